"""Each kind of malformed row is named by file and line (or index) and key; skip_bad_rows counts them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moeforge.config.data import DataSource, DataSpec
from moeforge.data import build_datasets
from moeforge.data.source import load_source
from moeforge.errors import MoeforgeError
from tests.data.files import assistant, records, user, write_json, write_jsonl

GOOD = {"prompt": "p", "completion": "c"}
HINT = "; fix the row or set data.skip_bad_rows: true"


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"prompt": "p", "answer": "a"}, "missing key 'completion' (row keys: prompt, answer)"),
        ({"prompt": "p", "completion": 3}, "'completion' must be a string, got a number"),
        ({"prompt": "  ", "completion": "c"}, "'prompt' is empty"),
        ({"prompt": "p", "completion": None}, "'completion' must be a string, got null"),
        (
            {"prompt": [{"role": "bot", "content": "x"}], "completion": "c"},
            "prompt[0].role is 'bot', expected one of system, user, assistant",
        ),
        ({"prompt": [], "completion": "c"}, "'prompt' is an empty list"),
        (
            {"prompt": "p", "completion": [*assistant("a"), *assistant("b")]},
            "'completion' must be one assistant message (or a string), got 2 messages",
        ),
        ({"prompt": "p", "completion": user("c")}, "'completion' must be an assistant message, got a user message"),
        (
            {"prompt": [{"role": ["user"], "content": "x"}], "completion": "c"},
            "prompt[0].role is ['user'], expected one of",
        ),
        (["not", "an", "object"], "the row is a list, not an object with keys like"),
    ],
)
def test_bad_prompt_completion_row(tmp_path: Path, bad: object, problem: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(MoeforgeError) as caught:
        records(path, "sft")
    assert str(caught.value).startswith(f"{path}:3: {problem}")
    assert str(caught.value).endswith(HINT)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"messages": [*user("u")]}, "'messages' has no assistant message to learn from"),
        (
            {"messages": [*assistant("a"), *user("u")]},
            "'messages' starts with the assistant reply, so nothing prompts it",
        ),
        ({"messages": [{"role": "user"}, *assistant("a")]}, "messages[0].content must be a string, got null"),
        ({"messages": "hello"}, "'messages' must be a list of messages, got a string"),
        ({"messages": ["hello"]}, "messages[0] must be an object with 'role' and 'content', got a string"),
    ],
)
def test_bad_messages_row(tmp_path: Path, bad: dict, problem: str) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [*user("u"), *assistant("a")]}, bad])
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}:2: {problem}")):
        records(path, "sft")


def test_sharegpt_unknown_speaker(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "h"}, {"from": "bot", "value": "b"}]}
    path = write_jsonl(tmp_path / "sg.jsonl", [row])
    expected = "conversations[1].from is 'bot', expected one of human, user, gpt, assistant, system"
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}:1: {expected}")):
        records(path, "sft")


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"prompt": "p", "chosen": "c"}, "missing key 'rejected' (row keys: prompt, chosen)"),
        ({"chosen": "c", "rejected": "r"}, "missing key 'prompt' (row keys: chosen, rejected)"),
        ({"prompt": "p", "chosen": user("c"), "rejected": "r"}, "'chosen' must end with an assistant message"),
        (
            {"prompt": "p", "chosen": [*user("other"), *assistant("c")], "rejected": "r"},
            "'chosen' repeats a conversation that differs from 'prompt'",
        ),
    ],
)
def test_bad_preference_row(tmp_path: Path, bad: dict, problem: str) -> None:
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_json(tmp_path / "prefs.json", [good, bad])
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}[1]: {problem}")):
        records(path, "dpo")


def test_bad_alpaca_input(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "input": 5, "output": "o"}])
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}:1: 'input' must be a string, got a number")):
        records(path, "sft")


def test_invalid_json_line_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "no end\n{"text": "fine"}\n')
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}:3: not valid JSON (Unterminated string")):
        records(path, "pt")
    loaded = load_source(DataSource(path=path), skip_bad_rows=True)
    assert (len(loaded.records), loaded.bad_rows) == (2, 1)


def test_jsonl_lines_are_split_on_newlines_only(tmp_path: Path) -> None:
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "c"}) + "\n")
    assert records(path, "pt") == [{"text": "a\u2028b"}, {"text": "c"}]


def test_invalid_json_array_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}:3: not valid JSON (Expecting value")):
        records(path, "pt")


def test_skip_bad_rows_counts_and_keeps_first_messages(tmp_path: Path) -> None:
    rows = [GOOD] + [{"prompt": "p"}] * 7 + [GOOD]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    built = build_datasets(DataSpec(train=[str(path)], skip_bad_rows=True), "sft")
    assert len(built.train) == 2
    assert built.stats["bad_rows"] == 7
    assert built.stats["sources"][0]["bad_rows"] == 7
    assert built.stats["bad_row_messages"] == [f"{path}:{n}: missing key 'completion' (row keys: prompt)" for n in range(2, 7)]


def test_all_rows_bad_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": ""}])
    spec = DataSpec(train=[str(path)], skip_bad_rows=True)
    with pytest.raises(MoeforgeError, match=re.escape(f"data.train: no usable rows in {path} (bad rows skipped: 1)")):
        build_datasets(spec, "sft")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}: no rows")):
        build_datasets(DataSpec(train=[str(path)]), "sft")


def test_empty_text_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}: 'text' is empty")):
        build_datasets(DataSpec(train=[str(path)]), "pt")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MoeforgeError, match="does not exist"):
        build_datasets(DataSpec(train=[str(tmp_path / "nope.jsonl")]), "pt")


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(MoeforgeError, match="cannot tell how to read a .parquet file"):
        records(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MoeforgeError, match="not UTF-8 text"):
        records(path)
