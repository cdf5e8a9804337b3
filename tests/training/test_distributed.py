"""Data parallelism: ``torchrun --nproc_per_node 2`` (gloo, CPU) with 2 rows per process trains the model that
one process with 4 rows per step trains.

Same recipe, same global batch of 4, 3 steps. The split is exact for the LM loss (packed pt rows all have 32
label tokens, and Trainer weights each rank's loss by the global token count), so per-step losses agree to
float round-off and so do the weights. Adam turns a float-noise sign flip of a near-zero gradient into a
±lr step, so weights are compared where that cannot happen (dense: every gradient well away from 0) or by
the whole update's relative error (MoE). The switch balance loss is *not* additive over ranks (it is a
product of per-rank means), so the MoE runs set ``balance_coef: 0``.

The ranks run ``python -m moeforge.cli.main train RECIPE`` under torchrun (:mod:`tests.training.launch`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moeforge.config.recipe import load_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.training import train
from tests.training.conftest import logged_losses, provenance, state_dict
from tests.training.launch import check, history, pt_recipe, torchrun, write_recipe

pytestmark = pytest.mark.timeout(900)  # two process starts per run on a 2-core machine

STEPS = 3
GLOBAL_BATCH = 4
# not the last step: a telemetry step's loss is left out of the per-step log (see test_stages), and at the last
# step Trainer would then add that rank's own, ungathered loss to train_loss
TELEMETRY_STEPS = 2


def _write_recipe(path: Path, model: Path, output: Path, data: Path, per_device: int, **extra) -> Path:
    return write_recipe(
        path, pt_recipe(model, output, data, per_device, steps=STEPS, save_steps=STEPS, telemetry_steps=TELEMETRY_STEPS, **extra)
    )


def _history(output: Path) -> list[dict]:
    return history(output, STEPS)


@pytest.fixture(scope="module")
def pairs(models, data_files, tmp_path_factory):
    """``pairs(name)``: (single-process output, torchrun output, source model) for one configuration."""
    root = tmp_path_factory.mktemp("ddp")
    configs = {
        "dense": ("dense", {}),
        "mixtral": ("mixtral", {"router_losses": {"balance_coef": 0.0}}),
        "aux_free": ("moeforge", {"router_losses": {"balance_coef": 0.0, "aux_free": True, "aux_free_rate": 0.01}}),
    }
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def run(name: str) -> tuple[Path, Path, Path]:
        if name in cache:
            return cache[name]
        kind, extra = configs[name]
        base = root / name
        base.mkdir()
        single = _write_recipe(base / "single.yaml", models[kind], base / "single", data_files["text"], GLOBAL_BATCH, **extra)
        train(load_recipe(single, model=TrainRecipe), log=lambda _line: None)
        ddp = _write_recipe(
            base / "ddp.yaml", models[kind], base / "ddp", data_files["text"], GLOBAL_BATCH // 2, ddp_backend="gloo", **extra
        )
        check(torchrun(ddp, base))
        cache[name] = (base / "single", base / "ddp", models[kind])
        return cache[name]

    return run


@pytest.mark.parametrize("name", ["dense", "mixtral"])
def test_two_processes_log_the_same_losses_as_one(pairs, name: str) -> None:
    single, ddp, _ = pairs(name)
    losses_single, losses_ddp = logged_losses(_history(single)), logged_losses(_history(ddp))
    assert losses_single.keys() == losses_ddp.keys() and 1 in losses_single
    for step, loss in losses_single.items():
        assert losses_ddp[step] == pytest.approx(loss, rel=1e-5), step
    # the whole run's mean, which includes steps a telemetry log may have kept out of the per-step log
    entry_single, entry_ddp = provenance(single / "model")["training"][-1], provenance(ddp / "model")["training"][-1]
    assert entry_ddp["train_loss"] == pytest.approx(entry_single["train_loss"], rel=1e-5)
    assert entry_ddp["steps"] == entry_single["steps"] == STEPS
    assert entry_ddp["tokens"] == entry_single["tokens"] == STEPS * GLOBAL_BATCH * 32
    assert entry_ddp["recipe"]["training"]["per_device_train_batch_size"] == GLOBAL_BATCH // 2


def test_two_processes_train_the_same_dense_weights_as_one(pairs) -> None:
    single, ddp, source = pairs("dense")
    a, b, before = state_dict(single / "model"), state_dict(ddp / "model"), state_dict(source)
    assert a.keys() == b.keys()
    assert max(float((a[k] - before[k]).abs().max()) for k in a) > 2e-3  # it trained (≈ lr per step)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_two_processes_train_the_same_moe_update_as_one(pairs) -> None:
    single, ddp, source = pairs("mixtral")
    a, b, before = state_dict(single / "model"), state_dict(ddp / "model"), state_dict(source)
    assert a.keys() == b.keys()
    update_single = torch.cat([(a[k] - before[k]).flatten() for k in sorted(a)])
    update_ddp = torch.cat([(b[k] - before[k]).flatten() for k in sorted(a)])
    assert float(update_single.abs().max()) > 2e-3
    assert float((update_ddp - update_single).norm() / update_single.norm()) < 1e-3
    assert float((update_ddp - update_single).abs().max()) < 1e-4
    assert json.loads((ddp / "model" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_only_rank_0_writes(pairs) -> None:
    _, ddp, _ = pairs("mixtral")
    assert sorted(p.name for p in ddp.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]
    assert not list(ddp.glob(".model.partial-*"))
    assert len((ddp / "routing.jsonl").read_text().splitlines()) == 1  # one report, not one per rank


def test_routing_telemetry_covers_every_rank(pairs) -> None:
    single, ddp, _ = pairs("mixtral")
    (report_single,) = [json.loads(line) for line in (single / "routing.jsonl").read_text().splitlines()]
    (report_ddp,) = [json.loads(line) for line in (ddp / "routing.jsonl").read_text().splitlines()]
    assert report_single["tokens"] == TELEMETRY_STEPS * GLOBAL_BATCH * 32
    assert report_ddp["tokens"] == report_single["tokens"]
    for load_ddp, load_single in zip(report_ddp["load"], report_single["load"], strict=True):
        # the same routing up to a near-tie flipped by float noise between batch shapes
        assert sum(abs(x - y) for x, y in zip(load_ddp, load_single, strict=True)) <= 2


def test_aux_free_bias_follows_the_global_batch(pairs) -> None:
    single, ddp, _ = pairs("aux_free")
    a, b = state_dict(single / "model"), state_dict(ddp / "model")
    biases = [k for k in a if k.endswith("expert_bias")]
    assert biases and any(float(a[k].abs().max()) > 0 for k in biases)
    for name in biases:
        assert torch.equal(a[name], b[name]), name


def test_dense2moe_in_one_command_converts_once_under_torchrun(models, data_files, tmp_path) -> None:
    """A ``convert:`` recipe under torchrun: rank 0 converts, rank 1 waits for the published MoE, both train it."""
    recipe = _write_recipe(
        tmp_path / "one-command.yaml",
        models["dense"],
        tmp_path / "run",
        data_files["text"],
        GLOBAL_BATCH // 2,
        ddp_backend="gloo",
        router_losses={"balance_coef": 0.0},
    )
    data = yaml.safe_load(recipe.read_text())
    data["convert"] = {"source": data.pop("model"), "export": "mixtral", "moe": {"num_experts": 4, "top_k": 2}}
    recipe.write_text(yaml.safe_dump(data))
    done = torchrun(recipe, tmp_path)
    check(done)
    assert done.stderr.count("convert: converting") == 1 and "waiting for rank 0" in done.stderr
    converted = tmp_path / "run" / "converted"
    assert sorted(p.name for p in tmp_path.joinpath("run").iterdir() if p.name.startswith(".")) == []  # no staging left
    assert json.loads((converted / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert provenance(tmp_path / "run" / "model")["training"][-1]["steps"] == STEPS
