"""Typed, validated recipes (YAML → pydantic objects)."""

from moeforge.config.recipe import ConvertRecipe, load_recipe

__all__ = ["ConvertRecipe", "load_recipe"]
