"""Built-in demo datasets: generated in code, deterministic, canonical and correct."""

from __future__ import annotations

import re

import pytest

from moeforge.data import builtin_dataset
from moeforge.data.builtin import builtin_records
from moeforge.errors import MoeforgeError


@pytest.mark.parametrize(
    ("name", "columns", "low", "high"),
    [
        ("pt-demo", ["text"], 20, 1000),
        ("sft-demo", ["prompt", "completion"], 350, 450),
        ("dpo-demo", ["prompt", "chosen", "rejected"], 150, 250),
    ],
)
def test_shape_and_determinism(name: str, columns: list[str], low: int, high: int) -> None:
    dataset = builtin_dataset(name)
    assert dataset.column_names == columns
    assert low <= len(dataset) <= high
    assert dataset.to_list() == builtin_records(name)  # a second generation gives the same rows


def test_sft_answers_are_correct() -> None:
    rows = builtin_records("sft-demo")
    assert len({r["prompt"][0]["content"] for r in rows}) == len(rows)
    for row in rows:
        question, answer = row["prompt"][0]["content"], row["completion"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        if match := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question):
            a, op, b = int(match[1]), match[2], int(match[3])
            assert answer == f"{a} {op} {b} = {eval(f'{a} {op} {b}')}."
        if match := re.fullmatch(r"Reverse the word '(\w+)'\.", question):
            assert answer == f"The reversed word is '{match[1][::-1]}'."
        if match := re.fullmatch(r"Spell '(\w+)' letter by letter\.", question):
            assert answer == "-".join(match[1])
    assert {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "completion": [{"role": "assistant", "content": "The capital of France is Paris."}],
    } in rows


def test_dpo_rejects_a_wrong_answer() -> None:
    rows = builtin_records("dpo-demo")
    assert all(r["chosen"] != r["rejected"] for r in rows)
    answers = {r["prompt"][0]["content"]: r["completion"] for r in builtin_records("sft-demo")}
    assert all(answers[r["prompt"][0]["content"]] == r["chosen"] for r in rows)


def test_unknown_builtin() -> None:
    with pytest.raises(MoeforgeError, match="unknown dataset 'chat-demo'"):
        builtin_dataset("chat-demo")
