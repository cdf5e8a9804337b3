"""Backends inside whole models: native Mixtral and moeforge_llama (through transformers' experts
interface), MoE-LoRA adapters (through the model's backend), loading and recipes."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import MixtralConfig, MixtralForCausalLM

from moeforge.adapters.build import apply_adapter
from moeforge.config.adapter import AdapterSpec
from moeforge.config.train_recipe import TrainRecipe
from moeforge.experts import EXPERTS_BACKENDS
from moeforge.io.loading import load_model
from moeforge.modeling import MoeforgeForCausalLM, MoeLayerSpec
from tests.adapters.test_moe_lora import randomise_adapter
from tests.helpers import build_tiny_llama, make_tiny_llama_config, moeforge_llama_config

PORTABLE = ["auto", "grouped", "per_token", "grouped_mm", "batched_mm"]


def _tokens(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(0))


def _mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config)


def _moeforge_llama():
    torch.manual_seed(0)
    spec = MoeLayerSpec(6, 2, 24, shared_intermediate_size=16).to_dict()
    config = moeforge_llama_config(
        [spec, spec],
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return MoeforgeForCausalLM(config)


def _loss_and_grads(model, backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.set_experts_implementation(EXPERTS_BACKENDS[backend])
    model.zero_grad()
    ids = _tokens()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [_mixtral, _moeforge_llama], ids=["mixtral", "moeforge_llama"])
@pytest.mark.parametrize("backend", PORTABLE)
def test_model_logits_and_gradients_match_eager(build, backend) -> None:
    model = build()
    logits, grads = _loss_and_grads(model, "eager")
    got_logits, got_grads = _loss_and_grads(model, backend)
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{backend} grad of {n}: {m}")


def test_moeforge_llama_defaults_to_moeforge_auto() -> None:
    assert _moeforge_llama().config._experts_implementation == "moeforge_auto"


def test_moe_lora_deltas_follow_the_model_backend(monkeypatch) -> None:
    """MoE-LoRA's per-expert deltas run as grouped GEMMs by default and as a loop under ``eager``; both
    give the same outputs and adapter gradients."""
    base = build_tiny_llama(make_tiny_llama_config(), seed=0)
    adapted = apply_adapter(copy.deepcopy(base), AdapterSpec(num_experts=4, top_k=2, rank=4, dropout=0.0))
    randomise_adapter(adapted, std=0.1)
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))

    def run(backend: str):
        adapted.config._experts_implementation = backend
        adapted.zero_grad()
        ids = _tokens()
        out = adapted(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in adapted.named_parameters() if p.grad is not None}

    eager_logits, eager_grads = run("eager")
    assert not calls
    logits, grads = run("moeforge_auto")
    assert calls, "the default backend should run the deltas through grouped_mm"
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)


def test_load_model_applies_the_backend(tmp_path) -> None:
    _mixtral().save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, experts_backend="per_token")
    assert model.config._experts_implementation == "moeforge_per_token"
    model, _ = load_model(tmp_path)
    assert model.config._experts_implementation == "moeforge_auto"


def test_recipe_rejects_an_unknown_backend(tmp_path) -> None:
    fields = {"stage": "sft", "model": "default", "output": str(tmp_path), "data": {"builtin": "sft-demo"}}
    assert TrainRecipe(**fields).experts_backend == "auto"
    with pytest.raises(ValidationError, match="'fast' is unknown: use one of auto, eager, grouped"):
        TrainRecipe(**fields, experts_backend="fast")
