"""The loss the trainers optimise (and log) includes moeforge's router balance loss, exactly once.

TRL's SFT (fused LM head) and DPO (preference loss) compute their loss without ``output.loss``, so the aux
loss must be added by moeforge's trainer subclasses. Two one-step runs that differ only in
``balance_coef`` (0 vs 10) see the same weights and batch in that step, so their losses must differ by
exactly ``10 × balance``, where ``balance`` is the ``router/balance`` logged with that step's loss (≈ top_k = 2 for
near-uniform routers, so the gap is ≈ 20): a missing aux would give 0, a double-counted one 2×.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moeforge.training import train
from tests.training.conftest import MOE, make_recipe

COEF = 10.0


def _run(stage: str, model: Path, output: Path, router_losses: dict | None) -> dict:
    extra = {"router_losses": router_losses} if router_losses is not None else {}
    recipe = make_recipe(stage, model, output, training={"max_steps": 1, "save_steps": 1, "telemetry_steps": 1}, **extra)
    result = train(recipe, log=lambda _line: None)
    history = json.loads((output / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    (entry,) = [e for e in history if "loss" in e]
    config = json.loads((result.model_dir / "config.json").read_text())
    return {"loss": result.train_loss, "balance": entry["router/balance"], "lm_loss": entry["lm_loss"], "config": config}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> dict[tuple[str, str], dict]:
    root = tmp_path_factory.mktemp("router-loss")
    cases = {
        ("sft", "zero"): ("moeforge", {"balance_coef": 0.0}),
        ("sft", "huge"): ("moeforge", {"balance_coef": COEF}),
        ("sft", "default"): ("moeforge", None),
        ("dpo", "zero"): ("mixtral", {"balance_coef": 0.0}),
        ("dpo", "huge"): ("mixtral", {"balance_coef": COEF}),
    }
    return {(stage, name): _run(stage, models[kind], root / f"{stage}-{name}", losses) for (stage, name), (kind, losses) in cases.items()}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_logged_loss_includes_the_balance_loss_once(runs, stage: str) -> None:
    zero, huge = runs[stage, "zero"], runs[stage, "huge"]
    assert math.isfinite(zero["loss"]) and math.isfinite(huge["loss"])
    # same weights and batch in step 1: the routers behaved identically in both runs
    assert huge["balance"] == zero["balance"]
    assert huge["balance"] == pytest.approx(MOE["top_k"], abs=0.35)  # near-uniform routers after copy upcycling
    gap = huge["loss"] - zero["loss"]
    assert gap > 5
    assert gap == pytest.approx(COEF * huge["balance"], rel=1e-4)
    # the logged lm_loss is the loss without the weighted aux: the same in both runs
    assert huge["lm_loss"] == pytest.approx(zero["lm_loss"], rel=1e-4)
    assert zero["lm_loss"] == pytest.approx(zero["loss"], rel=1e-6)


def test_moeforge_config_records_the_coefficients_it_trained_with(runs, models) -> None:
    source = json.loads((models["moeforge"] / "config.json").read_text())
    assert source["router_aux_loss_coef"] == 0.01
    assert runs["sft", "zero"]["config"]["router_aux_loss_coef"] == 0.0
    assert runs["sft", "huge"]["config"]["router_aux_loss_coef"] == COEF
    assert runs["sft", "default"]["config"]["router_aux_loss_coef"] == 0.01
    for run in (runs["sft", "zero"], runs["sft", "huge"], runs["sft", "default"]):
        assert run["config"]["model_type"] == "moeforge"
        assert run["config"]["router_z_loss_coef"] == 0.0
        assert run["config"]["router_mi_loss_coef"] == 0.0


def test_native_config_keeps_its_own_coefficient(runs, models) -> None:
    """TRL is told router_aux_loss_coef=0 (moeforge supplies the loss); the saved Mixtral must not carry that 0."""
    source = json.loads((models["mixtral"] / "config.json").read_text())
    for name in ("zero", "huge"):
        saved = runs["dpo", name]["config"]
        assert saved["model_type"] == "mixtral"
        assert saved["router_aux_loss_coef"] == source["router_aux_loss_coef"]
        assert saved["output_router_logits"] == source["output_router_logits"]
