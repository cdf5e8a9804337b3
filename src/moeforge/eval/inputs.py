"""What ``moeforge eval`` measures perplexity on: text files, a data file, or the built-in sample.

Resolved (and checked) before any model is loaded, so a mistyped path fails in a second, not after a
multi-gigabyte load. Data files go through :mod:`moeforge.data`, the same reader training uses, so a
file that trains is a file that evaluates, in any format training accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moeforge.errors import MoeforgeError

BUILTIN_DESCRIPTION = "built-in sample (Python standard-library documentation)"
EvalStage = Literal["pt", "sft"]
"""How a data file is read for perplexity: pt scores every token, sft only the completions (preference rows
are not evaluated)."""


@dataclass(frozen=True)
class EvalInputs:
    """Exactly one of ``texts`` / ``dataset`` is set; ``description`` says where it came from."""

    description: str
    texts: list[str] | None = None
    dataset: Any = None

    def perplexity_kwargs(self) -> dict[str, Any]:
        return {"texts": self.texts} if self.texts is not None else {"dataset": self.dataset}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MoeforgeError(f"text file {path} does not exist or is not a file; give a plain-text file")
    return path.read_text(errors="replace")


def _data_rows(path: str, stage: EvalStage, columns: dict[str, str] | None) -> Any:
    """Every row of the file: no evaluation split is held out, since here the whole file is the test set."""
    from moeforge.config.data import DataSpec, make_source
    from moeforge.data import build_datasets

    return build_datasets(DataSpec(train=[make_source(path=path, columns=columns)]), stage).train


def load_inputs(
    text_files: Sequence[Path] = (), data_file: str | None = None, stage: EvalStage = "pt", columns: dict[str, str] | None = None
) -> EvalInputs:
    """Texts from ``text_files`` (one text each), rows from ``data_file`` (``columns`` maps moeforge fields
    to its columns, as in training), or the built-in sample."""
    if text_files and data_file:
        raise MoeforgeError("both text files and a data file given; evaluate one source at a time")
    if data_file:
        return EvalInputs(description=f"{data_file} ({stage})", dataset=_data_rows(data_file, stage, columns))
    if text_files:
        names = ", ".join(str(p) for p in text_files)
        return EvalInputs(description=names, texts=[_read_text(Path(p)) for p in text_files])
    from moeforge.data.calibration import builtin_text

    return EvalInputs(description=BUILTIN_DESCRIPTION, texts=[builtin_text()])
