"""moeforge_llama carries its router losses itself: ``from_pretrained`` in a plain loop trains with them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeforge.modeling import TopKRouter
from moeforge.routing import RouterLossConfig, attach_router_losses, observe_routers
from moeforge.routing.losses import switch_balance_loss, z_loss
from tests.routing.tiny import batch, captured_router_logits, lm_loss, moeforge_model

KS = [2, 1]  # top-k of the two MoE layers of the tiny moeforge model


def test_from_pretrained_adds_the_aux_with_the_config_coefficients(tmp_path: Path) -> None:
    moeforge_model(router_aux_loss_coef=0.05, router_z_loss_coef=0.002).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).train()
    inputs = batch()
    with captured_router_logits(model, TopKRouter) as logits:
        out = model(**inputs)
    mask = inputs["attention_mask"].reshape(-1).bool()
    aux = 0.05 * switch_balance_loss(logits, KS, mask) + 0.002 * z_loss(logits, mask)
    torch.testing.assert_close(out.loss, lm_loss(out.logits, inputs["labels"]) + aux, rtol=1e-6, atol=1e-6)
    out.loss.backward()  # the router of the top-1 layer learns (from the balance loss)
    assert model.model.layers[2].mlp.gate.fc2.weight.grad.abs().max() > 0


def reference_aux(logits: list[torch.Tensor], mask: torch.Tensor, balance: float, z: float, mi: float) -> torch.Tensor:
    """The weighted router losses written out from the captured logits: per layer over the real tokens
    (Switch balance ``E · Σ_e f_e · P_e``, ``logsumexp²``, ``mean H(p_t) − H(mean p_t)``), averaged over layers."""

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.log()).sum(-1)

    terms = []
    for layer, k in zip(logits, KS, strict=True):
        real = layer[mask].float()
        probs, experts = real.softmax(-1), real.shape[-1]
        share = torch.nn.functional.one_hot(real.topk(k).indices, experts).sum(1).float().mean(0)
        terms.append(
            balance * experts * (share * probs.mean(0)).sum()
            + z * (real.logsumexp(-1) ** 2).mean()
            + mi * (entropy(probs).mean() - entropy(probs.mean(0)))
        )
    return torch.stack(terms).mean()


def test_the_models_own_forward_adds_the_weighted_router_losses_in_training_mode_only() -> None:
    """No hook on the model: its forward adds LM loss + the weighted losses (same value, same gradient)."""
    model = moeforge_model(router_aux_loss_coef=0.05, router_z_loss_coef=0.002, router_mi_loss_coef=0.1)
    assert not model._forward_hooks and not model._forward_pre_hooks
    inputs = batch()
    mask = inputs["attention_mask"].reshape(-1).bool()
    with captured_router_logits(model.train(), TopKRouter) as logits:
        out = model(**inputs)
    lm = lm_loss(out.logits, inputs["labels"])
    expected = lm + reference_aux(logits, mask, balance=0.05, z=0.002, mi=0.1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.router_aux_loss, expected - lm, rtol=1e-5, atol=1e-7)
    gates = [p for name, p in model.named_parameters() if ".gate." in name]
    for got, want in zip(torch.autograd.grad(out.loss, gates, retain_graph=True), torch.autograd.grad(expected, gates), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        out = model.eval()(**inputs)
    torch.testing.assert_close(out.loss, lm_loss(out.logits, inputs["labels"]), rtol=1e-6, atol=1e-6)
    assert out.router_aux_loss is None and out.router_losses["balance"] > 0


def test_a_forward_replaced_on_the_model_gets_the_losses_through_hooks() -> None:
    """TRL's fused LM head replaces the instance's forward with one that runs the decoder itself, skipping the
    class's forward: attached afterwards (as moeforge's trainer does), the handle hooks the model's call."""
    from trl.trainer.utils import add_fused_lm_head

    model = moeforge_model().train()
    add_fused_lm_head(model)
    attach_router_losses(model, RouterLossConfig(balance_coef=1.0))
    assert model._forward_hooks and model._forward_pre_hooks
    inputs = batch()
    mask = inputs["attention_mask"].reshape(-1).bool()
    for fused in (True, False):  # the unfused path runs the class's forward, which must not count them again
        with captured_router_logits(model, TopKRouter) as logits:
            out = model(**inputs, fused_lm_head=fused)
        torch.testing.assert_close(out.router_aux_loss, reference_aux(logits, mask, balance=1.0, z=0.0, mi=0.0))
    torch.testing.assert_close(out.loss, lm_loss(out.logits, inputs["labels"]) + out.router_aux_loss)


def test_zero_coefficients_give_the_plain_lm_loss(tmp_path: Path) -> None:
    moeforge_model(router_aux_loss_coef=0.0).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).train()
    inputs = batch()
    out = model(**inputs)
    torch.testing.assert_close(out.loss, lm_loss(out.logits, inputs["labels"]), rtol=1e-6, atol=1e-6)
    assert out.router_aux_loss.item() == 0.0
    assert out.router_losses["balance"] > 0  # still computed, for logging


def test_checkpoint_from_before_the_router_fields_loads_with_defaults(tmp_path: Path) -> None:
    moeforge_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("router_aux_loss_coef", "router_z_loss_coef", "router_mi_loss_coef", "router_aux_free"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (model.config.router_aux_loss_coef, model.config.router_aux_free) == (0.01, False)
    assert not any("expert_bias" in name for name in model.state_dict())


def test_attaching_replaces_the_models_own_losses_and_detaching_restores_them() -> None:
    model = moeforge_model().train()
    inputs = batch()
    handle = attach_router_losses(model, RouterLossConfig(balance_coef=1.0))
    out = model(**inputs)
    torch.testing.assert_close(out.loss - lm_loss(out.logits, inputs["labels"]), out.router_losses["balance"])
    inner = attach_router_losses(model, RouterLossConfig(balance_coef=0.0, z_coef=1.0))
    out = model(**inputs)
    torch.testing.assert_close(out.loss - lm_loss(out.logits, inputs["labels"]), out.router_losses["z"])
    inner.detach()  # back to balance_coef=1.0
    out = model(**inputs)
    torch.testing.assert_close(out.loss - lm_loss(out.logits, inputs["labels"]), out.router_losses["balance"])
    handle.detach()  # back to the config's 0.01
    out = model(**inputs)
    torch.testing.assert_close(out.loss - lm_loss(out.logits, inputs["labels"]), 0.01 * out.router_losses["balance"])


def test_attaching_on_a_wrapper_replaces_the_wrapped_models_own_losses() -> None:
    """A PEFT-style wrapper holds the moeforge model as a submodule: its own hooks must not add a second aux."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.base_model = inner

        def forward(self, **kwargs):
            return self.base_model(**kwargs)

    wrapper = Wrapper(moeforge_model()).train()
    inputs = batch()
    handle = attach_router_losses(wrapper, RouterLossConfig(balance_coef=1.0))
    out = wrapper(**inputs)
    torch.testing.assert_close(out.loss - lm_loss(out.logits, inputs["labels"]), out.router_losses["balance"])
    handle.detach()
    out = wrapper(**inputs)
    torch.testing.assert_close(out.loss - lm_loss(out.logits, inputs["labels"]), 0.01 * out.router_losses["balance"])


def test_gradient_checkpointing_recomputation_is_not_counted_twice() -> None:
    inputs = batch()
    results = []
    for checkpointing in (False, True):
        model = moeforge_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        handle = attach_router_losses(model, RouterLossConfig(balance_coef=0.5, mi_coef=0.5))
        calls = []
        model.model.layers[1].mlp.gate.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        out = model(**inputs)
        out.loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the router really ran again during backward
        stats = handle.pop_stats()
        assert stats.tokens == int(inputs["attention_mask"].sum())
        results.append((out.loss.detach(), model.model.layers[1].mlp.gate.weight.grad.clone(), stats.load))
    (loss_a, grad_a, load_a), (loss_b, grad_b, load_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(load_a, load_b, strict=True))


def test_generation_with_cache_and_left_padding_counts_only_real_tokens() -> None:
    model = moeforge_model().eval()
    ids = batch(rows=3, pad=False)["input_ids"][:, :6]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    new = 4
    with torch.no_grad(), observe_routers(model) as handle:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        stats = handle.pop_stats()
    # the prompt's real tokens, then one token per row for each generated token fed back (all but the last)
    expected = int(mask.sum()) + 3 * (new - 1)
    assert stats.tokens == expected
    assert [int(load.sum()) for load in stats.load] == [expected * k for k in KS]


def test_a_deep_copy_computes_its_own_losses() -> None:
    """A DPO reference model is a deep copy: its hooks must feed its own handle, not the original's."""
    model = moeforge_model().train()
    inputs = batch()
    model(**inputs)  # a forward before copying leaves nothing that deepcopy chokes on
    clone = copy.deepcopy(model)
    original_handle = model.__dict__["_moeforge_router_losses"]
    original_handle.pop_stats()
    out = clone(**inputs)
    assert out.router_losses["balance"] > 0
    torch.testing.assert_close(out.loss, lm_loss(out.logits, inputs["labels"]) + 0.01 * out.router_losses["balance"])
    assert original_handle.pop_stats().tokens == 0


def test_k_equal_e_warns_once_when_training_starts_that_the_balance_loss_is_constant() -> None:
    import warnings

    from moeforge.modeling import MoeLayerSpec

    layers = [None, MoeLayerSpec(4, 4, 24).to_dict(), MoeLayerSpec(3, 1, 16).to_dict()]
    with warnings.catch_warnings():  # loading, evaluating or chatting has nothing to fix: no warning
        warnings.simplefilter("error")
        model = moeforge_model(moe_layers=layers).eval()
        model(**batch())
    with pytest.warns(UserWarning, match="layers 1: the balance loss is constant"):
        model.train()(**batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch())
