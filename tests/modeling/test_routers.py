"""Routers of moeforge's architecture: the shared top-k rule :func:`route` and the three gates' logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moeforge.modeling import MoeLayerSpec
from moeforge.modeling.routers import GMMRouter, LinearRouter, MLPRouter, TopKRouter, build_router, route

T, E, H = 16, 8, 24


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(T, E) * 2.0


def _by_index(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's (weight, index) pairs by expert index, so two routings compare order-free."""
    order = indices.argsort(dim=-1)
    return weights.gather(-1, order), indices.gather(-1, order)


# --------------------------------------------------------------------------------------------- route()


@pytest.mark.parametrize("k", [1, 2, 3, E])
def test_indices_are_the_k_largest_logits(logits: torch.Tensor, k: int) -> None:
    for scoring in ("softmax_then_topk", "topk_then_softmax"):
        for normalize in (True, False):
            _, indices = route(logits, k, scoring, normalize)
            assert indices.shape == (T, k)
            assert indices.dtype == torch.int64
            expected = torch.topk(logits, k, dim=-1).indices
            assert torch.equal(indices.sort(-1).values, expected.sort(-1).values), (scoring, normalize)
            # every chosen logit is >= every unchosen one
            chosen_min = logits.gather(-1, indices).min(-1).values
            unchosen = logits.masked_fill(F.one_hot(indices, E).sum(1).bool(), -math.inf)
            assert torch.all(chosen_min >= unchosen.max(-1).values)


@pytest.mark.parametrize("k", [1, 2, 3, E])
def test_softmax_then_topk_normalized_is_softmax_over_top_logits(logits: torch.Tensor, k: int) -> None:
    weights, indices = route(logits, k, "softmax_then_topk", normalize=True)
    assert weights.shape == (T, k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(T), rtol=0, atol=1e-6)
    expected = F.softmax(logits.gather(-1, indices), dim=-1)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    if k == 1:
        assert torch.all(weights == 1.0)


@pytest.mark.parametrize("k", [1, 2, 3, E])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_then_softmax_equals_normalized_softmax_then_topk(logits: torch.Tensor, k: int, normalize: bool) -> None:
    """Same function in exact arithmetic; ``normalize`` has no effect on topk_then_softmax (its k weights are
    already a softmax)."""
    w_a, i_a = _by_index(*route(logits, k, "topk_then_softmax", normalize))
    w_b, i_b = _by_index(*route(logits, k, "softmax_then_topk", normalize=True))
    assert torch.equal(i_a, i_b)
    torch.testing.assert_close(w_a, w_b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w_a.sum(-1), torch.ones(T), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_unnormalized_weights_are_the_raw_softmax_probabilities(logits: torch.Tensor, k: int) -> None:
    weights, indices = route(logits, k, "softmax_then_topk", normalize=False)
    probs = F.softmax(logits, dim=-1)
    torch.testing.assert_close(weights, probs.gather(-1, indices), rtol=1e-6, atol=1e-7)
    sums = weights.sum(-1)
    assert torch.all(sums < 1.0) and torch.all(sums > 0.0)
    # the top-1 probability is at least 1/E, and the chosen mass at least k/E
    assert torch.all(sums >= k / E - 1e-6)


def test_unnormalized_with_all_experts_is_the_full_softmax(logits: torch.Tensor) -> None:
    weights, indices = route(logits, E, "softmax_then_topk", normalize=False)
    torch.testing.assert_close(weights.sum(-1), torch.ones(T), rtol=0, atol=1e-6)
    torch.testing.assert_close(weights, F.softmax(logits, -1).gather(-1, indices))


@pytest.mark.parametrize("scoring", ["softmax_then_topk", "topk_then_softmax"])
@pytest.mark.parametrize("normalize", [True, False])
def test_weights_are_fp32_for_bf16_logits(logits: torch.Tensor, scoring: str, normalize: bool) -> None:
    low = logits.to(torch.bfloat16)
    weights, indices = route(low, 2, scoring, normalize)
    assert weights.dtype == torch.float32
    # computed from the upcast logits, not in bf16: identical to routing the fp32 copy of the same values
    ref_w, ref_i = route(low.float(), 2, scoring, normalize)
    assert torch.equal(indices, ref_i)
    assert torch.equal(weights, ref_w)


@pytest.mark.parametrize("scoring", ["softmax_then_topk", "topk_then_softmax"])
def test_route_is_stable_for_huge_logits(scoring: str) -> None:
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4, 0.0], [-3e4, -3e4 + 2.0, -3e4 + 1.0, -5e4]])
    weights, indices = route(logits, 2, scoring, normalize=True)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, F.softmax(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), -1))
    assert indices.tolist() == [[0, 1], [1, 2]]


# --------------------------------------------------------------------------------------------- gates


def _spec(gate_type: str = "linear", **overrides) -> MoeLayerSpec:
    values = dict(num_experts=E, top_k=2, expert_intermediate_size=16, gate_type=gate_type, gate_hidden_size=12)
    values.update(overrides)
    return MoeLayerSpec(**values)


@pytest.mark.parametrize(("gate_type", "cls"), [("linear", LinearRouter), ("mlp", MLPRouter), ("gmm", GMMRouter)])
def test_build_router_picks_class_by_gate_type(gate_type: str, cls: type) -> None:
    router = build_router(H, _spec(gate_type), "silu")
    assert type(router) is cls
    assert isinstance(router, TopKRouter)
    assert (router.num_experts, router.top_k, router.scoring, router.normalize) == (
        E,
        2,
        "softmax_then_topk",
        True,
    )


def test_build_router_rejects_unknown_gate_type() -> None:
    with pytest.raises(ValueError, match="gate_type"):
        build_router(H, _spec("cosine"), "silu")


def test_router_parameter_shapes() -> None:
    shapes = lambda r: {n: tuple(p.shape) for n, p in r.named_parameters()}  # noqa: E731
    assert shapes(build_router(H, _spec("linear"), "silu")) == {"weight": (E, H)}
    assert shapes(build_router(H, _spec("mlp"), "silu")) == {"fc1.weight": (12, H), "fc2.weight": (E, 12)}
    assert shapes(build_router(H, _spec("gmm"), "silu")) == {"means": (E, H), "log_scales": (E, H)}


def test_linear_router_logits_are_x_w_transposed() -> None:
    torch.manual_seed(1)
    router = build_router(H, _spec("linear"), "silu")
    torch.nn.init.normal_(router.weight)
    x = torch.randn(T, H)
    torch.testing.assert_close(router.logits(x), x @ router.weight.T)


@pytest.mark.parametrize(("hidden_act", "act"), [("silu", F.silu), ("gelu", F.gelu), ("relu", F.relu)])
def test_mlp_router_logits_are_fc2_act_fc1(hidden_act: str, act) -> None:
    torch.manual_seed(2)
    router = build_router(H, _spec("mlp"), hidden_act)
    for p in router.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(T, H)
    expected = act(x @ router.fc1.weight.T) @ router.fc2.weight.T
    torch.testing.assert_close(router.logits(x), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gmm_router_logits_are_diagonal_gaussian_log_likelihoods(x_dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    router = build_router(H, _spec("gmm"), "silu")
    with torch.no_grad():
        router.means.normal_()
        router.log_scales.uniform_(-1.0, 1.0)
    x = torch.randn(T, H).to(x_dtype)
    logits = router.logits(x)
    assert logits.shape == (T, E)
    assert logits.dtype == torch.float32
    normal = torch.distributions.Normal(router.means.double()[None], router.log_scales.double().exp()[None])
    expected = normal.log_prob(x.double()[:, None, :]).sum(-1)  # [T, E]
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-3)


def test_gmm_router_prefers_the_expert_whose_mean_is_nearest() -> None:
    """With equal spreads the posterior is a nearest-centroid rule: a token at expert j's mean goes to j."""
    torch.manual_seed(4)
    router = build_router(H, _spec("gmm", top_k=1), "silu")
    with torch.no_grad():
        router.means.normal_(std=3.0)
        router.log_scales.fill_(0.5)
    x = router.means.detach() + 0.01 * torch.randn(E, H)
    _, weights, indices = router(x)
    assert indices[:, 0].tolist() == list(range(E))
    assert torch.all(weights == 1.0)


@pytest.mark.parametrize("gate_type", ["linear", "mlp", "gmm"])
@pytest.mark.parametrize(
    ("scoring", "normalize", "top_k"),
    [("softmax_then_topk", True, 2), ("softmax_then_topk", False, 3), ("topk_then_softmax", True, 1)],
)
def test_router_forward_routes_its_logits_with_its_spec(gate_type: str, scoring: str, normalize: bool, top_k: int) -> None:
    torch.manual_seed(5)
    router = build_router(H, _spec(gate_type, scoring=scoring, normalize=normalize, top_k=top_k), "silu")
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(T, H)
    router_logits, weights, indices = router(x)
    torch.testing.assert_close(router_logits, router.logits(x))
    ref_w, ref_i = route(router_logits, top_k, scoring, normalize)
    assert torch.equal(indices, ref_i)
    assert torch.equal(weights, ref_w)
    assert weights.dtype == torch.float32
