"""Target architectures: which can hold a plan exactly, their config, and their tensor names.

``auto`` picks the most portable architecture that holds every option exactly: Mixtral (every layer
MoE, routed experts only), then Qwen2-MoE (shared experts, dense layers), else moeforge's own
``moeforge_llama``. Native checkpoints are written in the per-expert layout that transformers 5's own
``save_pretrained`` writes (and vLLM / llama.cpp read); ``moeforge_llama`` keeps the fused layout.

Canonical MoE tensor names (relative to ``model.layers.{i}.mlp.``) are moeforge's: ``gate.<router
params>``, ``experts.gate_up_proj``, ``experts.down_proj``, ``shared_expert.{gate,up,down}_proj.weight``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import MixtralConfig, PretrainedConfig, Qwen2MoeConfig

from moeforge.convert.plan import ConversionPlan
from moeforge.errors import MoeforgeError
from moeforge.modeling import MoeforgeLlamaConfig

EXPORT_ORDER = ("mixtral", "qwen2_moe", "moeforge")


def _attention_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v have a bias, o_proj has a bias) for llama / mistral / qwen2 configs."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _sliding_window(config: PretrainedConfig) -> int | None:
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


def _uniform(plan: ConversionPlan) -> list[str]:
    layers = plan.moe_layers
    problems = []
    for field_name in ("num_experts", "expert_intermediate_size", "shared_intermediate_size"):
        if len({getattr(layer, field_name) for layer in layers}) > 1:
            problems.append(f"{field_name} differs between layers (one value per model)")
    return problems


def export_problems(target: str, plan: ConversionPlan, source: PretrainedConfig) -> list[str]:
    """Why ``target`` cannot hold this conversion exactly (empty: it can)."""
    routing = plan.moe.routing
    qkv_bias, o_bias = _attention_biases(source)
    problems: list[str] = []
    if target == "moeforge":
        if _sliding_window(source):
            problems.append("the source uses sliding-window attention, which moeforge_llama (Llama attention) lacks")
        return problems
    problems += _uniform(plan)
    if routing.gate_type != "linear":
        problems.append(f"gate_type {routing.gate_type} (only a linear router)")
    if routing.scoring == "softmax_then_topk" and not routing.normalize and target == "mixtral":
        problems.append("normalize: false (Mixtral always renormalises the top-k weights)")
    if o_bias:
        problems.append("an o_proj bias in attention")
    if target == "mixtral":
        if any(layer is None for layer in plan.layers):
            problems.append("dense layers (Mixtral has an MoE block in every layer)")
        if plan.moe.shared.num_experts:
            problems.append("shared experts")
        if qkv_bias:
            problems.append("q/k/v biases in attention")
    elif target == "qwen2_moe":
        if _sliding_window(source):
            problems.append("the source's sliding-window attention (Qwen2-MoE windows layers differently)")
    return problems


def resolve_export(requested: str, plan: ConversionPlan, source: PretrainedConfig) -> str:
    if requested != "auto":
        problems = export_problems(requested, plan, source)
        if problems:
            raise MoeforgeError(
                f"export: {requested} cannot hold this conversion exactly: {'; '.join(problems)}. "
                "Use export: auto (picks an architecture that can) or change those options"
            )
        return requested
    for target in EXPORT_ORDER:
        if not export_problems(target, plan, source):
            return target
    raise MoeforgeError(f"no architecture can hold this conversion: {'; '.join(export_problems('moeforge', plan, source))}")


def _common_config(source: PretrainedConfig) -> dict[str, Any]:
    head_dim = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    return {
        "vocab_size": source.vocab_size,
        "hidden_size": source.hidden_size,
        "num_hidden_layers": source.num_hidden_layers,
        "num_attention_heads": source.num_attention_heads,
        "num_key_value_heads": source.num_key_value_heads or source.num_attention_heads,
        "head_dim": head_dim,
        "hidden_act": source.hidden_act,
        "max_position_embeddings": source.max_position_embeddings,
        "initializer_range": source.initializer_range,
        "rms_norm_eps": source.rms_norm_eps,
        "use_cache": True,
        "pad_token_id": source.pad_token_id,
        "bos_token_id": source.bos_token_id,
        "eos_token_id": source.eos_token_id,
        "tie_word_embeddings": bool(getattr(source, "tie_word_embeddings", False)),
        "rope_parameters": dict(source.rope_parameters) if getattr(source, "rope_parameters", None) else None,
        "attention_dropout": getattr(source, "attention_dropout", 0.0) or 0.0,
    }


def build_config(target: str, plan: ConversionPlan, source: PretrainedConfig) -> PretrainedConfig:
    common = _common_config(source)
    first = plan.moe_layers[0]
    routing = plan.moe.routing
    normalized = routing.normalize or routing.scoring == "topk_then_softmax"
    if target == "mixtral":
        return MixtralConfig(
            **common,
            architectures=["MixtralForCausalLM"],
            intermediate_size=first.expert_intermediate_size,
            num_local_experts=first.num_experts,
            num_experts_per_tok=first.top_k,
            sliding_window=_sliding_window(source),
            router_jitter_noise=0.0,
        )
    if target == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            architectures=["Qwen2MoeForCausalLM"],
            intermediate_size=plan.intermediate_size,
            moe_intermediate_size=first.expert_intermediate_size,
            shared_expert_intermediate_size=first.shared_intermediate_size or 1,
            num_experts=first.num_experts,
            num_experts_per_tok=first.top_k,
            norm_topk_prob=normalized,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, layer in enumerate(plan.layers) if layer is None],
            qkv_bias=_attention_biases(source)[0],
            use_sliding_window=False,
        )
    qkv_bias, _ = _attention_biases(source)
    return MoeforgeLlamaConfig(
        **common,
        architectures=["MoeforgeLlamaForCausalLM"],
        intermediate_size=plan.intermediate_size,
        attention_bias=qkv_bias,
        mlp_bias=False,
        moe_layers=[None if layer is None else layer.spec(plan.moe).to_dict() for layer in plan.layers],
    )


def to_target_layout(target: str, mlp: dict[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """Canonical MoE tensors → the target model's in-memory ``mlp.*`` parameters (same function)."""
    if target != "qwen2_moe":
        return dict(mlp)
    out = dict(mlp)
    if "shared_expert.down_proj.weight" not in out:
        # Qwen2-MoE always has a shared expert: a one-neuron all-zero MLP adds exactly 0
        for name, shape in (("gate_proj", (1, hidden_size)), ("up_proj", (1, hidden_size)), ("down_proj", (hidden_size, 1))):
            out[f"shared_expert.{name}.weight"] = torch.zeros(shape)
    else:
        # its shared expert is scaled by sigmoid(gate·x); a zero gate gives exactly 0.5, undone by 2 (exact in fp)
        out["shared_expert.down_proj.weight"] = out["shared_expert.down_proj.weight"] * 2.0
    out["shared_expert_gate.weight"] = torch.zeros(1, hidden_size)
    return out


def to_disk_layout(target: str, prefix: str, mlp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Target in-memory ``mlp.*`` tensors → checkpoint keys (``prefix`` = ``model.layers.{i}.``)."""
    if target == "moeforge":
        return {f"{prefix}mlp.{name}": tensor for name, tensor in mlp.items()}
    gate_up, down = mlp["experts.gate_up_proj"], mlp["experts.down_proj"]
    size = gate_up.shape[1] // 2
    out: dict[str, torch.Tensor] = {}
    if target == "mixtral":
        block = f"{prefix}block_sparse_moe."
        out[f"{block}gate.weight"] = mlp["gate.weight"]
        for e in range(gate_up.shape[0]):
            out[f"{block}experts.{e}.w1.weight"] = gate_up[e, :size]
            out[f"{block}experts.{e}.w3.weight"] = gate_up[e, size:]
            out[f"{block}experts.{e}.w2.weight"] = down[e]
        return out
    block = f"{prefix}mlp."
    for name, tensor in mlp.items():
        if not name.startswith("experts."):
            out[f"{block}{name}"] = tensor
    for e in range(gate_up.shape[0]):
        out[f"{block}experts.{e}.gate_proj.weight"] = gate_up[e, :size]
        out[f"{block}experts.{e}.up_proj.weight"] = gate_up[e, size:]
        out[f"{block}experts.{e}.down_proj.weight"] = down[e]
    return out
