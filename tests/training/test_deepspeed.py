"""DeepSpeed ZeRO-2 / ZeRO-3 with the shipped configs (``configs/deepspeed/``), on 2 CPU processes (gloo).

Guaranteed, against one process without DeepSpeed on the same global batch of 4 (3 steps):

- the same per-step losses and the same update, for the tiny upcycled MoE (Mixtral export) under ZeRO-3 and
  ZeRO-2, and for a MoE-LoRA adapter on the dense model under ZeRO-3;
- the final ``model/`` of a ZeRO-3 run is the single-process output: the native export (architecture, config,
  tensor names, full gathered shapes, moeforge.json), or for the adapter a PEFT adapter directory;
- forced skewed routing (rank 1's tokens reach only experts 0..top_k-1, :mod:`tests.training.skewed_routing`)
  completes under ZeRO-3 with finite losses, and the routing telemetry shows the starved experts' smaller share;
- ZeRO-3's sharded checkpoints (``global_stepN``, one optimizer shard per rank) resume exactly: the run continued
  from the step-2 checkpoint (what a run killed during step 3 leaves) ends as the uninterrupted run did.

Tolerances. Everything is float32 (the configs' ``bf16: auto`` follows the recipe: off). The configs name no
``optimizer``, so ZeRO steps Trainer's own torch AdamW (on its flat fp32 partitions), as the single process does
(DeepSpeed's CPU Adam, a compiled op, is used only by the offload config, which names it). What differs from one
process is only the order of float sums: each rank's matmuls over 2 rows instead of 4, and the gradient average
over ranks. The losses agree to that round-off (measured: 2e-7 relative; asserted: 1e-5, as for DDP in
test_distributed.py). The update is compared as a whole, by its relative error (measured 1e-4 ZeRO-3, 4e-5
ZeRO-2, 4e-5 adapter; asserted 1e-3), and element-wise within 1e-4 (a step moves a weight by up to lr = 1e-3):
Adam turns the float noise of a near-zero gradient into up to ±lr, so a few elements differ by more than
round-off. Beyond any tolerance is a top-k near-tie flipped by such a difference: the token then trains other
experts. That happens at step 4 of this Mixtral run (loss 4e-5 relative, update 5e-3), hence 3 steps, and with
the adapter's default router init std 0.02 (one selection in 768 flipped at step 2), hence 0.5 here, where the
router's logits are far apart. The switch balance loss is not additive over ranks (a product of per-rank means),
so the runs set ``balance_coef: 0``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from moeforge.config.recipe import load_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError
from moeforge.io.loading import load_model
from moeforge.training import train
from moeforge.training.checkpoints import MARKER
from moeforge.training.deepspeed import check_config, check_resume
from tests.training.conftest import logged_losses, provenance, state_dict
from tests.training.launch import CONFIGS, check, history, pt_recipe, torchrun, write_recipe

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.timeout(900)

STEPS, SAVE_STEPS = 3, 2
GLOBAL_BATCH = 4
TELEMETRY_STEPS = 2  # not the last step (see test_distributed.py)
LAUNCH_TIMEOUT = 300  # a hang fails the test instead of blocking the suite
SKEW = "tests.training.skewed_routing"
ADAPTER = {"num_experts": 4, "top_k": 2, "rank": 4, "alpha": 8, "dropout": 0.0, "router_init_std": 0.5}
RUNS = {  # name: (model, config under configs/deepspeed, extra recipe keys, launched module)
    "mixtral": ("mixtral", "zero3.json", {}, None),
    "mixtral-zero2": ("mixtral", "zero2.json", {}, None),
    "adapter": ("dense", "zero3.json", {"adapter": ADAPTER}, None),
    "mixtral-skewed": ("mixtral", "zero3.json", {}, SKEW),
    "adapter-skewed": ("dense", "zero3.json", {"adapter": ADAPTER}, SKEW),
}


@dataclass(frozen=True)
class Run:
    single: Path
    """The single-process output (same recipe, no DeepSpeed, per-device batch 4)."""
    ds: Path
    """The 2-process DeepSpeed output."""
    source: Path
    recipe: Path
    """The DeepSpeed run's recipe."""


def _write_recipe(path: Path, model: Path, output: Path, data: Path, per_device: int, **extra) -> Path:
    recipe = pt_recipe(model, output, data, per_device, steps=STEPS, save_steps=SAVE_STEPS, telemetry_steps=TELEMETRY_STEPS, **extra)
    return write_recipe(path, {"router_losses": {"balance_coef": 0.0}, **recipe})


def _history(output: Path) -> list[dict]:
    return history(output, STEPS)


def _loads(output: Path) -> list[list[int]]:
    """Per layer, each expert's selections over both ranks' tokens of the telemetry window."""
    (report,) = [json.loads(line) for line in (output / "routing.jsonl").read_text().splitlines()]
    assert report["tokens"] == TELEMETRY_STEPS * GLOBAL_BATCH * 32
    return report["load"]


@pytest.fixture(scope="module")
def runs(models, data_files, tmp_path_factory):
    """``runs(name)``: the :class:`Run` of one configuration, each launch (and single-process run) done once."""
    root = tmp_path_factory.mktemp("deepspeed")
    cache: dict[str, Run] = {}
    singles: dict[str, Path] = {}

    def single(kind: str, extra: dict) -> Path:
        key = json.dumps([kind, extra], sort_keys=True)
        if key not in singles:
            base = root / f"single-{len(singles)}"
            base.mkdir()
            recipe = _write_recipe(base / "recipe.yaml", models[kind], base / "out", data_files["text"], GLOBAL_BATCH, **extra)
            train(load_recipe(recipe, model=TrainRecipe), log=lambda _line: None)
            singles[key] = base / "out"
        return singles[key]

    def run(name: str) -> Run:
        if name not in cache:
            kind, config, extra, module = RUNS[name]
            base = root / name
            base.mkdir()
            deepspeed = str(CONFIGS / "deepspeed" / config)
            recipe = _write_recipe(
                base / "ds.yaml", models[kind], base / "ds", data_files["text"], GLOBAL_BATCH // 2, deepspeed=deepspeed, **extra
            )
            check(torchrun(recipe, base, module=module or "moeforge.cli.main", timeout=LAUNCH_TIMEOUT))
            cache[name] = Run(single(kind, extra), base / "ds", models[kind], recipe)
        return cache[name]

    return run


@pytest.mark.parametrize("name", ["mixtral", "mixtral-zero2", "adapter"])
def test_deepspeed_logs_the_same_losses_as_one_process(runs, name: str) -> None:
    run = runs(name)
    losses_single, losses_ds = logged_losses(_history(run.single)), logged_losses(_history(run.ds))
    assert losses_single.keys() == losses_ds.keys() and 1 in losses_single
    for step, loss in losses_single.items():
        assert losses_ds[step] == pytest.approx(loss, rel=1e-5), step
    entry_single, entry_ds = provenance(run.single / "model")["training"][-1], provenance(run.ds / "model")["training"][-1]
    assert entry_ds["train_loss"] == pytest.approx(entry_single["train_loss"], rel=1e-5)
    assert entry_ds["steps"] == entry_single["steps"] == STEPS
    assert entry_ds["tokens"] == entry_single["tokens"] == STEPS * GLOBAL_BATCH * 32


@pytest.mark.parametrize("name", ["mixtral", "mixtral-zero2", "adapter"])
def test_deepspeed_trains_the_same_update_as_one_process(runs, name: str) -> None:
    run = runs(name)
    a, b = state_dict(run.single / "model"), state_dict(run.ds / "model")
    assert a.keys() == b.keys()
    assert all(a[key].shape == b[key].shape for key in a)  # full tensors, not ZeRO-3's empty placeholders
    if "adapter" in name:  # the update of LoRA's B matrices is their value (they start at 0)
        keys, before = [k for k in sorted(a) if "lora_B" in k], dict.fromkeys(a, 0.0)
    else:
        keys, before = sorted(a), state_dict(run.source)
    update_single = torch.cat([(a[k] - before[k]).flatten() for k in keys])
    update_ds = torch.cat([(b[k] - before[k]).flatten() for k in keys])
    assert float(update_single.abs().max()) > 2e-3  # it trained (≈ lr per step)
    assert float((update_ds - update_single).norm() / update_single.norm()) < 1e-3
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_zero3_saves_the_native_export(runs) -> None:
    run = runs("mixtral")
    model, reference = run.ds / "model", run.single / "model"
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert json.loads((model / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    assert json.loads((model / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    checksums = provenance(model)["checksums"]
    assert checksums.keys() == {"model.safetensors"} and provenance(model)["training"][-1]["recipe"]["deepspeed"]
    assert not list(run.ds.glob(".model.partial-*"))


def test_zero3_saves_the_adapter_as_a_peft_directory(runs) -> None:
    run = runs("adapter")
    model, reference = run.ds / "model", run.single / "model"
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not (model / "model.safetensors").exists()  # the adapter only, not the base
    assert json.loads((model / "adapter_config.json").read_text()) == json.loads((reference / "adapter_config.json").read_text())
    adapted, _ = load_model(model)
    single, _ = load_model(reference)
    tokens = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(adapted(tokens).logits, single(tokens).logits, rtol=0, atol=1e-4)


def test_zero3_checkpoints_hold_one_optimizer_shard_per_rank(runs) -> None:
    checkpoint = runs("mixtral").ds / f"checkpoint-{SAVE_STEPS}"
    assert (checkpoint / "latest").read_text().strip() == f"global_step{SAVE_STEPS}"
    shards = sorted(p.name for p in (checkpoint / f"global_step{SAVE_STEPS}").glob("*optim_states.pt"))
    assert shards == [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
    assert (checkpoint / MARKER).is_file()


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory) -> Path:
    """The ZeRO-3 Mixtral run continued with ``resume: true`` from its step-2 checkpoint alone."""
    run = runs("mixtral")
    base = tmp_path_factory.mktemp("deepspeed-resume")
    output = base / "ds"
    output.mkdir()
    shutil.copytree(run.ds / f"checkpoint-{SAVE_STEPS}", output / f"checkpoint-{SAVE_STEPS}")
    recipe = {**yaml.safe_load(run.recipe.read_text()), "output": str(output), "resume": True}
    (base / "resume.yaml").write_text(yaml.safe_dump(recipe))
    done = torchrun(base / "resume.yaml", base, timeout=LAUNCH_TIMEOUT)
    check(done)
    assert f"resuming from {output / f'checkpoint-{SAVE_STEPS}'}" in done.stdout + done.stderr
    return output


def test_resumed_zero3_run_ends_as_the_uninterrupted_one(runs, resumed: Path) -> None:
    uninterrupted = runs("mixtral").ds
    assert logged_losses(_history(resumed)) == logged_losses(_history(uninterrupted))
    a, b = state_dict(uninterrupted / "model"), state_dict(resumed / "model")
    assert a.keys() == b.keys()
    assert not [name for name in a if not torch.equal(a[name], b[name])]


def test_a_checkpoint_resumes_only_under_the_engine_and_ranks_that_wrote_it(runs) -> None:
    run = runs("mixtral")
    zero3, plain = run.ds / f"checkpoint-{SAVE_STEPS}", run.single / f"checkpoint-{SAVE_STEPS}"
    check_resume(zero3, deepspeed=True, world_size=2)
    check_resume(plain, deepspeed=False, world_size=1)
    with pytest.raises(MoeforgeError, match="written by 2 DeepSpeed ranks and this run has 1: launch 2 processes"):
        check_resume(zero3, deepspeed=True, world_size=1)
    with pytest.raises(MoeforgeError, match="holds DeepSpeed's sharded optimizer state: resume it with the deepspeed: config"):
        check_resume(zero3, deepspeed=False, world_size=1)
    with pytest.raises(MoeforgeError, match="was written without DeepSpeed"):
        check_resume(plain, deepspeed=True, world_size=2)


@pytest.mark.parametrize("name", ["mixtral-skewed", "adapter-skewed"])
def test_skewed_routing_completes_under_zero3(runs, name: str) -> None:
    """Rank 1 sends no token to experts 2 and 3 of any layer; ZeRO-3 still gathers them on both ranks."""
    run = runs(name)
    losses = logged_losses(_history(run.ds))
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(loss) for loss in losses.values())
    top_k = ADAPTER["top_k"]
    free = _loads(runs(name.removesuffix("-skewed")).ds)  # the same run, routing freely on both ranks
    for skewed, balanced in zip(_loads(run.ds), free, strict=True):
        # rank 1's selections all went to experts 0..top_k-1: the starved ones hold at most rank 0's half
        assert sum(skewed[top_k:]) <= sum(skewed) / 2 < sum(skewed[:top_k])
        assert sum(skewed[top_k:]) < sum(balanced[top_k:])


def test_shipped_configs_are_filled_by_trainer(models, tmp_path: Path) -> None:
    """Every ``"auto"`` is one Trainer fills; bf16 follows the recipe (off on CPU float32); ZeRO-3 gathers on save."""
    from transformers import AutoConfig, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    class Model:
        config = AutoConfig.from_pretrained(models["mixtral"])

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none")
    for name in ("zero2", "zero3", "zero3-offload"):
        path = CONFIGS / "deepspeed" / f"{name}.json"
        check_config(path)
        config = HfTrainerDeepSpeedConfig(json.loads(path.read_text()))
        config.trainer_config_process(args)
        config.trainer_config_finalize(args, Model(), 10)  # raises on an "auto" it cannot fill
        assert config.config["bf16"] == {"enabled": False}
        assert config.is_zero3() == (name != "zero2") and config.is_offload() == (name == "zero3-offload")


def test_zero3_config_without_gather_on_save_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(MoeforgeError, match="stage3_gather_16bit_weights_on_model_save: true"):
        check_config(config)
