"""The loss functions against explicit hand computations (plain Python math on fixed logits)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moeforge.config.router_losses import RouterLossConfig
from moeforge.routing.losses import (
    layer_balance,
    mutual_information_loss,
    switch_balance_loss,
    z_loss,
)

# layer A: E = 3, k = 1; layer B: E = 4, k = 2. Four tokens, the last one padding (mask False).
LOGITS_A = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]]
LOGITS_B = [[1.0, 0.5, 0.0, -1.0], [0.0, 2.0, 1.0, 0.0], [-1.0, 0.0, 0.5, 1.5], [0.2, 0.5, 0.0, 9.0]]
MASK = [True, True, True, False]


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def top_k(row: list[float], k: int) -> set[int]:
    return set(sorted(range(len(row)), key=lambda e: -row[e])[:k])


def hand_balance(rows: list[list[float]], k: int, mask: list[bool]) -> float:
    valid = [r for r, m in zip(rows, mask, strict=True) if m]
    n, experts = len(valid), len(rows[0])
    f = [sum(e in top_k(r, k) for r in valid) / n for e in range(experts)]
    p = [sum(softmax(r)[e] for r in valid) / n for e in range(experts)]
    return experts * sum(fe * pe for fe, pe in zip(f, p, strict=True))


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def hand_z(rows: list[list[float]], mask: list[bool]) -> float:
    valid = [r for r, m in zip(rows, mask, strict=True) if m]
    return sum(math.log(sum(math.exp(x) for x in r)) ** 2 for r in valid) / len(valid)


def hand_mi(rows: list[list[float]], mask: list[bool]) -> float:
    probs = [softmax(r) for r, m in zip(rows, mask, strict=True) if m]
    mean = [sum(p[e] for p in probs) / len(probs) for e in range(len(probs[0]))]
    return sum(entropy(p) for p in probs) / len(probs) - entropy(mean)


def tensors() -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.tensor(LOGITS_A), torch.tensor(LOGITS_B)], torch.tensor(MASK)


def test_balance_is_per_layer_then_mean_of_hand_values() -> None:
    logits, mask = tensors()
    expected = (hand_balance(LOGITS_A, 1, MASK) + hand_balance(LOGITS_B, 2, MASK)) / 2
    assert switch_balance_loss(logits, [1, 2], mask).item() == pytest.approx(expected, rel=1e-6)
    # layer A by hand: tokens 0, 1, 2 pick experts 0, 1, 2 -> f = 1/3 each -> 3 · Σ P_e / 3 = 1 exactly
    assert hand_balance(LOGITS_A, 1, MASK) == pytest.approx(1.0)
    assert layer_balance(logits[0], 1, mask).item() == pytest.approx(1.0, rel=1e-6)


def test_per_layer_balance_differs_from_transformers_global_balance() -> None:
    """Layer 1 sends every token to expert 0, layer 2 every token to expert 1: each layer is maximally
    unbalanced (balance = E = 2 at k = 1) but pooled over layers the experts look evenly used (≈ 1)."""
    to_expert_0 = torch.tensor([[20.0, 0.0]] * 6)
    to_expert_1 = torch.tensor([[0.0, 20.0]] * 6)
    ours = switch_balance_loss([to_expert_0, to_expert_1], 1)
    pooled = load_balancing_loss_func((to_expert_0, to_expert_1), num_experts=2, top_k=1)
    assert ours.item() == pytest.approx(2.0, abs=1e-6)
    assert pooled.item() == pytest.approx(1.0, abs=1e-6)


def test_mask_none_counts_every_token() -> None:
    logits, _ = tensors()
    everything = [True] * 4
    assert switch_balance_loss(logits, [1, 2]).item() == pytest.approx(
        (hand_balance(LOGITS_A, 1, everything) + hand_balance(LOGITS_B, 2, everything)) / 2, rel=1e-6
    )


@pytest.mark.parametrize("experts", [2, 5])
def test_balance_at_k_equal_e_is_e_with_zero_gradient(experts: int) -> None:
    logits = (torch.randn(7, experts, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    loss = switch_balance_loss([logits], experts)
    assert loss.item() == pytest.approx(experts, rel=1e-6)
    loss.backward()
    assert logits.grad.abs().max() < 1e-6


@pytest.mark.parametrize(
    ("rows", "k"),
    [
        ([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]], 1),
        # every expert in exactly two of four tokens' top-2, and (by symmetry) mean probability 1/4 each
        ([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]], 2),
    ],
)
def test_perfectly_balanced_routing_gives_k(rows: list[list[float]], k: int) -> None:
    assert switch_balance_loss([torch.tensor(rows)], k).item() == pytest.approx(k, rel=1e-6)


def test_z_loss_is_mean_squared_logsumexp_per_layer() -> None:
    logits, mask = tensors()
    expected = (hand_z(LOGITS_A, MASK) + hand_z(LOGITS_B, MASK)) / 2
    assert z_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)


def test_mutual_information_loss_is_mean_entropy_minus_entropy_of_mean() -> None:
    logits, mask = tensors()
    expected = (hand_mi(LOGITS_A, MASK) + hand_mi(LOGITS_B, MASK)) / 2
    assert mutual_information_loss(logits, mask).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_mi_prefers_confident_and_balanced_routing() -> None:
    confident_balanced = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    uniform = torch.zeros(2, 2)
    confident_collapsed = torch.tensor([[10.0, -10.0], [10.0, -10.0]])
    values = {
        name: mutual_information_loss([x]).item()
        for name, x in [("balanced", confident_balanced), ("uniform", uniform), ("collapsed", confident_collapsed)]
    }
    assert values["balanced"] == pytest.approx(-math.log(2), abs=1e-6)  # the minimum, −log E
    assert values["uniform"] == pytest.approx(0.0, abs=1e-6)
    assert values["collapsed"] == pytest.approx(0.0, abs=1e-6)


def test_padding_changes_nothing() -> None:
    """Appending junk tokens with mask 0 leaves every loss and the real tokens' gradients as they were,
    and gives the junk no gradient."""
    logits, mask = tensors()
    junk = [torch.randn(5, x.shape[1], generator=torch.Generator().manual_seed(i)) * 40 for i, x in enumerate(logits)]
    padded_mask = torch.cat([mask, torch.zeros(5, dtype=torch.bool)])
    for loss_fn in (lambda x, m: switch_balance_loss(x, [1, 2], m), z_loss, mutual_information_loss):
        clean = [x.clone().requires_grad_() for x in logits]
        padded = [torch.cat([x, j]).requires_grad_() for x, j in zip(logits, junk, strict=True)]
        a, b = loss_fn(clean, mask), loss_fn(padded, padded_mask)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
        a.backward()
        b.backward()
        for c, p in zip(clean, padded, strict=True):
            torch.testing.assert_close(p.grad[: len(c)], c.grad, rtol=1e-5, atol=1e-7)
            assert torch.all(p.grad[len(c) :] == 0)
            # the padding token of the original logits gets no gradient either
            assert torch.all(c.grad[3] == 0)


def test_all_padding_gives_zero_not_nan() -> None:
    logits, _ = tensors()
    none = torch.zeros(4, dtype=torch.bool)
    values = [switch_balance_loss(logits, [1, 2], none), z_loss(logits, none), mutual_information_loss(logits, none)]
    assert [v.item() for v in values] == [0.0, 0.0, 0.0]


def test_config_defaults_and_unknown_keys() -> None:
    config = RouterLossConfig()
    assert (config.balance_coef, config.z_coef, config.mi_coef, config.aux_free, config.aux_free_rate) == (
        0.01,
        0.0,
        0.0,
        False,
        1e-3,
    )
    with pytest.raises(ValueError, match="extra"):
        RouterLossConfig(balance=0.1)
