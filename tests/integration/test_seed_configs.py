"""The original tools' own files (examples/seed-configs) run through one import command each, on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

import moeforge
from moeforge.cli.main import main
from tests.helpers import build_tiny_llama, make_tiny_llama_config, save_tiny_llama

SEEDS = Path(__file__).parents[2] / "examples" / "seed-configs"
QUICK = {
    "training.max_steps": 1,
    "training.per_device_train_batch_size": 2,
    "training.report_to": [],
    "data.max_rows": 8,
    "data.max_length": 16,
}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A tiny Llama with enough layers for Dense2MoE's placement (every 2nd layer from 16)."""
    config = make_tiny_llama_config(num_hidden_layers=18, intermediate_size=128)
    return save_tiny_llama(tmp_path / "tiny", config)


def _imported(tmp_path: Path, seed: str, *args: str) -> Path:
    out = tmp_path / (Path(seed).stem + "-" + "-".join(a.strip("-") for a in args if a.startswith("--kind")) + ".yaml")
    assert main(["import-config", str(SEEDS / seed), "-o", str(out), *args]) == 0
    return out


def test_every_seed_file_imports(tiny: Path, tmp_path: Path) -> None:
    for seed in sorted(p.name for p in SEEDS.iterdir()):
        assert isinstance(
            moeforge.load_recipe(_imported(tmp_path, seed, "--model", str(tiny))), (moeforge.ConvertRecipe, moeforge.TrainRecipe)
        )


def test_dense2moe_converts_then_trains(tiny: Path, tmp_path: Path) -> None:
    convert = moeforge.load_recipe(_imported(tmp_path, "dense2moe-config.json", "--model", str(tiny)), {"output": str(tmp_path / "moe")})
    result = moeforge.convert(convert)
    assert result.fidelity is not None and result.fidelity.passed  # copy upcycling is exact
    assert [i for i, layer in enumerate(result.plan.layers) if layer is not None] == [16]
    train = moeforge.load_recipe(
        _imported(tmp_path, "dense2moe-config.json", "--kind", "train", "--model", str(tiny)),
        {**QUICK, "model": str(result.output), "output": str(tmp_path / "run")},  # the model: the conversion's output
    )
    assert train.router_losses.mi_coef == 0.01 and train.router_losses.balance_coef == 0.0
    assert moeforge.train(train).steps == 1


def test_llama_moe_v2_partitions(tiny: Path, tmp_path: Path) -> None:
    recipe = moeforge.load_recipe(_imported(tmp_path, "llama-moe-v2-convert.sh", "--model", str(tiny)), {"output": str(tmp_path / "moe")})
    result = moeforge.convert(recipe)
    layer = next(layer for layer in result.plan.layers if layer is not None)
    assert (layer.num_experts, layer.top_k) == (7, 1) and layer.shared_intermediate_size > 0


def test_moice_trains_its_routers(tiny: Path, tmp_path: Path) -> None:
    theta = build_tiny_llama(make_tiny_llama_config()).config.rope_parameters["rope_theta"]
    recipe = moeforge.load_recipe(
        _imported(tmp_path, "moice-config.json", "--model", str(tiny), "--rope-theta", str(theta)),
        {**QUICK, "output": str(tmp_path / "run")},
    )
    assert recipe.moice is not None and recipe.moice.base_set[0] == pytest.approx(theta)
    assert moeforge.train(recipe).steps == 1
