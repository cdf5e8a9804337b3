"""The data layer of ``moeforge train``: read data files in many formats, check every row, normalise
them to the records the trainers take, mix and split them.

Public API (the recipe's ``data:`` section is :mod:`moeforge.config.data`):
:func:`build_datasets` -> :class:`BuiltData`, :func:`pack_texts`, :func:`check_file`,
:func:`convert_file`, :func:`builtin_dataset`.

Names are imported on first use: ``datasets`` takes a second to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeforge.data.build import BuiltData, build_datasets
    from moeforge.data.builtin import builtin_dataset
    from moeforge.data.check import check_file
    from moeforge.data.packing import pack_texts
    from moeforge.data.portable import convert_file

_HOMES = {
    "BuiltData": "build",
    "build_datasets": "build",
    "builtin_dataset": "builtin",
    "check_file": "check",
    "pack_texts": "packing",
    "convert_file": "portable",
}
__all__ = [  # noqa: F822 (resolved by __getattr__)
    "BuiltData",
    "build_datasets",
    "builtin_dataset",
    "check_file",
    "convert_file",
    "pack_texts",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"moeforge.data.{_HOMES[name]}"), name)
