"""What moeforge's own attention modules share: taking over a Llama-style attention module and its projections.

MoICE (:mod:`moeforge.modeling.moice`) and attention MoE (:mod:`moeforge.modeling.attention_moe`) recompute a
layer's attention in their own forward. They keep the module they replace as it was — its ``q/k/v/o_proj``
(with or without bias), optional per-head ``q_norm``/``k_norm`` (Qwen3), scaling (Granite's multiplier),
dropout and sliding window — under the same attribute names, so a checkpoint keeps the dense keys. Only
families whose attention is Llama's (:attr:`moeforge.families.DenseFamily.llama_attention`) fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

_TAKEN_OVER = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


class LlamaAttentionTakeover(nn.Module):
    """Base class: the replaced attention's settings and submodules (plus ``extra`` ones it has, such as an
    attention MoE's ``head_gate`` under MoICE), and the un-rotated projections of a forward."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module  # only where the family has per-head q/k norms (Qwen3)
    k_norm: nn.Module

    def __init__(self, attention: Any, extra: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.attention_dropout = attention.attention_dropout
        self.is_causal = True
        self.sliding_window = getattr(attention, "sliding_window", getattr(attention.config, "sliding_window", None))
        self.num_heads = attention.config.num_attention_heads
        for name in (*_TAKEN_OVER, *extra):
            if hasattr(attention, name):
                setattr(self, name, getattr(attention, name))

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query, key, value)`` as ``[B, heads, T, head_dim]``, normed where the family norms them, not rotated."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        value = self.v_proj(hidden_states).view(hidden_shape)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transformers' attention interface of the model's ``attn_implementation`` (SDPA, eager, flash where
        installed) with the module's scaling, dropout and sliding window: ``(output [B, T, heads, d], weights)``."""
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        options: dict[str, Any] = {"dropout": 0.0 if not self.training else self.attention_dropout, "scaling": self.scaling}
        if self.sliding_window is not None:
            options["sliding_window"] = self.sliding_window
        return interface(self, query, key, value, attention_mask, **options, **kwargs)
