"""moeforge's experts backends, in transformers' experts-forward signature.

Every function here is ``forward(experts, hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k])
-> [T, d]`` for an experts module holding ``gate_up_proj [E, 2f, d]`` and ``down_proj [E, d, f]`` (or the
transposed layout), i.e. transformers' ``@use_experts_implementation`` contract. Registered in its
``ExpertsInterface`` they serve moeforge_llama and every native export (Mixtral, Qwen2-MoE, ...) alike:
``from_pretrained(..., experts_implementation="moeforge_auto")``.

* ``grouped``: slots sorted by expert, one grouped GEMM per projection (``grouped_mm`` where it works, an
  ``mm`` loop where it does not, see :mod:`.grouped_linear`), the routing weight applied on the narrower
  side of the down projection (``f``-wide before it or ``d``-wide after: it is linear, so both are equal),
  and adjoint gathers instead of scatters (:mod:`.slots`).
* ``per_token``: for a handful of token-expert pairs (decoding), each pair's expert applied directly: no
  sort, no bookkeeping (with gradients, small experts' weights are gathered instead, see
  :data:`GATHER_BYTES_PER_EXPERT`). Its cost is Python overhead per pair, so it loses past a few.
* ``auto``: on CUDA a fused kernel (sonic-moe, through transformers) when it is installed and applies;
  on CPU the pairs' weights gathered into two batched products when that copies little (few tokens, many
  small experts), ``per_token`` for at most :data:`PER_TOKEN_MAX_SLOTS` pairs, else ``grouped``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

import torch
from transformers.integrations.moe import grouped_mm_experts_forward

from moeforge.experts.grouped_linear import grouped_linear
from moeforge.experts.slots import combine, dispatch, plan_slots

PER_TOKEN_MAX_SLOTS = 4
"""``auto`` switches from ``per_token`` to ``grouped`` above this many token-expert pairs (measured on CPU
by ``benchmarks/moe_layer.py``: per pair, ``per_token`` costs ~3 small ops; ``grouped`` has a fixed cost)."""


class _Experts(Protocol):
    """What transformers' experts contract guarantees of an experts module (the optional flags are read
    with ``getattr``)."""

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    num_experts: int
    act_fn: Callable[[torch.Tensor], torch.Tensor]


def _contract(experts: torch.nn.Module) -> _Experts:
    """``experts`` with its contract's attribute types (torch types every module attribute ``Tensor | Module``)."""
    return cast(_Experts, experts)


def _weights(experts: _Experts) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_up [E, 2f, d]`` and ``down [E, d, f]`` in the ``nn.Linear`` layout, whatever the storage."""
    if getattr(experts, "is_transposed", False):
        return experts.gate_up_proj.transpose(-2, -1), experts.down_proj.transpose(-2, -1)
    return experts.gate_up_proj, experts.down_proj


def _gate(experts: _Experts, gate_up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` the way the module defines it (``_apply_gate`` covers interleaved layouts)."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _unsupported(experts: torch.nn.Module) -> bool:
    """Biases, post-expert norms, ungated experts and expert parallelism (sentinel slots) are handled by
    transformers' own grouped path, which knows them."""
    return (
        getattr(experts, "has_bias", False)
        or getattr(experts, "has_post_expert_norm", False)
        or not getattr(experts, "has_gate", True)
        or getattr(experts, "_is_expert_parallel", False)
    )


def grouped_experts_forward(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    use_grouped_mm: bool | None = None,
) -> torch.Tensor:
    """Sort-by-expert + grouped GEMM (``use_grouped_mm`` forces an implementation; None: per call)."""
    if _unsupported(experts):
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    module = _contract(experts)
    gate_up, down = _weights(module)
    plan = plan_slots(top_k_index, module.num_experts)
    counts = None if hidden_states.device.type == "cuda" else plan.counts  # no host sync on GPU
    rows = dispatch(hidden_states, plan)
    hidden = _gate(module, grouped_linear(rows, gate_up, plan.offsets, counts, use_grouped_mm=use_grouped_mm))
    weights = top_k_weights.reshape(-1)[plan.order, None].to(hidden.dtype)
    weigh_hidden = hidden.shape[-1] <= down.shape[-2]  # the narrower side: f (before down_proj) or d (after)
    if weigh_hidden:
        hidden = hidden * weights
    out = grouped_linear(hidden, down, plan.offsets, counts, use_grouped_mm=use_grouped_mm)
    if not weigh_hidden:
        out = out * weights
    return combine(out, plan).to(hidden_states.dtype)


def per_token_experts_forward(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Each token-expert pair through its expert, no sorting: for decoding's one token and k experts."""
    if _unsupported(experts):
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    module = _contract(experts)
    gate_up, down = _weights(module)
    training = torch.is_grad_enabled() and (gate_up.requires_grad or down.requires_grad)
    if training and _gather_is_cheaper(gate_up, down, top_k_index.numel()):
        return _gathered_pairs(module, hidden_states, top_k_index, top_k_weights, gate_up, down)
    gate_ups: torch.Tensor | tuple[torch.Tensor, ...] = gate_up
    downs: torch.Tensor | tuple[torch.Tensor, ...] = down
    if training:  # one view op for autograd: indexing would zero-fill a full [E, ...] gradient per pair
        gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    linear = torch.nn.functional.linear
    rows = []
    for token, (choices, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights.unbind(0), strict=True)):
        x = hidden_states[token : token + 1]
        total = None
        for j, e in enumerate(choices):
            hidden = _gate(module, linear(x, gate_ups[e].to(x.dtype))) * weights[j].to(x.dtype)
            out = linear(hidden, downs[e].to(x.dtype))
            total = out if total is None else total + out
        assert total is not None, "top_k >= 1: every token has an expert"
        rows.append(total)
    if not rows:
        return hidden_states.new_zeros(hidden_states.shape)
    return torch.cat(rows)


GATHER_BYTES_PER_EXPERT = 64 * 1024
"""Gathering the pairs' expert weights (a copy per pair; scattered back in backward) beats both a loop over
experts (fixed cost per expert) and unbinding them for autograd (a view per expert each way) when it
copies less than ~64 KB per expert of the layer (CPU, hidden 512: E=128 x f=64 at 1-16 tokens gathers,
E<=32 does not)."""


def _gather_is_cheaper(gate_up: torch.Tensor, down: torch.Tensor, pairs: int) -> bool:
    per_expert = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    return pairs * per_expert < GATHER_BYTES_PER_EXPERT * gate_up.shape[0]


def _gathered_pairs(experts, hidden_states, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    """The pairs' expert weights gathered, then two batched matrix-vector products (weights on the left:
    the layout bmm runs fastest on CPU, bf16 included)."""
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    rows = hidden_states.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # [pairs, d, 1]
    hidden = torch.bmm(gate_up.index_select(0, flat).to(rows.dtype), rows).squeeze(-1)
    hidden = _gate(experts, hidden) * top_k_weights.reshape(-1, 1).to(rows.dtype)
    out = torch.bmm(down.index_select(0, flat).to(rows.dtype), hidden.unsqueeze(-1)).squeeze(-1)
    return out.view(num_tokens, top_k, out.shape[-1]).sum(1)


def _gpu_kernel(experts: torch.nn.Module, hidden_states: torch.Tensor) -> Callable | None:
    """transformers' fused sonic-moe kernel when it applies (CUDA, Hopper+, 16-bit, gated, installed)."""
    if hidden_states.device.type != "cuda" or hidden_states.dtype not in (torch.bfloat16, torch.float16):
        return None
    if _unsupported(experts):
        return None
    from moeforge.experts.gpu import sonicmoe_forward

    return sonicmoe_forward()


def auto_experts_forward(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Pick by device, dtype and work (thresholds measured on CPU, ``benchmarks/moe_layer.py``): a fused GPU
    kernel when one applies; on CPU, the pairs' weights gathered into two batched products when that copies
    little (many small experts, few tokens) unless a fp32 decoding step can index them directly, the
    per-pair loop for a few pairs, else ``grouped`` (which picks ``grouped_mm`` or its fallback per call)."""
    kernel = _gpu_kernel(experts, hidden_states)
    if kernel is not None:
        return kernel(experts, hidden_states, top_k_index, top_k_weights)
    if hidden_states.device.type == "cpu" and not _unsupported(experts):
        pairs = top_k_index.numel()
        gate_up, down = _weights(_contract(experts))
        training = torch.is_grad_enabled() and (gate_up.requires_grad or down.requires_grad)
        few = pairs <= PER_TOKEN_MAX_SLOTS
        if _gather_is_cheaper(gate_up, down, pairs) and (training or not few or hidden_states.dtype != torch.float32):
            return _gathered_pairs(experts, hidden_states, top_k_index, top_k_weights, gate_up, down)
        if few:
            return per_token_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    return grouped_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
