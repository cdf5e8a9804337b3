"""Raw rows out of a file, each tagged with where it came from.

A reader only parses: it yields every row as ``RawRow(where, value)`` with ``where`` the location a
user can open (``train.jsonl:17``, ``train.json[17]`` with a 0-based index, ``books.csv:5`` counting
the header as line 1). A row that cannot even be parsed (an invalid JSON line, a CSV row with the wrong
number of fields) still comes out, carrying a :class:`BadRow` as its value, so the loader can skip it
like any other bad row. Problems with the file as a whole raise :class:`MoeforgeError`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.data.bad_row import BadRow
from moeforge.errors import MoeforgeError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# books and articles in a CSV easily exceed the csv module's default 128 KiB per field
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class RawRow:
    where: str
    value: Any
    """The parsed row (usually a dict), or the :class:`BadRow` that stopped it from parsing."""


def read_rows(path: Path, fmt: str = "auto", columns: dict[str, str] | None = None, split: str | None = None) -> Iterator[RawRow]:
    """Every row of ``path``, read as a plain-text document, CSV, JSON, JSONL or HF dataset directory."""
    if path.is_dir():
        rows = _hf_rows(path, split)
    elif not path.is_file():
        raise MoeforgeError(f"{path} does not exist; check the path (relative paths start in the current directory)")
    elif fmt == "hf":
        raise MoeforgeError(f"{path}: format hf needs a directory written by datasets' save_to_disk")
    elif fmt == "csv" or path.suffix.lower() == ".csv":
        return _csv_rows(path, columns or {})
    elif path.suffix.lower() == ".json":
        rows = _json_rows(path)
    elif path.suffix.lower() in JSONL_SUFFIXES or fmt not in ("auto", "text"):
        rows = _jsonl_rows(path, _read_text(path))
    elif path.suffix.lower() in TEXT_SUFFIXES or fmt == "text":
        rows = iter([RawRow(str(path), {"text": _read_text(path)})])
    else:
        raise MoeforgeError(
            f"{path}: cannot tell how to read a {path.suffix or 'suffix-less'} file; use .jsonl, .json, .csv, .txt "
            "or a save_to_disk directory, or set format:"
        )
    return rows if columns is None else (RawRow(row.where, _mapped(row.value, columns)) for row in rows)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise MoeforgeError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); re-save it as UTF-8") from None


def _mapped(row: Any, columns: dict[str, str]) -> Any:
    """The row as moeforge fields: exactly the mapped ones, renamed from the user's columns."""
    if not isinstance(row, dict):
        return row
    for field, column in columns.items():
        if column not in row:
            keys = ", ".join(map(str, row)) or "none"
            return BadRow(f"missing column {column!r} (mapped to {field!r}; row keys: {keys})")
    return {field: row[column] for field, column in columns.items()}


def _jsonl_rows(path: Path, text: str) -> Iterator[RawRow]:
    # split on newlines only: str.splitlines() also breaks at U+2028 and friends, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value: Any = json.loads(line)
        except json.JSONDecodeError as err:
            value = BadRow(f"not valid JSON ({err.msg} at column {err.colno})")
        yield RawRow(f"{path}:{number}", value)


def _json_rows(path: Path) -> Iterator[RawRow]:
    """A JSON array of rows. Many ``.json`` files are really JSONL; those are read as JSONL."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            return _jsonl_rows(path, text)
        raise MoeforgeError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the file") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise MoeforgeError(f"{path}: the top level must be a JSON array of rows (or use JSONL: one object per line)")
    return (RawRow(f"{path}[{i}]", row) for i, row in enumerate(data))


def _csv_rows(path: Path, columns: dict[str, str]) -> Iterator[RawRow]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise MoeforgeError(f"{path}: empty file; a CSV needs a header row naming its columns")
            index = _column_index(path, header, columns)
            next_line = reader.line_num + 1
            for cells in reader:
                line, next_line = next_line, reader.line_num + 1
                if not cells:  # a blank line
                    continue
                where = f"{path}:{line}"
                if len(cells) != len(header):
                    yield RawRow(where, BadRow(f"has {len(cells)} fields but the header has {len(header)}"))
                else:
                    yield RawRow(where, {field: cells[i] for field, i in index.items()})
    except csv.Error as err:
        raise MoeforgeError(f"{path}:{reader.line_num}: not valid CSV ({err}); fix the file") from None
    except UnicodeDecodeError as err:
        raise MoeforgeError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); re-save it as UTF-8") from None


def _column_index(path: Path, header: list[str], columns: dict[str, str]) -> dict[str, int]:
    for field, column in columns.items():
        if column not in header:
            raise MoeforgeError(f"{path}: column {column!r} (for field {field!r}) is not in the header ({', '.join(header)}); fix columns")
    return {field: header.index(column) for field, column in columns.items()}


def _hf_rows(path: Path, split: str | None) -> Iterator[RawRow]:
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MoeforgeError(f"{path}: not a dataset written by datasets' save_to_disk ({why})") from None
    if isinstance(loaded, DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise MoeforgeError(f"{path}: no split {name!r} (splits: {', '.join(loaded)}); set split: to one of them")
        loaded = loaded[name]
    elif split is not None:
        raise MoeforgeError(f"{path}: split {split!r} given but this dataset has no splits; remove split:")
    return (RawRow(f"{path}[{i}]", row) for i, row in enumerate(loaded))
