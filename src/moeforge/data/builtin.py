"""Built-in datasets for demos and smoke tests: generated in code, identical on every machine.

``pt-demo`` is English prose (Python's standard-library documentation, the text conversion already uses
for calibration); ``sft-demo`` and ``dpo-demo`` are exercises with computable answers
(:mod:`moeforge.data.demo_tasks`), so a trained model's answers can be checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moeforge.data.demo_tasks import exercises
from moeforge.data.formats import Stage
from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from datasets import Dataset

BUILTIN_STAGE: dict[str, Stage] = {"pt-demo": "pt", "sft-demo": "sft", "dpo-demo": "dpo"}
DPO_ROWS = 200
DOCUMENT_CHARS = 1500
"""pt-demo documents are runs of whole paragraphs at least this long."""


def _documents() -> list[dict[str, Any]]:
    from moeforge.data.calibration import builtin_text

    documents, current = [], []
    for paragraph in builtin_text().split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= DOCUMENT_CHARS:
            documents.append("\n\n".join(current))
            current = []
    if current:
        documents.append("\n\n".join(current))
    return [{"text": text} for text in documents]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def builtin_records(name: str) -> list[dict[str, Any]]:
    """The canonical records of built-in dataset ``name``."""
    if name == "pt-demo":
        return _documents()
    if name == "sft-demo":
        return [{"prompt": _user(e.question), "completion": _assistant(e.answer)} for e in exercises()]
    if name == "dpo-demo":
        return [
            {"prompt": _user(e.question), "chosen": _assistant(e.answer), "rejected": _assistant(e.wrong)} for e in exercises()[:DPO_ROWS]
        ]
    raise MoeforgeError(f"data.builtin: unknown dataset {name!r}; choose one of {', '.join(BUILTIN_STAGE)}")


def builtin_dataset(name: str) -> Dataset:
    """Built-in dataset ``name`` (pt-demo, sft-demo, dpo-demo) as a ``datasets.Dataset`` of canonical records."""
    from datasets import Dataset

    return Dataset.from_list(builtin_records(name))
