"""What training logs is what happened: the logged loss split into the LM loss and the router losses behind
it, one console line per log (no raw dicts), and one warning line when experts stop getting tokens."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import TrainerControl, TrainerState

from moeforge.routing import RoutingStats
from moeforge.training import train
from moeforge.training.telemetry import LogLineCallback, RouterLossMeter, TelemetryCallback, dead_experts, format_log_line
from tests.training.conftest import make_recipe


class _Reporting(nn.Module):
    """Returns, like a model with a router-loss handle, an output whose ``router_losses`` are the next ones queued."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[dict[str, float]] = []

    def forward(self, **kwargs):
        losses = {key: torch.tensor(value) for key, value in self.queue.pop(0).items()}
        return SimpleNamespace(loss=torch.tensor(0.0), router_losses=losses)


def test_meter_weighs_micro_batches_like_the_loss_and_skips_eval_and_no_grad() -> None:
    model = _Reporting().train()
    meter = RouterLossMeter(model)
    labels = torch.zeros(1, 5, dtype=torch.long)  # 4 label tokens after the shift
    # a step of two micro-batches, 4 and 12 of its 16 label tokens: weights 1/4 and 3/4
    model.queue = [{"balance": 2.0, "aux": 0.02}, {"balance": 3.0, "aux": 0.03}]
    model(labels=labels, num_items_in_batch=16)
    model(labels=torch.zeros(1, 13, dtype=torch.long), num_items_in_batch=16)
    model.queue = [{"balance": 100.0, "aux": 100.0}] * 2  # neither counts: evaluation, and a no-grad (reference) pass
    with torch.no_grad():
        model(labels=labels)
    model.eval()(labels=labels)
    model.train()
    assert meter.breakdown(1.0) == pytest.approx({"lm_loss": 1.0 - 0.0275, "router/balance": 2.75, "router/aux": 0.0275})
    # afresh after each log; without num_items_in_batch each forward weighs the same (a per-micro-batch mean)
    model.queue = [{"balance": 2.0, "z": 4.0, "aux": 1.0}, {"balance": 4.0, "z": 0.0, "aux": 3.0}]
    model(labels=labels)
    model(labels=labels)
    assert meter.breakdown(5.0) == pytest.approx({"lm_loss": 3.0, "router/balance": 3.0, "router/z": 2.0, "router/aux": 2.0})
    assert meter.breakdown(5.0) == {}  # no forward since: nothing to split (a dense model logs plain loss)
    meter.detach()
    model.queue = [{"aux": 9.0}]
    model(labels=labels)
    assert meter.pop() == {}


def test_log_line_is_one_readable_line_per_log() -> None:
    logs = {
        "loss": 2.326,
        "lm_loss": 2.3141,
        "router/balance": 1.0213,
        "router/z": 0.00123,
        "router/aux": 0.0119,
        "learning_rate": 5e-05,
        "grad_norm": 0.8312,
        "epoch": 0.2,
    }
    line = format_log_line(logs, 20, 100, 12.34)
    assert line == "step 20/100  lm_loss 2.314  router aux 0.0119 (balance 1.02 z 0.00123)  lr 5e-05  grad_norm 0.831  12.3 tok/s"
    assert format_log_line({"loss": 2.5, "learning_rate": 1e-3}, 3, 10, None) == "step 3/10  loss 2.5  lr 0.001"  # a dense model
    assert format_log_line({"eval_loss": 2.41, "eval_runtime": 1.0}, 20, 100, None) == "step 20/100  eval_loss 2.41"
    assert format_log_line({"train_runtime": 83.21, "train_loss": 2.4}, 100, 100, None) == "training done: 100 steps in 83.2 s"
    assert format_log_line({"router/entropy": 1.3, "tokens_per_second": 9.0}, 20, 100, None) is None  # telemetry: no line


def test_training_prints_lines_and_no_trainer_dicts(models, data_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    recipe = make_recipe("pt", models["mixtral"], tmp_path / "out", {"train": [str(data_files["text"])], "max_length": 32})
    train(recipe, log=lines.append)
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split("  ")[0] for line in step_lines] == ["step 1/2", "step 2/2"]
    for line in step_lines:
        fields = line.split("  ")
        assert fields[1].startswith("lm_loss ") and fields[2].startswith("router aux ") and "(balance " in fields[2]
        assert fields[3].startswith("lr ") and fields[4].startswith("grad_norm ") and fields[5].endswith(" tok/s")
    assert lines[-2].startswith("training done: 2 steps in ")
    captured = capsys.readouterr()
    assert "{'loss'" not in captured.out + captured.err and "'router/" not in captured.out + captured.err
    assert "it/s" not in captured.err  # no progress bar drawn between the lines


def test_log_lines_come_from_the_main_process_only() -> None:
    lines: list[str] = []
    callback = LogLineCallback(lines.append)
    state = TrainerState(max_steps=4, global_step=2, is_world_process_zero=False)
    callback.on_log(None, state, TrainerControl(), logs={"loss": 1.0})
    assert lines == []


def _stats(loads: list[list[int]], tokens: int) -> RoutingStats:
    layers = len(loads)
    return RoutingStats(
        load=[torch.tensor(load) for load in loads],
        tokens=tokens,
        entropy=[1.0] * layers,
        balance=[2.0] * layers,
        names=[str(i) for i in range(layers)],
    )


def test_dead_experts_count_only_where_a_zero_is_meaningful() -> None:
    # top-2 over 4 experts: 200 tokens give 100 expected selections per expert; 20 tokens only 10
    stats = _stats([[200, 0, 150, 50], [0, 0, 200, 200], [20, 0, 20, 0]], tokens=200)
    assert dead_experts(stats) == {"0": [1], "1": [0, 1]}  # layer 2 saw too few tokens for its zeros to mean anything


class _Handle:
    """The part of a router-loss handle the telemetry reads: the statistics of each window, in turn."""

    def __init__(self, windows: list[RoutingStats]) -> None:
        self.windows = windows
        self.losses: dict[str, torch.Tensor] = {}
        self.measure_grad_norm = False

    def pop_stats(self) -> RoutingStats:
        return self.windows.pop(0)


def test_dead_experts_warn_once_per_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    alive = _stats([[100, 100, 100, 100], [100, 100, 100, 100]], tokens=200)
    one_dead = _stats([[200, 0, 100, 100], [100, 100, 100, 100]], tokens=200)
    more_dead = _stats([[200, 0, 100, 100], [0, 0, 200, 200]], tokens=200)
    windows = [alive, one_dead, one_dead, alive, one_dead, more_dead, more_dead]
    telemetry = TelemetryCallback(_Handle(windows), tmp_path, every=10)
    state, control = TrainerState(max_steps=70), TrainerControl()
    telemetry.on_train_begin(None, state, control)
    with caplog.at_level(logging.WARNING, logger="moeforge.training.telemetry"):
        for step in range(10, 80, 10):
            state.global_step = step
            telemetry.on_step_end(None, state, control)
    assert [record.getMessage() for record in caplog.records] == [
        "warning: experts got no tokens over steps 11-20 (200 tokens): layer 0: 1 of 4",
        "warning: experts got no tokens over steps 51-60 (200 tokens): layer 0: 1 of 4, layer 1: 2 of 4",
    ]
