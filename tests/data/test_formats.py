"""Every input format becomes the exact canonical record the trainers take."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeforge.config.data import DataSource
from moeforge.data.source import load_source
from moeforge.errors import MoeforgeError
from tests.data.files import assistant, records, sft, user, write_json, write_jsonl


def test_text_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n")
    assert records(path, "pt") == [{"text": "First paragraph.\n\nSecond paragraph.\n"}]


def test_text_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two", "meta": 1}])
    assert records(path, "pt") == [{"text": "one"}, {"text": "two"}]


def test_prompt_completion_json_array(tmp_path: Path) -> None:
    path = write_json(tmp_path / "seed.json", [{"prompt": "Hi?", "completion": "Hello."}])
    assert records(path, "sft") == [sft("Hi?", "Hello.")]


def test_prompt_completion_as_trl_messages(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "system", "content": "Be brief."}, *user("Hi?")], "completion": assistant("Hello.")}
    path = write_jsonl(tmp_path / "pc.jsonl", [row])
    assert records(path, "sft") == [row]


def test_alpaca_with_and_without_input(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye!"},
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    assert records(path, "sft") == [sft("Translate.\n\nchat", "cat"), sft("Say hi.", "Hi!"), sft("Say bye.", "Bye!")]


def test_sharegpt_multi_turn_keeps_system_and_splits_at_last_reply(tmp_path: Path) -> None:
    conversation = [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
        {"from": "user", "value": "3+3?"},
        {"from": "assistant", "value": "6"},
    ]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": conversation}])
    assert records(path, "sft") == [
        {
            "prompt": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"},
            ],
            "completion": assistant("6"),
        }
    ]


def test_messages_drop_turns_after_the_last_reply(tmp_path: Path) -> None:
    messages = [*user("a"), *assistant("b"), *user("c")]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    assert records(path, "sft") == [sft("a", "b")]


def test_preference_strings_and_lists(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": user("Q?"), "chosen": assistant("good"), "rejected": assistant("bad")},
        {"prompt": "Q?", "chosen": [*user("Q?"), *assistant("good")], "rejected": [*user("Q?"), *assistant("bad")]},
        {"chosen": [*user("Q?"), *assistant("good")], "rejected": [*user("Q?"), *assistant("bad")]},
    ]
    path = write_jsonl(tmp_path / "dpo.jsonl", rows)
    expected = {"prompt": user("Q?"), "chosen": assistant("good"), "rejected": assistant("bad")}
    assert records(path, "dpo") == [expected] * 4


@pytest.mark.parametrize(
    ("row", "fmt", "stage"),
    [
        ({"text": "x"}, "text", "pt"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion", "sft"),
        ({"instruction": "i", "output": "o", "text": "also here"}, "alpaca", "sft"),
        ({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}, "sharegpt", "sft"),
        ({"messages": [*user("u"), *assistant("a")]}, "messages", "sft"),
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference", "dpo"),
    ],
)
def test_auto_detection(tmp_path: Path, row: dict, fmt: str, stage: str) -> None:
    loaded = load_source(DataSource(path=write_jsonl(tmp_path / "d.jsonl", [row])))
    assert (loaded.format, loaded.stage, len(loaded.records)) == (fmt, stage, 1)


def test_detection_skips_unrecognisable_leading_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"oops": 1}, {"prompt": "p", "completion": "c"}])
    loaded = load_source(DataSource(path=path), skip_bad_rows=True)
    assert (loaded.format, loaded.bad_rows) == ("prompt_completion", 1)
    assert loaded.bad_messages == [f"{path}:1: missing key 'prompt' (row keys: oops)"]


def test_unrecognisable_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        MoeforgeError,
        match=rf"^{re.escape(str(path))}:1: cannot tell the format from the row keys \(question, answer\)",
    ):
        records(path)


def test_stage_mismatch_names_file_and_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(
        MoeforgeError,
        match=rf"^{re.escape(str(path))}: format alpaca \(detected\) holds sft data, but the stage is dpo",
    ):
        records(path, "dpo")


def test_forced_format_mismatch(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(MoeforgeError, match=r"format preference \(set by format:\) holds dpo data, but the stage is sft"):
        records(path, "sft", format="preference")


def test_forced_format_checks_rows_against_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(MoeforgeError, match=rf"^{re.escape(str(path))}:1: missing key 'prompt' \(row keys: instruction, output\)"):
        records(path, "sft", format="prompt_completion")


def test_json_file_holding_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "really-jsonl.json", [{"text": "a"}, {"text": "b"}])
    assert records(path, "pt") == [{"text": "a"}, {"text": "b"}]


def test_columns_rename_json_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "id": 3}])
    assert records(path, "sft", columns={"prompt": "question", "completion": "answer"}) == [sft("q", "a")]
