"""Weighted mixing, eval splits and eval files, all reproducible from the seed."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from moeforge.config.data import DataSpec
from moeforge.data import build_datasets
from moeforge.data.mixing import hold_out, mix_counts, resample
from moeforge.errors import MoeforgeError
from tests.data.files import write_jsonl


def _texts(tmp_path: Path, name: str, count: int) -> str:
    return str(write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name}-{i}"} for i in range(count)]))


def _source_of(text: str) -> str:
    return text.split("-")[0]


def test_weights_share_the_total(tmp_path: Path) -> None:
    spec = DataSpec(train=[{"path": _texts(tmp_path, "a", 100), "weight": 3}, {"path": _texts(tmp_path, "b", 100)}])
    built = build_datasets(spec, "pt")
    assert Counter(_source_of(t) for t in built.train["text"]) == {"a": 150, "b": 50}
    assert len(set(built.train["text"])) == 150  # 'a' up-sampled: each row once, half of them twice
    assert [s["mixed_rows"] for s in built.stats["sources"]] == [150, 50]
    assert built.eval is None


def test_upsampling_repeats_rows_evenly() -> None:
    picked = Counter(resample(list(range(10)), 25, random.Random(0)))
    assert sorted(picked.values()) == [2] * 5 + [3] * 5


def test_mix_counts_round_half_up() -> None:
    assert mix_counts([3, 2], [1.0, 1.0]) == [3, 3]
    assert mix_counts([10, 10, 10], [1.0, 1.0, 2.0]) == [8, 8, 15]


def test_mixing_is_deterministic_by_seed(tmp_path: Path) -> None:
    sources = [{"path": _texts(tmp_path, "a", 40), "weight": 2}, {"path": _texts(tmp_path, "b", 40)}]
    first = build_datasets(DataSpec(train=sources, mix_seed=1), "pt").train["text"]
    again = build_datasets(DataSpec(train=sources, mix_seed=1), "pt").train["text"]
    other = build_datasets(DataSpec(train=sources, mix_seed=2), "pt").train["text"]
    assert list(first) == list(again)
    assert list(first) != list(other)
    assert Counter(map(_source_of, first)) == Counter(map(_source_of, other)) == {"a": 53, "b": 27}


def test_eval_ratio_split_is_disjoint_and_sized(tmp_path: Path) -> None:
    spec = DataSpec(train=_texts(tmp_path, "a", 50), eval_ratio=0.2, mix_seed=3)
    built = build_datasets(spec, "pt")
    train, held = set(built.train["text"]), set(built.eval["text"])
    assert (len(built.train), len(built.eval)) == (40, 10)
    assert not train & held and len(train | held) == 50
    assert list(build_datasets(spec, "pt").eval["text"]) == list(built.eval["text"])


def test_eval_ratio_holds_out_before_upsampling(tmp_path: Path) -> None:
    spec = DataSpec(train=[{"path": _texts(tmp_path, "a", 20), "weight": 9}, _texts(tmp_path, "b", 20)], eval_ratio=0.25)
    built = build_datasets(spec, "pt")
    assert not set(built.train["text"]) & set(built.eval["text"])
    assert len(built.eval) == 10


def test_eval_ratio_below_one_row(tmp_path: Path) -> None:
    with pytest.raises(MoeforgeError, match="data.eval_ratio: 0.1 of 3 rows is less than one row"):
        build_datasets(DataSpec(train=_texts(tmp_path, "a", 3), eval_ratio=0.1), "pt")


def test_hold_out_keeps_order() -> None:
    train, held = hold_out(list(range(20)), 0.25, random.Random(0))
    assert train == sorted(train) and held == sorted(held) and len(held) == 5


def test_eval_sources(tmp_path: Path) -> None:
    spec = DataSpec(train=_texts(tmp_path, "a", 10), eval=[_texts(tmp_path, "e", 4), _texts(tmp_path, "f", 2)])
    built = build_datasets(spec, "pt")
    assert len(built.train) == 10
    assert list(built.eval["text"]) == ["e-0", "e-1", "e-2", "e-3", "f-0", "f-1"]
    assert [s["rows"] for s in built.stats["eval_sources"]] == [4, 2]


def test_max_rows_caps_train_and_eval(tmp_path: Path) -> None:
    built = build_datasets(DataSpec(train=_texts(tmp_path, "a", 100), eval_ratio=0.5, max_rows=7), "pt")
    assert (len(built.train), len(built.eval), built.stats["train_rows"]) == (7, 7, 7)


def test_stats_name_sources_and_formats(tmp_path: Path) -> None:
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}],
    )
    built = build_datasets(DataSpec(train=[str(chat)]), "sft")
    assert built.stats["sources"] == [{"path": str(chat), "format": "messages", "rows": 1, "bad_rows": 0, "weight": 1.0, "mixed_rows": 1}]
    json.dumps(built.stats)  # plain data, ready for a log or a report


def test_builtin_spec_and_stage_check() -> None:
    built = build_datasets(DataSpec(builtin="sft-demo", eval_ratio=0.1), "sft")
    assert (len(built.train), len(built.eval)) == (360, 40)
    with pytest.raises(MoeforgeError, match="data.builtin: sft-demo is sft data but the stage is dpo; use dpo-demo"):
        build_datasets(DataSpec(builtin="sft-demo"), "dpo")
