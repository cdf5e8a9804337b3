"""``moeforge train`` with an ``adapter:`` section: only adapter tensors train and are saved (a PEFT
directory), the base stays bit-identical, the router losses use the adapter's coefficients, the output
reloads through moeforge and through PEFT, and MoE bases get LoRA on their fused experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from moeforge.adapters.peft_method import SAVED_PEFT_TYPE
from moeforge.io.loading import load_model
from moeforge.training.runner import train
from tests.training.conftest import logged_losses, make_recipe, provenance, state_dict

ADAPTER = {"num_experts": 4, "top_k": 2, "rank": 4, "alpha": 8, "dropout": 0.0}


def _tokens() -> torch.Tensor:
    return torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(3))


def test_moe_lora_sft_trains_only_the_adapter_and_reloads(models, data_files, tmp_path: Path) -> None:
    recipe = make_recipe(
        "sft",
        models["dense"],
        tmp_path / "run",
        data={"train": str(data_files["prompt_completion"]), "max_length": 64},
        adapter={**ADAPTER, "targets": ["gate_proj", "up_proj", "down_proj", "q_proj"], "balance_coef": 0.02},
        training={"max_steps": 6, "learning_rate": 5e-3},
    )
    lines: list[str] = []
    result = train(recipe, log=lines.append)
    saved = state_dict(result.model_dir)
    assert (result.model_dir / "adapter_config.json").is_file() and (result.model_dir / "adapter_model.safetensors").is_file()
    assert not (result.model_dir / "model.safetensors").exists()  # the base is not copied
    assert all("moe_lora_" in name for name in saved)
    assert result.trainable_parameters == sum(t.numel() for t in saved.values())
    assert any("moe_lora_router" in name for name in saved) and any(name.endswith("q_proj.moe_lora_A") for name in saved)
    losses = logged_losses(result.log_history)
    assert losses[max(losses)] < losses[min(losses)]
    assert any("trainable parameters" in line and "%" in line for line in lines)

    config = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == SAVED_PEFT_TYPE and config["router_aux_loss_coef"] == 0.02
    assert Path(config["base_model_name_or_path"]) == Path(models["dense"]).resolve()
    assert provenance(result.model_dir)["training"][-1]["recipe"]["adapter"]["num_experts"] == 4

    # moeforge's loader: an adapter directory loads its base and the adapter
    adapted, tokenizer = load_model(result.model_dir)
    assert tokenizer is not None and isinstance(adapted, PeftModel)
    base = AutoModelForCausalLM.from_pretrained(models["dense"]).eval()
    with torch.no_grad():
        assert not torch.allclose(adapted(_tokens()).logits, base(_tokens()).logits)
        # plain PEFT after `import moeforge` gives the same model
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["dense"]), str(result.model_dir)).eval()
        torch.testing.assert_close(peft(_tokens()).logits, adapted(_tokens()).logits, rtol=0, atol=0)


def test_router_losses_use_the_adapter_coefficient(models, tmp_path: Path) -> None:
    recipe = make_recipe("pt", models["dense"], tmp_path / "run", adapter={**ADAPTER, "balance_coef": 0.5, "z_coef": 0.1})
    from moeforge.training.runner import _router_losses

    assert (_router_losses(recipe).balance_coef, _router_losses(recipe).z_coef) == (0.5, 0.1)
    explicit = make_recipe("pt", models["dense"], tmp_path / "run2", adapter=ADAPTER, router_losses={"balance_coef": 0.0})
    assert _router_losses(explicit).balance_coef == 0.0


@pytest.mark.parametrize(
    ("kind", "method"), [("mixtral", "lora"), ("mixtral", "moe_lora"), ("qwen2_moe", "moe_lora"), ("moeforge", "moe_lora")]
)
def test_moe_base_gets_lora_on_its_fused_experts_with_the_router_frozen(models, tmp_path: Path, kind: str, method: str) -> None:
    recipe = make_recipe(
        "pt",
        models[kind],
        tmp_path / "run",
        adapter={**ADAPTER, "method": method, "targets": ["experts"]},
        training={"max_steps": 2, "learning_rate": 1e-2},
    )
    result = train(recipe, log=lambda _line: None)
    saved = state_dict(result.model_dir)
    assert saved and all(".mlp.experts." in name for name in saved)
    assert not any(".gate." in name for name in saved)  # the base router is not trained
    adapted, _ = load_model(result.model_dir)
    base = AutoModelForCausalLM.from_pretrained(models[kind]).eval()
    with torch.no_grad():
        assert not torch.allclose(adapted(_tokens()).logits, base(_tokens()).logits)


def test_router_only_preset_trains_only_the_adapter_routers(models, tmp_path: Path) -> None:
    recipe = make_recipe("pt", models["dense"], tmp_path / "run", adapter=ADAPTER, preset="router_only")
    result = train(recipe, log=lambda _line: None)
    routers = {n: t for n, t in state_dict(result.model_dir).items() if "moe_lora_router" in n}
    assert result.trainable_parameters == sum(t.numel() for t in routers.values()) == 3 * 4 * 64
