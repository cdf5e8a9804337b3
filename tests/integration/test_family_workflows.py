"""Training, adapters and merging on families other than Llama: moeforge's architecture over Gemma 3 and a
native Qwen3-MoE train and keep their class; MoE-LoRA on Qwen3 and Gemma 3 merges into the family's MoE form."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeforge.adapters.build import apply_adapter
from moeforge.adapters.merge import merge_to_directory
from moeforge.config.adapter import AdapterSpec
from moeforge.errors import MoeforgeError
from moeforge.training.runner import train
from tests.families.test_conversion import convert_tiny
from tests.families.tiny import build_family
from tests.training.conftest import logged_losses, make_recipe

ADAPTER = {"num_experts": 4, "top_k": 2, "rank": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("family", "export", "stage"), [("gemma3_text", "moeforge", "pt"), ("qwen3", "qwen3_moe", "sft")])
def test_converted_family_trains_and_keeps_its_architecture(family_sources, tmp_path, family, export, stage):
    convert_tiny(family_sources[family], tmp_path / "moe", {"num_experts": 4, "top_k": 2})
    recipe = make_recipe(stage, tmp_path / "moe", tmp_path / "run", training={"max_steps": 6, "learning_rate": 3e-3})
    result = train(recipe, log=lambda _line: None)
    losses = logged_losses(result.log_history)
    assert losses[max(losses)] < losses[min(losses)] - 0.1
    assert any("router/balance" in entry for entry in result.log_history)  # router losses and telemetry ran
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert (
        saved["model_type"] == export
        and saved["architectures"] == json.loads((tmp_path / "moe" / "config.json").read_text())["architectures"]
    )
    if export == "moeforge":
        assert saved["base_model_type"] == family
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert type(loaded).__name__ == saved["architectures"][0]


@pytest.mark.parametrize(("family", "architecture"), [("qwen3", "Qwen3MoeForCausalLM"), ("gemma3_text", "MoeforgeGemma3ForCausalLM")])
def test_moe_lora_merges_into_the_family_moe(family_sources, tmp_path, family, architecture):
    recipe = make_recipe(
        "sft",
        family_sources[family],
        tmp_path / "run",
        adapter=ADAPTER,
        training={"max_steps": 3, "learning_rate": 1e-2},
    )
    result = train(recipe, log=lambda _line: None)
    merged = merge_to_directory(result.model_dir, tmp_path / "merged", log=lambda _line: None)
    assert merged.architecture == architecture and merged.check.passed  # equal to the adapter model, or nothing written
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == [architecture]


def test_fused_ffn_families_say_moe_adapters_need_separate_projections():
    model = build_family("phi3")
    with pytest.raises(MoeforgeError, match="stores gate and up as one gate_up_proj"):
        apply_adapter(model, AdapterSpec(**ADAPTER))


def test_eval_chat_and_plan_on_moeforge_over_gemma3(family_sources, tmp_path, capsys):
    """The commands a user runs next work on moeforge's architecture over a non-Llama family."""
    from moeforge.cli.main import main

    convert_tiny(family_sources["gemma3_text"], tmp_path / "moe", {"num_experts": 4, "top_k": 2})
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert (
        main(
            [
                "eval",
                str(tmp_path / "moe"),
                "--text",
                str(tmp_path / "text.txt"),
                "--output",
                str(tmp_path / "eval"),
                "--max-length",
                "48",
                "--batch-size",
                "2",
                "--compare",
                str(family_sources["gemma3_text"]),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(report["routing"]["load"]) == 4  # every layer's routing
    assert report["compare"]["perplexity"] == pytest.approx(report["perplexity"], rel=1e-5)  # exact conversion
    assert main(["chat", str(tmp_path / "moe"), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert main(["plan", str(tmp_path / "moe"), "--gpu-memory", "24GB", "--json"]) == 0
    out = capsys.readouterr().out
    assert "moeforge" in out
