"""Every recipe shipped in recipes/ is valid, so the README's examples stay true."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeforge.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.source and recipe.output


def test_there_are_recipes():
    assert len(RECIPES) >= 5
