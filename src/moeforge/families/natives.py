"""Native transformers MoE architectures moeforge exports to (and loads, trains, evaluates), one declaration each.

A :class:`NativeMoe` says what the architecture can hold (shared experts and how they add up, which
layers may stay dense, whether top-k weights may stay unnormalised) and how its config fields and
checkpoint keys are named. Which dense family it can hold exactly, and on what condition, is the
family's :class:`~moeforge.families.spec.Sibling` entry. Every pairing was checked by loading the export
with plain transformers and comparing logits with the dense source (``tests/families``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SharedForm = Literal["none", "gated", "plain"]


def _per_expert(prefix: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> tuple[str, ...]:
    return tuple(f"{prefix}.experts.{{e}}.{name}.weight" for name in names)


@dataclass(frozen=True)
class MoeKeys:
    """An MoE layer's checkpoint names, relative to ``model.layers.{i}.``.

    ``experts`` and ``shared`` hold three names (gate, up, down matrices) or two (gate and up stacked in one
    matrix, gate rows first; then down). Expert names containing ``{e}`` are per expert (``[I, H]``,
    ``[H, I]``); without it they are whole 3-D tensors (``[E, 2I, H]``, ``[E, H, I]``)."""

    router: str = "mlp.gate.weight"
    experts: tuple[str, ...] = _per_expert("mlp")
    shared: tuple[str, ...] = (
        "mlp.shared_expert.gate_proj.weight",
        "mlp.shared_expert.up_proj.weight",
        "mlp.shared_expert.down_proj.weight",
    )
    shared_gate: str = "mlp.shared_expert_gate.weight"
    score_bias: str | None = None
    """A per-expert selection bias ``[1, E]`` the architecture always has (written as zeros: no bias)."""


@dataclass(frozen=True)
class LlamaCpp:
    """How llama.cpp (its ``convert_hf_to_gguf.py`` and runtime) treats an architecture: measured by
    ``benchmarks/engine_check.py``; its source says why."""

    runs: bool = True
    renormalizes: bool = True
    """Whether it renormalises the top-k weights (whatever the config says)."""
    dense_layers: bool = False
    """Whether its converter maps layers that keep a dense FFN."""
    sliding_window: bool = True
    """Whether it applies the config's sliding window."""
    head_dim_free: bool = True
    """Whether a head size other than hidden / heads survives conversion."""


@dataclass(frozen=True)
class NativeMoe:
    model_type: str
    title: str
    config_class: str
    """transformers' config class name (imported only when used)."""
    architecture: str
    fields: dict[str, str]
    """Config field for each of: ``num_experts``, ``top_k``, ``expert_size`` and, where they exist,
    ``shared_size`` and ``dense_size`` (the FFN size of layers kept dense)."""
    keys: MoeKeys = MoeKeys()
    shared: SharedForm = "none"
    """How a shared expert adds to the routed ones: not at all, times sigmoid(gate·x), or plainly."""
    shared_always: bool = False
    """Every MoE layer has a shared expert; one that holds nothing is written as a single zero neuron."""
    dense_layers: bool = False
    """Some layers may keep their dense FFN (listed in ``mlp_only_layers``)."""
    norm_flag: str | None = None
    """Config field switching the top-k renormalisation; without one the architecture always renormalises."""
    constants: dict[str, Any] = field(default_factory=dict)
    """Config values every export sets."""
    untied_head: bool = False
    """Always write ``lm_head.weight`` (a copy of the embedding for a tied source): llama.cpp's loader for
    this architecture requires it."""
    llama_cpp: LlamaCpp = LlamaCpp()
    llama_attention: bool = False
    """Its attention is Llama's (see :attr:`DenseFamily.llama_attention`): MoICE can take it over."""


_GRANITE = MoeKeys(
    router="block_sparse_moe.router.layer.weight",
    experts=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
    shared=("shared_mlp.input_linear.weight", "shared_mlp.output_linear.weight"),
)
_QWEN = dict(num_experts="num_experts", top_k="num_experts_per_tok", expert_size="moe_intermediate_size")

NATIVE_MOES: tuple[NativeMoe, ...] = (
    NativeMoe(
        "mixtral",
        "Mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        fields=dict(num_experts="num_local_experts", top_k="num_experts_per_tok", expert_size="intermediate_size"),
        keys=MoeKeys(router="block_sparse_moe.gate.weight", experts=_per_expert("block_sparse_moe", ("w1", "w3", "w2"))),
        constants={"router_jitter_noise": 0.0},
        llama_cpp=LlamaCpp(sliding_window=False),
        llama_attention=True,
    ),
    NativeMoe(
        "qwen2_moe",
        "Qwen2-MoE",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        fields=dict(_QWEN, shared_size="shared_expert_intermediate_size", dense_size="intermediate_size"),
        shared="gated",
        shared_always=True,
        dense_layers=True,
        norm_flag="norm_topk_prob",
        untied_head=True,
        llama_cpp=LlamaCpp(renormalizes=False),
        llama_attention=True,
        constants={"decoder_sparse_step": 1, "use_sliding_window": False},
    ),
    NativeMoe(
        "qwen3_moe",
        "Qwen3-MoE",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        fields=dict(_QWEN, dense_size="intermediate_size"),
        dense_layers=True,
        norm_flag="norm_topk_prob",
        constants={"decoder_sparse_step": 1},
        llama_attention=True,
    ),
    NativeMoe(
        "qwen3_5_moe_text",
        "Qwen3.5-MoE (text)",
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        fields=dict(_QWEN, shared_size="shared_expert_intermediate_size"),
        shared="gated",
        shared_always=True,
    ),
    NativeMoe(
        "granitemoe",
        "Granite-MoE",
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        fields=dict(num_experts="num_local_experts", top_k="num_experts_per_tok", expert_size="intermediate_size"),
        keys=_GRANITE,
        llama_cpp=LlamaCpp(head_dim_free=False),
        llama_attention=True,
    ),
    NativeMoe(
        "granitemoeshared",
        "Granite-MoE with shared experts",
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        fields=dict(
            num_experts="num_local_experts",
            top_k="num_experts_per_tok",
            expert_size="intermediate_size",
            shared_size="shared_intermediate_size",
        ),
        shared="plain",
        keys=_GRANITE,
        llama_cpp=LlamaCpp(head_dim_free=False),
        llama_attention=True,
    ),
    NativeMoe(
        "flex_olmo",
        "FlexOlmo",
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        fields=dict(num_experts="num_experts", top_k="num_experts_per_tok", expert_size="intermediate_size"),
        norm_flag="norm_topk_prob",
        llama_cpp=LlamaCpp(runs=False),
    ),
    NativeMoe(
        "ernie4_5_moe",
        "ERNIE 4.5 MoE",
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        fields=dict(num_experts="moe_num_experts", top_k="moe_k", expert_size="moe_intermediate_size", dense_size="intermediate_size"),
        keys=MoeKeys(score_bias="mlp.moe_statics.e_score_correction_bias"),
        constants={"moe_num_shared_experts": 0, "moe_layer_start_index": 0, "moe_layer_end_index": -1, "moe_layer_interval": 1},
    ),
)

_BY_TYPE = {native.model_type: native for native in NATIVE_MOES}
NATIVE_MODEL_TYPES: tuple[str, ...] = tuple(_BY_TYPE)


def native_moe(model_type: str) -> NativeMoe | None:
    return _BY_TYPE.get(model_type)
