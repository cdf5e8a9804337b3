"""Tiny random checkpoints of every dense family moeforge converts, built in code (no downloads).

Each config keeps what makes its family itself (hybrid and sliding layer types, per-layer-type RoPE,
no-RoPE layers, q/k norms, multipliers, fused FFNs, per-layer inputs and KV sharing) at a size that builds
in well under a second. Weights are random at a scale where logits spread far from ties, and norm weights
are random too (around 1, or around 0 for the ``(1 + w)`` norms), so a norm applied in the wrong place shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from tests.helpers import TINY_SHAPE, TINY_VOCAB_SIZE, make_tiny_tokenizer

COMMON: dict[str, Any] = dict(TINY_SHAPE)
_HYBRID = ["linear_attention", "full_attention", "linear_attention", "full_attention"]

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=12, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24, tie_word_embeddings=True),  # head_dim != hidden / heads
    "qwen3_5_text": dict(
        num_hidden_layers=4,
        layer_types=_HYBRID,
        head_dim=16,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        tie_word_embeddings=False,
    ),
    "gemma3_text": dict(
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=12,
        query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    ),
    "gemma4_text": dict(
        num_hidden_layers=4,
        head_dim=16,
        global_head_dim=32,
        sliding_window=12,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=TINY_VOCAB_SIZE,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    "granite": dict(
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0, tie_word_embeddings=True
    ),
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=2, tie_word_embeddings=True),
    "olmo2": dict(tie_word_embeddings=False),
    "olmo3": dict(num_hidden_layers=4, sliding_window=12, tie_word_embeddings=False),
    "glm4": dict(head_dim=16, tie_word_embeddings=False),
    "phi3": dict(intermediate_size=80, tie_word_embeddings=False),  # fused gate_up_proj; 80 neurons
    "ernie4_5": dict(head_dim=16, tie_word_embeddings=True),
    "exaone4": dict(
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=12,
        tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    ),
}
ZERO_CENTRED_NORMS = ("gemma3_text", "qwen3_5_text")
"""Families whose RMSNorm multiplies by ``1 + w``: their random norm weights are centred on 0."""


def family_config(model_type: str, **overrides: Any):
    values = {**COMMON, **FAMILY_CONFIGS[model_type], **overrides}
    if "vocab_size_per_layer_input" in values and "vocab_size_per_layer_input" not in overrides:
        values["vocab_size_per_layer_input"] = values["vocab_size"]  # Gemma 4's per-layer embeddings share the vocabulary
    return AutoConfig.for_model(model_type, **values)


def build_family(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **overrides)).eval()
    norm_centre = 0.0 if model_type in ZERO_CENTRED_NORMS else 1.0
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "A_log" in name or "dt_bias" in name:
                continue  # linear attention's decay parameters: keep their meaningful init
            if parameter.ndim == 1 and "norm" in name:
                parameter.copy_(norm_centre + 0.3 * torch.randn(parameter.shape, generator=g))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.2)
    return model


def save_family(path: Path, model_type: str, seed: int = 0, **overrides: Any) -> Path:
    model = build_family(model_type, seed, **overrides)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return Path(path)


def token_ids(length: int = 40, batch: int = 2, seed: int = 7) -> torch.Tensor:
    """Longer than every tiny sliding window, so windows matter."""
    return torch.randint(4, TINY_VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))
