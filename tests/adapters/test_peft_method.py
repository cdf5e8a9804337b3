"""The adapter directory is PEFT's own format: ``import moeforge`` registers ``MOE_LORA`` and then plain
PEFT and transformers load it (in a fresh interpreter, as a user would), tensors round-trip exactly, and
a directory that is not an adapter, or does not fit the base, gets one line."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from moeforge.adapters.build import apply_adapter, load_adapter
from moeforge.adapters.peft_method import SAVED_PEFT_TYPE
from moeforge.config.adapter import AdapterSpec
from moeforge.errors import MoeforgeError
from moeforge.io.loading import load_model
from tests.adapters.test_moe_lora import randomise_adapter
from tests.helpers import make_tiny_llama_config, save_tiny_llama

SPEC = AdapterSpec(
    num_experts=4,
    rank=4,
    dropout=0.1,
    shared_expert=True,
    layer_experts={2: 3},
    targets=["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"],
    balance_coef=0.03,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("peft-format")
    dense = save_tiny_llama(root / "dense", make_tiny_llama_config())
    adapted = apply_adapter(AutoModelForCausalLM.from_pretrained(dense), SPEC)
    randomise_adapter(adapted)
    adapted.save_pretrained(root / "adapter")
    adapted.eval()
    with torch.no_grad():
        logits = adapted(_tokens()).logits
    return dense, root / "adapter", logits


def _tokens() -> torch.Tensor:
    return torch.arange(4, 20).reshape(2, 8)


@contextmanager
def recording_base(adapter: Path, base: Path):
    """The adapter records its base by path (as ``moeforge train`` writes it); put the test's base there."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    try:
        yield
    finally:
        (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_directory_is_peft_format(saved) -> None:
    _, adapter, _ = saved
    assert sorted(p.name for p in adapter.iterdir() if p.suffix != ".md") == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == SAVED_PEFT_TYPE and config["task_type"] == "CAUSAL_LM"
    assert (config["num_experts"], config["layer_experts"], config["top_k"], config["router_aux_loss_coef"]) == (4, {"2": 3}, 2, 0.03)


def test_round_trip_through_peft_is_exact(saved) -> None:
    dense, adapter, logits = saved
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense), str(adapter)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(_tokens()).logits, logits)
    routers = [m for n, m in loaded.named_modules() if n.endswith("moe_lora_router.default")]
    assert [r.num_experts for r in routers] == [4, 4, 3]


def test_fresh_interpreter_loads_with_peft_and_with_the_transformers_one_liner(saved, tmp_path: Path) -> None:
    dense, adapter, logits = saved
    torch.save(logits, tmp_path / "expected.pt")
    script = f"""
import torch, moeforge
from peft import PeftModel
from transformers import AutoModelForCausalLM
tokens = torch.arange(4, 20).reshape(2, 8)
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(dense)!r}), {str(adapter)!r}).eval()
one_liner = AutoModelForCausalLM.from_pretrained({str(adapter)!r}).eval()  # the seed README's way
with torch.no_grad():
    assert torch.equal(peft(tokens).logits, expected)
    assert torch.equal(one_liner(tokens).logits, expected)
print("ok")
"""
    with recording_base(adapter, dense):  # the one-liner reads the base from there
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_without_moeforge_peft_says_to_import_it(saved) -> None:
    """PEFT's own error for a method it does not know is `KeyError: '<peft_type>'`; the saved value makes
    that line say what to do, on every plain loading path."""
    dense, adapter, _ = saved
    loads = {
        "PeftModel": f"from peft import PeftModel; PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(dense)!r}), {str(adapter)!r})",
        "AutoPeftModel": f"from peft import AutoPeftModelForCausalLM; AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})",
        "one-liner": f"AutoModelForCausalLM.from_pretrained({str(adapter)!r})",
    }
    with recording_base(adapter, dense):
        for how, load in loads.items():
            script = f"import sys\nfrom transformers import AutoModelForCausalLM\n{load}\nassert 'moeforge' not in sys.modules"
            result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
            assert result.returncode == 1, how
            assert result.stderr.strip().splitlines()[-1] == f"KeyError: {SAVED_PEFT_TYPE!r}", (how, result.stderr[-2000:])
            assert "moeforge" not in result.stderr.replace(SAVED_PEFT_TYPE, "").replace(str(adapter), ""), how  # moeforge never ran


def test_adapters_saved_as_plain_moe_lora_still_load(saved, tmp_path: Path) -> None:
    dense, adapter, logits = saved
    for file in adapter.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "MOE_LORA"}))  # as moeforge saved before
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(_tokens()).logits, logits)


def test_moeforge_loader_takes_adapter_dirs(saved) -> None:
    dense, adapter, logits = saved
    model, _ = load_model(dense, adapter=adapter)
    with torch.no_grad():
        assert torch.equal(model(_tokens()).logits, logits)


def test_bad_adapter_directories_get_one_line(saved, tmp_path: Path) -> None:
    dense, adapter, _ = saved
    base = AutoModelForCausalLM.from_pretrained(dense)
    with pytest.raises(MoeforgeError, match="no adapter_config.json"):
        load_adapter(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(MoeforgeError, match="adapter_model.safetensors is missing"):
        load_adapter(base, tmp_path)
    with pytest.raises(MoeforgeError, match="records no base model"):
        config = json.loads((adapter / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
        load_model(tmp_path)


def test_chat_takes_an_adapter_flag_or_an_adapter_directory(saved, capsys) -> None:
    from moeforge.cli.main import main

    dense, adapter, _ = saved
    replies = []
    with recording_base(adapter, dense):
        for argv in (["chat", str(dense), "--adapter", str(adapter)], ["chat", str(adapter)]):
            assert main([*argv, "--prompt", "hi", "--max-new-tokens", "4"]) == 0
            replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()
