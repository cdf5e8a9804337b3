"""convert_file writes portable records that read back as the same canonical records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moeforge.data import convert_file
from moeforge.data.portable import portable_records
from moeforge.errors import MoeforgeError
from tests.data.files import assistant, records, user, write_csv, write_json, write_jsonl

SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {
        "conversations": [
            {"from": "system", "value": "Be terse."},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ]
    },
]
ALPACA = [{"instruction": "Add.", "input": "2 and 2", "output": "4"}, {"instruction": "Greet.", "output": "Hi!"}]
PREFERENCES = [
    {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
    {"prompt": "R?", "chosen": "up", "rejected": "down"},
]


@pytest.mark.parametrize(
    ("rows", "stage", "suffix"),
    [
        (ALPACA, "sft", ".jsonl"),
        (SHAREGPT, "sft", ".json"),
        (PREFERENCES, "dpo", ".jsonl"),
        ([{"text": "a"}, {"text": "b"}], "pt", ".json"),
    ],
)
def test_round_trip(tmp_path: Path, rows: list[dict], stage: str, suffix: str) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    dst = tmp_path / f"dst{suffix}"
    summary = convert_file(src, dst)
    assert (summary["rows"], summary["train_rows"], summary["stage"]) == (2, 2, stage)
    assert records(dst, stage) == records(src, stage)


def test_simple_shapes(tmp_path: Path) -> None:
    convert_file(write_jsonl(tmp_path / "a.jsonl", ALPACA), tmp_path / "sft.jsonl")
    assert [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()] == [
        {"prompt": "Add.\n\n2 and 2", "completion": "4"},
        {"prompt": "Greet.", "completion": "Hi!"},
    ]
    convert_file(write_jsonl(tmp_path / "p.jsonl", PREFERENCES), tmp_path / "dpo.json")
    assert json.loads((tmp_path / "dpo.json").read_text()) == PREFERENCES


def test_one_multi_turn_row_makes_every_row_messages(tmp_path: Path) -> None:
    convert_file(write_jsonl(tmp_path / "s.jsonl", SHAREGPT), tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == [
        {"messages": [*user("Hi"), *assistant("Hello")]},
        {"messages": [{"role": "system", "content": "Be terse."}, *user("2+2?"), *assistant("4")]},
    ]


def test_multi_turn_preferences_stay_lists() -> None:
    canonical = [{"prompt": [*user("a"), *assistant("b"), *user("c")], "chosen": assistant("d"), "rejected": assistant("e")}]
    assert portable_records(canonical, "dpo") == canonical


def test_csv_to_json_with_split(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "qa.csv", ["q", "a"], [[f"q{i}", f"a{i}"] for i in range(10)])
    summary = convert_file(
        src,
        tmp_path / "train.json",
        columns={"prompt": "q", "completion": "a"},
        eval_ratio=0.3,
        eval_dst=tmp_path / "eval.jsonl",
        seed=5,
    )
    assert (summary["train_rows"], summary["eval_rows"]) == (7, 3)
    train = json.loads((tmp_path / "train.json").read_text())
    held = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in train + held) == sorted(f"q{i}" for i in range(10))
    assert train == sorted(train, key=lambda r: int(r["prompt"][1:]))  # input order kept
    assert records(tmp_path / "eval.jsonl", "sft")[0]["completion"] == assistant(held[0]["completion"])


def test_bad_rows_stop_or_are_skipped(tmp_path: Path) -> None:
    src = write_json(tmp_path / "seed.json", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}])
    dst = tmp_path / "out.jsonl"
    with pytest.raises(MoeforgeError, match=re.escape(f"{src}[1]: 'completion' is empty; fix the row or skip bad rows")):
        convert_file(src, dst)
    assert not dst.exists()
    assert convert_file(src, dst, skip_bad_rows=True)["bad_rows"] == 1
    assert len(dst.read_text().splitlines()) == 1


def test_output_suffix_must_say_the_format(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(MoeforgeError, match="cannot infer the output format from .txt"):
        convert_file(src, tmp_path / "out.txt")
    convert_file(src, tmp_path / "out.txt", out_format="jsonl")
    assert (tmp_path / "out.txt").read_text() == '{"text": "a"}\n'
