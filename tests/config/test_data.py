"""The data: section's validation: shapes and impossible combinations fail before any file is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from moeforge.config.data import DataSource, DataSpec, make_source
from moeforge.errors import MoeforgeError


def test_single_path_or_mapping_becomes_a_list() -> None:
    assert DataSpec(train="a.jsonl").train == [DataSource(path=Path("a.jsonl"))]
    assert DataSpec(train={"path": "a.jsonl", "weight": 2}).train == [DataSource(path=Path("a.jsonl"), weight=2.0)]
    assert DataSpec(train=["a.jsonl", {"path": "b.jsonl"}], eval="c.jsonl").eval == [DataSource(path=Path("c.jsonl"))]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": "a.jsonl", "eval": "b.jsonl", "eval_ratio": 0.1}, "set either eval (files) or eval_ratio"),
        ({"train": "books.csv"}, "books.csv is CSV, which needs columns"),
        ({"train": {"path": "b.txt", "format": "csv"}}, "b.txt is CSV, which needs columns"),
        ({"train": {"path": "b.csv", "columns": {"body": "text"}}}, "unknown field 'body'"),
        ({"train": "a.jsonl", "shuffle": True}, "Extra inputs are not permitted"),
        ({"train": {"path": "a.jsonl", "wieght": 2}}, "Extra inputs are not permitted"),
        ({"train": {"path": "a.jsonl", "weight": 0}}, "greater than 0"),
        ({"train": "a.jsonl", "eval_ratio": 1.0}, "less than 1"),
        ({"train": "a.jsonl", "max_length": 4}, "greater than or equal to 8"),
        ({"train": {"path": "a.jsonl", "format": "parquet"}}, "Input should be 'auto'"),
        ({}, "train: give at least one data file"),
        ({"train": "a.jsonl", "builtin": "sft-demo"}, "set either builtin (sft-demo) or train files"),
        ({"train": "a.jsonl", "eval": []}, "eval: give at least one file"),
    ],
)
def test_invalid_spec(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataSpec.model_validate(data)


def test_builtin_needs_no_files() -> None:
    spec = DataSpec(builtin="dpo-demo", eval_ratio=0.1)
    assert (spec.train, spec.max_length, spec.completion_only_loss) == ([], 512, True)


def test_make_source_reports_a_one_line_error() -> None:
    with pytest.raises(MoeforgeError, match=r"^books.csv is CSV, which needs columns"):
        make_source(path="books.csv")
    with pytest.raises(MoeforgeError, match=r"^b.csv: columns: unknown field 'body'"):
        make_source(path="b.csv", columns={"body": "text"})
