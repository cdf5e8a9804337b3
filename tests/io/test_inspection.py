"""inspect_checkpoint on tiny dense and MoE checkpoints: the layer plan and parameter counts match the models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from moeforge.errors import MoeforgeError
from moeforge.io.inspection import inspect_checkpoint
from tests.helpers import build_tiny_llama

SMALL = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)


def _save(model: PreTrainedModel, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def _expected_active(model: PreTrainedModel, moe_layers: list[tuple[int, int, int]]) -> int:
    """Total minus the (E - k) unused SwiGLU experts of each MoE layer: (experts, top_k, expert ffn)."""
    total = sum(p.numel() for p in model.parameters())
    hidden = model.config.hidden_size
    return total - sum((e - k) * 3 * hidden * ffn for e, k, ffn in moe_layers)


def test_dense_llama(tiny_llama_dir: Path) -> None:
    report = inspect_checkpoint(tiny_llama_dir)
    model = build_tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    assert report["model_type"] == "llama" and report["architecture"] == "LlamaForCausalLM"
    assert report["dtype"] == "float32"
    assert (report["hidden_size"], report["num_layers"], report["vocab_size"]) == (64, 3, 256)
    assert report["total_parameters"] == report["active_parameters"] == total
    assert report["num_moe_layers"] == 0
    assert report["size_on_disk_bytes"] == (tiny_llama_dir / "model.safetensors").stat().st_size
    assert [row["kind"] for row in report["layers"]] == ["dense"] * 3
    assert report["layers"][0]["intermediate_size"] == 96
    assert "fidelity" not in report
    json.dumps(report)  # the CLI's --json relies on this


def test_mixtral(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = MixtralConfig(**SMALL, intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(config)
    report = inspect_checkpoint(_save(model, tmp_path))
    assert report["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert report["active_parameters"] == _expected_active(model, [(4, 2, 48)] * 2)
    row = report["layers"][1]
    assert (row["kind"], row["num_experts"], row["top_k"], row["expert_intermediate_size"]) == ("moe", 4, 2, 48)
    assert row["gate_type"] == "linear" and row["shared_intermediate_size"] is None


def test_qwen2_moe_sparse_step_mlp_only_and_shared_experts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        **SMALL,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=40,
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
    )
    model = Qwen2MoeForCausalLM(config)
    report = inspect_checkpoint(_save(model, tmp_path))
    kinds = ["moe" if "Sparse" in type(layer.mlp).__name__ else "dense" for layer in model.model.layers]
    assert [row["kind"] for row in report["layers"]] == kinds == ["dense", "moe", "dense", "dense"]
    moe = report["layers"][1]
    assert (moe["expert_intermediate_size"], moe["shared_intermediate_size"]) == (16, 40)
    assert report["layers"][0]["intermediate_size"] == 48
    assert report["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert report["active_parameters"] == _expected_active(model, [(4, 2, 16)])


def test_qwen3_moe(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        **SMALL, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2
    )
    model = Qwen3MoeForCausalLM(config)
    report = inspect_checkpoint(_save(model, tmp_path))
    assert [row["num_experts"] for row in report["layers"]] == [8, 8]
    assert report["active_parameters"] == _expected_active(model, [(8, 2, 16)] * 2)


def test_moeforge_llama_with_fidelity(tmp_path: Path) -> None:
    from moeforge.modeling import MoeforgeForCausalLM
    from tests.helpers import moeforge_llama_config

    spec = {
        "num_experts": 4,
        "top_k": 1,
        "expert_intermediate_size": 24,
        "shared_intermediate_size": 16,
        "gate_type": "mlp",
        "scoring": "softmax_then_topk",
    }
    config = moeforge_llama_config([None, spec, spec], **SMALL, intermediate_size=48, num_hidden_layers=3)
    torch.manual_seed(0)
    model = MoeforgeForCausalLM(config)
    _save(model, tmp_path)
    (tmp_path / "moeforge.json").write_text(json.dumps({"fidelity": {"max_abs_logit_diff": 0.0}, "other": 1}))
    report = inspect_checkpoint(tmp_path)
    assert report["model_type"] == "moeforge"
    assert [row["kind"] for row in report["layers"]] == ["dense", "moe", "moe"]
    assert report["layers"][2]["gate_type"] == "mlp" and report["layers"][2]["shared_intermediate_size"] == 16
    assert report["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert report["active_parameters"] == _expected_active(model, [(4, 1, 24)] * 2)
    assert report["fidelity"] == {"max_abs_logit_diff": 0.0}


def test_unsupported_and_missing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(MoeforgeError, match=r"model_type 'bert' \(BertModel\) is not supported"):
        inspect_checkpoint(tmp_path)
    with pytest.raises(MoeforgeError, match="does not exist"):
        inspect_checkpoint(tmp_path / "missing")
