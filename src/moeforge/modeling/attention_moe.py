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

Runs on transformers' attention interface (SDPA by default, eager, flash where installed), for the
families whose attention is Llama's (:attr:`moeforge.families.DenseFamily.llama_attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from moeforge.errors import MoeforgeError
from moeforge.families import has_llama_attention
from moeforge.modeling.configuration import AttentionMoeLayerSpec, MoeLayerSpec
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

    head_group: torch.Tensor
    routed_column: torch.Tensor

    def __init__(self, hidden_size: int, num_heads: int, spec: AttentionMoeLayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.router = AttentionRouter(
            hidden_size, MoeLayerSpec(num_experts=len(spec.routed_experts), top_k=spec.top_k, expert_intermediate_size=0)
        )
        head_group, routed_column = self._index(num_heads)
        self.register_buffer("head_group", head_group, persistent=False)
        self.register_buffer("routed_column", routed_column, persistent=False)

    def _index(self, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each head, its group; for each group, its column among the routed weights (the last column,
        always 1, for a shared group)."""
        routed = self.spec.routed_experts
        column = torch.full((self.spec.num_experts,), len(routed), dtype=torch.long)
        column[list(routed)] = torch.arange(len(routed))
        return torch.arange(num_heads) // (num_heads // self.spec.num_experts), column

    def reset_index(self) -> None:
        """Refill the index buffers: ``from_pretrained`` builds the model on the meta device and leaves buffers
        that are not saved (these) uninitialised, so the model's ``_init_weights`` calls this."""
        head_group, routed_column = self._index(self.head_group.numel())
        init.copy_(self.head_group, head_group)
        init.copy_(self.routed_column, routed_column)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [B, T, H]`` (the attention's input) -> fp32 weights ``[B, T, heads]``."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, indices = self.router(flat)
        routed = weights.new_zeros(flat.shape[0], self.router.num_experts + 1)
        routed = routed.scatter(-1, indices, weights * self.spec.scale)
        routed[:, -1] = 1.0
        per_head = routed[:, self.routed_column[self.head_group]]
        return per_head.view(*hidden_states.shape[:-1], -1)


class MoeforgeAttentionMoE(nn.Module):
    """Takes over one Llama-style attention module's projections (same parameter names, so checkpoints keep
    the dense keys) and adds ``head_gate``; see the module docstring for what it computes."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module  # only where the family has per-head q/k norms (Qwen3)
    k_norm: nn.Module

    def __init__(self, attention: Any, spec: AttentionMoeLayerSpec) -> None:
        super().__init__()
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.attention_dropout = attention.attention_dropout
        self.is_causal = True
        self.sliding_window = getattr(attention, "sliding_window", getattr(attention.config, "sliding_window", None))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if hasattr(attention, name):
                setattr(self, name, getattr(attention, name))
        self.num_heads = attention.config.num_attention_heads
        weight = attention.q_proj.weight
        self.head_gate = HeadGroupGate(attention.config.hidden_size, self.num_heads, spec).to(device=weight.device, dtype=weight.dtype)

    def _computed_kv_heads(self, gates: torch.Tensor) -> torch.Tensor | None:
        """The KV heads whose query heads some token gives a non-zero weight; ``None`` when that is all of them."""
        used = gates.reshape(-1, self.num_heads // self.num_key_value_groups, self.num_key_value_groups).ne(0).any(-1).any(0)
        return None if bool(used.all()) else used.nonzero().flatten()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        assert position_embeddings is not None  # Llama-style decoder layers always pass them
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:  # every KV head: a later token may select any group
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        gates = self.head_gate(hidden_states)  # [B, T, heads]
        kv_heads = self._computed_kv_heads(gates)
        heads = None
        if kv_heads is not None:
            heads = (
                kv_heads[:, None] * self.num_key_value_groups + torch.arange(self.num_key_value_groups, device=kv_heads.device)
            ).flatten()
            query, key, value, gates = query[:, heads], key[:, kv_heads], value[:, kv_heads], gates[..., heads]

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if self.sliding_window is not None else {}
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )  # [B, T, computed heads, d]
        out = out * gates.unsqueeze(-1).to(out.dtype)
        if heads is not None:
            out = out.new_zeros(*input_shape, self.num_heads, self.head_dim).index_copy(2, heads, out)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def install_attention_moe(decoder: nn.Module, config: Any) -> None:
    """Give every layer of ``decoder`` that ``config.attention_moe_layers`` names an attention MoE."""
    layers = [(index, spec) for index in range(config.num_hidden_layers) if (spec := config.attention_layer_spec(index))]
    if layers and not has_llama_attention(config):
        raise MoeforgeError(
            f"attention_moe: {config.base_model_type} attention is not Llama's; attention MoE works on llama, mistral, "
            "qwen2, qwen3 and granite models (docs/families.md)"
        )
    for index, spec in layers:
        layer = cast(nn.ModuleList, decoder.layers)[index]
        attention = MoeforgeAttentionMoE(layer.self_attn, spec)
        if config.router_aux_free:
            attention.head_gate.router.enable_expert_bias()
        layer.self_attn = attention
