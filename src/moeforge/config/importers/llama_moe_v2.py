"""LLaMA-MoE v2's conversion settings (``convert_mixtral_v2.sh`` / ``convert_llama_to_mixtral.py`` variables,
or the same keys in JSON/YAML) → a convert recipe.

LLaMA-MoE v2 split each FFN's neurons among ``num_experts`` experts (sequentially, or by the indices of its
gradient split in ``neuron_indices_file``), optionally kept ``num_residual`` always-on residual experts,
initialised routers from ``gate_weights_file`` (k-means on hidden states), multiplied the expert output
by ``scale_factor`` and left ``num_moe_contract_layers`` layers dense at each end of the model.
"""

from __future__ import annotations

from typing import Any

from moeforge.config.importers.context import ImportContext
from moeforge.config.importers.imported import ImportedRecipe

TOOL = "LLaMA-MoE v2 conversion settings"
SIGNATURE = frozenset(
    {
        "scale_factor",
        "num_moe_contract_layers",
        "moe_implementation_type",
        "tgt_moe_types",
        "tgt_model_dir_prefix",
        "src_model_dir",
        "neuron_indices_file",
        "gate_weights_file",
        "num_residual",
    }
)
OUTPUT_KEYS = ("save_path", "tgt_model_dir_prefix")
BACKEND_KEYS = ("moe_implementation_type", "tgt_moe_types", "moe_type")


def recognises(settings: dict[str, Any]) -> bool:
    """Its own keys, or the README's pair ``num_experts`` + ``top_k`` (Dense2MoE says ``expert_top_k``)."""
    return bool(SIGNATURE & settings.keys()) or {"num_experts", "top_k"} <= settings.keys()


def translate(settings: dict[str, Any], context: ImportContext) -> ImportedRecipe:
    recipe = ImportedRecipe(TOOL, context.path, ("convert",))
    model, where = context.take_model(settings)
    recipe.put("convert", "source", model or "default", where or "no model_path: the embedded SmolLM2; set yours")
    outputs = {key: settings.pop(key) for key in OUTPUT_KEYS if key in settings}
    key, output = next(iter(outputs.items()), ("", context.output("moe")))
    recipe.put("convert", "output", output, f"from {key}" if key else "no save_path: choose the converted model's directory")
    for name in ("num_experts", "top_k"):
        if name in settings:
            recipe.put("convert", f"moe.{name}", settings.pop(name), f"from {name}")
    recipe.put("convert", "moe.init", "partition", "LLaMA-MoE v2 splits the FFN's neurons among the experts")
    indices = settings.pop("neuron_indices_file", "")
    if indices:
        recipe.put(
            "convert", "moe.partition.method", "importance", "from neuron_indices_file (a gradient split): moeforge ranks neurons itself"
        )
    else:
        recipe.put(
            "convert", "moe.partition.method", "random", "no neuron_indices_file: v2 split sequentially; random is as good (LLaMA-MoE)"
        )
    if "num_residual" in settings:
        recipe.put("convert", "moe.shared.num_experts", settings.pop("num_residual"), "from num_residual (residual experts)")
    if settings.pop("gate_weights_file", ""):
        recipe.put(
            "convert",
            "moe.routing.router_init",
            "kmeans",
            "from gate_weights_file (k-means gates): moeforge clusters the router input itself",
        )
    if "scale_factor" in settings:
        recipe.put("convert", "moe.scale", float(settings.pop("scale_factor")), "from scale_factor (a factor on each expert's output)")
    if "num_moe_contract_layers" in settings:
        dense = settings.pop("num_moe_contract_layers")
        recipe.put("convert", "moe.placement.keep_first_dense", dense, "from num_moe_contract_layers (dense layers at the bottom ...")
        recipe.put("convert", "moe.placement.keep_last_dense", dense, "... and as many at the top)")
    for name in BACKEND_KEYS:
        if name in settings:
            recipe.drop(
                name,
                f"{settings.pop(name)}: moeforge writes native transformers MoE checkpoints; how experts run is "
                "experts_backend in a train recipe (grouped_mm, sonicmoe, ...: docs/performance.md)",
            )
    return recipe
