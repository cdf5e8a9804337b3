"""moeforge's experts backends against the naive per-token reference: outputs and gradients (input,
routing weights, both weight tensors) for every backend and implementation, the dtypes and shapes where
PyTorch's ``grouped_mm`` fails (so the fallback must run), and the dispatch of ``auto``."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import moeforge.experts.backends as backends
from moeforge.errors import MoeforgeError
from moeforge.experts import (
    EXPERTS_BACKENDS,
    auto_experts_forward,
    grouped_experts_forward,
    grouped_mm_supported,
    implementation_name,
    per_token_experts_forward,
)
from tests.modeling.test_moe_block import CASES, H, grads_of, make_experts, naive_experts, random_routing

GRAD_NAMES = ("x", "routing weights", "gate_up_proj", "down_proj")


def _grouped_mm(experts, x, indices, weights):
    return grouped_experts_forward(experts, x, indices, weights, use_grouped_mm=True)


def _grouped_loop(experts, x, indices, weights):
    return grouped_experts_forward(experts, x, indices, weights, use_grouped_mm=False)


BACKENDS = {
    "grouped[grouped_mm]": _grouped_mm,
    "grouped[loop]": _grouped_loop,
    "grouped": grouped_experts_forward,
    "per_token": per_token_experts_forward,
    "auto": auto_experts_forward,
}


def _check_against_reference(forward, experts, x, indices, weights, *, rtol: float, atol: float) -> None:
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    out = forward(experts, x, indices, weights)
    ref = naive_experts(x, indices, weights, experts.gate_up_proj, experts.down_proj)
    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    probe = torch.randn_like(out)
    for name, got, want in zip(
        GRAD_NAMES, grads_of(out, x, weights, experts, probe), grads_of(ref, x, weights, experts, probe), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("num_experts", "top_k", "unused"), CASES)
def test_fp32_outputs_and_gradients_match_reference(backend, num_experts, top_k, unused) -> None:
    experts = make_experts(num_experts, 24)
    x, indices, weights = random_routing(num_experts, top_k, unused)
    _check_against_reference(BACKENDS[backend], experts, x, indices, weights, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["grouped", "per_token", "auto"])
def test_fp64_runs_on_the_fallback_and_matches_exactly(backend) -> None:
    """``grouped_mm`` rejects fp64: the loop takes over, to fp64 precision."""
    experts = make_experts(6, 24, dtype=torch.float64)
    x, indices, weights = random_routing(6, 2, (3,), dtype=torch.float64)
    assert not grouped_mm_supported(x, experts.gate_up_proj.transpose(-2, -1))
    _check_against_reference(BACKENDS[backend], experts, x, indices, weights.double(), rtol=1e-10, atol=1e-12)


def test_unaligned_rows_use_the_fallback() -> None:
    """CPU ``grouped_mm`` needs 16-byte rows: hidden 13 / intermediate 7 in fp32 are not, so the check says
    no (calling it would raise) and the fallback gives the reference result."""
    import torch.nn.functional as F

    from moeforge.modeling import MoeforgeExperts
    from tests.modeling.test_moe_block import experts_config

    torch.manual_seed(0)
    config = experts_config()
    config.hidden_size = 13
    experts = MoeforgeExperts(config, 4, 7)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
    x = torch.randn(9, 13)
    top, indices = torch.randn(9, 4).topk(2, dim=-1)
    weights = top.softmax(-1)
    assert not grouped_mm_supported(x, experts.gate_up_proj.transpose(-2, -1))
    with pytest.raises(RuntimeError, match="16 bytes"):  # the failure the check prevents
        offsets = torch.bincount(indices.reshape(-1), minlength=4).cumsum(0).int()
        F.grouped_mm(x.repeat_interleave(2, 0), experts.gate_up_proj.transpose(-2, -1), offs=offsets)
    _check_against_reference(grouped_experts_forward, experts, x, indices, weights, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["grouped[grouped_mm]", "grouped[loop]", "per_token"])
def test_bf16_close_to_fp32(backend) -> None:
    experts = make_experts(6, 24)
    x, indices, weights = random_routing(6, 2, (1,))
    ref = BACKENDS[backend](experts, x, indices, weights)
    low = BACKENDS[backend](experts.to(torch.bfloat16), x.bfloat16(), indices, weights)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.03, atol=0.03)


def test_expanded_gradient_reaches_grouped_mm() -> None:
    """``out.sum().backward()`` hands grouped_mm's backward a zero-stride gradient, which PyTorch rejects;
    the backend makes it contiguous first."""
    experts = make_experts(4, 24)
    x, indices, weights = random_routing(4, 2)
    x.requires_grad_(True)
    _grouped_mm(experts, x, indices, weights).sum().backward()
    expected = torch.autograd.grad(naive_experts(x, indices, weights, experts.gate_up_proj, experts.down_proj).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend) -> None:
    experts = make_experts(4, 16)
    out = BACKENDS[backend](experts, torch.zeros(0, H), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, H)


def test_auto_picks_by_work(monkeypatch) -> None:
    """A few pairs: the per-pair loop; many: grouped; a cheap weight gather (small experts, few tokens):
    the gathered batched products. Each choice still equals the reference."""
    calls: list[str] = []
    for name in ("per_token_experts_forward", "grouped_experts_forward", "_gathered_pairs"):
        original = getattr(backends, name)
        monkeypatch.setattr(backends, name, lambda *a, _n=name, _f=original: calls.append(_n) or _f(*a))
    experts = make_experts(6, 24)
    x, indices, weights = random_routing(6, 2)
    pairs = backends.PER_TOKEN_MAX_SLOTS // 2
    monkeypatch.setattr(backends, "GATHER_BYTES_PER_EXPERT", 0)
    with torch.no_grad():
        auto_experts_forward(experts, x[:pairs], indices[:pairs], weights[:pairs])
        auto_experts_forward(experts, x, indices, weights)
    monkeypatch.setattr(backends, "GATHER_BYTES_PER_EXPERT", 2**40)
    _check_against_reference(auto_experts_forward, experts, x, indices, weights, rtol=1e-5, atol=1e-5)
    assert calls == ["per_token_experts_forward", "grouped_experts_forward", "_gathered_pairs"]


def test_compiled_fp32_falls_back_and_matches() -> None:
    """inductor cannot compile ``grouped_mm`` outside bf16; under ``torch.compile`` the grouped backend
    takes its loop (aot_eager traces the same Python path inductor would, in a fraction of the time)."""
    experts = make_experts(4, 24)
    x, indices, weights = random_routing(4, 2)
    weight_t = experts.gate_up_proj.transpose(-2, -1)
    assert grouped_mm_supported(x, weight_t)  # eager: grouped_mm
    choice = torch.compile(lambda t: t * (2.0 if grouped_mm_supported(t, weight_t) else 3.0), backend="aot_eager")
    torch.testing.assert_close(choice(x), 3.0 * x)  # compiled fp32: the loop
    compiled = torch.compile(lambda *a: grouped_experts_forward(experts, *a), backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(x, indices, weights), grouped_experts_forward(experts, x, indices, weights), rtol=1e-5, atol=1e-5)


def test_backends_are_registered_with_transformers() -> None:
    for backend, implementation in EXPERTS_BACKENDS.items():
        assert implementation == "eager" or implementation in ALL_EXPERTS_FUNCTIONS, backend
    assert implementation_name("grouped") == "moeforge_grouped"
    assert implementation_name("moeforge_auto") == "moeforge_auto"
    with pytest.raises(MoeforgeError, match="experts_backend 'fast' is unknown: use one of auto, eager"):
        implementation_name("fast")


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "unbound"])
def test_per_token_with_gradients_both_ways(monkeypatch, gather) -> None:
    """Training through ``per_token`` either gathers the pairs' weights or unbinds them (chosen by bytes);
    both give the reference outputs and gradients."""
    monkeypatch.setattr(backends, "GATHER_BYTES_PER_EXPERT", 2**40 if gather else 0)
    experts = make_experts(6, 24)
    x, indices, weights = random_routing(6, 2, (3,))
    _check_against_reference(per_token_experts_forward, experts, x[:2], indices[:2], weights[:2], rtol=1e-5, atol=1e-5)
