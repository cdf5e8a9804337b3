"""Dense2MoE's MoE config (``--MoE_config_path configs/config.json``) → a convert recipe and its router loss.

Dense2MoE copied the dense FFN into ``num_experts`` experts in every ``moe_layer_freq``-th layer from
``moe_start_layer`` on, routed to ``expert_top_k`` of them with a ``gate_type`` gate, and trained with one
aux loss, ``aux_loss_type`` (``mi`` | ``switch``) weighted by ``aux_loss_weight``. The model, data and
output came from command-line flags, so the recipe fills them with placeholders that say so.
"""

from __future__ import annotations

from typing import Any

from moeforge.config.importers.context import ImportContext
from moeforge.config.importers.imported import ImportedRecipe
from moeforge.errors import MoeforgeError

TOOL = "Dense2MoE MoE config"
SIGNATURE = frozenset({"expert_top_k", "moe_start_layer", "moe_layer_freq", "aux_loss_type", "aux_loss_weight"})
CONVERT_KEYS = {
    "num_experts": "moe.num_experts",
    "expert_top_k": "moe.top_k",
    "moe_start_layer": "moe.placement.moe_start_layer",
    "moe_layer_freq": "moe.placement.moe_layer_freq",
    "gate_type": "moe.routing.gate_type",
}
AUX_LOSSES = {"mi": "router_losses.mi_coef", "switch": "router_losses.balance_coef"}


def translate(settings: dict[str, Any], context: ImportContext) -> ImportedRecipe:
    recipe = ImportedRecipe(TOOL, context.path, ("convert", "train"))
    model, where = context.take_model(settings)
    recipe.put("convert", "source", model or "default", where or "Dense2MoE took the model as --model_name_or_path: set yours")
    recipe.put("convert", "output", context.output("moe"), "Dense2MoE wrote to --output_dir: choose the converted model's directory")
    recipe.put("convert", "moe.init", "copy", "Dense2MoE copies the dense FFN into every expert")
    for key, target in CONVERT_KEYS.items():
        if key in settings:
            recipe.put("convert", target, settings.pop(key), f"from {key}")
    recipe.put("train", "stage", "pt", "Dense2MoE's --stage flag: pt or sft")
    recipe.put("train", "model", context.output("moe"), "the model `moeforge convert` writes from this file's convert recipe")
    recipe.put("train", "output", context.output("pt"), "Dense2MoE wrote to --output_dir: choose the run's directory")
    recipe.put("train", "data.builtin", "pt-demo", "Dense2MoE took --dataset: replace with data.train: [your files]")
    _aux_loss(settings, recipe, context)
    return recipe


def _aux_loss(settings: dict[str, Any], recipe: ImportedRecipe, context: ImportContext) -> None:
    """The one aux loss Dense2MoE added: its coefficient, and no other router loss (moeforge's default
    balance coefficient would add a second one)."""
    kind, weight = settings.pop("aux_loss_type", None), settings.pop("aux_loss_weight", None)
    if kind is None:
        if weight is not None:
            recipe.drop(
                "aux_loss_weight", "without aux_loss_type it is unknown which loss it weighs: set router_losses.mi_coef or balance_coef"
            )
        return
    if kind not in AUX_LOSSES:
        raise MoeforgeError(f"{context.path}: aux_loss_type {kind!r} is not one Dense2MoE had; use mi or switch")
    coef = 0.01 if weight is None else weight
    recipe.put(
        "train", AUX_LOSSES[kind], coef, f"from aux_loss_type: {kind}, aux_loss_weight" + ("" if weight is not None else " (absent: 0.01)")
    )
    if kind == "mi":
        recipe.put("train", "router_losses.balance_coef", 0.0, "Dense2MoE with aux_loss_type mi adds no balance loss")
