"""Parameter counts of a scenario's model, counted on the ``meta`` device: exact, instant, no weights.

The model is built from its config exactly as training builds it (same architecture classes, MoICE
routers, the recipe's adapter through moeforge's own adapter builder, the recipe's freezing through
:func:`~moeforge.training.freeze.apply_freeze`), only with storage-less tensors. So trainable counts are the
ones ``moeforge train`` reports, not a re-derivation that could drift from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from moeforge.adapters.moe_lora import BottleneckExperts, MoeLoraLayer
from moeforge.adapters.peft_method import layer_index
from moeforge.config.adapter import AdapterSpec
from moeforge.config.moice import MoiceSpec
from moeforge.io.inspection import layer_plan
from moeforge.io.loading import TORCH_DTYPES
from moeforge.planning.memory import AdapterPart, FfnShape, ModelShape, ParameterCounts
from moeforge.routing.detection import RouterRef, find_routers
from moeforge.training.freeze import apply_freeze

_MOE_BLOCK = re.compile(r"^(.*(?:^|\.)layers\.\d+\.mlp)\.")


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a config plus the training-time changes a recipe makes to the loaded model."""

    config: PretrainedConfig
    dtype: str = "float32"
    adapter: AdapterSpec | None = None
    moice: MoiceSpec | None = None
    frozen_groups: tuple[str, ...] = ()
    frozen_layers: frozenset[int] = field(default_factory=frozenset)


def model_shape(config: PretrainedConfig) -> ModelShape:
    """The activation formulas' view of a config; per-layer FFNs come from the same plan ``moeforge inspect`` shows."""
    heads = config.num_attention_heads
    ffn = tuple(
        FfnShape(row["intermediate_size"])
        if row["kind"] == "dense"
        else FfnShape(row["expert_intermediate_size"], row["num_experts"], row["top_k"], row["shared_intermediate_size"] or 0)
        for row in layer_plan(config)
    )
    return ModelShape(
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
        ffn=ffn,
    )


def build_meta_model(config: PretrainedConfig, dtype: str = "float32") -> PreTrainedModel:
    """The architecture of ``config`` with storage-less weights (buffers stay real: MoICE derives its RoPE
    tables from the model's own); a MoICE checkpoint gets its attention back,
    as :func:`moeforge.io.loading.from_pretrained` does."""
    from moeforge.config.moice import ResolvedMoice
    from moeforge.modeling.moice import install_moice

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype])
        moice = getattr(config, "moice", None)
        if moice:
            install_moice(model, ResolvedMoice.model_validate(moice))
    model.tie_weights()  # init_empty_weights re-registers every parameter, which unties tied embeddings
    return model


def _quantizable(model: nn.Module) -> list[torch.Tensor]:
    """Weights bitsandbytes would replace: every plain ``nn.Linear`` except those transformers keeps in full
    precision (the output embeddings, tied and fp32-pinned modules). Fused expert tensors are no Linear and
    stay in the compute dtype."""
    skip = [*get_keys_to_not_convert(model), *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    return [module.weight for name, module in model.named_modules() if type(module) is nn.Linear and should_convert_module(name, skip)]


def _routed_experts(model: nn.Module) -> list[tuple[str, nn.Parameter, RouterRef]]:
    """Each routed-expert tensor with its router: the block's per-expert tensors (leading dim E), for model
    routers and adapter routers alike. Shared experts and the routers themselves are not routed."""
    found = []
    for router in find_routers(model):
        if router.per_token != 1:  # MoICE attention routers pick RoPE bases, not parameter blocks
            continue
        match = _MOE_BLOCK.match(router.name)
        prefix = match.group(1) if match else router.name.rpartition(".")[0]
        block = model.get_submodule(prefix)
        own = {id(p) for p in router.module.parameters()}
        found += [
            (f"{prefix}.{name}", p, router)
            for name, p in block.named_parameters()
            if id(p) not in own and "shared" not in name and p.dim() >= 2 and p.shape[0] == router.num_experts
        ]
    return found


def _inactive(routed: list[tuple[str, nn.Parameter, RouterRef]]) -> int:
    """Routed-expert parameters a token skips: (E - k) / E of each per-expert tensor."""
    return sum(p.numel() * (router.num_experts - router.top_k) // router.num_experts for _, p, router in routed)


def _largest_layer(model: nn.Module, routed: list[tuple[str, nn.Parameter, RouterRef]]) -> tuple[int, int]:
    """``(bytes, routed-expert bytes)`` of the decoder layer with the most parameter bytes."""
    total: dict[int, int] = {}
    experts: dict[int, int] = {}
    for name, p in model.named_parameters():
        layer = layer_index(name)
        if layer is not None:
            total[layer] = total.get(layer, 0) + p.numel() * p.element_size()
    for name, p, _ in routed:
        layer = layer_index(name)
        if layer is not None:
            experts[layer] = experts.get(layer, 0) + p.numel() * p.element_size()
    if not total:
        return 0, 0
    largest = max(total, key=lambda layer: total[layer])
    return total[largest], experts.get(largest, 0)


def _mixture(module: MoeLoraLayer, layer: int | None) -> AdapterPart:
    adapter = module.active_adapters[0]
    settings, base = module.moe_lora_settings[adapter], module.mlp
    bottleneck = module.part("ffn", adapter)
    return AdapterPart(
        "mixture",
        layer,
        in_features=base.gate_proj.in_features,
        width=bottleneck.down.shape[1] if isinstance(bottleneck, BottleneckExperts) else base.gate_proj.out_features,
        num_experts=module.router(adapter).num_experts,
        top_k=settings["top_k"],
    )


def _adapter_parts(model: nn.Module) -> tuple[AdapterPart, ...]:
    """What each adapted module adds to the activations, read off the wrapped model (so it follows exactly
    what moeforge's adapter builder wrapped, layer by layer)."""
    parts = []
    module: nn.Module  # torch leaves named_modules() unannotated
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        layer, base = layer_index(name), module.get_base_layer()
        if isinstance(module, MoeLoraLayer):
            parts.append(_mixture(module, layer))
        elif isinstance(base, nn.Linear):
            own = [p for n, p in module.named_parameters() if not n.startswith("base_layer.")]
            parts.append(AdapterPart("lora", layer, in_features=base.in_features, width=min(min(p.shape) for p in own)))
        else:  # LoRA on fused expert weights (one wrapper per tensor for PEFT's target_parameters)
            parameter: str | None = getattr(module, "parameter_name", None)
            merged = [base.get_parameter(parameter)] if parameter is not None else list(base.parameters())
            parts.append(AdapterPart("merged", layer, merged_bytes=sum(p.numel() * p.element_size() for p in merged)))
    return tuple(parts)


def _first_trained_layer(model: PreTrainedModel | PeftModel) -> int | None:
    embeddings = model.get_input_embeddings().get_parameter("weight")
    if embeddings.requires_grad:
        return 0
    layers = [layer_index(name) for name, p in model.named_parameters() if p.requires_grad]
    return min((i for i in layers if i is not None), default=None)


def count_parameters(spec: ModelSpec) -> ParameterCounts:
    """Build ``spec`` on the meta device and count what training would hold and train."""
    base = build_meta_model(spec.config, spec.dtype)
    quantizable = _quantizable(base)
    if spec.moice is not None:
        from moeforge.modeling.moice import apply_moice

        with init_empty_weights():
            apply_moice(base, spec.moice)
    model: PreTrainedModel | PeftModel = base
    if spec.adapter is not None:
        from moeforge.adapters.build import apply_adapter

        with init_empty_weights():
            model = apply_adapter(model, spec.adapter)
    trainable, total = apply_freeze(model, spec.frozen_groups, spec.frozen_layers, keep_frozen=spec.adapter is not None)
    parameters = list(model.parameters())
    routed = _routed_experts(model)
    layer_bytes, layer_expert_bytes = _largest_layer(model, routed)
    return ParameterCounts(
        total=total,
        trainable=trainable,
        active=total - _inactive(routed),
        total_bytes=sum(p.numel() * p.element_size() for p in parameters),
        trainable_bytes=sum(p.numel() * p.element_size() for p in parameters if p.requires_grad),
        quantizable=sum(p.numel() for p in quantizable),
        quantizable_bytes=sum(p.numel() * p.element_size() for p in quantizable),
        first_trained_layer=_first_trained_layer(model),
        adapter_parts=_adapter_parts(model),
        layer_bytes=layer_bytes,
        layer_expert_bytes=layer_expert_bytes,
    )
