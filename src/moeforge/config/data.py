"""The ``data:`` section of a training recipe: which files to read, and how to mix and split them.

Only the shape is checked here (before any file is opened), so a typo in a key or an impossible value
fails at once with the key's name. Whether the files exist and hold good rows is checked when they are
read by :func:`moeforge.data.build_datasets`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeforge.config.seed import Seed
from moeforge.errors import MoeforgeError

Format = Literal["auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages", "preference", "csv", "hf"]
Builtin = Literal["pt-demo", "sft-demo", "dpo-demo"]


FIELDS = (
    "text",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "chosen",
    "rejected",
    "messages",
    "conversations",
)
"""The keys of every format: what a ``columns:`` mapping may fill."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSource(_Strict):
    """One data file (or ``save_to_disk`` directory) and how to read it."""

    path: Path
    format: Format = "auto"
    """auto: recognised from the row keys (and .txt / .csv / directory for plain text, CSV, HF datasets)."""
    columns: dict[str, str] | None = None
    """moeforge field -> your column, e.g. {prompt: question, completion: answer}. Required for CSV; for
    JSON and HF datasets it renames keys. Rows then hold exactly the mapped fields."""
    weight: Annotated[float, Field(gt=0.0)] = 1.0
    """Share of the training mix, relative to the other sources' weights."""
    split: str | None = None
    """Which split of a saved DatasetDict to read (default: train)."""

    @field_validator("path")
    @classmethod
    def _home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for field, column in (value or {}).items():
            if field not in FIELDS:
                raise ValueError(
                    f"unknown field {field!r}: keys are moeforge fields ({', '.join(FIELDS)}) and values your "
                    "column names, e.g. {text: body}"
                )
            if not column.strip():
                raise ValueError(f"field {field!r} maps to an empty column name")
        return value

    @model_validator(mode="after")
    def _csv_needs_columns(self) -> DataSource:
        if (self.format == "csv" or self.path.suffix.lower() == ".csv") and self.columns is None:
            raise ValueError(
                f"{self.path} is CSV, which needs columns mapping moeforge fields to its columns, "
                "e.g. {text: body} or {prompt: question, completion: answer}"
            )
        return self


def _as_source_list(value: Any) -> Any:
    """A lone path or mapping stands for a one-item list; a path alone stands for ``{path: ...}``."""
    if isinstance(value, (str, Path, dict)):
        value = [value]
    if isinstance(value, list):
        return [{"path": item} if isinstance(item, (str, Path)) else item for item in value]
    return value


class DataSpec(_Strict):
    """Training data: sources to mix, how to hold out evaluation rows, and how to treat bad rows."""

    train: list[DataSource] = Field(default_factory=list)
    eval: list[DataSource] | None = None
    eval_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Share of the training rows held out for evaluation (when no eval files are given)."""
    max_length: Annotated[int, Field(ge=8)] = 512
    skip_bad_rows: bool = False
    completion_only_loss: bool = True
    mix_seed: Seed = 0
    max_rows: Annotated[int, Field(ge=1)] | None = None
    """Keep at most this many train rows after mixing (and eval rows): quick demos on big files."""
    builtin: Builtin | None = None
    """A small dataset generated in code, used instead of train files."""

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _as_source_list(value)

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.builtin is None and not self.train:
            raise ValueError("train: give at least one data file, or set builtin: pt-demo | sft-demo | dpo-demo")
        if self.builtin is not None and self.train:
            raise ValueError(f"set either builtin ({self.builtin}) or train files, not both")
        if self.eval is not None and not self.eval:
            raise ValueError("eval: give at least one file, or remove the key")
        if self.eval is not None and self.eval_ratio > 0:
            raise ValueError("set either eval (files) or eval_ratio (a share of the train rows), not both")
        return self


def make_source(**fields: Any) -> DataSource:
    """A :class:`DataSource` from API or CLI arguments (None = default); a bad value is a one-line
    :class:`MoeforgeError` instead of pydantic's report."""
    try:
        return DataSource.model_validate({key: value for key, value in fields.items() if value is not None})
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"]:
            message = f"{fields.get('path')}: {'.'.join(str(part) for part in first['loc'])}: {message}"
        raise MoeforgeError(message) from None
