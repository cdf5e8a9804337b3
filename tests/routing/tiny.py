"""Tiny MoE models for the routing tests (moeforge over Llama, Mixtral, Qwen2-MoE) and an independent capture of
router outputs, so the hooks under test are checked against logits read by other means."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import moeforge  # noqa: F401  (registers moeforge's architecture)
from moeforge.modeling import MoeforgeForCausalLM, MoeLayerSpec
from tests.helpers import moeforge_llama_config, sharpen

VOCAB = 96
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def moeforge_config(**overrides: Any):
    """Layer 0 dense, layer 1: 4 experts top-2 (linear gate), layer 2: 3 experts top-1 (mlp gate)."""
    values = dict(
        COMMON,
        intermediate_size=48,
        num_hidden_layers=3,
        moe_layers=[
            None,
            MoeLayerSpec(4, 2, 24).to_dict(),
            MoeLayerSpec(3, 1, 16, gate_type="mlp", gate_hidden_size=8).to_dict(),
        ],
    )
    values.update(overrides)
    return moeforge_llama_config(**values)


def moeforge_model(seed: int = 0, **overrides: Any):
    torch.manual_seed(seed)
    return sharpen(MoeforgeForCausalLM(moeforge_config(**overrides)), seed + 1)


def mixtral_model(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(
        **COMMON,
        intermediate_size=24,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.05,
    )
    return sharpen(MixtralForCausalLM(config), seed + 1)


def qwen2_moe_model(seed: int = 0) -> Qwen2MoeForCausalLM:
    """Three layers, the first dense (``mlp_only_layers``): routers must be found in layers 1 and 2 only."""
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        **COMMON,
        intermediate_size=48,
        num_hidden_layers=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        mlp_only_layers=[0],
        output_router_logits=True,
        router_aux_loss_coef=0.05,
    )
    return sharpen(Qwen2MoeForCausalLM(config), seed + 1)


def qwen3_moe_model(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        **COMMON,
        head_dim=8,
        intermediate_size=48,
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=0.05,
    )
    return sharpen(Qwen3MoeForCausalLM(config), seed + 1)


def batch(rows: int = 4, length: int = 9, seed: int = 3, pad: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded ids (row r has ``r`` pad tokens when ``pad``), the attention mask, and labels with the
    pads and the first two positions set to -100 (a prompt that is not scored)."""
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length, dtype=torch.long)
    if pad:
        for r in range(rows):
            mask[r, length - r :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
    """Shifted cross-entropy written out here: mean over label tokens, or sum / num_items."""
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none")
    total = per_token.sum()
    return total / (label_tokens(labels) if num_items is None else num_items)


@contextmanager
def captured_router_logits(model: nn.Module, router_type: type) -> Iterator[list[torch.Tensor]]:
    """Every ``router_type`` call's logits (with their graph), in call order, by plain forward hooks."""
    seen: list[torch.Tensor] = []
    routers = [m for m in model.modules() if isinstance(m, router_type)]
    hooks = [m.register_forward_hook(lambda _m, _a, out: seen.append(out[0])) for m in routers]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()
