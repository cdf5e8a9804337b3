"""Aux-loss-free balancing: the selection bias moves selection only, zero bias is the old routing, the
balancer's rule by hand, its effect on a skewed router, persistence, and refusal on native routers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moeforge.errors import MoeforgeError
from moeforge.modeling import LinearRouter, MoeLayerSpec, route
from moeforge.routing import AuxFreeBalancer, RouterLossConfig, attach_router_losses
from tests.routing.tiny import batch, mixtral_model, moeforge_model

SCORINGS = [("softmax_then_topk", True), ("softmax_then_topk", False), ("topk_then_softmax", True)]


def logits(tokens: int = 32, experts: int = 6) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(0)) * 2


@pytest.mark.parametrize(("scoring", "normalize"), SCORINGS)
def test_bias_changes_the_selection_but_not_the_weights(scoring: str, normalize: bool) -> None:
    x, k = logits(), 2
    bias = torch.tensor([3.0, 0.0, -1.0, 0.5, 0.0, -4.0])
    weights, indices = route(x, k, scoring, normalize, bias)
    assert torch.equal(indices.sort(-1).values, torch.topk(x + bias, k, -1).indices.sort(-1).values)
    assert not torch.equal(indices.sort(-1).values, torch.topk(x, k, -1).indices.sort(-1).values)
    probs = F.softmax(x, dim=-1).gather(-1, indices)  # unbiased probabilities at the chosen experts
    expected = probs / probs.sum(-1, keepdim=True) if normalize else probs
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("scoring", "normalize"), SCORINGS)
def test_zero_bias_routes_bit_for_bit_like_no_bias(scoring: str, normalize: bool) -> None:
    x = logits()
    for k in (1, 2, 6):
        w0, i0 = route(x, k, scoring, normalize)
        w1, i1 = route(x, k, scoring, normalize, torch.zeros(6))
        assert torch.equal(i0, i1) and torch.equal(w0, w1)
    router = LinearRouter(8, MoeLayerSpec(6, 2, 4, scoring=scoring, normalize=normalize))
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    before = router(hidden)
    assert "expert_bias" not in router.state_dict()
    router.enable_expert_bias()
    assert torch.equal(router.state_dict()["expert_bias"], torch.zeros(6))
    assert all(torch.equal(a, b) for a, b in zip(before, router(hidden), strict=True))


def test_one_step_follows_the_sign_rule() -> None:
    model = moeforge_model().train()
    handle = attach_router_losses(model, RouterLossConfig(aux_free=True, aux_free_rate=0.25))
    assert model.config.router_aux_free is True
    model(**batch())
    loads = handle.pop_stats().load  # the same window the balancer reads
    handle.balancer.step()
    for router, load in zip(handle.balancer.routers, loads, strict=True):
        load = load.double()
        torch.testing.assert_close(router.expert_bias, 0.25 * torch.sign(load.mean() - load).float())
    handle.balancer.step()  # no forward since: no load, no change
    for router, load in zip(handle.balancer.routers, loads, strict=True):
        torch.testing.assert_close(router.expert_bias, 0.25 * torch.sign(load.double().mean() - load.double()).float())


def skew(model: torch.nn.Module) -> None:
    """Tilt layer 1's router toward expert 0 along the mean direction of its inputs."""
    gate = model.model.layers[1].mlp.gate
    seen = []
    hook = gate.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**batch())
    hook.remove()
    mean = torch.cat(seen).mean(0)
    with torch.no_grad():
        gate.weight[0] += 4 * mean / mean.square().sum()


def test_balancer_moves_a_skewed_router_toward_uniform_load() -> None:
    model = moeforge_model().train()
    skew(model)
    handle = attach_router_losses(model, RouterLossConfig(balance_coef=0.0, aux_free=True, aux_free_rate=0.2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: only the bias moves the load
    handle.balancer.hook_optimizer(optimizer)
    inputs = batch(rows=4, length=16, pad=False)
    shares = []
    for _ in range(15):
        model(**inputs).loss.backward()
        shares.append(handle.pop_stats().load_fraction()[0])
        optimizer.step()
    first, last = shares[0], torch.stack(shares[-3:]).mean(0)
    assert first[0] > 0.4  # skewed: expert 0 in over 80% of the top-2 sets (uniform: share 0.25, i.e. 50%)
    assert last.max() < first.max() - 0.1
    assert last.std() < 0.5 * first.std()
    bias = model.model.layers[1].mlp.gate.expert_bias
    assert bias[0] == bias.min() < 0


def test_bias_is_saved_and_loaded_with_the_model(tmp_path: Path) -> None:
    model = moeforge_model().train()
    handle = attach_router_losses(model, RouterLossConfig(aux_free=True, aux_free_rate=0.5))
    inputs = batch()
    for _ in range(3):
        model(**inputs)
        handle.balancer.step()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.router_aux_free is True
    for layer in (1, 2):
        bias = model.model.layers[layer].mlp.gate.expert_bias
        assert bias.abs().sum() > 0
        assert torch.equal(loaded.model.layers[layer].mlp.gate.expert_bias, bias)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_bf16_model_keeps_small_steps_in_an_fp32_master_copy() -> None:
    model = moeforge_model().to(torch.bfloat16).train()
    handle = attach_router_losses(model, RouterLossConfig(aux_free=True, aux_free_rate=1e-3))
    router = handle.balancer.routers[0]
    with torch.no_grad():
        router.expert_bias.fill_(1.0)  # as a loaded checkpoint leaves it: the master copy follows
    for _ in range(3):
        model(**batch())
        handle.balancer.step()
    steps = (handle.balancer.bias[0] - 1.0) / 1e-3
    assert torch.all(steps.round().abs() <= 3) and steps.abs().max() > 0.5  # each step kept, in fp32
    torch.testing.assert_close(router.expert_bias.float(), handle.balancer.bias[0].to(router.expert_bias.dtype).float())


def test_native_routers_are_refused_and_the_model_left_as_it_was() -> None:
    model = mixtral_model()
    with pytest.raises(MoeforgeError, match="aux_free needs moeforge routers.*convert with export: moeforge"):
        attach_router_losses(model, RouterLossConfig(aux_free=True))
    assert model.config.output_router_logits is True
    assert not model._forward_hooks and not model._forward_pre_hooks
    with pytest.raises(MoeforgeError, match="aux_free needs moeforge routers"):
        AuxFreeBalancer(attach_router_losses(moeforge_model(moe_layers=[None, None, None])), 1e-3)


def test_a_bias_restored_after_the_balancer_was_built_is_kept() -> None:
    """Trainer restores a checkpoint's buffers after the balancer exists: the next step continues from the
    restored bias instead of writing back the one the balancer saw at setup."""
    model = moeforge_model().train()
    handle = attach_router_losses(model, RouterLossConfig(aux_free=True, aux_free_rate=0.25))
    restored = torch.arange(4, dtype=torch.float32) / 10
    for router in handle.balancer.routers:
        with torch.no_grad():
            router.expert_bias.copy_(restored[: router.expert_bias.numel()])
    model(**batch())
    loads = handle.pop_stats().load
    handle.balancer.step()
    for router, load in zip(handle.balancer.routers, loads, strict=True):
        load = load.double()
        expected = restored[: load.numel()] + 0.25 * torch.sign(load.mean() - load).float()
        torch.testing.assert_close(router.expert_bias, expected)
