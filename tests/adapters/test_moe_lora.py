"""MoE-LoRA layer: starts as the base, equals the naive per-expert mixture (so a merged Mixtral-style
export is exact), deterministic in eval, registered parameters, router losses, and it learns."""

from __future__ import annotations

import copy

import pytest
import torch

from moeforge.adapters.moe_lora import MoeLoraMLP
from moeforge.routing.losses import RouterLossConfig
from tests.helpers import build_tiny_llama, forward_with_router_losses, hand_switch_balance, make_tiny_llama_config


def _adapted(model, **kwargs):
    model = copy.deepcopy(model)
    options = {"num_experts": 4, "top_k": 2, "rank": 4, "alpha": 8.0, **kwargs}
    for layer in model.model.layers:
        layer.mlp = MoeLoraMLP(layer.mlp, **options)
    return model


def _randomise_b(model, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def base():
    return build_tiny_llama(make_tiny_llama_config(), seed=0).eval()


def _tokens(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(4, 256, (batch, length), generator=torch.Generator().manual_seed(0))


def test_zero_b_equals_the_base_model(base):
    adapted = _adapted(base).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(_tokens()).logits, base(_tokens()).logits, rtol=0, atol=1e-5)


def test_equals_the_naive_mixture_of_merged_experts():
    torch.manual_seed(0)
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(make_tiny_llama_config())
    layer = MoeLoraMLP(mlp, num_experts=4, top_k=2, rank=4, alpha=8.0)
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.ndim == 3:
                parameter.normal_(0, 0.1)
    x = torch.randn(3, 7, 64)
    out = layer(x)
    _, weights, indices = layer.router(x.reshape(-1, 64))
    expected = torch.zeros(21, 64)
    for token, row in enumerate(x.reshape(-1, 64)):
        for slot in range(2):
            w = layer.merged_expert(int(indices[token, slot]))
            hidden = torch.nn.functional.silu(row @ w["gate_proj"].T) * (row @ w["up_proj"].T)
            expected[token] += weights[token, slot] * (hidden @ w["down_proj"].T)
    torch.testing.assert_close(out.reshape(-1, 64), expected, rtol=1e-5, atol=1e-5)


def test_eval_is_deterministic_with_dropout(base):
    adapted = _adapted(base, dropout=0.5)
    _randomise_b(adapted)
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
    for suffix in ("mlp.router.weight", "mlp.experts.gate_proj.lora_A", "mlp.experts.down_proj.lora_B", "mlp.gate_proj.weight"):
        assert f"model.layers.0.{suffix}" in names
    adapted.to(torch.float64)
    assert adapted.model.layers[0].mlp.experts["up_proj"].lora_A.dtype == torch.float64
    optimizer = torch.optim.AdamW(adapted.parameters())
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(adapted.model.layers[0].mlp.router.weight) in ids


def test_balance_loss_matches_a_hand_computation(base):
    adapted = _adapted(base)
    routers = [layer.mlp.router for layer in adapted.model.layers]
    out, losses, calls = forward_with_router_losses(adapted, routers, RouterLossConfig(balance_coef=0.01), _tokens())
    expected = hand_switch_balance(calls)
    assert losses["balance"].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(out.router_aux_loss, 0.01 * expected)


def test_training_only_the_adapter_lowers_the_loss(base):
    adapted = _adapted(base)
    for name, parameter in adapted.named_parameters():
        parameter.requires_grad_("experts." in name or "router" in name)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    tokens = _tokens(4, 16)
    adapted.train()
    losses = []
    for _ in range(15):
        loss = adapted(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    before = dict(base.named_parameters())
    for name, parameter in adapted.named_parameters():
        if name in before:
            assert torch.equal(parameter, before[name]), name
