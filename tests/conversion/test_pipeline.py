"""Every strategy x placement x gate x export on tiny models: exact conversions reproduce the dense
logits when the written checkpoint is loaded back with plain transformers; inexact ones load, run,
and compute exactly what the fidelity report measured."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeforge.config.recipe import Calibration, parse_recipe
from moeforge.conversion import convert
from moeforge.data.calibration import calibration_ids
from moeforge.io.loading import load_tokenizer
from tests.conversion.conftest import dense_logits, load_logits, run_convert

EXACT_CASES = {
    # name: (moe section, top-level keys, expected export)
    "copy_all_layers": ({"num_experts": 4, "top_k": 2}, {}, "mixtral"),
    "copy_topk_then_softmax": ({"num_experts": 4, "top_k": 1, "routing": {"scoring": "topk_then_softmax"}}, {}, "mixtral"),
    "partition_k_eq_e": ({"num_experts": 4, "top_k": 4, "init": "partition"}, {}, "mixtral"),
    "partition_kmeans_k_eq_e": ({"num_experts": 4, "top_k": 4, "init": "partition", "partition": {"method": "kmeans"}}, {}, "mixtral"),
    "granular": ({"num_experts": 8, "top_k": 4, "init": "granular", "granularity": 2}, {}, "mixtral"),
    "shared_residual_top1": ({"num_experts": 3, "top_k": 1, "shared": {"num_experts": 1}}, {}, "granitemoeshared"),
    "two_shared_importance": (
        {"num_experts": 4, "top_k": 2, "shared": {"num_experts": 2, "intermediate_size": 24}},
        {},
        "granitemoeshared",
    ),
    "dense2moe_placement": ({"num_experts": 4, "top_k": 2, "placement": {"moe_start_layer": 1, "moe_layer_freq": 2}}, {}, "qwen2_moe"),
    "keep_first_last_dense": ({"num_experts": 4, "top_k": 2, "placement": {"keep_first_dense": 1, "keep_last_dense": 1}}, {}, "qwen2_moe"),
    "explicit_layers_qwen_export": ({"num_experts": 4, "top_k": 2, "placement": {"layers": [0, 2]}}, {"export": "qwen2_moe"}, "qwen2_moe"),
    "pmoe_per_layer_counts": ({"num_experts": {"0": 2, "1-2": 6}, "top_k": 2}, {}, "moeforge"),
    "mlp_gate": ({"num_experts": 4, "top_k": 2, "routing": {"gate_type": "mlp", "gate_hidden_size": 16}}, {}, "moeforge"),
    "gmm_gate_kmeans": ({"num_experts": 4, "top_k": 2, "routing": {"gate_type": "gmm", "router_init": "kmeans"}}, {}, "moeforge"),
    "linear_kmeans_router": ({"num_experts": 4, "top_k": 2, "routing": {"router_init": "kmeans"}}, {}, "mixtral"),
    "forced_moeforge_export": ({"num_experts": 4, "top_k": 2, "shared": {"num_experts": 1}}, {"export": "moeforge"}, "moeforge"),
}


@pytest.mark.parametrize("variant", ["gqa", "odd_tied"])
@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_exact_conversions_reproduce_dense_logits(case, variant, tiny_sources, input_ids, tmp_path):
    moe, top, expected_export = EXACT_CASES[case]
    if variant == "odd_tied" and moe.get("shared", {}).get("intermediate_size") == 24:
        moe = {**moe, "shared": {"num_experts": 2, "intermediate_size": 40}}  # 120-40 = 80 routed neurons
    source = tiny_sources[variant]
    result = run_convert(source, tmp_path / "moe", moe, **top)
    assert result.export == expected_export
    assert result.plan.exact
    assert result.fidelity.passed and result.fidelity.top1_agreement == 1.0
    reference = dense_logits(source, input_ids)
    converted = load_logits(tmp_path / "moe", input_ids)
    assert reference.abs().max() > 1.0  # the check is not vacuous
    torch.testing.assert_close(converted, reference, atol=1e-5, rtol=1e-5)


INEXACT_CASES = {
    "copy_no_renorm": ({"num_experts": 4, "top_k": 2, "routing": {"normalize": False}}, "qwen2_moe"),
    "copy_noise": ({"num_experts": 4, "top_k": 2, "copy": {"noise": 0.1}}, "mixtral"),
    "drop_upcycling": ({"num_experts": 4, "top_k": 2, "copy": {"drop_ratio": 0.5}}, "mixtral"),
    "partition_random_top2": ({"num_experts": 4, "top_k": 2, "init": "partition"}, "mixtral"),
    "partition_importance": ({"num_experts": 4, "top_k": 2, "init": "partition", "partition": {"method": "importance"}}, "mixtral"),
    "granular_no_renorm": (
        {"num_experts": 8, "top_k": 4, "init": "granular", "granularity": 2, "routing": {"normalize": False}},
        "qwen2_moe",
    ),
    "partition_shared_gmm": (
        {
            "num_experts": 4,
            "top_k": 1,
            "init": "partition",
            "shared": {"num_experts": 1, "intermediate_size": 32},
            "routing": {"gate_type": "gmm"},
        },
        "moeforge",
    ),
}


@pytest.mark.parametrize("case", sorted(INEXACT_CASES))
def test_inexact_conversions_compute_what_the_report_measured(case, tiny_sources, tmp_path):
    moe, expected_export = INEXACT_CASES[case]
    result = run_convert(tiny_sources["gqa"], tmp_path / "moe", moe, seed=3)
    assert result.export == expected_export
    assert not result.plan.exact and not result.fidelity.exact_expected
    assert result.fidelity.max_abs_logit_diff > 1e-4  # really approximate
    # the checkpoint on disk computes the perplexity the in-pipeline check reported
    tokenizer = load_tokenizer(tiny_sources["gqa"])
    ids, _ = calibration_ids(Calibration(), tokenizer, 256, torch.Generator().manual_seed(3))
    ids = ids[Calibration().num_sequences // 2 :]  # the report is computed on the held-out half
    import moeforge  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.exp(loss).item() == pytest.approx(result.fidelity.perplexity_moe, rel=1e-4)


def test_analytic_scales(tiny_sources, tmp_path):
    """Partition with renormalised top-k scales each expert by E (exact when all experts fire with weight 1/E);
    copy without renormalisation by E/k (the expected sum of k of E near-uniform probabilities)."""
    moe = {"num_experts": 4, "top_k": 2, "init": "partition", "scale": "analytic"}
    result = run_convert(tiny_sources["gqa"], tmp_path / "moe", moe)
    assert {layer.scale for layer in result.plan.moe_layers} == {4.0}
    moe = {"num_experts": 4, "top_k": 2, "routing": {"normalize": False}, "scale": "analytic"}
    result = run_convert(tiny_sources["gqa"], tmp_path / "moe2", moe)
    assert {layer.scale for layer in result.plan.moe_layers} == {2.0}


def test_auto_scale_fits_approximate_layers_and_beats_analytic(tiny_sources, tmp_path):
    moe = {"num_experts": 4, "top_k": 2, "init": "partition"}
    analytic = run_convert(tiny_sources["gqa"], tmp_path / "a", {**moe, "scale": "analytic"})
    fitted = run_convert(tiny_sources["gqa"], tmp_path / "f", moe)
    assert fitted.fidelity.mean_abs_logit_diff < analytic.fidelity.mean_abs_logit_diff
    layers = json.loads((tmp_path / "f" / "moeforge.json").read_text())["layers"]
    assert all(layer["scale_calibrated"] for layer in layers) and len({layer["scale"] for layer in layers}) == 3
    exact = run_convert(tiny_sources["gqa"], tmp_path / "e", {"num_experts": 4, "top_k": 2})
    assert exact.fidelity.passed  # exact layers keep their analytic scale


def test_native_exports_generate_with_plain_transformers(tiny_sources, tmp_path, input_ids):
    source = tiny_sources["gqa"]
    run_convert(source, tmp_path / "mixtral", {"num_experts": 4, "top_k": 2})
    run_convert(source, tmp_path / "granite", {"num_experts": 4, "top_k": 2, "shared": {"num_experts": 1}})
    run_convert(source, tmp_path / "qwen", {"num_experts": 4, "top_k": 2, "placement": {"layers": [1]}})
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    expected = dense.generate(input_ids[:1, :8], max_new_tokens=10, do_sample=False)
    for name, architecture in (
        ("mixtral", "MixtralForCausalLM"),
        ("granite", "GraniteMoeSharedForCausalLM"),
        ("qwen", "Qwen2MoeForCausalLM"),
    ):
        # serving engines dispatch on config.architectures
        assert json.loads((tmp_path / name / "config.json").read_text())["architectures"] == [architecture]
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()  # no moeforge import needed
        assert torch.equal(model.generate(input_ids[:1, :8], max_new_tokens=10, do_sample=False), expected)


def test_provenance_file(tiny_sources, tmp_path):
    import hashlib

    out = tmp_path / "moe"
    run_convert(tiny_sources["gqa"], out, {"num_experts": 4, "top_k": 2, "routing": {"gate_type": "mlp"}})
    info = json.loads((out / "moeforge.json").read_text())
    assert info["export"] == "moeforge"
    assert info["fidelity"]["passed"] and info["exact_by_construction"]
    assert info["recipe"]["moe"]["num_experts"] == 4
    assert set(info["versions"]) == {"torch", "transformers", "safetensors"}
    assert "model.layers.0.mlp.gate.fc1.weight" in info["newly_initialized"]
    assert not any("experts" in name for name in info["newly_initialized"])
    for name, digest in info["checksums"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert (out / "tokenizer.json").is_file()


def test_layer_progress_is_0_based_like_placement_layers(tiny_sources, tmp_path):
    lines: list[str] = []
    moe = {"num_experts": 4, "top_k": 2, "placement": {"layers": [1]}}
    recipe = parse_recipe({"source": str(tiny_sources["gqa"]), "output": str(tmp_path / "moe"), "moe": moe})
    convert(recipe, log=lines.append)
    assert [line for line in lines if line.startswith("  layer ")] == ["  layer 0 dense", "  layer 1 moe", "  layer 2 dense"]
