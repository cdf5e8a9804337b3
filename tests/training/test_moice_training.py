"""``moeforge train`` with a ``moice:`` section and the ``moice`` preset: only the routers change, the
paper's schedule is the default, the balance loss and its gradient norm are logged, and the saved model
reloads with its MoICE attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeforge.errors import MoeforgeError
from moeforge.io.loading import load_model
from moeforge.training.runner import train
from tests.training.conftest import make_recipe, provenance, state_dict


def test_moice_preset_trains_only_the_routers_and_reloads(models, tmp_path: Path) -> None:
    recipe = make_recipe(
        "pt",
        models["dense"],
        tmp_path / "run",
        preset="moice",
        moice={"topk": 3},
        training={"max_steps": 3, "learning_rate": 1e-2},
    )
    result = train(recipe, log=lambda _line: None)
    before, after = state_dict(models["dense"]), state_dict(result.model_dir)
    routers = [name for name in after if "moice_router" in name]
    assert len(routers) == 3 * 3  # w1, w2, w3 per layer
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert result.trainable_parameters == sum(after[name].numel() for name in routers)
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["moice"]["topk"] == 3 and config["moice"]["base_set"][0] == 10000.0
    assert provenance(result.model_dir)["training"][-1]["recipe"]["moice"]["topk"] == 3

    reloaded, _ = load_model(result.model_dir)
    tokens = torch.randint(4, 256, (1, 16))
    for name in routers:
        assert torch.equal(reloaded.get_parameter(name), after[name])
    with torch.no_grad():
        reloaded(tokens)

    logged = [json.loads(line) for line in (recipe.output / "routing.jsonl").read_text().splitlines()]
    assert logged and all(name.endswith(".attn") for name in logged[-1]["layers"])


def test_moice_preset_defaults_to_the_paper_schedule(models, tmp_path: Path) -> None:
    recipe = make_recipe("pt", models["dense"], tmp_path / "run", preset="moice", moice={})
    assert recipe.training.learning_rate == 1e-3  # make_recipe sets one: the recipe's own value wins
    from moeforge.config.recipe import parse_recipe
    from moeforge.config.train_recipe import TrainRecipe

    bare = parse_recipe(
        {"stage": "pt", "model": "default", "output": str(tmp_path / "x"), "data": {"builtin": "pt-demo"}, "preset": "moice", "moice": {}},
        model=TrainRecipe,
    )
    assert bare.training.learning_rate == 1e-4 and bare.training.lr_scheduler_type == "constant"


def test_released_recipe_warns_and_logs_a_zero_gradient(models, tmp_path: Path) -> None:
    recipe = make_recipe("pt", models["dense"], tmp_path / "run", preset="moice", moice={}, training={"max_steps": 2})
    with pytest.warns(UserWarning, match="constant .*MoICE's released recipe"):
        result = train(recipe, log=lambda _line: None)
    losses = [entry for entry in result.log_history if "loss" in entry]
    assert len(losses) == 2
    for entry in losses:  # the constant 0.3 × 7 is in the loss, and taken out of lm_loss
        assert entry["router/attention_balance"] == pytest.approx(7.0, abs=1e-4)
        assert entry["router/aux"] == pytest.approx(0.3 * 7.0, abs=1e-4)
        assert entry["lm_loss"] == pytest.approx(entry["loss"] - 2.1, abs=1e-4)
    telemetry = [entry for entry in result.log_history if "router/attention_balance_grad_norm" in entry]
    assert len(telemetry) == 2
    assert all(entry["router/attention_balance_grad_norm"] == 0.0 for entry in telemetry)


def test_moice_preset_without_routers_is_an_error(models, tmp_path: Path) -> None:
    recipe = make_recipe("pt", models["dense"], tmp_path / "run", preset="moice")
    with pytest.raises(MoeforgeError, match="preset: moice needs MoICE routers"):
        train(recipe, log=lambda _line: None)


def test_moice_composes_with_ffn_experts(models, tmp_path: Path) -> None:
    recipe = make_recipe("pt", models["moeforge"], tmp_path / "run", preset="moice", moice={"topk": 2})
    result = train(recipe, log=lambda _line: None)
    before, after = state_dict(models["moeforge"]), state_dict(result.model_dir)
    changed = {name for name in after if name not in before or not torch.equal(after[name], before[name])}
    assert changed and all("moice_router" in name for name in changed)
