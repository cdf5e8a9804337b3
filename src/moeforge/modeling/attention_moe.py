"""Attention MoE: a layer's attention heads split into groups that a per-token router selects.

A dense attention's output is ``o_proj(concat_h out_h) = Σ_g o_proj_g(out_g)``: a sum over groups of
heads, each through its own columns of ``o_proj``. Attention MoE weights that sum per token:
``Σ_{g shared} o_g + scale · Σ_{g in top-k} w_g · o_g``, with ``w`` the router's softmax over the routed
groups, renormalised over the top k. A group is a run of consecutive query heads with the KV heads they
read (a whole KV group by default, so grouped-query attention stays valid), so a checkpoint keeps the
dense projections unchanged and only adds ``self_attn.head_gate.router.weight``. With ``top_k`` = all
routed groups, a zero router (weights 1/R) and ``scale`` = R, every group gets weight 1: the dense
attention (up to fp32 round-off in the weights, 1/R·R).

What is computed for groups a token did not select (LLaMA-MoE v2 instead runs each group's attention on
the tokens routed to it only, so a group never sees the others' keys and needs its own cache):

- every token's keys and values, for every KV head, and they are cached: a later token may select any
  group and attends to all earlier tokens in it, so the KV cache is transformers' own, unchanged;
- queries for every head (one ``q_proj`` matmul; slicing the weight per step would cost as much);
- attention only over the KV groups that some token of the batch selected; heads of a computed group
  that a token did not select get weight 0. In one-token decoding (batch 1) that is the token's ``top_k``
  groups, so attention over the cache, the cost that grows with context, shrinks to the selected share;
  in a prefill or training batch nearly every group is selected and the cost is dense attention plus
  the router. ``benchmarks/attention_moe_cost.py`` measures both.

That module (:class:`MoeforgeAttentionMoE`) runs on transformers' attention interface (SDPA by default,
eager, flash where installed) for the families whose attention is Llama's
(:attr:`moeforge.families.DenseFamily.llama_attention`). Every other family keeps its own attention module
and forward (Gemma's soft-capping and per-layer RoPE, OLMo's q/k norms over all heads, Phi-3's fused qkv,
Qwen3.5's output gate, Gemma 4's shared KV, ...): the module becomes a subclass of its class
(:func:`head_gated_class`) that computes the gates from its input and, during its forward, has its
``o_proj`` weight each head's slice of its input by them. Every family computes
``o_proj(attn_output.reshape(..., heads · head_dim))``, so that is the same sum over head groups; attention
is then computed for every head, selected or not (the skipping above is the Llama module's).
"""

from __future__ import annotations

import importlib
from typing import Any, cast

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from moeforge.errors import MoeforgeError
from moeforge.families import DENSE_FAMILIES, has_llama_attention
from moeforge.modeling.configuration import AttentionMoeLayerSpec, MoeLayerSpec
from moeforge.modeling.llama_attention import LlamaAttentionTakeover
from moeforge.modeling.routers import LinearRouter


class AttentionRouter(LinearRouter):
    """A linear router over a layer's attention input choosing head groups. ``decisions_per_token`` marks it
    as an attention router (freezing role ``attention_router``, telemetry label ``N.heads``, apart from a MoICE
    router's ``N.attn`` on the same layer); its losses are the recipe's router losses, averaged with the FFN
    routers' per layer."""

    decisions_per_token = 1


class HeadGroupGate(nn.Module):
    """Per-token, per-head output weights of one attention MoE layer: 1 for shared groups, ``scale · w`` for
    the routed groups the router selected, 0 for the others."""

    head_column: torch.Tensor

    def __init__(self, hidden_size: int, num_heads: int, spec: AttentionMoeLayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.router = AttentionRouter(
            hidden_size, MoeLayerSpec(num_experts=len(spec.routed_experts), top_k=spec.top_k, expert_intermediate_size=0)
        )
        self.register_buffer("head_column", self._head_column(num_heads), persistent=False)

    def _head_column(self, num_heads: int) -> torch.Tensor:
        """For each head, the column of its group's weight among the routed weights (the last column, always 1,
        for a shared group)."""
        routed = self.spec.routed_experts
        column = torch.full((self.spec.num_experts,), len(routed), dtype=torch.long)
        column[list(routed)] = torch.arange(len(routed))
        return column[torch.arange(num_heads) // (num_heads // self.spec.num_experts)]

    def reset_index(self) -> None:
        """Refill the index buffer: ``from_pretrained`` builds the model on the meta device and leaves buffers
        that are not saved (this one) uninitialised, so the model's ``_init_weights`` calls this."""
        init.copy_(self.head_column, self._head_column(self.head_column.numel()))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [B, T, H]`` (the attention's input) -> fp32 weights ``[B, T, heads]``."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, indices = self.router(flat)
        routed = weights.new_zeros(flat.shape[0], self.router.num_experts + 1)
        routed = routed.scatter(-1, indices, weights * self.spec.scale)
        routed[:, -1] = 1.0
        per_head = routed[:, self.head_column]
        return per_head.view(*hidden_states.shape[:-1], -1)


class MoeforgeAttentionMoE(LlamaAttentionTakeover):
    """Takes over one Llama-style attention module's projections (same parameter names, so checkpoints keep
    the dense keys) and adds ``head_gate``; see the module docstring for what it computes."""

    def __init__(self, attention: Any, spec: AttentionMoeLayerSpec) -> None:
        super().__init__(attention)
        weight = attention.q_proj.weight
        self.head_gate = HeadGroupGate(attention.config.hidden_size, self.num_heads, spec).to(device=weight.device, dtype=weight.dtype)

    def _computed_kv_heads(self, gates: torch.Tensor) -> slice | torch.Tensor | None:
        """The KV heads whose query heads some token gives a non-zero weight: a slice when they are consecutive
        (always at top-1; a view, so the cache is not copied), else their indices; ``None`` when that is all of
        them (always at top_k = all routed groups: then nothing is checked, which would cost a device sync)."""
        if self.head_gate.spec.top_k == len(self.head_gate.spec.routed_experts):
            return None
        used = gates.reshape(-1, self.num_heads // self.num_key_value_groups, self.num_key_value_groups).ne(0).any(-1).any(0)
        if bool(used.all()):
            return None
        chosen = used.nonzero().flatten()
        first, last = int(chosen[0]), int(chosen[-1])
        return slice(first, last + 1) if last - first + 1 == len(chosen) else chosen

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query, key, value = self.project(hidden_states)
        assert position_embeddings is not None  # Llama-style decoder layers always pass them
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:  # every KV head: a later token may select any group
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        gates = self.head_gate(hidden_states)  # [B, T, heads]
        kv_heads, heads = self._computed_kv_heads(gates), None
        per_kv = self.num_key_value_groups  # query heads per KV head
        if isinstance(kv_heads, slice):
            heads = slice(kv_heads.start * per_kv, kv_heads.stop * per_kv)
        elif kv_heads is not None:
            heads = (kv_heads[:, None] * per_kv + torch.arange(per_kv, device=kv_heads.device)).flatten()
        if heads is not None:
            query, key, value, gates = query[:, heads], key[:, kv_heads], value[:, kv_heads], gates[..., heads]

        out, weights = self.attend(query, key, value, attention_mask, **kwargs)  # [B, T, computed heads, d]
        out = out * gates.unsqueeze(-1).to(out.dtype)
        if heads is not None:
            computed, out = out, out.new_zeros(*input_shape, self.num_heads, self.head_dim)
            out[:, :, heads] = computed
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class _HeadGatedAttention(nn.Module):
    """Placed before a family's attention class (:func:`head_gated_class`): the family's own forward, in which
    ``self.o_proj`` is, for that call only, ``o_proj`` applied to the head outputs weighted by the call's gates
    (an instance attribute, found before the child module; the child, and whatever wraps it, such as a LoRA
    adapter, is what runs, on the gated input). Nothing is left between calls, so a recomputing gradient
    checkpoint or a deep copy sees the plain module."""

    head_gate: HeadGroupGate
    o_proj: nn.Module

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        gates, o_proj = self.head_gate(hidden_states), self.o_proj  # gates [B, T, heads]

        def gated_o_proj(heads: torch.Tensor) -> torch.Tensor:  # [B, T, heads · head_dim], as every family calls it
            weighted = heads.view(*heads.shape[:-1], gates.shape[-1], -1) * gates.unsqueeze(-1).to(heads.dtype)
            return o_proj(weighted.flatten(-2))

        self.__dict__["o_proj"] = gated_o_proj  # nn.Module.__setattr__ would refuse a function over a child module
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            del self.__dict__["o_proj"]


def head_gated_class(attention_class: type[nn.Module]) -> type[nn.Module]:
    """The head-gated subclass of a family's attention class, built once and kept in this module under its name
    (``HeadGatedGemma3Attention``), so models pickle."""
    name = f"HeadGated{attention_class.__name__}"
    if name not in globals():
        doc = f"{attention_class.__name__} with attention MoE's head gate at o_proj's input."
        globals()[name] = type(name, (_HeadGatedAttention, attention_class), {"__module__": __name__, "__doc__": doc})
    return globals()[name]


def __getattr__(name: str) -> type:
    """A head-gated attention class by name, built on first use (as when a model is unpickled in a process that
    has not built it yet): the family's attention class lives in the module of its transformers model."""
    if name.startswith("HeadGated"):
        for family in DENSE_FAMILIES:
            module = importlib.import_module(MODEL_MAPPING[CONFIG_MAPPING[family.model_type]].__module__)
            base = getattr(module, name.removeprefix("HeadGated"), None)
            if isinstance(base, type) and issubclass(base, nn.Module):
                return head_gated_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_head_gate(attention: Any, spec: AttentionMoeLayerSpec) -> nn.Module:
    """``attention`` (a decoder layer's ``self_attn``) as an attention MoE of ``spec``: moeforge's module over its
    projections where it is Llama's, else the module itself made head-gated in place (its class; the
    parameters stay where and what they are)."""
    if has_llama_attention(attention.config):
        return MoeforgeAttentionMoE(attention, spec)
    heads, o_proj = attention.config.num_attention_heads, attention.o_proj
    if not isinstance(o_proj, nn.Linear) or o_proj.in_features % heads:
        raise MoeforgeError(
            f"attention_moe: {type(attention).__name__}.o_proj is not a linear map of {heads} heads' outputs; "
            "this model's attention cannot be split into head groups"
        )
    attention.__class__ = head_gated_class(type(attention))
    attention.head_gate = HeadGroupGate(attention.config.hidden_size, heads, spec).to(
        device=o_proj.weight.device, dtype=o_proj.weight.dtype
    )
    return attention


def install_attention_moe(decoder: nn.Module, config: Any) -> None:
    """Give every layer of ``decoder`` that ``config.attention_moe_layers`` names an attention MoE."""
    for index in range(config.num_hidden_layers):
        spec = config.attention_layer_spec(index)
        if spec is None:
            continue
        layer = cast(nn.ModuleList, decoder.layers)[index]
        attention = with_head_gate(layer.self_attn, spec)
        if config.router_aux_free:
            cast(HeadGroupGate, attention.head_gate).router.enable_expert_bias()
        layer.self_attn = attention
