"""Fixtures for the family tests: one saved tiny source per family (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.families.tiny import FAMILY_CONFIGS, save_family


@pytest.fixture(scope="session")
def family_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {model_type: save_family(root / model_type, model_type) for model_type in FAMILY_CONFIGS}
