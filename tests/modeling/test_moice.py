"""MoICE attention: equivalences with the original model, top-k semantics, cache / generate, balance loss,
gradients, parameter count, checkpoint round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from moeforge.config.moice import MoiceSpec
from moeforge.config.router_losses import RouterLossConfig
from moeforge.errors import MoeforgeError
from moeforge.modeling.moice import MoiceAttention, MoiceRouter, apply_moice
from moeforge.routing.hooks import attach_router_losses
from tests.helpers import build_tiny_llama, forward_with_router_losses, hand_switch_balance, make_tiny_llama_config

THETA = 10000.0
BASES = [THETA, 17500.0, 18000.0, 19000.0, 20000.0, 22500.0, 25000.0]


def _tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _moice(model, **spec) -> torch.nn.Module:
    model = copy.deepcopy(model)
    apply_moice(model, MoiceSpec(**spec), seed=0)
    return model.eval()


def _force(model, base: int) -> None:
    """Route every token and head to ``base``: w1 = w3 = 0 makes the router input irrelevant, and a
    large bias-like row in w2 cannot exist without input, so set logits through a hook instead."""
    for module in model.modules():
        if isinstance(module, MoiceRouter):

            def forward(query, module=module):
                b, h, t, _ = query.shape
                logits = torch.full((b, t, h, module.num_experts), -30.0)
                logits[..., base] = 30.0
                indices = logits.topk(module.top_k, dim=-1).indices
                weights = torch.softmax(logits, -1).gather(-1, indices)
                return logits, weights / weights.sum(-1, keepdim=True), indices

            module.forward = forward


@pytest.fixture(scope="module")
def base_model():
    return build_tiny_llama(make_tiny_llama_config(rope_theta=THETA), seed=0).eval()


def test_single_native_base_is_bit_exact(base_model):
    moice = _moice(base_model, base_set=[THETA])
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(moice(tokens).logits, base_model(tokens).logits)


@pytest.mark.parametrize("base", [1, 4, 6])
def test_one_hot_routing_equals_model_with_that_theta(base_model, base):
    moice = _moice(base_model, base_set=BASES, topk=2)
    _force(moice, base)
    other = build_tiny_llama(make_tiny_llama_config(rope_theta=BASES[base]), seed=0).eval()
    other.load_state_dict(base_model.state_dict())
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(moice(tokens).logits, other(tokens).logits, rtol=0, atol=1e-5)


def test_identical_bases_give_the_original_for_any_router(base_model):
    moice = _moice(base_model, base_set=[THETA] * 4, topk=3)
    with torch.no_grad():
        for router in (m for m in moice.modules() if isinstance(m, MoiceRouter)):
            for weight in (router.w1, router.w2, router.w3):
                weight.normal_(0, 3.0)
        tokens = _tokens()
        torch.testing.assert_close(moice(tokens).logits, base_model(tokens).logits, rtol=0, atol=2e-5)


def test_untrained_moice_is_not_the_original(base_model):
    moice = _moice(base_model)
    tokens = _tokens()
    with torch.no_grad():
        assert (moice(tokens).logits - base_model(tokens).logits).abs().max() > 1e-4


def test_topk_semantics():
    torch.manual_seed(0)
    router = MoiceRouter(head_dim=8, num_bases=7, top_k=3, num_heads=4, per_head=False, balance_coef=0.3)
    for weight in (router.w1, router.w2, router.w3):
        torch.nn.init.normal_(weight, std=1.0)
    logits, weights, indices = router(torch.randn(2, 4, 5, 8))
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 4, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, 4))
    assert torch.equal(indices, logits.topk(3, dim=-1).indices)  # chosen by logit
    expected = torch.softmax(logits.gather(-1, indices), -1)  # renormalised over the top-k
    torch.testing.assert_close(weights, expected)
    dense = torch.zeros_like(logits).scatter(-1, indices, weights)
    assert ((dense > 0).sum(-1) == 3).all()  # zero outside the top-k


def test_router_input_mean_differs_from_base0(base_model):
    a = _moice(base_model, router_input="query_base0")
    b = _moice(base_model, router_input="query_mean")
    tokens = _tokens()
    with torch.no_grad():
        assert not torch.allclose(a(tokens).logits, b(tokens).logits)


@pytest.mark.parametrize("topk", [7, 2])
def test_cache_and_generate_equal_the_full_forward(base_model, topk):
    moice = _moice(base_model, topk=topk)
    tokens = _tokens(batch=1, length=10)
    with torch.no_grad():
        full = moice(tokens).logits
        prefix = moice(tokens[:, :6], use_cache=True)
        cache, steps = prefix.past_key_values, [prefix.logits]
        for i in range(6, 10):
            out = moice(tokens[:, i : i + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    generated = moice.generate(tokens[:, :6], max_new_tokens=6, do_sample=False)
    with torch.no_grad():  # greedy decoding with the cache = argmax of full forwards, token by token
        sequence = tokens[:, :6]
        for _ in range(6):
            sequence = torch.cat([sequence, moice(sequence).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)


def test_left_padded_batched_generation_matches_rows_alone(base_model):
    moice = _moice(base_model, topk=3)
    short, long = _tokens(1, 5, seed=1), _tokens(1, 9, seed=2)
    pad = 3
    batch = torch.cat([torch.cat([torch.full((1, 4), pad), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    together = moice.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=pad)
    alone = [moice.generate(row, max_new_tokens=5, do_sample=False, pad_token_id=pad) for row in (short, long)]
    assert torch.equal(together[0, 4:], alone[0][0])
    assert torch.equal(together[1], alone[1][0])


def test_balance_loss_constant_at_topk_n_and_hand_computed_below(base_model):
    tokens = _tokens()
    full = _moice(base_model)  # topk = N = 7
    handle = attach_router_losses(full, RouterLossConfig(balance_coef=0.0))
    full.train()
    with pytest.warns(UserWarning, match="constant"):  # when it first trains
        out = full(tokens, labels=tokens)
    balance = handle.losses["attention_balance"]
    assert balance.item() == pytest.approx(7.0)
    routers = [p for n, p in full.named_parameters() if "moice_router" in n]
    grads = torch.autograd.grad(out.router_aux_loss, routers, allow_unused=True)
    assert all(g is None or g.abs().max() < 1e-6 for g in grads)
    handle.detach()

    part = _moice(base_model, topk=2)
    routers = [m for m in part.modules() if isinstance(m, MoiceRouter)]
    out, losses, calls = forward_with_router_losses(part, routers, RouterLossConfig(balance_coef=0.0), tokens)
    expected = hand_switch_balance(calls)
    assert losses["attention_balance"].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(out.router_aux_loss, 0.3 * expected)


def test_only_routers_get_gradients_when_the_rest_is_frozen(base_model):
    from moeforge.training.freeze import apply_freeze

    moice = _moice(base_model, topk=3)
    trainable, total = apply_freeze(moice, ["all_but_new"])
    assert trainable == 3 * (2 * 16 * 7 + 49)  # layers · (2·head_dim·N + N²)
    moice.train()
    tokens = _tokens()
    moice(tokens, labels=tokens).loss.backward()
    for name, parameter in moice.named_parameters():
        if "moice_router" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_per_head_scope_parameter_count(base_model):
    moice = _moice(base_model, router_scope="per_head", layers="0-1")
    count = sum(p.numel() for n, p in moice.named_parameters() if "moice_router" in n)
    assert count == 2 * 4 * (2 * 16 * 7 + 49)
    assert not isinstance(moice.model.layers[2].self_attn, MoiceAttention)


def test_bad_base_set_explains_the_native_base(base_model):
    with pytest.raises(MoeforgeError, match="first base must be the native one"):
        _moice(base_model, base_set=[20000.0, THETA])
    with pytest.raises(MoeforgeError, match="topk 9 exceeds"):
        _moice(base_model, topk=9)
    with pytest.raises(MoeforgeError, match="moice.layers"):
        _moice(base_model, layers=[5])
    with pytest.raises(MoeforgeError, match="already has MoICE"):
        apply_moice(_moice(base_model), MoiceSpec())


def test_default_base_set_scales_with_theta():
    settings = MoiceSpec().resolve(1e5, 2)
    assert settings.base_set == pytest.approx([1e5, 1.75e5, 1.8e5, 1.9e5, 2e5, 2.25e5, 2.5e5])
    assert settings.topk == 7 and settings.layers == [0, 1]


@pytest.mark.parametrize(
    "config_class,model_class,extra",
    [(MistralConfig, MistralForCausalLM, {"sliding_window": 6}), (Qwen2Config, Qwen2ForCausalLM, {})],
)
def test_mistral_and_qwen2_attention(config_class, model_class, extra):
    config = config_class(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    moice = _moice(model, base_set=[_theta(model)])
    tokens = _tokens(length=14)
    with torch.no_grad():
        assert torch.equal(moice(tokens).logits, model(tokens).logits)
        generated = moice.generate(tokens[:1, :8], max_new_tokens=6, do_sample=False)
        expected = model.generate(tokens[:1, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)


def _theta(model) -> float:
    return float(model.config.rope_parameters["rope_theta"])


def test_checkpoint_round_trip_keeps_moice(tmp_path, base_model):
    from moeforge.io.loading import load_model

    moice = _moice(base_model, topk=3)
    moice.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).moice["topk"] == 3
    loaded, _ = load_model(tmp_path)
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, moice(tokens).logits)
