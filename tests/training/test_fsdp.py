"""FSDP2 on 2 CPU processes (gloo) trains what one process trains, by both routes, and writes what one process writes.

The routes: ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` (the shipped config) and the
recipe's ``fsdp:`` section under torchrun. Same recipe, same global batch of 4 (2 rows per process), 4 steps:
per-step losses agree to float round-off and the weights' update does too (see tests/training/test_distributed.py
for why MoE runs set ``balance_coef: 0`` and why the update is compared, not each weight). The final
``<output>/model`` is the single-process export (architecture, tensor names, full tensors, provenance); the
checkpoints written on the way are sharded, one shard per rank, and a run killed after step 3 and resumed from
its step-2 checkpoint ends exactly as the uninterrupted run (the recipe route's run is the killed one, the
accelerate route's the uninterrupted one: both routes configure the same FSDP2, so they agree bit for bit). With routing skewed so one rank never feeds experts
2 and 3 (:mod:`tests.training.skewed_routing`), FSDP2 still finishes (a hang fails on the launch timeout).

Each launch costs two process starts on a 2-core machine, so every run happens once (module-scoped, lazily)
and several tests read it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments

from moeforge.config.recipe import parse_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError
from moeforge.training import train
from moeforge.training.checkpoints import MARKER
from moeforge.training.fsdp import fsdp_arguments
from tests.training.conftest import logged_losses, provenance, state_dict
from tests.training.launch import CLI, CONFIGS, accelerate_launch, check, history, pt_recipe, run_module, torchrun

pytestmark = pytest.mark.timeout(900)

STEPS, SAVE_STEPS, KILL_AT = 4, 2, 3
GLOBAL_BATCH = 4
TELEMETRY_STEPS = 3  # not the last step (see test_distributed); its routing report is the skew test's evidence
HANG = 300  # seconds: a launch that has not finished by then hangs
ADAPTER = {"num_experts": 4, "top_k": 2, "rank": 4, "dropout": 0.0}  # no dropout: its masks depend on the batch split
KILLED = "tests.training.killed_run"
SKEWED = "tests.training.skewed_routing"
FSDP2 = CONFIGS / "accelerate" / "fsdp2.yaml"  # the GPU config, on CPU processes (docs/distributed.md)


def _recipe(models, data_files, output: Path, kind: str, per_device: int, **extra) -> dict:
    if kind == "adapter":
        kind, extra = "dense", {**extra, "adapter": ADAPTER}
    recipe = pt_recipe(
        models[kind], output, data_files["text"], per_device, steps=STEPS, save_steps=SAVE_STEPS, telemetry_steps=TELEMETRY_STEPS, **extra
    )
    return {"router_losses": {"balance_coef": 0.0}, **recipe}


@pytest.fixture(scope="module")
def runs(models, data_files, tmp_path_factory):
    """``runs(name)``: the output directory of one run (single-process ones in this process, the rest launched)."""
    root = tmp_path_factory.mktemp("fsdp")
    cache: dict[str, Path] = {}

    def write(name: str, kind: str, per_device: int, **extra) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_recipe(models, data_files, root / name, kind, per_device, **extra)))
        return path

    def single(name: str, kind: str) -> None:
        train(parse_recipe(_recipe(models, data_files, root / name, kind, GLOBAL_BATCH), model=TrainRecipe), log=lambda _l: None)

    def launched(name: str, kind: str, module: str = CLI) -> None:
        check(torchrun(write(name, kind, GLOBAL_BATCH // 2, fsdp={}), root, module=module, timeout=HANG))

    def killed_and_resumed() -> None:
        """The recipe route's run: killed at the end of step 3, then resumed (from its step-2 checkpoint)."""
        recipe = write("recipe", "mixtral", GLOBAL_BATCH // 2, fsdp={})
        killed = run_module(KILLED, [str(KILL_AT), "train", str(recipe)], root, timeout=HANG)
        assert re.search(r"exitcode\s*:\s*130", killed.stderr), killed.stderr[-3000:]  # the CLI's exit on an interrupt
        (root / "killed.json").write_text(json.dumps(sorted(p.name for p in (root / "recipe").glob("checkpoint-*"))))
        check(torchrun(write("recipe", "mixtral", GLOBAL_BATCH // 2, fsdp={}, resume=True), root, timeout=HANG))

    plan = {
        "single": lambda: single("single", "mixtral"),
        "accelerate": lambda: check(accelerate_launch(FSDP2, write("accelerate", "mixtral", GLOBAL_BATCH // 2), root, timeout=HANG)),
        "recipe": killed_and_resumed,
        "adapter_single": lambda: single("adapter_single", "adapter"),
        "adapter": lambda: launched("adapter", "adapter"),
        "skewed": lambda: launched("skewed", "mixtral", SKEWED),
        "skewed_adapter": lambda: launched("skewed_adapter", "adapter", SKEWED),
    }

    def run(name: str) -> Path:
        if name not in cache:
            plan[name]()
            cache[name] = root / name
        return cache[name]

    return run


def _history(output: Path) -> list[dict]:
    return history(output, STEPS)


def _update(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(after[k] - before[k]).flatten() for k in sorted(after)])


@pytest.mark.parametrize("route", ["accelerate", "recipe"])
def test_fsdp2_logs_the_same_losses_as_one_process(runs, route: str) -> None:
    single, sharded = runs("single"), runs(route)
    losses_single, losses_sharded = logged_losses(_history(single)), logged_losses(_history(sharded))
    assert losses_single.keys() == losses_sharded.keys() and 1 in losses_single
    for step, loss in losses_single.items():
        assert losses_sharded[step] == pytest.approx(loss, rel=1e-5), step
    entry_single, entry_sharded = provenance(single / "model")["training"][-1], provenance(sharded / "model")["training"][-1]
    if route == "accelerate":  # (the recipe route's run was resumed: its train_loss is the mean of steps 3-4)
        assert entry_sharded["train_loss"] == pytest.approx(entry_single["train_loss"], rel=1e-5)
    assert entry_sharded["steps"] == STEPS and entry_sharded["tokens"] == entry_single["tokens"] == STEPS * GLOBAL_BATCH * 32


@pytest.mark.parametrize("route", ["accelerate", "recipe"])
def test_fsdp2_writes_the_single_process_export_with_the_same_update(runs, models, route: str) -> None:
    single, sharded = runs("single") / "model", runs(route) / "model"
    a, b, before = state_dict(single), state_dict(sharded), state_dict(models["mixtral"])
    assert a.keys() == b.keys() == before.keys()
    assert {k: t.shape for k, t in b.items()} == {k: t.shape for k, t in a.items()}  # gathered, not shards
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    config = json.loads((sharded / "config.json").read_text())
    assert config["architectures"] == json.loads((single / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    update_single, update_sharded = _update(a, before), _update(b, before)
    assert float(update_single.abs().max()) > 2e-3
    assert float((update_sharded - update_single).norm() / update_single.norm()) < 1e-3
    assert float((update_sharded - update_single).abs().max()) < 1e-4
    assert provenance(sharded)["checksums"].keys() == {"model.safetensors"}
    assert not list(sharded.parent.glob(".model.partial-*"))  # rank 1 joined the gather and wrote nothing


@pytest.mark.parametrize("route", ["accelerate", "recipe"])
def test_fsdp2_checkpoints_are_sharded_one_shard_per_rank(runs, route: str) -> None:
    output = runs(route)  # (sharded checkpoints also show that the run was FSDP, not a DDP fallback)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [f"checkpoint-{SAVE_STEPS}", f"checkpoint-{STEPS}"]
    for checkpoint in output.glob("checkpoint-*"):
        assert (checkpoint / MARKER).is_file()
        assert not list(checkpoint.glob("*.safetensors"))  # no gathered copy
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
            assert (checkpoint / part / ".metadata").is_file()


def test_moe_lora_adapter_under_fsdp2_trains_what_one_process_trains(runs) -> None:
    single, sharded = runs("adapter_single"), runs("adapter")
    losses_single, losses_sharded = logged_losses(_history(single)), logged_losses(_history(sharded))
    assert losses_single.keys() == losses_sharded.keys()
    for step, loss in losses_single.items():
        assert losses_sharded[step] == pytest.approx(loss, rel=1e-5), step
    a, b = state_dict(single / "model"), state_dict(sharded / "model")
    assert a.keys() == b.keys() and all("moe_lora_" in name for name in a)
    assert {k: t.shape for k, t in b.items()} == {k: t.shape for k, t in a.items()}
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert sorted(p.name for p in (sharded / "model").iterdir()) == sorted(p.name for p in (single / "model").iterdir())
    assert not (sharded / "model" / "model.safetensors").exists()  # a PEFT adapter dir, not the base
    config_single = json.loads((single / "model" / "adapter_config.json").read_text())
    assert json.loads((sharded / "model" / "adapter_config.json").read_text()) == config_single


def test_killed_fsdp2_run_resumes_to_the_uninterrupted_run(runs) -> None:
    """The recipe route's run was killed after step 3 and resumed; the accelerate route's run went through."""
    resumed, uninterrupted = runs("recipe"), runs("accelerate")
    assert json.loads((resumed.parent / "killed.json").read_text()) == [f"checkpoint-{SAVE_STEPS}"]  # what the kill left
    assert logged_losses(_history(resumed)) == logged_losses(_history(uninterrupted))
    a, b = state_dict(uninterrupted / "model"), state_dict(resumed / "model")
    assert a.keys() == b.keys()
    assert not [name for name in a if not torch.equal(a[name], b[name])]
    assert provenance(resumed / "model")["training"][-1]["steps"] == STEPS


@pytest.mark.parametrize("name", ["skewed", "skewed_adapter"])
def test_fsdp2_finishes_when_one_rank_starves_experts(runs, name: str) -> None:
    output = runs(name)
    losses = logged_losses(_history(output))
    assert sorted(losses) and all(torch.isfinite(torch.tensor(loss)) for loss in losses.values())
    (report,) = [json.loads(line) for line in (output / "routing.jsonl").read_text().splitlines()]
    tokens = report["tokens"]  # over both ranks; each token goes to top_k = 2 experts
    for load in report["load"]:
        # rank 1 sent all of its tokens (half) to experts 0 and 1: experts 2 and 3 saw only rank 0's
        assert sum(load) == 2 * tokens
        assert load[2] + load[3] <= tokens <= load[0] + load[1]
        assert load[2] + load[3] < load[0] + load[1]


def test_fsdp_recipe_without_a_launcher_fails_before_loading(models, data_files, tmp_path: Path, monkeypatch) -> None:
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    recipe = parse_recipe({**_recipe(models, data_files, tmp_path / "out", "mixtral", 2), "fsdp": {}}, model=TrainRecipe)
    with pytest.raises(MoeforgeError, match=r"^fsdp: .*launch the run with torchrun") as error:
        train(recipe, log=lambda _l: None)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP1 runs where there is a GPU")
def test_fsdp1_is_refused_without_a_gpu(models, data_files, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = parse_recipe({**_recipe(models, data_files, tmp_path / "out", "mixtral", 2), "fsdp": {"version": 1}}, model=TrainRecipe)
    with pytest.raises(MoeforgeError, match=r"^fsdp.version: 1 \(FSDP1\) runs on GPUs only"):
        train(recipe, log=lambda _l: None)
    assert not (tmp_path / "out").exists()


def test_router_learning_rate_is_refused_with_fsdp(models, data_files, tmp_path: Path, monkeypatch) -> None:
    keys = _recipe(models, data_files, tmp_path / "out", "mixtral", 2)
    keys["training"]["router_learning_rate"] = 1e-2
    with pytest.raises(MoeforgeError, match="router_learning_rate is not supported with fsdp"):
        parse_recipe({**keys, "fsdp": {}}, model=TrainRecipe)
    # an accelerate FSDP config says it only in the environment: refused before the model loads
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(MoeforgeError, match="router_learning_rate is not supported with FSDP"):
        train(parse_recipe(keys, model=TrainRecipe), log=lambda _l: None)
    assert not (tmp_path / "out").exists()


def test_fsdp_section_reaches_the_accelerate_plugin(models, data_files, tmp_path: Path) -> None:
    spec = {"reshard_after_forward": False, "cpu_offload": True}
    recipe = parse_recipe({**_recipe(models, data_files, tmp_path, "mixtral", 2), "fsdp": spec}, model=TrainRecipe)
    plugin = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **fsdp_arguments(recipe)).fsdp_plugin_args
    assert plugin is not None
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is False and plugin["cpu_offload"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "transformer_cls_names_to_wrap" not in plugin
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT"
