"""The second real model, Gemma 3 270M (base; a family with sandwich norms, (1+w) RMSNorm, scaled embeddings and
sliding/global layers): it converts exactly into moeforge's architecture and generates the dense model's text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeforge  # noqa: F401  (registers moeforge's architecture)
from moeforge.config.recipe import parse_recipe
from moeforge.conversion import convert

pytestmark = pytest.mark.gemma3


def test_gemma3_270m_converts_exactly_and_generates_the_same_text(gemma3_dir: Path, tmp_path: Path) -> None:
    recipe = parse_recipe(
        {
            "source": str(gemma3_dir),
            "output": str(tmp_path / "moe"),
            "moe": {"num_experts": 4, "top_k": 2},
            "calibration": {"num_sequences": 2, "sequence_length": 64},
        }
    )
    result = convert(recipe, log=lambda _line: None)
    assert result.export == "moeforge" and result.fidelity.passed and result.fidelity.top1_agreement == 1.0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe")
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    texts = []
    for directory in (gemma3_dir, tmp_path / "moe"):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        texts.append(tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]))
        del model
    assert texts[0] == texts[1]
    assert "France" in texts[0] or "Paris" in texts[0]
