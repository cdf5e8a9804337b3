"""The ``adapter:`` recipe section: the seed's names are accepted, impossible values are refused by name,
and a quantised base on a machine without CUDA is one line saying what is needed."""

from __future__ import annotations

import pytest

from moeforge.config.recipe import parse_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError
from moeforge.io.quantization import quantization_config


def _recipe(**adapter) -> TrainRecipe:
    return parse_recipe(
        {"stage": "sft", "model": "default", "output": "out", "data": {"builtin": "sft-demo"}, "adapter": adapter}, model=TrainRecipe
    )


def test_defaults_and_seed_aliases() -> None:
    spec = _recipe(num_experts=8, expert_capacity=2, lora_rank=16, lora_alpha=32, lora_dropout=0.0).adapter
    assert (spec.method, spec.num_experts, spec.top_k, spec.rank, spec.alpha, spec.dropout) == ("moe_lora", 8, 2, 16, 32.0, 0.0)
    assert spec.targets == ["gate_proj", "up_proj", "down_proj"] and spec.balance_coef == 0.01


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"num_experts": 2, "top_k": 3}, "top_k .*3 exceeds the number of experts 2"),
        ({"num_experts": 4, "layer_experts": {3: 1}}, "top_k .*2 exceeds the number of experts 1"),
        ({"method": "mixlora"}, "adapter.method"),
        ({"targets": ["fc1"]}, "adapter.targets"),
        ({"targets": []}, "targets is empty"),
        ({"targets": ["q_proj"]}, "moe_lora needs FFN targets"),
        ({"dropout": 1.0}, "adapter.dropout"),
        ({"rank": 0}, "adapter.rank"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "exclude each other"),
        ({"experts": 4}, "adapter.experts: unknown key"),
    ],
)
def test_bad_values_are_rejected_by_name(adapter, message) -> None:
    with pytest.raises(MoeforgeError, match=message):
        _recipe(**adapter)


def test_adapter_excludes_moice_and_freeze_layers() -> None:
    base = {"stage": "pt", "model": "default", "output": "out", "data": {"builtin": "pt-demo"}, "adapter": {}}
    with pytest.raises(MoeforgeError, match="adapter and moice exclude each other"):
        parse_recipe({**base, "moice": {}}, model=TrainRecipe)
    with pytest.raises(MoeforgeError, match="freeze_layers has no effect with an adapter"):
        parse_recipe({**base, "freeze_layers": "0-3"}, model=TrainRecipe)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantised_base_without_cuda_says_what_is_needed(bits, monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(MoeforgeError, match=f"load_in_{bits} .*needs a CUDA GPU"):
        quantization_config(bits)
