"""build_experts: copies of one FFN cost one expert's memory, and every export writes them as full copies."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from moeforge.config.recipe import parse_recipe
from moeforge.conversion.experts import build_experts, scale_experts
from moeforge.conversion.export import layer_tensors
from moeforge.conversion.plan import build_plan

HIDDEN, FFN = 16, 20  # 20 neurons: native exports pad experts to 24


def _experts(moe: dict) -> dict[str, torch.Tensor]:
    recipe = parse_recipe({"source": "unused", "output": "unused", "moe": moe})
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=2)
    plan = build_plan(recipe, config, [FFN])
    generator = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(shape, generator=generator) for shape in ((FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)))
    assert plan.layers[0] is not None
    return build_experts(plan.layers[0], recipe.moe, gate, up, down, None, generator) | {"dense": torch.cat([gate, up]), "down": down}


def test_copies_hold_one_expert_and_scale_together():
    built = _experts({"num_experts": 8, "top_k": 2, "init": "copy"})
    gate_up, down = built["experts.gate_up_proj"], built["experts.down_proj"]
    assert gate_up.shape == (8, 2 * FFN, HIDDEN) and down.shape == (8, HIDDEN, FFN)
    assert all(torch.equal(gate_up[e], built["dense"]) and torch.equal(down[e], built["down"]) for e in range(8))
    # the 8B case: 8 copies of a 352 MB FFN must not take 2.8 GB
    assert gate_up.untyped_storage().nbytes() == gate_up[0].nbytes and down.untyped_storage().nbytes() == down[0].nbytes
    scale_experts(down, 0.5)
    assert all(torch.equal(down[e], built["down"] * 0.5) for e in range(8))


@pytest.mark.parametrize("moe", [{"init": "granular", "granularity": 2, "top_k": 4}, {"init": "copy", "copy": {"noise": 0.1}}])
def test_granular_and_perturbed_copies_are_materialised(moe):
    built = _experts({"num_experts": 8, **moe, "top_k": moe.get("top_k", 2)})
    down = built["experts.down_proj"]
    assert down.is_contiguous() and down.untyped_storage().nbytes() == down.nbytes
    if moe["init"] == "granular":  # expert e is shard e % 2 of the one copy
        assert all(torch.equal(down[e], built["down"][:, (e % 2) * 10 : (e % 2 + 1) * 10] * 2) for e in range(8))


@pytest.mark.parametrize("target", ["mixtral", "granitemoe", "moeforge"])
def test_every_export_writes_copies_as_from_materialised_experts(target):
    built = _experts({"num_experts": 4, "top_k": 2, "init": "copy"})
    mlp = {name: built[name] for name in ("experts.gate_up_proj", "experts.down_proj")} | {"gate.weight": torch.zeros(4, HIDDEN)}
    viewed = layer_tensors(target, "model.layers.0.", {}, mlp)
    copied = layer_tensors(target, "model.layers.0.", {}, {name: tensor.contiguous() for name, tensor in mlp.items()})
    assert viewed.keys() == copied.keys() and all(torch.equal(viewed[name], copied[name]) for name in copied)
    padded = {  # native exports pad 20 neurons to 24
        "mixtral": ("block_sparse_moe.experts.3.w1.weight", (24, HIDDEN)),
        "granitemoe": ("block_sparse_moe.input_linear.weight", (4, 48, HIDDEN)),
        "moeforge": ("mlp.experts.gate_up_proj", (4, 40, HIDDEN)),
    }
    name, shape = padded[target]
    assert viewed[f"model.layers.0.{name}"].shape == shape
