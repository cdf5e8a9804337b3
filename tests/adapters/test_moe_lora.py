"""MoE-LoRA layer: starts as the base, equals the naive per-expert mixture (so a merged Mixtral-style
export is exact), deterministic in eval, registered parameters, router losses, and it learns."""

from __future__ import annotations

import copy

import pytest
import torch

from moeforge.adapters.build import apply_adapter
from moeforge.adapters.moe_lora import MoeLoraLayer
from moeforge.config.adapter import AdapterSpec
from moeforge.config.router_losses import RouterLossConfig
from tests.helpers import build_tiny_llama, forward_with_router_losses, hand_switch_balance, make_tiny_llama_config

SPEC = {"num_experts": 4, "top_k": 2, "rank": 4, "alpha": 8.0, "dropout": 0.0}


def _adapted(model, **kwargs):
    return apply_adapter(copy.deepcopy(model), AdapterSpec(**{**SPEC, **kwargs}))


def randomise_adapter(model, std: float = 0.05, seed: int = 1) -> None:
    """Give every trainable (adapter) tensor random values, so the adapter changes the function."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def _layers(model) -> list[MoeLoraLayer]:
    return [m for m in model.modules() if isinstance(m, MoeLoraLayer)]


@pytest.fixture(scope="module")
def base():
    return build_tiny_llama(make_tiny_llama_config(), seed=0).eval()


def _tokens(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(4, 256, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["moe_lora", "moe_bottleneck"])
def test_zero_b_equals_the_base_model(base, method):
    adapted = _adapted(base, method=method, shared_expert=True, targets=["gate_proj", "up_proj", "down_proj", "v_proj"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(_tokens()).logits, base(_tokens()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_equals_the_naive_mixture_of_merged_experts(base, shared):
    adapted = _adapted(base, shared_expert=shared)
    randomise_adapter(adapted, std=0.1)
    layer = _layers(adapted)[0]
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        out = layer(x)
        _, weights, indices = layer.moe_lora_router["default"](x.reshape(-1, 64))
    expected = torch.zeros(21, 64)
    for token, row in enumerate(x.reshape(-1, 64)):
        for slot in range(2):
            w = layer.merged_expert(int(indices[token, slot]))
            hidden = torch.nn.functional.silu(row @ w["gate_proj"].T) * (row @ w["up_proj"].T)
            expected[token] += weights[token, slot] * (hidden @ w["down_proj"].T)
    torch.testing.assert_close(out.reshape(-1, 64), expected, rtol=1e-5, atol=1e-5)


def test_bottleneck_equals_ffn_plus_routed_adapters(base):
    adapted = _adapted(base, method="moe_bottleneck")
    randomise_adapter(adapted, std=0.1)
    layer = _layers(adapted)[0]
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = layer(x)
        _, weights, indices = layer.moe_lora_router["default"](x)
        experts, scaling = layer.moe_lora_ffn["default"], layer.moe_lora_settings["default"]["scaling"]
        expected = layer.base_layer(x).clone()
        for token in range(5):
            for slot in range(2):
                e = int(indices[token, slot])
                expected[token] += weights[token, slot] * scaling * experts.delta(x[token : token + 1], e)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_per_layer_expert_counts(base):
    adapted = _adapted(base, layer_experts={1: 2, 2: 6}, top_k=2)
    assert [layer.moe_lora_router["default"].num_experts for layer in _layers(adapted)] == [4, 2, 6]


def test_eval_is_deterministic_with_dropout(base):
    adapted = _adapted(base, dropout=0.5, targets=["gate_proj", "up_proj", "down_proj", "q_proj"])
    randomise_adapter(adapted)
    tokens = _tokens()
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(adapted(tokens).logits, adapted(tokens).logits)
    adapted.train()
    with torch.no_grad():
        assert not torch.equal(adapted(tokens).logits, adapted(tokens).logits)


def test_experts_and_router_are_registered_parameters(base):
    adapted = _adapted(base)
    names = set(adapted.state_dict())
    prefix = "base_model.model.model.layers.0.mlp."
    for suffix in (
        "moe_lora_router.default.weight",
        "moe_lora_gate_proj.default.lora_A",
        "moe_lora_down_proj.default.lora_B",
        "base_layer.gate_proj.weight",
    ):
        assert prefix + suffix in names
    adapted.to(torch.float64)
    assert _layers(adapted)[0].moe_lora_up_proj["default"].lora_A.dtype == torch.float64
    trainable = {id(p) for p in adapted.parameters() if p.requires_grad}
    assert id(_layers(adapted)[0].moe_lora_router["default"].weight) in trainable
    assert id(_layers(adapted)[0].base_layer.gate_proj.weight) not in trainable


def test_balance_loss_matches_a_hand_computation(base):
    adapted = _adapted(base)
    routers = [layer.moe_lora_router["default"] for layer in _layers(adapted)]
    out, losses, calls = forward_with_router_losses(adapted, routers, RouterLossConfig(balance_coef=0.01), _tokens())
    expected = hand_switch_balance(calls)
    assert losses["balance"].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(out.router_aux_loss, 0.01 * expected)


def test_disabling_the_adapter_gives_the_base(base):
    adapted = _adapted(base)
    randomise_adapter(adapted)
    with torch.no_grad(), adapted.disable_adapter():
        torch.testing.assert_close(adapted(_tokens()).logits, base(_tokens()).logits, rtol=0, atol=1e-6)


def test_training_only_the_adapter_lowers_the_loss(base):
    adapted = _adapted(base, shared_expert=True)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    tokens = _tokens(4, 16)
    adapted.train()
    losses = []
    for _ in range(15):
        loss = adapted(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    before = dict(base.named_parameters())
    for name, parameter in adapted.get_base_model().named_parameters():
        key = name.replace(".base_layer", "")
        if key in before:
            assert torch.equal(parameter, before[key]), name
