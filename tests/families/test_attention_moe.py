"""Attention MoE in every family: converted exactly at top_k = all routed groups (with FFN copy upcycling), and
below it a model whose cached decoding, checkpoint round trip and head-router gradients hold, with the
family's own attention code (Llama-style families run moeforge's module, the others their own, head-gated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import moeforge  # noqa: F401  (registers moeforge's architecture)
from moeforge.config.recipe import Calibration, parse_recipe
from moeforge.conversion import ConversionResult, convert
from moeforge.data.calibration import calibration_ids
from moeforge.families import dense_family, softmax_attention_layers
from moeforge.io.loading import load_tokenizer
from moeforge.modeling import AttentionRouter, MoeforgeAttentionMoE
from tests.families.tiny import FAMILY_CONFIGS, token_ids

pytestmark = pytest.mark.filterwarnings("ignore:router layers .* the balance loss is constant")  # full top-k, on purpose


def _convert(source: Path, output: Path, attention_moe: dict[str, Any], moe: dict[str, Any] | None) -> ConversionResult:
    recipe = {"source": str(source), "output": str(output), "moe": moe, "attention_moe": attention_moe, "calibration": {"num_sequences": 2}}
    return convert(parse_recipe(recipe), log=lambda _line: None)


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_all_routed_groups_with_ffn_upcycling_are_exact(family_sources, tmp_path, family):
    result = _convert(family_sources[family], tmp_path / "moe", {"top_k": 2}, {"num_experts": 4, "top_k": 2})  # 2 KV groups
    assert result.export == "moeforge" and result.plan.exact
    assert result.fidelity.passed and result.fidelity.max_abs_logit_diff <= 1e-4
    model = _load(tmp_path / "moe")
    attention_layers = softmax_attention_layers(model.config)
    assert [index for index, spec in enumerate(model.config.attention_moe_layers) if spec] == attention_layers
    for index in attention_layers:
        attention = model.model.layers[index].self_attn
        if dense_family(family).llama_attention:
            assert isinstance(attention, MoeforgeAttentionMoE)
        else:  # the family's own module, head-gated at o_proj's input
            assert type(attention).__name__ == f"HeadGated{type(attention).__mro__[2].__name__}"
    ids = token_ids()
    torch.testing.assert_close(_logits(model, ids), _logits(_load(family_sources[family]), ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_below_all_groups_report_cache_round_trip_and_router_gradient(family_sources, tmp_path, family):
    """Four one-head groups, the most important one shared, top-2 of the others, k-means routers: not the dense
    model; the checkpoint computes what the conversion reported; cached decoding equals the full forward; a saved
    and reloaded model computes the same logits; the LM loss alone gives every head router a gradient."""
    source = family_sources[family]
    result = _convert(source, tmp_path / "moe", {"num_experts": 4, "shared": 1, "top_k": 2, "router_init": "kmeans"}, None)
    assert not result.plan.exact and result.fidelity.max_abs_logit_diff > 1e-3
    model = _load(tmp_path / "moe")
    calibration, _ = calibration_ids(
        Calibration(num_sequences=2), load_tokenizer(source), model.config.vocab_size, torch.Generator().manual_seed(0)
    )
    held_out = calibration[1:]  # the first sequence fitted the shared group and the routers
    with torch.no_grad():
        perplexity = torch.exp(model(held_out, labels=held_out).loss).item()
    assert perplexity == pytest.approx(result.fidelity.perplexity_moe, rel=1e-4)

    ids = token_ids(length=20)
    full = _logits(model, ids)

    with torch.no_grad():
        prefill = model(ids[:, :16], use_cache=True)  # past the sliding windows (12)
        steps, cache = [prefill.logits], prefill.cache
        for position in range(16, ids.shape[1]):
            step = model(ids[:, position : position + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
            cache = step.cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path / "again")
    assert torch.equal(_logits(_load(tmp_path / "again"), ids), full)

    model.train()
    logits = model(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    routers = [module for module in model.modules() if isinstance(module, AttentionRouter)]
    assert len(routers) == len(softmax_attention_layers(model.config))
    assert all(router.weight.grad is not None and router.weight.grad.abs().sum() > 0 for router in routers)
