"""Mixing sources by weight and holding out evaluation rows, reproducibly from one seed."""

from __future__ import annotations

import random
from typing import Any, TypeVar

from moeforge.errors import MoeforgeError

Row = TypeVar("Row")


def _round(x: float) -> int:
    """Half up (Python's round() sends 0.5 and 2.5 to the even neighbour)."""
    return int(x + 0.5)


def mix_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows each source contributes: the mix keeps the total rows, shared in proportion to the weights."""
    total, weight_sum = sum(sizes), sum(weights)
    return [_round(weight / weight_sum * total) for weight in weights]


def resample(rows: list[Row], count: int, rng: random.Random) -> list[Row]:
    """``count`` rows of ``rows``: a random subset when down-sampling; when up-sampling, every row
    ``count // len(rows)`` times plus a random subset for the rest, so no row repeats more than it must."""
    whole, rest = divmod(count, len(rows))
    return rows * whole + rng.sample(rows, rest)


def mix(parts: list[list[Row]], weights: list[float], rng: random.Random) -> list[Row]:
    """The sources resampled to their weighted share (see :func:`mix_counts`), shuffled together."""
    mixed: list[Row] = []
    for rows, count in zip(parts, mix_counts([len(rows) for rows in parts], weights), strict=True):
        mixed.extend(resample(rows, count, rng))
    rng.shuffle(mixed)
    return mixed


def hold_out(rows: list[Row], ratio: float, rng: random.Random) -> tuple[list[Row], list[Row]]:
    """(train, eval): a random ``ratio`` of ``rows`` for eval, at least one row left for train; both keep
    the rows' order."""
    count = min(len(rows) - 1, _round(ratio * len(rows)))
    chosen = set(rng.sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


def hold_out_each(parts: list[list[Any]], ratio: float, rng: random.Random) -> tuple[list[list[Any]], list[Any]]:
    """Hold out ``ratio`` of every source *before* mixing, so an up-sampled row never lands in both sets."""
    trains, evals = [], []
    for rows in parts:
        train, held = hold_out(rows, ratio, rng)
        trains.append(train)
        evals.extend(held)
    if not evals:
        total = sum(len(rows) for rows in parts)
        raise MoeforgeError(f"data.eval_ratio: {ratio} of {total} rows is less than one row; raise eval_ratio or add rows")
    rng.shuffle(evals)
    return trains, evals
