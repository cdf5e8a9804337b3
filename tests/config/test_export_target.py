"""``export:`` accepts exactly the architectures moeforge can write: the spelled-out Literal (which type
checkers read) matches the family tables it mirrors."""

from __future__ import annotations

from typing import get_args

import pytest

from moeforge.config.recipe import ExportTarget, parse_recipe
from moeforge.errors import MoeforgeError
from moeforge.families import MOEFORGE_MODEL_TYPE, NATIVE_MODEL_TYPES


def test_export_target_lists_every_native_family_and_moeforge() -> None:
    assert get_args(ExportTarget) == ("auto", *NATIVE_MODEL_TYPES, MOEFORGE_MODEL_TYPE)


def test_unknown_export_target_is_refused_by_name() -> None:
    assert parse_recipe({"source": "default", "output": "out", "export": "mixtral"}).export == "mixtral"
    with pytest.raises(MoeforgeError, match="export"):
        parse_recipe({"source": "default", "output": "out", "export": "llama"})
