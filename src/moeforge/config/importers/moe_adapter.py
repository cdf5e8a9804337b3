"""MoE-adapter's ``config.json`` (``run_fine_tuning.py --config config.json``) → a train recipe with ``adapter:``.

Its experts were LoRA deltas (``use_lora``) or bottleneck adapters, mixed by a top-k router
(``use_moe``; ``expert_capacity`` is the top-k, not a token capacity), trained on ``[{"prompt",
"completion"}]`` JSON. The training keys are TrainingArguments names and pass through.
"""

from __future__ import annotations

from typing import Any

from moeforge.config.importers.context import ImportContext, take_schedule
from moeforge.config.importers.imported import ImportedRecipe

TOOL = "MoE-adapter config.json"
SIGNATURE = frozenset({"use_moe", "use_lora", "expert_capacity", "lora_rank", "train_file", "load_in_8bit", "load_in_4bit"})
ADAPTER_KEYS = {
    "num_experts": "adapter.num_experts",
    "expert_capacity": "adapter.top_k",
    "lora_rank": "adapter.rank",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "load_in_8bit": "adapter.load_in_8bit",
    "load_in_4bit": "adapter.load_in_4bit",
}
METHODS = {(True, True): "moe_lora", (True, False): "moe_bottleneck", (False, True): "lora"}
"""(use_moe, use_lora) -> adapter.method; neither is a full fine-tune (no adapter)."""
EXPERT_KEYS = ("num_experts", "expert_capacity")
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout")


def translate(settings: dict[str, Any], context: ImportContext) -> ImportedRecipe:
    recipe = ImportedRecipe(TOOL, context.path, ("train",))
    model, where = context.take_model(settings)
    recipe.put("train", "stage", "sft", "MoE-adapter trains prompt → completion pairs, the loss on the completion")
    recipe.put("train", "model", model or "default", where or "no model_name_or_path: the embedded SmolLM2; set yours")
    output = settings.pop("output_dir", None)
    recipe.put("train", "output", output or "output", "from output_dir" if output else "MoE-adapter's default output_dir")
    train = settings.pop("train_file", None)
    recipe.put("train", "data.train", [train or "data/train.json"], "from train_file" if train else "MoE-adapter's default train_file")
    if settings.get("validation_file"):
        recipe.put("train", "data.eval", [settings.pop("validation_file")], "from validation_file")
    if "max_seq_length" in settings:
        recipe.put("train", "data.max_length", settings.pop("max_seq_length"), "from max_seq_length")
    _adapter(settings, recipe)
    take_schedule(settings, recipe)
    return recipe


def _adapter(settings: dict[str, Any], recipe: ImportedRecipe) -> None:
    absent = [key for key in ("use_moe", "use_lora") if key not in settings]
    use_moe, use_lora = bool(settings.pop("use_moe", True)), bool(settings.pop("use_lora", True))
    method = METHODS.get((use_moe, use_lora))
    if method is None:
        recipe.drop("use_moe, use_lora", "both false: the tool fine-tuned the whole model, which is a recipe without adapter:")
    else:
        switches = f"from use_moe: {str(use_moe).lower()}, use_lora: {str(use_lora).lower()}"
        recipe.put("train", "adapter.method", method, switches + (f" ({' and '.join(absent)} absent: true)" if absent else ""))
    unused = {None: tuple(ADAPTER_KEYS), "lora": EXPERT_KEYS, "moe_bottleneck": LORA_KEYS}.get(method, ())
    for key, target in ADAPTER_KEYS.items():
        if key in unused and key in settings:
            settings.pop(key)
            recipe.drop(key, f"unused with use_moe: {str(use_moe).lower()}, use_lora: {str(use_lora).lower()}")
        elif key in settings:
            recipe.put("train", target, settings.pop(key), f"from {key}" + (" (the top-k)" if key == "expert_capacity" else ""))
