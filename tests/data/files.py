"""Writing small data files for the data-layer tests, and reading them back as canonical records."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from moeforge.config.data import DataSource
from moeforge.data.source import load_source


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def records(path: Path, stage: str | None = None, **source: Any) -> list[dict[str, Any]]:
    """The canonical records of one file, in file order."""
    return load_source(DataSource(path=path, **source), stage=stage).records


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft(prompt: str, completion: str) -> dict[str, Any]:
    return {"prompt": user(prompt), "completion": assistant(completion)}
