"""Shared tiny models (dense LLaMA and its MoE conversions) and helpers for the training tests.

Every model here is built once per run of this package: a 3-layer LLaMA with a character-level chat tokenizer,
and its copy-upcycled MoE versions (4 experts, top-2) in each export: Mixtral, Qwen2-MoE (one shared
expert) and moeforge_llama. Runs are a handful of steps on batches of 2-4 rows of 32-64 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import moeforge  # noqa: F401  (registers moeforge_llama with the Auto classes)
from moeforge.config.recipe import parse_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.conversion import convert
from tests.helpers import make_tiny_llama_config, save_tiny_llama

MOE = {"num_experts": 4, "top_k": 2}
ARCHITECTURES = {
    "dense": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "moeforge": "MoeforgeLlamaForCausalLM",
}


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Train on one intra-op thread: these matrices are tiny, and on a shared 2-core machine a second
    thread makes each step several times slower (and its timing erratic) instead of faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"dense" | "mixtral" | "qwen2_moe" | "moeforge": checkpoint dir}``, built once per test run of this package."""
    root = tmp_path_factory.mktemp("train-models")
    dense = save_tiny_llama(root / "dense", make_tiny_llama_config(initializer_range=0.05))
    recipes = {
        "mixtral": {"export": "mixtral", "moe": MOE},
        "qwen2_moe": {"export": "qwen2_moe", "moe": {**MOE, "shared": {"num_experts": 1}}},
        "moeforge": {"export": "moeforge", "moe": MOE},
    }
    out = {"dense": dense}
    for name, recipe in recipes.items():
        convert(parse_recipe({"source": str(dense), "output": str(root / name), **recipe}), log=lambda _line: None)
        out[name] = root / name
    return out


def make_recipe(stage: str, model: Path | str | None, output: Path, data: dict[str, Any] | None = None, **extra: Any) -> TrainRecipe:
    """A small recipe: ``training`` keys in ``extra['training']`` are merged over quick defaults; ``model``
    None leaves the key out (a ``convert`` section in ``extra`` names the model)."""
    default_data = {
        "pt": {"builtin": "pt-demo", "max_rows": 16, "max_length": 32},
        "sft": {"builtin": "sft-demo", "max_rows": 16, "max_length": 64},
        "dpo": {"builtin": "dpo-demo", "max_rows": 16, "max_length": 64},
    }[stage]
    training = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "telemetry_steps": 1,
        "report_to": [],
        **extra.pop("training", {}),
    }
    return parse_recipe(
        {
            "stage": stage,
            **({} if model is None else {"model": str(model)}),
            "output": str(output),
            "data": data or default_data,
            "training": training,
            **extra,
        },
        model=TrainRecipe,
    )


def state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint (all ``*.safetensors`` shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(shard))
    assert tensors, f"no safetensors in {directory}"
    return tensors


def logged_losses(history: list[dict[str, Any]]) -> dict[int, float]:
    """``{step: loss}`` of the per-step training log (not the final ``train_loss`` summary)."""
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def provenance(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "moeforge.json").read_text())


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="package")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small training files, one per format; rows repeat, so a few steps at lr 1e-3 visibly lower the loss."""
    root = tmp_path_factory.mktemp("train-data")
    sentence = "the quick brown fox jumps over the lazy dog. "
    question, answer = "What is 2+2?", "4, of course."
    files = {
        "txt": root / "pt.txt",
        "text": _jsonl(root / "pt.jsonl", [{"text": sentence * 3}] * 8),
        "prompt_completion": _jsonl(root / "pc.jsonl", [{"prompt": question, "completion": answer}] * 8),
        "alpaca": _jsonl(root / "alpaca.jsonl", [{"instruction": "Add the numbers.", "input": "2+2", "output": answer}] * 8),
        "sharegpt": _jsonl(
            root / "sharegpt.jsonl",
            [{"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}] * 8,
        ),
        "messages": _jsonl(
            root / "messages.jsonl",
            [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}] * 8,
        ),
        "preference": _jsonl(root / "preference.jsonl", [{"prompt": question, "chosen": answer, "rejected": "5, I think."}] * 8),
    }
    files["txt"].write_text((sentence * 3 + "\n\n") * 8)
    return files
