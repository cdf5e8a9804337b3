"""``build_datasets``: a recipe's ``data:`` section in, train and eval ``datasets.Dataset`` out."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeforge.config.data import Builtin, DataSource, DataSpec
from moeforge.data.builtin import BUILTIN_STAGE, builtin_records
from moeforge.data.formats import Stage
from moeforge.data.mixing import hold_out_each, mix, mix_counts
from moeforge.data.source import KEPT_MESSAGES, LoadedSource, load_source
from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class BuiltData:
    train: Dataset
    eval: Dataset | None
    stats: dict[str, Any]
    """Per source: path, format, rows, bad_rows, weight, mixed_rows (its rows in the train mix); overall:
    stage, train_rows, eval_rows, bad_rows, bad_row_messages (the first few); eval_sources when given."""


def _load_all(sources: list[DataSource], spec: DataSpec, stage: Stage, key: str) -> list[LoadedSource]:
    loaded = [load_source(source, stage=stage, skip_bad_rows=spec.skip_bad_rows) for source in sources]
    for item in loaded:
        if not item.records:
            skipped = f" (bad rows skipped: {item.bad_rows})" if item.bad_rows else ""
            raise MoeforgeError(f"data.{key}: no usable rows in {item.path}{skipped}; fix the file or remove it")
    return loaded


def _builtin(name: Builtin, stage: Stage) -> LoadedSource:
    if BUILTIN_STAGE[name] != stage:
        wanted = next(n for n, s in BUILTIN_STAGE.items() if s == stage)
        raise MoeforgeError(f"data.builtin: {name} is {BUILTIN_STAGE[name]} data but the stage is {stage}; use {wanted}")
    return LoadedSource(path=f"builtin:{name}", format="builtin", stage=stage, records=builtin_records(name))


def _source_stats(item: LoadedSource) -> dict[str, Any]:
    return {"path": str(item.path), "format": item.format, "rows": len(item.records), "bad_rows": item.bad_rows}


def build_datasets(spec: DataSpec, stage: Stage) -> BuiltData:
    """Read, check, mix and split the data of ``spec`` into canonical records for ``stage``.

    Train sources are mixed by weight (:func:`moeforge.data.mixing.mix`) and shuffled with
    ``spec.mix_seed``. Eval rows come from ``spec.eval`` files, else from ``eval_ratio`` of every train
    source (held out before mixing), else there are none. ``max_rows`` caps each of train and eval.
    """
    from datasets import Dataset

    rng = random.Random(spec.mix_seed)
    if spec.builtin is not None:
        train_sources, weights = [_builtin(spec.builtin, stage)], [1.0]
    else:
        train_sources, weights = _load_all(spec.train, spec, stage, "train"), [s.weight for s in spec.train]
    parts = [item.records for item in train_sources]
    eval_sources = _load_all(spec.eval, spec, stage, "eval") if spec.eval else []
    eval_rows = [record for item in eval_sources for record in item.records]
    if spec.eval_ratio > 0:
        parts, eval_rows = hold_out_each(parts, spec.eval_ratio, rng)
    train_rows = mix(parts, weights, rng)[: spec.max_rows]
    eval_rows = eval_rows[: spec.max_rows]

    counts = mix_counts([len(p) for p in parts], weights)
    sources = [_source_stats(item) | {"weight": w, "mixed_rows": n} for item, w, n in zip(train_sources, weights, counts, strict=True)]
    every = train_sources + eval_sources
    stats: dict[str, Any] = {
        "stage": stage,
        "sources": sources,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "bad_rows": sum(item.bad_rows for item in every),
        "bad_row_messages": [m for item in every for m in item.bad_messages][:KEPT_MESSAGES],
    }
    if eval_sources:
        stats["eval_sources"] = [_source_stats(item) for item in eval_sources]
    return BuiltData(Dataset.from_list(train_rows), Dataset.from_list(eval_rows) if eval_rows else None, stats)
