"""Integration on the real SmolLM2-135M-Instruct (30 layers, GQA 9/3 heads, tied embeddings, θ = 1e5)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeforge.cli.chat_cmd import chat_once
from moeforge.io.loading import load_model
from tests.conversion.conftest import run_convert

pytestmark = pytest.mark.smollm2

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def dense_bf16_reference(smollm2_dir):
    """The dense model with weights rounded to bf16 (the precision the MoE is stored in), run in fp32."""
    model, tokenizer = load_model(smollm2_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    return model, tokenizer


def test_copy_upcycling_answers_like_the_dense_model(smollm2_dir, dense_bf16_reference, tmp_path):
    result = run_convert(smollm2_dir, tmp_path / "moe", {"num_experts": 4, "top_k": 2}, dtype="bfloat16")
    assert result.export == "mixtral" and result.fidelity.passed and result.fidelity.top1_agreement == 1.0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()  # plain transformers
    dense, tokenizer = dense_bf16_reference
    answer = chat_once(moe, tokenizer, QUESTION, max_new_tokens=16, temperature=0.0, top_p=None)
    assert "Paris" in answer
    assert answer == chat_once(dense, tokenizer, QUESTION, max_new_tokens=16, temperature=0.0, top_p=None)
    info = json.loads((tmp_path / "moe" / "moeforge.json").read_text())
    assert info["fidelity"]["passed"] and info["dtype"] == "bfloat16"
    assert len(info["newly_initialized"]) == 30  # one router per layer


@pytest.mark.parametrize(
    ("moe", "export"),
    [
        ({"num_experts": 4, "top_k": 4, "init": "partition", "partition": {"method": "kmeans"}}, "mixtral"),
        (
            {"num_experts": 7, "top_k": 1, "shared": {"num_experts": 1}, "placement": {"moe_start_layer": 16, "moe_layer_freq": 2}},
            "qwen2_moe",
        ),
    ],
    ids=["partition_kmeans_k_eq_e", "residual_1_plus_7_dense2moe_placement"],
)
def test_exact_strategies_on_smollm2(smollm2_dir, dense_bf16_reference, tmp_path, moe, export):
    result = run_convert(smollm2_dir, tmp_path / "moe", moe, dtype="bfloat16")
    assert result.export == export and result.plan.exact and result.fidelity.passed
    dense, tokenizer = dense_bf16_reference
    ids = tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, dense(ids).logits, atol=2e-3, rtol=0)


def test_partition_top2_is_approximate_and_says_so(smollm2_dir, tmp_path):
    result = run_convert(smollm2_dir, tmp_path / "moe", {"num_experts": 8, "top_k": 2, "init": "partition"}, dtype="bfloat16")
    report = result.fidelity
    assert not report.exact_expected and report.passed
    assert report.perplexity_moe > report.perplexity_dense  # a quarter of the neurons fire: broken until trained
