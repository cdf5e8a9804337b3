"""The killed-run contract: a run killed after its step-2 checkpoint and resumed with ``resume: true`` is the
run that was never killed: the same per-step losses (exactly: CPU is deterministic) and the same weights.

The kill is a KeyboardInterrupt raised at the end of step 3 by a callback riding on the checkpoint-marker
callback the runner installs (``moeforge.training.runner.CompleteCheckpointMarker``, patched for run B's first
attempt only); the step-3 update is lost with the process, as in a real kill.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moeforge.training.runner as runner
from moeforge.errors import MoeforgeError
from moeforge.training import train
from moeforge.training.checkpoints import MARKER, CompleteCheckpointMarker
from tests.training.conftest import logged_losses, make_recipe, provenance, state_dict

STEPS, SAVE_STEPS, KILL_AT = 6, 2, 3


class KillAtStep(CompleteCheckpointMarker):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == KILL_AT:
            raise KeyboardInterrupt
        return super().on_step_end(args, state, control, **kwargs)


ADAPTER = {"num_experts": 4, "rank": 4, "dropout": 0.1}  # kind "adapter": MoE-LoRA on the dense model


def _recipe(models, data_files, output: Path, kind: str = "moeforge", training: dict | None = None, **extra):
    if kind == "adapter":
        kind, extra = "dense", {**extra, "adapter": ADAPTER}
    return make_recipe(
        "pt",
        models[kind],
        output,
        {"train": [str(data_files["text"])], "max_length": 32},
        training={
            "max_steps": STEPS,
            "save_steps": SAVE_STEPS,
            "logging_steps": 1,
            "telemetry_steps": 100,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.2,
            **(training or {}),
        },
        **extra,
    )


def _history(output: Path, step: int) -> list[dict]:
    return json.loads((output / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def resumed(models, data_files, tmp_path_factory):
    """``resumed(kind)``: run A (uninterrupted) and run B (killed at step 3, then resumed) on one model kind."""
    root = tmp_path_factory.mktemp("resume")
    cache: dict[str, dict] = {}

    def run(kind: str) -> dict:
        if kind in cache:
            return cache[kind]
        a = train(_recipe(models, data_files, root / kind / "a", kind), log=lambda _line: None)
        b_out = root / kind / "b"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(runner, "CompleteCheckpointMarker", KillAtStep)
            with pytest.raises(KeyboardInterrupt):
                train(_recipe(models, data_files, b_out, kind), log=lambda _line: None)
        killed = sorted(p.name for p in b_out.glob("checkpoint-*"))
        # a save that was killed half-way: looks like a newer checkpoint, but has no completion marker
        leftover = b_out / "checkpoint-8"
        leftover.mkdir()
        (leftover / "trainer_state.json").write_text(json.dumps({"global_step": 8, "log_history": []}))
        lines: list[str] = []
        b = train(_recipe(models, data_files, b_out, kind, resume=True), log=lines.append)
        cache[kind] = {"a": a, "b": b, "killed": killed, "lines": lines}
        return cache[kind]

    return run


KINDS = ["dense", "moeforge", "mixtral", "adapter"]


def test_the_kill_left_only_the_step_2_checkpoint(resumed) -> None:
    assert resumed("moeforge")["killed"] == ["checkpoint-2"]


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_logs_the_same_losses_as_the_uninterrupted_one(resumed, kind: str) -> None:
    a, b = resumed(kind)["a"], resumed(kind)["b"]
    losses_a, losses_b = logged_losses(_history(a.output, STEPS)), logged_losses(_history(b.output, STEPS))
    assert sorted(losses_a) == list(range(1, STEPS + 1))
    assert losses_b == losses_a
    assert b.steps == a.steps == STEPS
    # (train_loss is transformers' mean over the steps of one train() call: 3-6 for the resumed run)
    assert provenance(b.model_dir)["training"][-1]["steps"] == STEPS


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_ends_with_identical_weights(resumed, kind: str) -> None:
    weights_a, weights_b = state_dict(resumed(kind)["a"].model_dir), state_dict(resumed(kind)["b"].model_dir)
    assert weights_a.keys() == weights_b.keys()
    different = [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])]
    assert not different


def test_resume_picks_the_newest_complete_checkpoint_and_removes_incomplete_ones(resumed) -> None:
    run = resumed("moeforge")
    output, lines = run["b"].output, run["lines"]
    assert f"resuming from {output / 'checkpoint-2'}" in lines
    assert not (output / "checkpoint-8").exists()
    for checkpoint in output.glob("checkpoint-*"):
        assert (checkpoint / MARKER).is_file()


def test_resume_without_a_checkpoint_starts_from_step_0(
    models, data_files, resumed, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "out"
    (output / "checkpoint-4").mkdir(parents=True)  # only an incomplete one
    lines: list[str] = []
    result = train(_recipe(models, data_files, output, resume=True), log=lines.append)
    assert "resume: no complete checkpoint yet, starting from step 0" in lines
    assert f"removing incomplete checkpoint {output / 'checkpoint-4'} (its save was interrupted)" in caplog.messages
    assert result.steps == STEPS
    assert logged_losses(_history(output, STEPS)) == logged_losses(_history(resumed("moeforge")["a"].output, STEPS))


def test_existing_output_needs_resume_or_overwrite(models, data_files, resumed) -> None:
    output = resumed("moeforge")["a"].output
    with pytest.raises(MoeforgeError) as error:
        train(_recipe(models, data_files, output), log=lambda _line: None)
    assert "resume" in str(error.value) and "overwrite" in str(error.value)
    assert (output / "model").is_dir()  # the refused run touched nothing


def test_overwrite_starts_afresh(models, data_files, tmp_path: Path) -> None:
    output = tmp_path / "out"
    (output / "checkpoint-9").mkdir(parents=True)
    (output / "checkpoint-9" / MARKER).write_text("step 9\n")
    recipe = _recipe(models, data_files, output, overwrite=True, training={"max_steps": 2, "save_steps": 2})
    result = train(recipe, log=lambda _line: None)
    assert result.steps == 2
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
