"""``convert_file``: any supported input in, simple JSON / JSONL that any tool (and moeforge) reads out.

Records are written in the plainest shape that holds them: pt ``{"text"}``; sft ``{"prompt",
"completion"}`` strings, or ``{"messages"}`` when some row has a system message or several turns; dpo
``{"prompt", "chosen", "rejected"}`` as strings, or as message lists under the same condition. The choice
is made once for all rows (train and eval alike): a column that is a string in some rows and a list in
others cannot be loaded by Arrow, and moeforge recognises a file's format from its first row.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from moeforge.config.data import make_source
from moeforge.data.formats import Stage
from moeforge.data.mixing import hold_out
from moeforge.data.source import load_source
from moeforge.errors import MoeforgeError
from moeforge.io.publish import write_texts

OutFormat = Literal["json", "jsonl"]
SKIP_HINT = "fix the row or skip bad rows"


def _single_turn(prompt: list[dict[str, str]]) -> bool:
    return len(prompt) == 1 and prompt[0]["role"] == "user"


def portable_records(records: list[dict[str, Any]], stage: Stage) -> list[dict[str, Any]]:
    """Canonical records in the plainest shape that holds all of them (see the module docstring)."""
    if stage == "pt":
        return records
    simple = all(_single_turn(r["prompt"]) for r in records)
    if stage == "sft":
        if simple:
            return [{"prompt": r["prompt"][0]["content"], "completion": r["completion"][0]["content"]} for r in records]
        return [{"messages": r["prompt"] + r["completion"]} for r in records]
    if simple:
        return [{key: r[key][0]["content"] for key in ("prompt", "chosen", "rejected")} for r in records]
    return records


def _out_format(path: Path, out_format: OutFormat | None) -> OutFormat:
    if out_format is not None:
        return out_format
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise MoeforgeError(f"{path}: cannot infer the output format from {suffix or 'no suffix'}; name it .json or .jsonl")
    return suffix[1:]  # type: ignore[return-value]


def _serialise(records: list[dict[str, Any]], out_format: OutFormat) -> str:
    if out_format == "json":
        return json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def convert_file(
    src: str | Path,
    dst: str | Path,
    *,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    out_format: OutFormat | None = None,
    eval_ratio: float = 0.0,
    eval_dst: str | Path | None = None,
    seed: int = 0,
    stage: Stage | None = None,
    split: str | None = None,
    skip_bad_rows: bool = False,
) -> dict[str, Any]:
    """Convert ``src`` to ``dst`` (and hold out ``eval_ratio`` of the rows to ``eval_dst``); return a
    summary: format, stage, rows, bad_rows, train_rows, eval_rows. Both outputs keep the input's order."""
    dst = Path(dst)
    if not 0.0 <= eval_ratio < 1.0:
        raise MoeforgeError(f"eval_ratio: {eval_ratio} must be at least 0 and below 1")
    if (eval_ratio > 0) != (eval_dst is not None):
        raise MoeforgeError("give both an eval ratio and an eval output, or neither")
    outputs = {dst: _out_format(dst, out_format)}
    if eval_dst is not None:
        eval_dst = Path(eval_dst)
        if eval_dst.resolve() == dst.resolve():
            raise MoeforgeError(f"{eval_dst}: the eval output must differ from the train output")
        outputs[eval_dst] = _out_format(eval_dst, out_format)
    source = make_source(path=src, format=fmt, columns=columns, split=split)
    loaded = load_source(source, stage=stage, skip_bad_rows=skip_bad_rows, hint=SKIP_HINT)
    if not loaded.records:
        raise MoeforgeError(f"{src}: no usable rows (bad rows skipped: {loaded.bad_rows}); nothing to write")
    records = portable_records(loaded.records, loaded.stage)
    train, held = hold_out(records, eval_ratio, random.Random(seed)) if eval_ratio > 0 else (records, [])
    if eval_ratio > 0 and not held:
        raise MoeforgeError(f"eval_ratio: {eval_ratio} of {len(records)} rows is less than one row; raise it or add rows")
    texts = {dst: _serialise(train, outputs[dst])}
    if eval_dst is not None:
        texts[eval_dst] = _serialise(held, outputs[eval_dst])
    write_texts(texts)
    return {
        "format": loaded.format,
        "stage": loaded.stage,
        "rows": len(loaded.records),
        "bad_rows": loaded.bad_rows,
        "train_rows": len(train),
        "eval_rows": len(held),
    }
