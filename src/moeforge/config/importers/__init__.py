"""``moeforge import-config``: an original tool's settings file → a moeforge recipe that means the same.

The tool is recognised from the file's keys (its format does not say): MoICE's ``base_set`` /
``expert_nums``, Dense2MoE's ``expert_top_k`` / ``moe_start_layer`` / ``aux_loss_type``, MoE-adapter's
``use_moe`` / ``expert_capacity`` / ``lora_rank``, LLaMA-MoE v2's ``scale_factor`` / ``num_moe_contract_layers``
(or ``num_experts`` with ``top_k``). The recipe is validated before it is returned, as the YAML text that
will be written, so what ``import-config`` writes always loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from moeforge.config.importers import dense2moe, llama_moe_v2, moe_adapter, moice
from moeforge.config.importers.context import MODEL_CONFIG_KEYS, ImportContext
from moeforge.config.importers.imported import ImportedRecipe, Kind
from moeforge.config.importers.reading import read_settings
from moeforge.config.recipe import ConvertRecipe, parse_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError

RECIPE_MODELS: dict[Kind, type[BaseModel]] = {"convert": ConvertRecipe, "train": TrainRecipe}


@dataclass(frozen=True)
class Format:
    name: str
    recognises: Callable[[dict[str, Any]], bool]
    translate: Callable[[dict[str, Any], ImportContext], ImportedRecipe]


FORMATS = (  # in order of precedence: MoICE's keys sit in a model config, Dense2MoE's share num_experts with v2's
    Format("MoICE (base_set, topk, expert_nums)", lambda s: bool(moice.SIGNATURE & s.keys()), moice.translate),
    Format(
        "Dense2MoE (num_experts, expert_top_k, moe_start_layer, aux_loss_type)",
        lambda s: bool(dense2moe.SIGNATURE & s.keys()),
        dense2moe.translate,
    ),
    Format(
        "MoE-adapter config.json (use_moe, expert_capacity, lora_rank)",
        lambda s: bool(moe_adapter.SIGNATURE & s.keys()),
        moe_adapter.translate,
    ),
    Format("LLaMA-MoE v2 conversion (num_experts, top_k, scale_factor)", llama_moe_v2.recognises, llama_moe_v2.translate),
)


@dataclass(frozen=True)
class Imported:
    """The recipe text to write, and what it was made from."""

    kind: Kind
    tool: str
    text: str
    recipe: BaseModel


def import_config(path: str | Path, *, kind: Kind | None = None, model: str | None = None, rope_theta: float | None = None) -> Imported:
    """Translate ``path`` into a ``kind`` recipe (default: the one the tool's file is mainly about)."""
    path = Path(path)
    settings = read_settings(path)
    found = next((fmt for fmt in FORMATS if fmt.recognises(settings)), None)
    if found is None:
        raise MoeforgeError(
            f"{path}: not a config import-config knows; it reads {'; '.join(fmt.name for fmt in FORMATS)} (see docs/migrating.md)"
        )
    unused = dict(settings)  # each translator takes out the keys it translates or drops
    translated = found.translate(unused, ImportContext(path, model, rope_theta))
    _drop_unused(unused, translated)
    kind = kind or translated.kinds[0]
    if kind not in translated.kinds:
        raise MoeforgeError(
            f"{path} is a {translated.tool}, which becomes a {' or '.join(translated.kinds)} recipe, not a {kind} one: drop --kind {kind}"
        )
    text = translated.text(kind)
    recipe = parse_recipe(yaml.safe_load(text), origin=f"{path} ({translated.tool}) as a {kind} recipe", model=RECIPE_MODELS[kind])
    return Imported(kind, translated.tool, text, recipe)


def _drop_unused(unused: dict[str, Any], recipe: ImportedRecipe) -> None:
    """The keys no translator took get a ``left out`` comment with the reason, so nothing vanishes silently."""
    shape = [key for key in unused if key in MODEL_CONFIG_KEYS]
    if shape:
        recipe.drop(", ".join(shape), "the model's own config.json fields: moeforge reads the architecture from the model")
    for key in [key for key in unused if key not in MODEL_CONFIG_KEYS]:
        recipe.drop(key, f"no counterpart in moeforge for this key of a {recipe.tool}")
