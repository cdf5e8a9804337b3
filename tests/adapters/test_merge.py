"""``moeforge merge``: a dense base + MoE-LoRA becomes a native MoE checkpoint (Mixtral, or Qwen2-MoE /
moeforge's architecture when some layers stay dense or expert counts differ) that computes the adapter model's
function; plain LoRA parts fold in; what cannot be merged is refused by name; bad input leaves nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from moeforge.adapters.build import apply_adapter
from moeforge.adapters.merge import merge_adapter
from moeforge.cli.main import main
from moeforge.config.adapter import AdapterSpec
from moeforge.errors import MoeforgeError
from tests.adapters.test_moe_lora import randomise_adapter
from tests.helpers import build_tiny_llama, make_tiny_llama_config, save_tiny_llama

FFN = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return build_tiny_llama(make_tiny_llama_config(), seed=0).eval()


def _tokens() -> torch.Tensor:
    return torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _adapter_and_merged(model, **spec):
    adapted = apply_adapter(copy.deepcopy(model), AdapterSpec(**{"num_experts": 4, "rank": 4, "dropout": 0.0, **spec}))
    randomise_adapter(adapted, std=0.1)
    adapted.eval()
    with torch.no_grad():
        reference = adapted(_tokens()).logits
        merged = merge_adapter(adapted)
        return reference, merged, merged(_tokens()).logits


@pytest.mark.parametrize(
    ("spec", "architecture"),
    [
        ({}, "MixtralForCausalLM"),
        ({"shared_expert": True, "targets": [*FFN, "q_proj", "o_proj"]}, "MixtralForCausalLM"),
        ({"layers": [0, 2]}, "Qwen2MoeForCausalLM"),
        ({"layer_experts": {1: 2}}, "MoeforgeLlamaForCausalLM"),
    ],
    ids=["all-layers", "shared+attention-lora", "some-layers", "per-layer-counts"],
)
def test_dense_plus_moe_lora_becomes_an_equal_native_moe(base, spec, architecture, tmp_path: Path):
    reference, merged, logits = _adapter_and_merged(base, **spec)
    assert type(merged).__name__ == architecture
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-5)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_tokens()).logits, reference, rtol=0, atol=2e-5)


def test_plain_lora_folds_into_the_base(base):
    reference, merged, logits = _adapter_and_merged(base, method="lora", targets=[*FFN, "v_proj"])
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", ["lora", "moe_lora"])
def test_lora_on_fused_experts_folds_into_a_mixtral_base(method):
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    mixtral = AutoModelForCausalLM.from_config(config).eval()
    reference, merged, logits = _adapter_and_merged(mixtral, method=method, targets=["experts", "k_proj"])
    assert type(merged).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-5)


def test_a_bottleneck_mixture_is_refused(base):
    adapted = apply_adapter(copy.deepcopy(base), AdapterSpec(method="moe_bottleneck", num_experts=4))
    with pytest.raises(MoeforgeError, match="moe_bottleneck adapter .* cannot be merged"):
        merge_adapter(adapted)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge-cli")
    dense = save_tiny_llama(root / "dense", make_tiny_llama_config())
    model = AutoModelForCausalLM.from_pretrained(dense)
    adapted = apply_adapter(model, AdapterSpec(num_experts=4, rank=4, dropout=0.0))
    randomise_adapter(adapted, std=0.1)
    adapted.save_pretrained(root / "adapter")
    return root / "adapter"


def test_merge_cli_writes_a_checked_native_checkpoint(trained_adapter: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(trained_adapter), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "merged into MixtralForCausalLM" in err and "top-1 agreement 100.00%" in err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    assert json.loads((out / "moeforge.json").read_text())["check"]["passed"] is True
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_merge_cli_bad_input_exits_2_and_writes_nothing(trained_adapter: Path, tmp_path: Path, capsys) -> None:
    assert main(["merge", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge merge: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    (tmp_path / "exists").mkdir()
    assert main(["merge", str(trained_adapter), "-o", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
