"""Export targets: which architecture can hold a plan exactly, its config, and its checkpoint names.

``auto`` picks the source family's first native sibling that holds every option of the recipe exactly
(:mod:`moeforge.families`: Mixtral for Llama with routed experts only, Qwen3-MoE for Qwen3, ...), else
moeforge's own architecture, which holds any plan on any family. Native checkpoints use the names the
architecture's own ``save_pretrained`` writes (what vLLM and llama.cpp's converter read), with expert FFNs
padded with zero neurons to a multiple of 8 (exact, and the row alignment transformers' default
``grouped_mm`` experts backend needs); moeforge checkpoints keep moeforge's fused layout.

Canonical MoE tensors (names relative to the layer's FFN module) are moeforge's: ``gate.<router params>``,
``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``,
``shared_expert.{gate,up,down}_proj.weight``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers
from transformers import PretrainedConfig

from moeforge.conversion.plan import ConversionPlan
from moeforge.errors import MoeforgeError
from moeforge.families import MOEFORGE_MODEL_TYPE, NativeMoe, Sibling, known_dense_family, known_native_moe, native_moe
from moeforge.modeling import AttentionMoeLayerSpec, moeforge_config

MOEFORGE = MOEFORGE_MODEL_TYPE
EXPERT_ROW_ALIGNMENT = 8
"""Expert FFN sizes of native exports are padded to a multiple of this (16 bytes in 16-bit dtypes)."""


def _sibling(target: str, source: PretrainedConfig) -> Sibling | None:
    return next((s for s in known_dense_family(source.model_type).siblings if s.target == target), None)


def _uniform(plan: ConversionPlan) -> list[str]:
    problems = []
    for name in ("num_experts", "top_k", "expert_intermediate_size", "shared_intermediate_size"):
        if len({getattr(layer, name) for layer in plan.moe_layers}) > 1:
            problems.append(f"{name} differs between layers (one value per model there)")
    return problems


def export_problems(target: str, plan: ConversionPlan, source: PretrainedConfig) -> list[str]:
    """Why ``target`` cannot hold this conversion of ``source`` exactly (empty: it can)."""
    if target == MOEFORGE:
        return []
    if plan.attention_moe_layers:  # no native architecture routes attention heads
        return ["attention MoE (only moeforge's architecture has it)"]
    native, sibling = native_moe(target), _sibling(target, source)
    family = known_dense_family(source.model_type)
    if native is None or sibling is None:
        what = native.title if native else repr(target)
        return [f"{what} has no decoder like {family.title}'s (docs/families.md lists what each family exports to)"]
    routing = plan.moe.routing
    problems = sibling.problems(source) + _uniform(plan)
    if routing.gate_type != "linear":
        problems.append(f"gate_type {routing.gate_type} (only a linear router)")
    if not routing.normalize and native.norm_flag is None:
        problems.append("normalize: false (it always renormalises the top-k weights)")
    if any(layer is None for layer in plan.layers) and not native.dense_layers:
        problems.append("dense layers (every layer is an MoE block there)")
    if plan.moe.shared.num_experts and native.shared == "none":
        problems.append("shared experts")
    return problems


def export_choices(source: PretrainedConfig) -> list[str]:
    """The targets a source of this family can be exported to, most portable first (moeforge last)."""
    return [sibling.target for sibling in known_dense_family(source.model_type).siblings] + [MOEFORGE]


def resolve_export(requested: str, plan: ConversionPlan, source: PretrainedConfig) -> str:
    if requested != "auto":
        problems = export_problems(requested, plan, source)
        if problems:
            choices = ", ".join(export_choices(source))
            raise MoeforgeError(
                f"export: {requested} cannot hold this conversion exactly: {'; '.join(problems)}. "
                f"Use export: auto (picks an architecture that can; for this source: {choices}) or change those options"
            )
        return requested
    return next(target for target in export_choices(source) if not export_problems(target, plan, source))


def llama_cpp_caveats(target: str, plan: ConversionPlan, source: PretrainedConfig) -> list[str]:
    """Why llama.cpp will not compute this export the way transformers does (empty: it will)."""
    native = native_moe(target)
    if native is None:
        return ["it has no moeforge architecture"]
    engine, routing = native.llama_cpp, plan.moe.routing
    if not engine.runs:
        return [f"it has no {native.title} architecture"]
    caveats = []
    if routing.normalize != engine.renormalizes and any(layer.top_k < layer.num_experts for layer in plan.moe_layers):
        done = "never renormalises" if routing.normalize else "always renormalises"
        caveats.append(f"it {done} {native.title}'s top-k weights (for llama.cpp: routing.normalize: {str(engine.renormalizes).lower()})")
    if any(layer is None for layer in plan.layers) and not engine.dense_layers:
        caveats.append(f"its converter cannot map {native.title} layers that stay dense")
    if not engine.sliding_window and getattr(source, "sliding_window", None):
        caveats.append(f"it ignores {native.title}'s sliding window (exact only up to {source.sliding_window} tokens)")
    head_dim = getattr(source, "head_dim", None)
    if not engine.head_dim_free and head_dim and head_dim * source.num_attention_heads != source.hidden_size:
        caveats.append(f"its {native.title} converter drops head_dim ({head_dim} != hidden / heads)")
    return caveats


def padded(size: int) -> int:
    return -(-size // EXPERT_ROW_ALIGNMENT) * EXPERT_ROW_ALIGNMENT


def _native_config(native: NativeMoe, plan: ConversionPlan, source: PretrainedConfig) -> PretrainedConfig:
    """The target config: every field the target shares with the source by name, the source's head size, what
    the family pairing adds (:attr:`Sibling.carry`), the target's constants, then the MoE shape."""
    config_class = getattr(transformers, native.config_class)
    own = {f.name for f in dataclasses.fields(config_class)} - {f.name for f in dataclasses.fields(PretrainedConfig)}
    source_values = source.to_dict()
    values: dict[str, Any] = {name: source_values[name] for name in own if name in source_values}
    values["head_dim"] = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    sibling = _sibling(native.model_type, source)
    if sibling is None:
        raise MoeforgeError(f"{native.title} is not a sibling of {source.model_type}: choose another export")
    values.update(sibling.carry(source))
    values.update(native.constants)
    first = plan.moe_layers[0]
    routing = plan.moe.routing
    shape = {
        "num_experts": first.num_experts,
        "top_k": first.top_k,
        "expert_size": padded(first.expert_intermediate_size),
        "shared_size": first.shared_intermediate_size or (1 if native.shared_always else 0),
        "dense_size": plan.intermediate_size,
    }
    values.update({native.fields[role]: value for role, value in shape.items() if role in native.fields})
    if native.dense_layers:
        values["mlp_only_layers"] = [i for i, layer in enumerate(plan.layers) if layer is None]
    if native.norm_flag:
        values[native.norm_flag] = routing.normalize
    if native.untied_head:
        values["tie_word_embeddings"] = False
    values["architectures"] = [native.architecture]
    return config_class(**values)


def build_config(
    target: str, plan: ConversionPlan, source: PretrainedConfig, attention_specs: dict[int, AttentionMoeLayerSpec] | None = None
) -> PretrainedConfig:
    """The converted model's config; ``attention_specs``: the attention MoE layers' specs where the conversion
    fitted them (shared groups by importance, a calibrated scale; default: as planned)."""
    if target == MOEFORGE:
        moe_layers = [None if layer is None else layer.spec(plan.moe).to_dict() for layer in plan.layers]
        if not plan.attention_moe_layers:
            return moeforge_config(source, moe_layers)
        fitted = attention_specs or {}
        attention = [
            None if layer is None else fitted.get(index, layer.spec()).to_dict() for index, layer in enumerate(plan.attention_layers)
        ]
        return moeforge_config(source, moe_layers, attention_moe_layers=attention)
    return _native_config(known_native_moe(target), plan, source)


def _pad_experts(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero neurons up to the aligned size: zero gate and up rows give act(0)·0 = 0, whatever down holds."""
    size = gate_up.shape[1] // 2
    extra = padded(size) - size
    if not extra:
        return gate_up, down
    experts, hidden = gate_up.shape[0], gate_up.shape[2]
    if experts > 1 and gate_up.stride(0) == 0 and down.stride(0) == 0:  # one expert repeated (a view): pad it once
        gate_up, down = _pad_experts(gate_up[:1], down[:1])
        return gate_up.expand(experts, -1, -1), down.expand(experts, -1, -1)
    rows = gate_up.new_zeros(experts, extra, hidden)
    gate_up = torch.cat([gate_up[:, :size], rows, gate_up[:, size:], rows], dim=1)
    return gate_up, torch.cat([down, down.new_zeros(experts, hidden, extra)], dim=2)


def _matrices(names: tuple[str, ...], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """One FFN's matrices under ``names``: (gate, up, down) or (gate_up stacked, down)."""
    if len(names) == 3:
        return dict(zip(names, (gate, up, down), strict=True))
    return {names[0]: torch.cat([gate, up], dim=-2), names[1]: down}


def _half_gate(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """A shared-expert gate ``g`` with sigmoid(g·x) = 0.5 for every x: rows of ±ε, so g·x is a tiny non-zero
    number (sigmoid rounds it to exactly 0.5 in the compute dtype). Not g = 0: llama.cpp computes this sigmoid
    as silu(z)/z, which is 0/0 at z = 0."""
    epsilon = 2.0**-24 if dtype == torch.float16 else 1e-30  # representable, and 0.5 ± ε·|x|/4 rounds to 0.5
    signs = torch.ones(hidden)
    signs[1::2] = -1.0
    return (epsilon * signs).to(dtype)[None]


def _native_moe_tensors(native: NativeMoe, mlp: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    keys = native.keys
    gate_up, down = _pad_experts(mlp["experts.gate_up_proj"], mlp["experts.down_proj"])
    size = gate_up.shape[1] // 2
    out = {keys.router: mlp["gate.weight"]}
    if "{e}" in keys.experts[0]:
        for e in range(gate_up.shape[0]):
            out.update(_matrices(tuple(name.format(e=e) for name in keys.experts), gate_up[e, :size], gate_up[e, size:], down[e]))
    elif len(keys.experts) == 2:  # gate and up stacked: the fused tensor as it is (no copy of every expert)
        out.update(dict(zip(keys.experts, (gate_up, down), strict=True)))
    else:
        out.update(_matrices(keys.experts, gate_up[:, :size], gate_up[:, size:], down))
    shared: list[torch.Tensor] | None = None
    if "shared_expert.gate_proj.weight" in mlp:
        shared = [mlp[f"shared_expert.{name}_proj.weight"] for name in ("gate", "up", "down")]
    elif native.shared_always:  # a single zero neuron adds exactly 0
        zeros = gate_up.new_zeros
        shared = [zeros(1, hidden), zeros(1, hidden), zeros(hidden, 1)]
    if shared is not None:
        gate, up, down = shared
        if native.shared == "gated":
            down = down * 2.0  # undoes the gate's constant 0.5 (exact in fp)
            out[keys.shared_gate] = _half_gate(hidden, gate_up.dtype)
        out.update(_matrices(keys.shared, gate, up, down))
    if keys.score_bias:
        out[keys.score_bias] = gate_up.new_zeros(1, gate_up.shape[0])
    return out


def created_by_conversion(target: str, name: str, ffn_module: str = "mlp") -> bool:
    """Whether a checkpoint name of an MoE layer (relative to the layer) holds something conversion creates
    rather than copies from the dense FFN: the router, and a target's shared-expert gate or selection bias."""
    if target == MOEFORGE:
        return name.startswith(f"{ffn_module}.gate.")
    keys = known_native_moe(target).keys
    return name in (keys.router, keys.shared_gate, keys.score_bias)


def layer_tensors(
    target: str, prefix: str, layer: dict[str, torch.Tensor], mlp: dict[str, torch.Tensor] | None, ffn_module: str = "mlp"
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one decoder layer (``prefix`` = ``model.layers.{i}.``): its non-FFN tensors as
    they were (``layer``, names relative to the layer), plus the MoE block built from canonical ``mlp``
    tensors, or the dense FFN as it was when ``mlp`` is None (``layer`` then holds it)."""
    out = dict(layer)
    if mlp is not None:
        if target == MOEFORGE:
            out.update({f"{ffn_module}.{name}": tensor for name, tensor in mlp.items()})
        else:
            hidden = mlp["experts.gate_up_proj"].shape[2]
            out.update(_native_moe_tensors(known_native_moe(target), mlp, hidden))
    return {prefix + name: tensor for name, tensor in out.items()}


def outer_sources(target: str, names: list[str]) -> dict[str, str]:
    """Checkpoint name → source name of the tensors outside the decoder layers (embeddings, final norm,
    head), as the target stores them (a target that needs an untied head gets the embedding twice). Names
    rather than tensors, so a converter can read, write and release them one at a time."""
    out = {name: name for name in names}
    native = native_moe(target)
    if native is not None and native.untied_head and "lm_head.weight" not in out:
        out["lm_head.weight"] = "model.embed_tokens.weight"
    return out


def outer_tensors(target: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers, as the target stores them (:func:`outer_sources`)."""
    return {name: tensors[source] for name, source in outer_sources(target, list(tensors)).items()}
