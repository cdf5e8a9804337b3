"""Fused experts of moeforge's architecture: the eager path against a naive per-token reference, forward and
backward, and transformers' ``grouped_mm`` / ``batched_mm`` backends against the eager path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeforge.modeling import MoeforgeExperts
from tests.helpers import moeforge_llama_config

H = 32  # multiples of 8: CPU grouped_mm wants 16-byte aligned rows
T = 11


def experts_config(impl: str = "eager"):
    config = moeforge_llama_config(
        None,
        vocab_size=64,
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config._experts_implementation = impl
    return config


def make_experts(num_experts: int, intermediate: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    experts = MoeforgeExperts(experts_config(), num_experts, intermediate).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
    return experts


def random_routing(num_experts: int, top_k: int, unused: tuple[int, ...] = (), seed: int = 1, dtype=torch.float32):
    """Random hidden states and a top-k routing of them; experts in ``unused`` receive no token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    logits = torch.randn(T, num_experts, generator=g)
    logits[:, list(unused)] = -torch.inf
    top, indices = torch.topk(logits, top_k, dim=-1)
    weights = F.softmax(top, dim=-1) * torch.rand(T, 1, generator=g)  # not summing to 1: weights must matter
    return x, indices, weights


def naive_experts(x, indices, weights, gate_up_proj, down_proj, act=F.silu):
    """Loop over tokens and their k experts: Σ_j w_j · down_e(act(gate_e x) · up_e x)."""
    intermediate = down_proj.shape[-1]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[-1], dtype=x.dtype)
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            gate = gate_up_proj[e, :intermediate] @ x[t]
            up = gate_up_proj[e, intermediate:] @ x[t]
            acc = acc + weights[t, j].to(x.dtype) * (down_proj[e] @ (act(gate) * up))
        rows.append(acc)
    return torch.stack(rows)


def grads_of(out, x, weights, experts, probe):
    loss = (out * probe).sum()
    return torch.autograd.grad(loss, [x, weights, experts.gate_up_proj, experts.down_proj])


CASES = [  # (num_experts, top_k, experts receiving no token)
    pytest.param(6, 2, (1, 4), id="E6-k2-unused"),
    pytest.param(5, 1, (), id="E5-k1"),
    pytest.param(5, 3, (2,), id="E5-k3-unused"),
    pytest.param(1, 1, (), id="E1-k1"),
    pytest.param(8, 8, (), id="E8-k8-all"),
]


@pytest.mark.parametrize(("num_experts", "top_k", "unused"), CASES)
def test_eager_forward_and_backward_match_naive_reference(num_experts, top_k, unused) -> None:
    experts = make_experts(num_experts, 24, dtype=torch.float64)
    x, indices, weights = random_routing(num_experts, top_k, unused, dtype=torch.float64)
    weights = weights.double()
    for e in unused:
        assert not (indices == e).any()
    x.requires_grad_(True)
    weights.requires_grad_(True)

    out = experts(x, indices, weights)
    ref = naive_experts(x, indices, weights, experts.gate_up_proj, experts.down_proj)
    assert out.shape == (T, H) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)

    probe = torch.randn_like(out)
    got = grads_of(out, x, weights, experts, probe)
    want = grads_of(ref, x, weights, experts, probe)
    for name, g, w in zip(("x", "routing weights", "gate_up_proj", "down_proj"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"grad of {n}: {m}")
    for e in unused:  # an expert that saw no token gets exactly zero gradient
        assert torch.all(got[2][e] == 0) and torch.all(got[3][e] == 0)
    if num_experts > len(unused):
        assert got[2].abs().sum() > 0 and got[3].abs().sum() > 0


def test_eager_uses_the_configured_activation() -> None:
    experts = make_experts(4, 16, dtype=torch.float64)
    experts.act_fn = torch.nn.GELU()  # what ACT2FN["gelu"] would give for hidden_act="gelu"
    x, indices, weights = random_routing(4, 2, dtype=torch.float64)
    ref = naive_experts(x, indices, weights.double(), experts.gate_up_proj, experts.down_proj, act=F.gelu)
    torch.testing.assert_close(experts(x, indices, weights.double()), ref)


def test_eager_bf16_states_with_fp32_routing_weights() -> None:
    """A bf16 model routes with fp32 weights; output stays bf16 and close to the fp32 computation."""
    experts = make_experts(4, 16)
    x, indices, weights = random_routing(4, 2)
    ref = experts(x, indices, weights)
    low = experts.to(torch.bfloat16)(x.bfloat16(), indices, weights)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_duplicate_expert_in_a_token_row_counts_twice() -> None:
    """Routing indices need not be distinct: the same expert twice means its output twice (weighted)."""
    experts = make_experts(3, 16, dtype=torch.float64)
    x = torch.randn(4, H, dtype=torch.float64)
    indices = torch.tensor([[0, 0], [1, 2], [2, 2], [1, 0]])
    weights = torch.rand(4, 2, dtype=torch.float64)
    ref = naive_experts(x, indices, weights, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(experts(x, indices, weights), ref)


def test_eager_handles_zero_tokens() -> None:
    experts = make_experts(4, 16)
    out = experts(torch.zeros(0, H), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, H)


# --------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize(("num_experts", "top_k", "unused"), CASES)
def test_transformers_backends_match_eager(monkeypatch, impl, num_experts, top_k, unused) -> None:
    calls = []
    backend = ALL_EXPERTS_FUNCTIONS[impl]

    def spy(*args, **kwargs):
        calls.append(impl)
        return backend(*args, **kwargs)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._local_mapping, impl, spy)

    experts = make_experts(num_experts, 24)
    x, indices, weights = random_routing(num_experts, top_k, unused)
    x.requires_grad_(True)
    weights.requires_grad_(True)

    experts.config._experts_implementation = "eager"
    eager = experts(x, indices, weights)
    assert calls == []
    probe = torch.randn_like(eager)
    eager_grads = grads_of(eager, x, weights, experts, probe)

    experts.config._experts_implementation = impl
    out = experts(x, indices, weights)
    assert calls == [impl], "the config's experts implementation was not dispatched to"
    assert out.shape == eager.shape and out.dtype == eager.dtype
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(
        ("x", "routing weights", "gate_up_proj", "down_proj"),
        grads_of(out, x, weights, experts, probe),
        eager_grads,
        strict=True,
    ):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{impl} grad of {n}: {m}")


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_transformers_backends_bf16_match_eager(impl) -> None:
    experts = make_experts(6, 24).to(torch.bfloat16)
    x, indices, weights = random_routing(6, 2, unused=(3,))
    x = x.bfloat16()
    experts.config._experts_implementation = "eager"
    eager = experts(x, indices, weights)
    experts.config._experts_implementation = impl
    out = experts(x, indices, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), eager.float(), rtol=0.02, atol=0.02)
