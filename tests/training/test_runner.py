"""Every stage trains every model kind it should, and leaves a model that loads as what went in.

pt: dense, Mixtral, moeforge_llama; sft: dense, Qwen2-MoE, moeforge_llama; dpo: dense, Mixtral. Each run is
6 steps at lr 1e-3 on repeated rows, so for pt and sft the logged loss must fall; every run must leave
``<output>/model`` in the input's own architecture (a native model stays native) with its provenance
extended by a ``training`` entry, loss plots, and for MoE models the expert-load plot and per-layer loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeforge.training import train
from tests.training.conftest import ARCHITECTURES, MOE, logged_losses, make_recipe, provenance, state_dict

CASES = [
    ("pt", "dense"),
    ("pt", "mixtral"),
    ("pt", "moeforge"),
    ("sft", "dense"),
    ("sft", "qwen2_moe"),
    ("sft", "moeforge"),
    ("dpo", "dense"),
    ("dpo", "mixtral"),
]
STEPS = 6
TELEMETRY_STEPS = 3


def _data(stage: str, data_files: dict[str, Path]) -> dict:
    name = {"pt": "text", "sft": "prompt_completion", "dpo": "preference"}[stage]
    return {"train": [str(data_files[name])], "max_length": 32 if stage == "pt" else 64}


@pytest.fixture(scope="module")
def runs(models, data_files, tmp_path_factory):
    """One run per (stage, model kind), with the log history read back from the final checkpoint."""
    root = tmp_path_factory.mktemp("stages")
    results = {}
    for stage, kind in CASES:
        recipe = make_recipe(
            stage,
            models[kind],
            root / f"{stage}-{kind}",
            _data(stage, data_files),
            training={"max_steps": STEPS, "save_steps": STEPS, "telemetry_steps": TELEMETRY_STEPS},
        )
        lines: list[str] = []
        result = train(recipe, log=lines.append)
        history = json.loads((recipe.output / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
        results[stage, kind] = (recipe, result, history, lines)
    return results


@pytest.mark.parametrize(("stage", "kind"), CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_stage_trains_and_saves_the_same_architecture(runs, models, stage: str, kind: str) -> None:
    recipe, result, history, lines = runs[stage, kind]
    assert result.steps == STEPS
    assert result.model_dir == recipe.output / "model"

    losses = logged_losses(history)
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    assert result.train_loss is not None and math.isfinite(result.train_loss)
    if stage in ("pt", "sft"):
        steps = sorted(losses)
        assert steps[0] == 1
        assert losses[steps[-1]] < losses[steps[0]] - 0.1, f"{stage} on {kind} did not learn repeated rows: {losses}"

    # native stays native: the saved config names the input's architecture, and loads as that class
    source_arch = json.loads((models[kind] / "config.json").read_text())["architectures"]
    saved_arch = json.loads((result.model_dir / "config.json").read_text())["architectures"]
    assert source_arch == [ARCHITECTURES[kind]]
    assert saved_arch == source_arch
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    assert type(loaded).__name__ == ARCHITECTURES[kind]
    original = AutoModelForCausalLM.from_pretrained(models[kind], dtype=torch.float32)
    assert type(loaded) is type(original)

    # it trained: the saved weights are not the input's (same tensor names, some values moved)
    before, after = state_dict(models[kind]), state_dict(result.model_dir)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)

    # provenance: the conversion's record (for MoE) is kept, and this run is appended
    record = provenance(result.model_dir)
    if kind != "dense":
        assert record["export"] == provenance(models[kind])["export"]
        assert "training" not in provenance(models[kind])
    assert len(record["training"]) == 1
    entry = record["training"][-1]
    assert entry["stage"] == stage
    assert entry["steps"] == STEPS
    assert entry["recipe"] == recipe.model_dump(mode="json", by_alias=True)
    assert entry["recipe"]["model"] == str(models[kind])
    assert entry["train_loss"] == pytest.approx(result.train_loss)
    assert entry["trainable_parameters"] == entry["total_parameters"] == result.total_parameters
    assert entry["total_parameters"] == sum(p.numel() for p in original.parameters())
    assert set(record["checksums"]) == {p.name for p in result.model_dir.glob("*.safetensors")}

    # plots and routing telemetry
    plots = recipe.output / "plots"
    assert (plots / "loss.png").is_file()
    assert plots / "loss.png" in result.plots
    routing = recipe.output / "routing.jsonl"
    if kind == "dense":
        assert not (plots / "expert_load.png").exists()
        assert not routing.exists()
        return
    assert (plots / "expert_load.png").is_file()
    assert plots / "expert_load.png" in result.plots
    reports = [json.loads(line) for line in routing.read_text().splitlines()]
    assert [r["step"] for r in reports] == list(range(TELEMETRY_STEPS, STEPS + 1, TELEMETRY_STEPS))
    layers = loaded.config.num_hidden_layers
    for report in reports:
        assert len(report["layers"]) == layers
        assert len(report["load"]) == layers
        assert report["tokens"] > 0
        for load in report["load"]:
            assert len(load) == MOE["num_experts"]
            assert sum(load) == report["tokens"] * MOE["top_k"]  # every valid token picks top_k experts
    logged = [e for e in history if "router/entropy" in e]
    assert [e["step"] for e in logged] == [r["step"] for r in reports]
    assert all(math.isfinite(e["router/entropy"]) for e in logged)
    # every logged loss comes with its split: the LM loss plus the weighted router aux make up the loss
    for entry in (e for e in history if "loss" in e):
        assert entry["lm_loss"] == pytest.approx(entry["loss"] - entry["router/aux"], abs=1e-9)
        assert entry["router/balance"] == pytest.approx(MOE["top_k"], abs=0.5)  # near-uniform routers
        assert {"router/z", "router/mi"} <= entry.keys()
    # one line per logged step, through the runner's log
    steps = [line.split()[1] for line in lines if line.startswith("step ") and " lm_loss " in line]
    assert steps == [f"{e['step']}/{STEPS}" for e in history if "loss" in e]


SFT_FORMATS = ["prompt_completion", "alpaca", "sharegpt", "messages"]


@pytest.mark.parametrize("fmt", [*SFT_FORMATS, "txt"])
def test_every_data_format_trains(models, data_files, tmp_path: Path, fmt: str) -> None:
    stage = "pt" if fmt == "txt" else "sft"
    recipe = make_recipe(
        stage,
        models["dense"],
        tmp_path / "out",
        {"train": [str(data_files[fmt])], "max_length": 64},
        training={"max_steps": 2},
    )
    result = train(recipe, log=lambda _line: None)
    assert result.steps == 2
    assert math.isfinite(result.train_loss)
    entry = provenance(result.model_dir)["training"][-1]
    assert entry["data"]["sources"][0]["format"] == ("text" if fmt == "txt" else fmt)
    assert entry["data"]["train_rows"] == (1 if fmt == "txt" else 8)


def test_dpo_trains_a_moeforge_moe(models, data_files, tmp_path: Path) -> None:
    recipe = make_recipe("dpo", models["moeforge"], tmp_path / "out", _data("dpo", data_files), training={"max_steps": 2})
    result = train(recipe, log=lambda _line: None)
    assert result.steps == 2
    assert math.isfinite(result.train_loss)
    assert json.loads((result.model_dir / "config.json").read_text())["architectures"] == [ARCHITECTURES["moeforge"]]


def test_every_step_loss_is_logged_also_at_telemetry_steps(models, data_files, tmp_path: Path) -> None:
    recipe = make_recipe(
        "pt",
        models["mixtral"],
        tmp_path / "out",
        _data("pt", data_files),
        training={"max_steps": 4, "save_steps": 4, "logging_steps": 1, "telemetry_steps": 2},
    )
    train(recipe, log=lambda _line: None)
    history = json.loads((recipe.output / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "router/entropy" in e] == [2, 4]
    assert sorted(logged_losses(history)) == [1, 2, 3, 4]
    assert [e["step"] for e in history if "router/balance" in e] == [1, 2, 3, 4]  # the router losses go with each loss
