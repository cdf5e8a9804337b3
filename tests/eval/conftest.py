"""Tiny checkpoints for evaluation tests: a dense LLaMA and its Mixtral conversion, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeforge.config.recipe import parse_recipe
from moeforge.conversion import convert
from tests.eval.fake_harness import FakeHarness
from tests.helpers import make_tiny_llama_config, save_tiny_llama

# positions for windows of up to 128 tokens; larger weights so routing is far from uniform
TINY_CONFIG = dict(initializer_range=0.2, max_position_embeddings=128)


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("dense") / "tiny", make_tiny_llama_config(**TINY_CONFIG), seed=1)


def _convert(source: Path, output: Path, moe: dict, export: str) -> Path:
    recipe = parse_recipe({"source": str(source), "output": str(output), "moe": moe, "export": export})
    return convert(recipe, log=lambda _line: None).output


@pytest.fixture(scope="session")
def mixtral_dir(dense_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 experts top-2 in every layer, copy upcycled with noise so experts and routing differ."""
    moe = {"num_experts": 4, "top_k": 2, "copy": {"noise": 0.5}}
    return _convert(dense_dir, tmp_path_factory.mktemp("mixtral") / "moe", moe, "mixtral")


@pytest.fixture(scope="session")
def pmoe_dir(dense_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """moeforge_llama with a different expert count in each layer (4, 8, 3)."""
    moe = {"num_experts": [4, 8, 3], "top_k": 2, "copy": {"noise": 0.5}}
    return _convert(dense_dir, tmp_path_factory.mktemp("pmoe") / "moe", moe, "moeforge")


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> FakeHarness:
    """A fake ``lm_eval`` package installed in ``sys.modules`` for the test."""
    fake = FakeHarness()
    fake.install(monkeypatch)
    return fake
