"""Every recipe shipped in recipes/ is valid, so the README's examples stay true."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moeforge.config import load_recipe
from moeforge.config.train_recipe import TrainRecipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_is_valid(path):
    is_training = "stage" in yaml.safe_load(path.read_text())
    recipe = load_recipe(path, model=TrainRecipe) if is_training else load_recipe(path)
    assert recipe.output


def test_there_are_recipes():
    assert len(RECIPES) >= 10
