"""One source read into canonical records: format recognised, stage checked, every row validated."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from moeforge.config.data import DataSource
from moeforge.data.bad_row import BadRow
from moeforge.data.formats import EXPECTED_KEYS, FORMAT_STAGE, Stage, detect_format, to_record
from moeforge.data.messages import describe_keys, type_name
from moeforge.data.readers import RawRow, read_rows
from moeforge.errors import MoeforgeError

KEPT_MESSAGES = 5
RECIPE_HINT = "fix the row or set data.skip_bad_rows: true"

_STAGE_NEEDS = {
    "pt": "plain text (a .txt file or rows with 'text')",
    "sft": "prompt/completion, alpaca, ShareGPT or messages rows",
    "dpo": "prompt/chosen/rejected rows",
}


@dataclass
class LoadedSource:
    path: Path | str
    """The file, or ``builtin:NAME`` for a built-in dataset."""
    format: str
    stage: Stage
    records: list[dict[str, Any]]
    bad_rows: int = 0
    bad_messages: list[str] = field(default_factory=list)
    """The first few bad rows' messages, each starting with the row's location."""


def load_source(source: DataSource, *, stage: Stage | None = None, skip_bad_rows: bool = False, hint: str = RECIPE_HINT) -> LoadedSource:
    """Read ``source`` into canonical records for ``stage`` (None: the stage its format implies).

    A bad row stops with a :class:`MoeforgeError` that names its location and ends with ``hint``, unless
    ``skip_bad_rows``, in which case it is counted and the first few messages are kept.
    """
    rows = read_rows(source.path, source.format, source.columns, source.split)
    fmt, head = _format(source, rows)
    how = "set by format:" if source.format == fmt else "detected"
    if stage is not None and FORMAT_STAGE[fmt] != stage:
        raise MoeforgeError(
            f"{source.path}: format {fmt} ({how}) holds {FORMAT_STAGE[fmt]} data, but the stage is {stage}, "
            f"which needs {_STAGE_NEEDS[stage]}"
        )
    loaded = LoadedSource(source.path, fmt, FORMAT_STAGE[fmt], [])
    for row in chain(head, rows):
        try:
            if isinstance(row.value, BadRow):
                raise row.value
            loaded.records.append(to_record(fmt, row.value))
        except BadRow as problem:
            message = f"{row.where}: {problem}"
            if not skip_bad_rows:
                raise MoeforgeError(f"{message}; {hint}") from None
            loaded.bad_rows += 1
            if len(loaded.bad_messages) < KEPT_MESSAGES:
                loaded.bad_messages.append(message)
    return loaded


def _format(source: DataSource, rows: Iterator[RawRow]) -> tuple[str, list[RawRow]]:
    """The source's row format, and the rows read to find it (they still need checking)."""
    if source.format in FORMAT_STAGE:
        return source.format, []
    head: list[RawRow] = []
    for row in rows:
        head.append(row)
        fmt = detect_format(row.value)
        if fmt is not None:
            return fmt, head
    if not head:
        raise MoeforgeError(f"{source.path}: no rows; add data or remove the file from the list")
    first = next((row for row in head if isinstance(row.value, dict)), None)
    if first is None:
        value = head[0].value
        problem = value if isinstance(value, BadRow) else f"the row is {type_name(value)}, not an object"
        raise MoeforgeError(f"{head[0].where}: {problem}; no row of the file could be read")
    raise MoeforgeError(
        f"{first.where}: cannot tell the format from the row keys ({describe_keys(first.value)}); expected "
        f"{EXPECTED_KEYS}: rename the keys, map them with columns:, or set format: (docs/data.md)"
    )
