"""``check_file``: what a data file holds and what is wrong with it, before any training starts."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from moeforge.config.data import make_source
from moeforge.data.formats import Stage
from moeforge.data.source import load_source
from moeforge.errors import MoeforgeError


def token_length(record: dict[str, Any], stage: Stage, tokenizer) -> int:
    """Tokens the trainer will see for ``record``: the plain text for pt; for sft and dpo the chat
    template rendered over prompt and reply (for dpo the longer of chosen and rejected)."""
    if stage == "pt":
        return len(tokenizer(record["text"], add_special_tokens=False, verbose=False)["input_ids"])
    replies = [record["completion"]] if stage == "sft" else [record["chosen"], record["rejected"]]
    return max(
        len(tokenizer.apply_chat_template(record["prompt"] + reply, tokenize=True, return_dict=True)["input_ids"]) for reply in replies
    )


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min / mean / median / p95 (nearest rank) / max of ``lengths`` (not empty)."""
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p95": ordered[math.ceil(0.95 * len(ordered)) - 1],
        "max": ordered[-1],
    }


def check_file(
    path: str | Path,
    *,
    stage: Stage | None = None,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    tokenizer=None,
    split: str | None = None,
) -> dict[str, Any]:
    """Read every row of ``path`` and report: path, format, stage, rows (good ones), bad_rows,
    first_bad_row (its message, or None), bad_row_messages (the first few), and with a tokenizer
    ``tokens`` (length stats of the good rows; None when there are none).

    A problem with the file as a whole (missing, unreadable, unknown format, wrong stage) raises
    :class:`MoeforgeError`; bad rows are counted, not raised.
    """
    source = make_source(path=path, format=fmt, columns=columns, split=split)
    loaded = load_source(source, stage=stage, skip_bad_rows=True)
    report: dict[str, Any] = {
        "path": str(path),
        "format": loaded.format,
        "stage": loaded.stage,
        "rows": len(loaded.records),
        "bad_rows": loaded.bad_rows,
        "first_bad_row": loaded.bad_messages[0] if loaded.bad_messages else None,
        "bad_row_messages": loaded.bad_messages,
    }
    if tokenizer is not None:
        if loaded.stage != "pt" and not getattr(tokenizer, "chat_template", None):
            raise MoeforgeError(
                f"the tokenizer has no chat template, which {loaded.stage} rows are rendered with; use a chat model's tokenizer"
            )
        lengths = [token_length(record, loaded.stage, tokenizer) for record in loaded.records]
        report["tokens"] = length_stats(lengths) if lengths else None
    return report
