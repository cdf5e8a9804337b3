"""Fixtures for conversion tests: tiny dense sources with large enough weights that routing and
logits are far from zero (so an inexact conversion shows up), and a helper that converts one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeforge.config.recipe import parse_recipe
from moeforge.conversion import ConversionResult, convert
from tests.helpers import build_tiny_llama, make_tiny_llama_config, save_tiny_llama

SOURCE_VARIANTS = {
    # GQA (4 heads, 2 kv heads), untied head
    "gqa": dict(initializer_range=0.2),
    # odd sizes, multi-query attention, tied embeddings
    "odd_tied": dict(
        initializer_range=0.2, hidden_size=48, intermediate_size=120, num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True
    ),
}


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: save_tiny_llama(root / name, make_tiny_llama_config(**cfg), seed=1) for name, cfg in SOURCE_VARIANTS.items()}


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(7))


def dense_logits(source: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def run_convert(source: Path, output: Path, moe: dict[str, Any] | None = None, **top: Any) -> ConversionResult:
    recipe = parse_recipe({"source": str(source), "output": str(output), "moe": moe or {}, **top})
    return convert(recipe, log=lambda _line: None)


def load_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import moeforge  # noqa: F401  (registers moeforge_llama)

    # eager experts: transformers' default grouped_mm rejects the odd expert sizes some cases use
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits


__all__ = ["build_tiny_llama", "dense_logits", "load_logits", "run_convert"]
