"""check_file's report and the ``moeforge data check|convert`` commands' output and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from moeforge.cli import data_cmd
from moeforge.data import check_file
from moeforge.errors import MoeforgeError
from tests.data.files import write_csv, write_jsonl
from tests.helpers import make_tiny_tokenizer, save_tiny_llama


def run(argv: list[str]) -> int:
    """Parse ``argv`` with the data subcommand alone, as the moeforge entry point would, and run it."""
    parser = argparse.ArgumentParser(prog="moeforge")
    data_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def chat_tokens(prompt: str, completion: str) -> int:
    """Tokens of a one-turn chat rendered by the tiny ChatML template (4 specials, role names, newlines)."""
    return 4 + len("user\n") + len(prompt) + 1 + len("assistant\n") + len(completion) + 1


def test_check_report_with_token_stats(tmp_path: Path) -> None:
    pairs = [("Hi?", "Hello."), ("2+2?", "4"), ("Name?", "Tiny.")] + [("q", "a")] * 17
    path = write_jsonl(tmp_path / "seed.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    report = check_file(path, tokenizer=make_tiny_tokenizer())
    lengths = sorted(chat_tokens(p, c) for p, c in pairs)
    assert {k: report[k] for k in ("format", "stage", "rows", "bad_rows", "first_bad_row")} == {
        "format": "prompt_completion",
        "stage": "sft",
        "rows": 20,
        "bad_rows": 0,
        "first_bad_row": None,
    }
    assert report["tokens"] == {
        "min": lengths[0],
        "mean": sum(lengths) / 20,
        "median": lengths[0],
        "p95": lengths[18],
        "max": lengths[-1],
    }


def test_check_pt_and_dpo_lengths(tmp_path: Path) -> None:
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert check_file(text, tokenizer=make_tiny_tokenizer())["tokens"]["max"] == 5
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no, never"}])
    assert check_file(prefs, tokenizer=make_tiny_tokenizer())["tokens"]["max"] == chat_tokens("q", "no, never")


def test_check_counts_bad_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "seed.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}, {"prompt": 1, "completion": "c"}])
    report = check_file(path, stage="sft")
    assert (report["rows"], report["bad_rows"]) == (1, 2)
    assert report["first_bad_row"] == f"{path}:2: missing key 'completion' (row keys: prompt)"


def test_cli_check_clean_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "seed.jsonl", [{"prompt": "Hi?", "completion": "Hello."}])
    model = save_tiny_llama(tmp_path / "tiny")
    assert run(["data", "check", str(path), "--tokenizer", str(model)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"{path}: prompt_completion rows for sft",
        "rows: 1",
        "bad rows: 0",
        "tokens per row: min 30  mean 30  median 30  p95 30  max 30",
    ]
    assert out.err == ""


def test_cli_check_bad_rows_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_csv(tmp_path / "books.csv", ["title", "body"], [["A", "text"], ["B", ""]])
    assert run(["data", "check", str(path), "--columns", "text=body", "--stage", "pt"]) == 2
    out = capsys.readouterr()
    first = f"{path}:3: 'text' is empty"
    assert f"bad rows: 1 (first: {first})" in out.out
    assert out.err == f"moeforge data check: {first} (1 bad row)\n"


def test_cli_check_file_errors_raise(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(MoeforgeError, match="format alpaca \\(detected\\) holds sft data, but the stage is pt"):
        run(["data", "check", str(path), "--stage", "pt"])
    with pytest.raises(MoeforgeError, match="which needs columns"):
        run(["data", "check", str(tmp_path / "x.csv")])


def test_cli_columns_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(["data", "check", "x.csv", "--columns", "text"])
    assert exited.value.code == 2
    assert "'text' is not field=column" in capsys.readouterr().err


def test_cli_convert_csv_with_eval_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    books = write_csv(tmp_path / "books.csv", ["title", "content"], [[f"T{i}", f"Book {i}."] for i in range(20)])
    train, held = tmp_path / "out" / "train.json", tmp_path / "out" / "eval.json"
    argv = [
        "data",
        "convert",
        str(books),
        str(train),
        "--columns",
        "text=content",
        "--eval-ratio",
        "0.1",
        "--eval-output",
        str(held),
    ]
    assert run(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"read {books}: 20 text rows for pt",
        f"wrote {train} (18 rows)",
        f"wrote {held} (2 rows)",
    ]
    train_rows, eval_rows = json.loads(train.read_text()), json.loads(held.read_text())
    assert len(train_rows) == 18 and len(eval_rows) == 2
    texts = [r["text"] for r in train_rows + eval_rows]
    assert sorted(texts) == sorted(f"Book {i}." for i in range(20))
    assert all(set(r) == {"text"} for r in train_rows + eval_rows)
    assert sorted(p.name for p in train.parent.iterdir()) == ["eval.json", "train.json"]  # no temporaries left


def test_cli_convert_needs_eval_output(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(MoeforgeError, match="^give both an eval ratio and an eval output, or neither$"):
        run(["data", "convert", str(path), str(tmp_path / "o.jsonl"), "--eval-ratio", "0.5"])
