"""Interleaved timing shared by the layer benchmarks: every case runs once per round, rounds alternate cases,
so slow drift of a shared machine falls on every case alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(steps: dict[str, Callable[[], None]], reps: int, inner: int = 1) -> dict[str, tuple[float, float]]:
    """(median, minimum) seconds per call of each step, rounds interleaved across steps after one warm-up
    round. The minimum is the least-disturbed round: on cores shared with other work, a ratio of minima that
    agrees with the ratio of medians says the interference did not decide the ratio."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                step()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}
