"""Serve an adapter without PEFT: fold it into the base, as a plain transformers model.

Plain LoRA parts (attention, an MoE base's experts, PEFT's own LoRA) fold into the weights they adapt.
A mixture of LoRA experts on a dense FFN *is* an MoE layer: expert ``e`` is the FFN with its LoRA deltas
(and the shared delta) merged, the router is the adapter's router, and the routing (softmax → top-k →
renormalise) is Mixtral's. So a dense base with ``moe_lora`` becomes a native MoE checkpoint, chosen the
way ``moeforge convert`` chooses (Mixtral when every layer is MoE and attention has no biases, else
Qwen2-MoE, else moeforge_llama) — the same export code, fed a copy-upcycling plan of the adapted layers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from moeforge.adapters.lora_layers import FusedExpertsLora, LoraLinear
from moeforge.adapters.moe_lora import MoeLoraLayer
from moeforge.adapters.peft_method import layer_index
from moeforge.config.recipe import ConvertRecipe, MoESpec, Placement
from moeforge.convert.export import build_config, resolve_export, to_target_layout
from moeforge.convert.fidelity import FidelityReport
from moeforge.convert.plan import build_plan
from moeforge.errors import MoeforgeError
from moeforge.models.loading import DENSE_MODEL_TYPES


def _mixture_layers(model: PeftModel) -> dict[int, tuple[str, MoeLoraLayer]]:
    return {
        layer_index(name): (name, module) for name, module in model.base_model.model.named_modules() if isinstance(module, MoeLoraLayer)
    }


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """The adapter model as a plain transformers model computing the same function (up to fp round-off).
    Consumes ``model`` (its base weights are modified in place)."""
    adapter = model.active_adapter
    mixtures = _mixture_layers(model)
    for module in model.modules():
        if isinstance(module, (LoraLinear, FusedExpertsLora)):
            module.merge(adapter_names=[adapter])
    if not mixtures:
        return model.merge_and_unload()
    base_config = model.base_model.model.config
    if base_config.model_type not in DENSE_MODEL_TYPES:
        raise MoeforgeError(
            f"merge: MoE-LoRA on the dense layers of a {base_config.model_type} model cannot be exported yet; "
            "serve it with the adapter (PeftModel / moeforge chat --adapter)"
        )
    experts = {index: (name, module.merged_expert_tensors(adapter)) for index, (name, module) in mixtures.items()}
    top_k = {module.moe_lora_settings[adapter]["top_k"] for _, module in mixtures.values()}
    base = model.unload()
    return _to_moe(base, experts, top_k.pop())


def _to_moe(base: PreTrainedModel, experts: dict[int, tuple[str, dict[str, torch.Tensor]]], top_k: int) -> PreTrainedModel:
    """Build the MoE model whose adapted layers hold ``experts`` (canonical ``mlp.*`` tensors) and whose
    other tensors are ``base``'s."""
    source = base.config
    layers = sorted(experts)
    recipe = ConvertRecipe(
        source=str(getattr(source, "_name_or_path", "") or "base"), output="unused",
        moe=MoESpec(num_experts=[experts[i][1]["gate.weight"].shape[0] for i in layers], top_k=top_k, scale=1.0,
                    placement=Placement(layers=layers)),
    )
    plan = build_plan(recipe, source)
    target = resolve_export("auto", plan, source)
    config = build_config(target, plan, source)
    state = base.state_dict()
    for index, (name, mlp) in experts.items():
        prefix = name.removeprefix("base_model.model.")
        for key in ("gate_proj", "up_proj", "down_proj"):
            state.pop(f"{prefix}.{key}.weight")
        state.update({f"{prefix}.{key}": tensor for key, tensor in to_target_layout(target, mlp, source.hidden_size).items()})
    dtype = next(iter(state.values())).dtype
    with no_init_weights():  # every tensor is assigned below; buffers (RoPE) are built as usual
        merged = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = merged.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in missing if key != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise MoeforgeError(f"merge: the {target} model does not match the merged tensors (missing {missing[:3]}, unexpected {unexpected[:3]})")
    merged.tie_weights()
    merged.generation_config = base.generation_config
    return merged.eval()


@dataclass(frozen=True)
class MergeResult:
    output: Path
    architecture: str
    check: FidelityReport


def merge_to_directory(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    base: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> MergeResult:
    """``moeforge merge``: load base + adapter, merge, check the merged model against the adapter model on
    built-in text (it must agree to fp round-off, else nothing is written), write atomically."""
    from moeforge.convert.pipeline import prepare_output, publish

    output, adapter_dir = Path(output), Path(adapter_dir)
    tmp = prepare_output(output, overwrite)  # refuses an existing output before any work
    try:
        result = _merge_into(tmp, adapter_dir, base, dtype, log)
        publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {output}")
    return MergeResult(output, *result)


def _merge_into(tmp: Path, adapter_dir: Path, base: str | None, dtype: torch.dtype, log: Callable[[str], None]) -> tuple[str, FidelityReport]:
    from moeforge.config.recipe import Calibration
    from moeforge.convert.calibration import calibration_ids
    from moeforge.convert.fidelity import compare, default_tolerance
    from moeforge.models.loading import load_model

    model, tokenizer = load_model(base, adapter=adapter_dir, dtype=dtype) if base else load_model(adapter_dir, dtype=dtype)
    config = model.base_model.model.config
    ids, _ = calibration_ids(Calibration(num_sequences=2, sequence_length=64), tokenizer, config.vocab_size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits.float()
        merged = merge_adapter(model)
        logits = merged(ids).logits.float()
    tolerance = default_tolerance(reference, config.num_hidden_layers) * (1 if dtype == torch.float32 else 1e3)
    check = compare(reference, logits, ids, exact_expected=True, tolerance=tolerance)
    architecture = merged.config.architectures[0] if merged.config.architectures else type(merged).__name__
    log(f"merged into {architecture}: max |Δlogit| vs the adapter model {check.max_abs_logit_diff:.3e} "
        f"(tolerance {tolerance:.2e}), top-1 agreement {check.top1_agreement * 100:.2f}% on {check.tokens} tokens")
    if not check.passed:
        raise MoeforgeError(f"merge: the merged model differs from the adapter model (max |Δlogit| {check.max_abs_logit_diff:.3e}); nothing was written")
    merged.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    record = {"merged_from": {"adapter": str(adapter_dir.resolve()), "base": base or "recorded in the adapter"}, "check": check.to_dict()}
    (tmp / "moeforge.json").write_text(json.dumps(record, indent=2) + "\n")
    return architecture, check
