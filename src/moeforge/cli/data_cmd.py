"""``moeforge data check|convert``: look at a data file before training on it, or rewrite it portably."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moeforge.cli.choices import field_choices
from moeforge.config.data import DataSource
from moeforge.data.formats import STAGES


def parse_columns(text: str) -> dict[str, str]:
    """``text=body,title=name`` -> ``{"text": "body", "title": "name"}`` (moeforge field = your column)."""
    columns = {}
    for item in text.split(","):
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not field=column (e.g. --columns prompt=question,completion=answer)")
        columns[field.strip()] = column.strip()
    return columns


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGES, help="the stage the rows are for (default: implied by the format)")
    parser.add_argument("--format", default="auto", choices=field_choices(DataSource, "format"), help="row format (default: auto-detect)")
    parser.add_argument(
        "--columns",
        type=parse_columns,
        help="map moeforge fields to your columns: text=body or prompt=q,completion=a (required for CSV)",
    )
    parser.add_argument("--split", help="split of a save_to_disk DatasetDict directory (default: train)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="check or convert training data files",
        description="Check a training data file row by row, or convert it to portable JSON / JSONL.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    check = actions.add_parser(
        "check",
        help="report a file's format, rows, bad rows and token lengths (exit 2 when a row is bad)",
        description="Read every row of FILE, report what it holds, and exit 2 if any row is bad.",
    )
    check.add_argument("file", help="a .jsonl / .json / .csv / .txt file or a save_to_disk directory")
    _add_source_arguments(check)
    check.add_argument("--tokenizer", help="model dir, hub id, .gguf or 'default': also report token lengths")
    check.set_defaults(func=run_check)

    convert = actions.add_parser(
        "convert",
        help="rewrite a data file as portable JSON / JSONL, optionally holding out an eval split",
        description="Convert SRC (any supported format) to DST (.json or .jsonl) in the plainest record shape.",
    )
    convert.add_argument("src")
    convert.add_argument("dst", help="output file, .json (array) or .jsonl (one row per line)")
    _add_source_arguments(convert)
    convert.add_argument("--eval-ratio", type=float, default=0.0, help="share of the rows to write to --eval-output")
    convert.add_argument("--eval-output", help="where the held-out eval rows go (.json or .jsonl)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the eval split")
    convert.add_argument("--skip-bad-rows", action="store_true", help="drop bad rows instead of stopping at the first")
    convert.set_defaults(func=run_convert)


def _load_tokenizer(source: str):
    from moeforge.errors import MoeforgeError
    from moeforge.io.loading import load_tokenizer, resolve_checkpoint

    if source == "default":
        from moeforge.io.embedded import default_model_dir

        directory = default_model_dir()
    else:
        directory = resolve_checkpoint(source)
    tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        raise MoeforgeError(f"--tokenizer {source}: {directory} has no tokenizer files")
    return tokenizer


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _number(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.1f}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The human summary ``data check`` prints."""
    lines = [f"{report['path']}: {report['format']} rows for {report['stage']}", f"rows: {report['rows']}"]
    if report["bad_rows"]:
        lines.append(f"bad rows: {report['bad_rows']} (first: {report['first_bad_row']})")
    else:
        lines.append("bad rows: 0")
    if report.get("tokens"):
        stats = "  ".join(f"{key} {_number(value)}" for key, value in report["tokens"].items())
        lines.append(f"tokens per row: {stats}")
    return lines


def run_check(args: argparse.Namespace) -> int:
    from moeforge.data.check import check_file

    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    report = check_file(args.file, stage=args.stage, fmt=args.format, columns=args.columns, tokenizer=tokenizer, split=args.split)
    print("\n".join(summary_lines(report)))
    if report["bad_rows"]:
        print(f"moeforge data check: {report['first_bad_row']} ({_count(report['bad_rows'], 'bad row')})", file=sys.stderr)
        return 2
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from moeforge.data.portable import convert_file

    result = convert_file(
        args.src,
        args.dst,
        fmt=args.format,
        columns=args.columns,
        eval_ratio=args.eval_ratio,
        eval_dst=args.eval_output,
        seed=args.seed,
        stage=args.stage,
        split=args.split,
        skip_bad_rows=args.skip_bad_rows,
    )
    skipped = f", skipped {_count(result['bad_rows'], 'bad row')}" if result["bad_rows"] else ""
    print(f"read {args.src}: {_count(result['rows'], result['format'] + ' row')} for {result['stage']}{skipped}")
    print(f"wrote {args.dst} ({_count(result['train_rows'], 'row')})")
    if args.eval_output:
        print(f"wrote {args.eval_output} ({_count(result['eval_rows'], 'row')})")
    return 0
