"""The Python API: recipes from paths, mappings or objects, the right kind for each job, lazy names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeforge
from moeforge.config.recipe import ConvertRecipe
from moeforge.config.train_recipe import TrainRecipe


def test_load_recipe_tells_the_kind_by_its_keys(tmp_path: Path) -> None:
    convert = tmp_path / "c.yaml"
    convert.write_text("source: default\noutput: out/x\nmoe: {num_experts: 4, top_k: 2}\n")
    train = tmp_path / "t.yaml"
    train.write_text("stage: sft\nmodel: out/x\noutput: out/y\ndata: {builtin: sft-demo}\n")
    assert isinstance(moeforge.load_recipe(convert), ConvertRecipe)
    assert isinstance(moeforge.load_recipe(train), TrainRecipe)
    assert moeforge.load_recipe(convert, {"moe.top_k": 1}).moe.top_k == 1
    assert isinstance(moeforge.load_recipe({"stage": "pt", "model": "m", "output": "o", "data": {"builtin": "pt-demo"}}), TrainRecipe)


def test_recipe_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(moeforge.MoeforgeError, match=r"^recipe: moe\.top_k"):
        moeforge.load_recipe({"source": "default", "output": "x", "moe": {"top_k": 0}})
    with pytest.raises(moeforge.MoeforgeError, match="kind 'serve' is unknown: use one of convert, train"):
        moeforge.load_recipe({"source": "default", "output": "x"}, kind="serve")
    with pytest.raises(moeforge.MoeforgeError, match="a TrainRecipe was given where a ConvertRecipe is needed"):
        moeforge.convert(TrainRecipe(stage="pt", model="m", output=tmp_path / "o", data={"builtin": "pt-demo"}))
    with pytest.raises(moeforge.MoeforgeError, match="dtype 'float64' is unknown"):
        moeforge.load_model("default", dtype="float64")


def test_convert_takes_a_mapping_and_loads_back(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = moeforge.convert({"source": str(tiny_llama_dir), "output": str(tmp_path / "moe"), "moe": {"num_experts": 4, "top_k": 2}})
    assert result.fidelity is not None and result.fidelity.passed
    model, _ = moeforge.load_model(result.output)
    dense, _ = moeforge.load_model(tiny_llama_dir)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=0)


def test_the_api_is_resolved_on_first_use() -> None:
    code = "import sys, moeforge; assert 'moeforge.api' not in sys.modules; moeforge.convert; assert 'moeforge.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="has no attribute 'serve'"):
        moeforge.serve  # noqa: B018
