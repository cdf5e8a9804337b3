"""MoICE settings (the fields its code reads from a patched ``config.json``: ``base_set``, ``topk``,
``expert_nums``, ``router_aux_loss_coef``, plus ``train-balance.py``'s arguments) → a train recipe with ``moice:``.

The official ``base_set`` is absolute: ``[10000, 17500, ...]`` for Llama-2's θ = 10000, and moeforge
requires ``base_set[0]`` to be the target model's θ. When that θ is known (``--rope-theta``, the named
model's ``config.json`` on disk, or the file's own ``rope_theta``) the set is rescaled by the ratio and the
comment says so; otherwise it is kept and the comment says what to check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeforge.config.importers.context import ImportContext, take_schedule
from moeforge.config.importers.imported import ImportedRecipe
from moeforge.errors import MoeforgeError

TOOL = "MoICE config"
SIGNATURE = frozenset({"base_set", "expert_nums"})


def translate(settings: dict[str, Any], context: ImportContext) -> ImportedRecipe:
    recipe = ImportedRecipe(TOOL, context.path, ("train",))
    model, where = context.take_model(settings)
    recipe.put("train", "stage", "pt", "MoICE's train-balance.py: the LM loss on every token")
    recipe.put("train", "model", model or "default", where or "no model_name_or_path: the embedded SmolLM2; set yours")
    output = settings.pop("output_dir", None)
    recipe.put("train", "output", output or context.output("moice"), "from output_dir" if output else "choose the run's directory")
    if settings.get("data_path"):
        recipe.put("train", "data.train", [settings.pop("data_path")], "from data_path")
        if settings.get("eval_data_path"):
            recipe.put("train", "data.eval", [settings.pop("eval_data_path")], "from eval_data_path")
    else:
        recipe.put("train", "data.builtin", "pt-demo", "no data_path: a built-in demo set; replace with data.train: [your files]")
    if "model_max_length" in settings:
        recipe.put("train", "data.max_length", settings.pop("model_max_length"), "from model_max_length")
    recipe.put("train", "preset", "moice", "the released recipe: only the attention routers train (lr 1e-4, constant)")
    _bases(settings, recipe, context, model)
    if "topk" in settings:
        recipe.put("train", "moice.topk", settings.pop("topk"), "from topk")
    if "router_aux_loss_coef" in settings:
        recipe.put("train", "moice.router_aux_loss_coef", settings.pop("router_aux_loss_coef"), "from router_aux_loss_coef")
    if "output_router_logits" in settings:
        recipe.drop("output_router_logits", "moeforge adds the balance loss whenever moice.router_aux_loss_coef > 0")
        settings.pop("output_router_logits")
    take_schedule(settings, recipe)
    return recipe


def _bases(settings: dict[str, Any], recipe: ImportedRecipe, context: ImportContext, model: str | None) -> None:
    bases = settings.pop("base_set", None)
    experts = settings.pop("expert_nums", None)
    if bases is None:
        if experts is not None:
            recipe.drop("expert_nums", "without base_set moeforge uses θ · [1, 1.75, 1.8, 1.9, 2.0, 2.25, 2.5] (7 bases)")
        return
    if not isinstance(bases, list) or not bases or not all(isinstance(b, (int, float)) and b > 0 for b in bases):
        raise MoeforgeError(f"{context.path}: base_set {bases!r} must be a list of positive RoPE bases, the model's θ first")
    if experts is not None:
        if experts != len(bases):
            raise MoeforgeError(
                f"{context.path}: expert_nums {experts} but base_set has {len(bases)} bases; MoICE has one expert per base: make them agree"
            )
        recipe.drop("expert_nums", "always len(base_set): moeforge counts the bases")
    theta, source = _target_theta(settings, context, model)
    written = _number_list(bases)
    if theta is None:
        recipe.put(
            "train",
            "moice.base_set",
            written,
            f"from base_set, kept: moice requires base_set[0] to equal the model's rope_theta; if it is not {written[0]:g}, "
            "rerun with --rope-theta or scale every base by θ/base_set[0]",
        )
    elif theta == bases[0]:
        recipe.put("train", "moice.base_set", written, f"from base_set; base_set[0] is the model's rope_theta ({source})")
    else:
        ratio = theta / bases[0]
        recipe.put(
            "train",
            "moice.base_set",
            _number_list([b * ratio for b in bases]),
            f"from base_set {written} rescaled by {ratio:g} = rope_theta {theta:g} ({source}) / {written[0]:g}",
        )


def _target_theta(settings: dict[str, Any], context: ImportContext, model: str | None) -> tuple[float | None, str]:
    """The target model's RoPE base and where it was read, in order of authority."""
    own = settings.pop("rope_theta", None)
    if context.rope_theta is not None:
        return context.rope_theta, "--rope-theta"
    config = Path(model) / "config.json" if model else None
    if config is not None and config.is_file():
        try:
            theta = _theta_in(json.loads(config.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise MoeforgeError(f"{config} is not a readable config.json: pass the model's θ with --rope-theta") from None
        if theta is not None:
            return theta, f"read from {config}"
    if isinstance(own, (int, float)) and model is not None and context.model is None:  # the file's θ is its own model's
        return float(own), "the file's rope_theta"
    return None, ""


def _theta_in(config: dict[str, Any]) -> float | None:
    """``rope_theta`` at the top, in transformers 5's ``rope_parameters``, or in a ``text_config``."""
    for node in (config, config.get("rope_parameters")):
        if isinstance(node, dict) and isinstance(node.get("rope_theta"), (int, float)):
            return float(node["rope_theta"])
    nested = config.get("text_config")
    return _theta_in(nested) if isinstance(nested, dict) else None


def _number_list(values: list[float]) -> list[float | int]:
    """Whole numbers as ints (``100000``, not ``100000.0``), the rest rounded off float noise."""
    rounded = [round(float(v), 6) for v in values]
    return [int(v) if v.is_integer() else v for v in rounded]
