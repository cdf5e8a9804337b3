"""Serve an adapter without PEFT: fold it into the base, as a plain transformers model.

Plain LoRA parts (attention, an MoE base's experts, PEFT's own LoRA) fold into the weights they adapt.
A mixture of LoRA experts on a dense FFN *is* an MoE layer: expert ``e`` is the FFN with its LoRA deltas
(and the shared delta) merged, the router is the adapter's router, and the routing (softmax → top-k →
renormalise) is Mixtral's. So a dense base with ``moe_lora`` becomes a native MoE checkpoint, chosen the
way ``moeforge convert`` chooses (the base family's native MoE sibling when it holds the layout, else
moeforge's own architecture) — the same export code, fed a copy-upcycling plan of the adapted layers, and
the merged model is read back from the checkpoint written, so what is checked is what is shipped.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from moeforge.adapters.lora_layers import FusedExpertsLora, LoraLinear
from moeforge.adapters.moe_lora import MoeLoraLayer
from moeforge.adapters.peft_method import layer_index
from moeforge.config.recipe import ConvertRecipe, MoESpec, Placement
from moeforge.conversion.export import build_config, layer_tensors, outer_tensors, resolve_export
from moeforge.conversion.fidelity import FidelityReport
from moeforge.conversion.layerwise import LAYERS_PREFIX
from moeforge.conversion.plan import build_plan
from moeforge.errors import MoeforgeError
from moeforge.families import DenseFamily, dense_family
from moeforge.io.loading import save_config
from moeforge.io.publish import staged_directory
from moeforge.io.safetensors_writer import ShardedWriter


def _base_model(model: PeftModel) -> PreTrainedModel:
    """The transformers model under ``model``'s adapter layers."""
    base = model.get_base_model()
    if not isinstance(base, PreTrainedModel):
        raise MoeforgeError(f"merge: the adapter sits on a {type(base).__name__}, not a transformers model")
    return base


logger = logging.getLogger(__name__)


def _mixture_layers(model: PeftModel) -> dict[int, tuple[str, MoeLoraLayer]]:
    layers: dict[int, tuple[str, MoeLoraLayer]] = {}
    for name, module in _base_model(model).named_modules():
        if isinstance(module, MoeLoraLayer):
            index = layer_index(name)
            if index is None:
                raise MoeforgeError(
                    f"merge: the MoE adapter on {name} is outside the decoder layers (model.layers.N); it cannot become an MoE layer"
                )
            layers[index] = (name, module)
    return layers


def merge_adapter(model: PeftModel, directory: Path | None = None) -> PreTrainedModel:
    """The adapter model as a plain transformers model computing the same function (up to fp round-off),
    written to ``directory`` (a temporary one when None) and read back. Consumes ``model`` (its base weights
    are modified in place)."""
    adapter = model.active_adapter
    mixtures = _mixture_layers(model)
    for module in model.modules():
        if isinstance(module, (LoraLinear, FusedExpertsLora)):
            module.merge(adapter_names=[adapter])
    if not mixtures:
        merged = model.merge_and_unload()
        if directory is not None:
            merged.save_pretrained(directory)
            save_config(merged.config, directory)  # what transformers 4.5x reads too, as every export
        return merged
    base_config = _base_model(model).config
    family = dense_family(base_config.model_type)
    if family is None:
        raise MoeforgeError(
            f"merge: MoE-LoRA on the dense layers of a {base_config.model_type} model cannot be exported yet; "
            "serve it with the adapter on its base (PeftModel)"
        )
    experts = {index: module.merged_expert_tensors(adapter) for index, (_, module) in mixtures.items()}
    top_k = {module.moe_lora_settings[adapter]["top_k"] for _, module in mixtures.values()}
    base = model.unload()
    if directory is not None:
        return _write_moe(base, family, experts, top_k.pop(), directory)
    with tempfile.TemporaryDirectory(prefix="moeforge-merge-") as tmp:
        return _write_moe(base, family, experts, top_k.pop(), Path(tmp))


def _write_moe(
    base: PreTrainedModel, family: DenseFamily, experts: dict[int, dict[str, torch.Tensor]], top_k: int, directory: Path
) -> PreTrainedModel:
    """Write the MoE checkpoint whose adapted layers hold ``experts`` (canonical tensors) and whose other
    tensors are ``base``'s (a ``family`` model), then load it (weights in memory)."""
    source = base.config
    layers = sorted(experts)
    recipe = ConvertRecipe(
        source=str(getattr(source, "_name_or_path", "") or "base"),
        output=Path("unused"),
        moe=MoESpec(
            num_experts=[experts[i]["gate.weight"].shape[0] for i in layers], top_k=top_k, scale=1.0, placement=Placement(layers=layers)
        ),
    )
    state = {name: tensor.detach() for name, tensor in base.state_dict().items()}
    if source.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    prefix = LAYERS_PREFIX
    sizes = [family.ffn.intermediate_size(lambda name, i=i: state[f"{prefix}{i}.{name}"].shape) for i in range(source.num_hidden_layers)]
    plan = build_plan(recipe, source, sizes)
    target = resolve_export("auto", plan, source)
    config = build_config(target, plan, source)
    ffn_names = set(family.ffn.weight_names())
    with ShardedWriter(directory, recipe.max_shard_bytes) as writer:
        for name, tensor in outer_tensors(target, {k: v for k, v in state.items() if not k.startswith(prefix)}).items():
            writer.add(name, tensor)
        for index in range(source.num_hidden_layers):
            layer_prefix = f"{prefix}{index}."
            layer = {k[len(layer_prefix) :]: v for k, v in state.items() if k.startswith(layer_prefix)}
            if index in experts:
                layer = {k: v for k, v in layer.items() if k not in ffn_names}
            for name, tensor in layer_tensors(target, layer_prefix, layer, experts.get(index), family.ffn.module).items():
                writer.add(name, tensor)
    save_config(config, directory)
    if base.generation_config is not None:
        base.generation_config.save_pretrained(directory)
    dtype = next(iter(state.values())).dtype
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


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
    log: Callable[[str], None] = logger.info,
) -> MergeResult:
    """``moeforge merge``: load base + adapter, merge, check the merged model against the adapter model on
    built-in text (it must agree to fp round-off, else nothing is written), write atomically."""
    output, adapter_dir = Path(output), Path(adapter_dir)
    with staged_directory(output, overwrite=overwrite) as tmp:  # refuses an existing output before any work
        result = _merge_into(tmp, adapter_dir, base, dtype, log)
    log(f"wrote {output}")
    return MergeResult(output, *result)


def _merge_into(
    tmp: Path, adapter_dir: Path, base: str | None, dtype: torch.dtype, log: Callable[[str], None]
) -> tuple[str, FidelityReport]:
    from moeforge.config.recipe import Calibration
    from moeforge.conversion.fidelity import compare, default_tolerance
    from moeforge.data.calibration import calibration_ids
    from moeforge.io.loading import load_model

    model, tokenizer = load_model(base, adapter=adapter_dir, dtype=dtype) if base else load_model(adapter_dir, dtype=dtype)
    if not isinstance(model, PeftModel):  # load_model puts the adapter on the base it loads
        raise MoeforgeError(f"merge: {adapter_dir} did not load as an adapter model")
    config = _base_model(model).config
    ids, _ = calibration_ids(
        Calibration(num_sequences=2, sequence_length=64), tokenizer, config.vocab_size, torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        reference = model(ids).logits.float()
        merged = merge_adapter(model, tmp)
        logits = merged(ids).logits.float()
    tolerance = default_tolerance(reference, config.num_hidden_layers) * (1 if dtype == torch.float32 else 1e3)
    check = compare(reference, logits, ids, exact_expected=True, tolerance=tolerance)
    architecture = merged.config.architectures[0] if merged.config.architectures else type(merged).__name__
    log(
        f"merged into {architecture}: max |Δlogit| vs the adapter model {check.max_abs_logit_diff:.3e} "
        f"(tolerance {tolerance:.2e}), top-1 agreement {check.top1_agreement * 100:.2f}% on {check.tokens} tokens"
    )
    if not check.passed:
        raise MoeforgeError(
            f"merge: the merged model differs from the adapter model (max |Δlogit| {check.max_abs_logit_diff:.3e}); nothing was written"
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    record = {"merged_from": {"adapter": str(adapter_dir.resolve()), "base": base or "recorded in the adapter"}, "check": check.to_dict()}
    (tmp / "moeforge.json").write_text(json.dumps(record, indent=2) + "\n")
    return architecture, check
