"""Plots are real PNG files, written atomically, for uneven expert counts and typical training logs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeforge.eval.plots import plot_expert_load, plot_load_over_time, plot_loss_curves
from moeforge.routing import RoutingStats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, returned: Path) -> None:
    assert returned == path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000  # axes, colour bar and labels, not an empty canvas
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def _stats(seed: int, tokens: int = 100) -> RoutingStats:
    """Top-2 routing over 3 layers with 4, 8 and 2 experts (PMoE-style uneven counts)."""
    generator = torch.Generator().manual_seed(seed)
    loads = []
    for experts in (4, 8, 2):
        weights = torch.rand(experts, generator=generator) + 0.1
        counts = (weights / weights.sum() * tokens * 2).round().long()
        loads.append(counts)
    return RoutingStats(
        load=loads, tokens=tokens, entropy=[1.0, 1.5, 0.5], balance=[2.1, 2.3, 2.0], names=["0", "1", "2"]
    )


def test_expert_load_heatmap_with_uneven_expert_counts(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "expert_load.png"  # parent created on demand
    _assert_png(path, plot_expert_load(_stats(0), path, title="tiny"))


def test_expert_load_refuses_a_dense_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dense"):
        plot_expert_load(RoutingStats(), tmp_path / "x.png")


def test_load_over_time(tmp_path: Path) -> None:
    history = [(step, _stats(step)) for step in (10, 20, 30, 50)]
    history.append((60, RoutingStats(load=[torch.zeros(4), torch.zeros(8), torch.zeros(2)], names=["0", "1", "2"],
                                     entropy=[0.0] * 3, balance=[0.0] * 3)))  # a window without tokens
    path = tmp_path / "load_over_time.png"
    _assert_png(path, plot_load_over_time(history, path))


def test_loss_curves_with_router_losses(tmp_path: Path) -> None:
    log_history = [
        {"loss": 3.0 - 0.1 * step, "aux_loss": 2.1 - 0.01 * step, "learning_rate": 1e-4, "step": step, "epoch": step / 10}
        for step in range(1, 11)
    ]
    log_history += [{"eval_loss": 2.5, "eval_runtime": 1.0, "step": 5}, {"eval_loss": 2.2, "step": 10}]
    log_history.append({"train_runtime": 9.0, "train_loss": 2.5, "step": 10})  # the Trainer's final summary
    path = tmp_path / "loss.png"
    _assert_png(path, plot_loss_curves(log_history, path))


def test_loss_curves_overwrite_in_place(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    plot_loss_curves([{"loss": 1.0, "step": 1}], path)
    first = path.read_bytes()
    _assert_png(path, plot_loss_curves([{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}, {"eval_loss": 0.7, "step": 2}], path))
    assert path.read_bytes() != first
