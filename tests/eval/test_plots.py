"""Plots show what they claim (curves, panels, cells, ticks, read off the figure each builds) and are real
PNG files of that figure, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moeforge.eval.plots import (
    can_compare_load,
    expert_load_figure,
    load_difference_figure,
    load_over_time_figure,
    loss_figure,
    plot_expert_load,
    plot_load_over_time,
    plot_loss_curves,
    plot_position_curve,
    position_figure,
    save_png,
)
from moeforge.eval.probes import KVProbe, PositionScore, ProbeResult
from moeforge.routing import RoutingStats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png_of(path: Path, returned: Path, fig: Figure) -> None:
    """``path`` (in a folder of its own) holds exactly the PNG of ``fig``, and nothing else is left there."""
    assert returned == path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data == save_png(fig, path.parent.parent / f"expected-{path.name}").read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def _lines(ax: Axes) -> dict[str, tuple[list[float], list[float]]]:
    """Each labelled line of ``ax``: its x and y data."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def _legend(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    return [text.get_text() for text in legend.get_texts()] if legend else []


def _stats(seed: int, tokens: int = 100) -> RoutingStats:
    """Top-2 routing over 3 layers with 4, 8 and 2 experts (PMoE-style uneven counts)."""
    generator = torch.Generator().manual_seed(seed)
    loads = []
    for experts in (4, 8, 2):
        weights = torch.rand(experts, generator=generator) + 0.1
        counts = (weights / weights.sum() * tokens * 2).round().long()
        loads.append(counts)
    return RoutingStats(load=loads, tokens=tokens, entropy=[1.0, 1.5, 0.5], balance=[2.1, 2.3, 2.0], names=["0", "1", "2"])


def _image(fig: Figure) -> np.ma.MaskedArray:
    """The heatmap's cells (the figure's first axes; the colour bar is the second)."""
    (image,) = fig.axes[0].get_images()
    return image.get_array()


def test_expert_load_heatmap_with_uneven_expert_counts(tmp_path: Path) -> None:
    stats = _stats(0)
    fig = expert_load_figure(stats, title="tiny")
    ax, colorbar = fig.axes
    cells = _image(fig)
    assert cells.shape == (3, 8)  # one row per MoE layer, as many columns as the widest layer has experts
    for layer, fraction in enumerate(stats.load_fraction()):
        experts = len(fraction)
        np.testing.assert_allclose(cells[layer, :experts], fraction.numpy(), rtol=1e-6)
        assert not cells.mask[layer, :experts].any() and cells.mask[layer, experts:].all()  # grey past its experts
    assert [t.get_text() for t in ax.get_yticklabels()] == stats.names
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("tiny", "expert", "layer")
    assert colorbar.get_ylabel() == "share of routed tokens"
    assert expert_load_figure(stats).axes[0].get_title() == "expert load over 100 tokens"
    path = tmp_path / "plots" / "expert_load.png"  # parent created on demand
    _assert_png_of(path, plot_expert_load(stats, path, title="tiny"), fig)


def test_load_difference_is_second_minus_first_in_points() -> None:
    first, second = _stats(0), _stats(1)
    fig = load_difference_figure(first, second, title="trained − base")
    cells = _image(fig)
    for layer, (a, b) in enumerate(zip(first.load_fraction(), second.load_fraction(), strict=True)):
        np.testing.assert_allclose(cells[layer, : len(a)], 100 * (b - a).numpy(), rtol=1e-5, atol=1e-9)
        assert cells.mask[layer, len(a) :].all()
    (image,) = fig.axes[0].get_images()
    low, high = image.get_clim()
    assert low == -high and high == pytest.approx(float(np.abs(cells).max()))  # centred: red busier, blue idler
    assert fig.axes[0].get_title() == "trained − base"
    assert fig.axes[1].get_ylabel() == "change in share of routed tokens (percentage points)"
    other_layers = RoutingStats(load=first.load, tokens=100, entropy=first.entropy, balance=first.balance, names=["1", "2", "3"])
    assert not can_compare_load(first, other_layers)
    with pytest.raises(ValueError, match="cannot be compared cell by cell"):
        load_difference_figure(first, other_layers)


def test_expert_load_says_when_routing_is_dense() -> None:
    # MoICE at top_k = num_experts: every one of the 4 experts gets every one of the 100 tokens
    dense = RoutingStats(load=[torch.full((4,), 100)] * 2, tokens=100, entropy=[1.0] * 2, balance=[4.0] * 2, names=["0.attn", "1.attn"])
    title = expert_load_figure(dense, title="step 4").axes[0].get_title()
    assert title.splitlines() == [
        "step 4",
        "dense routing in every layer (top_k = num_experts): every expert gets every token, so the load is flat by construction",
    ]
    # one dense layer among sparse ones is named; perfectly balanced top-2 routing (50 each of 100) is not dense
    mixed = RoutingStats(
        load=[torch.full((4,), 50), torch.full((4,), 100)], tokens=100, entropy=[1.0] * 2, balance=[2.0, 4.0], names=["3", "7"]
    )
    assert expert_load_figure(mixed).axes[0].get_title().splitlines()[1].startswith("dense routing in layer 7 (top_k")
    assert expert_load_figure(_stats(0), title="tiny").axes[0].get_title() == "tiny"  # sparse: no note


def test_expert_load_refuses_a_dense_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dense"):
        plot_expert_load(RoutingStats(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_load_over_time_colours_imbalance(tmp_path: Path) -> None:
    """0 for a balanced layer, sqrt(E - 1) for one collapsed onto one of its E experts, grey for a window
    without tokens; one column per recorded step."""
    balanced, collapsed = torch.tensor([50, 50, 50, 50]), torch.tensor([200, 0, 0, 0, 0, 0, 0, 0])
    skewed = torch.tensor([150, 50])  # 3:1 over 2 experts: fractions 0.75, 0.25, so std / mean = 0.5
    names = ["0", "1", "2"]
    steady = RoutingStats(load=[balanced, collapsed, skewed], tokens=100, entropy=[0.0] * 3, balance=[0.0] * 3, names=names)
    empty = RoutingStats(load=[torch.zeros(4), torch.zeros(8), torch.zeros(2)], names=names, entropy=[0.0] * 3, balance=[0.0] * 3)
    history = [(10, steady), (20, _stats(20)), (30, empty)]
    fig = load_over_time_figure(history)
    ax, colorbar = fig.axes
    cells = _image(fig)
    assert cells.shape == (3, 3)  # layers x steps
    np.testing.assert_allclose(cells[:, 0], [0.0, math.sqrt(7), 0.5], atol=1e-6)
    assert not cells.mask[:, :2].any() and cells.mask[:, 2].all()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "20", "30"]
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert colorbar.get_ylabel() == "load coefficient of variation (0 = balanced)"
    path = tmp_path / "plots" / "load_over_time.png"
    _assert_png_of(path, plot_load_over_time(history, path), fig)


def test_load_over_time_thins_step_ticks() -> None:
    history = [(step, _stats(step)) for step in range(0, 500, 10)]
    ticks = [t.get_text() for t in load_over_time_figure(history).axes[0].get_xticklabels()]
    assert len(ticks) == 12 and ticks[0] == "0" and ticks[-1] == "490"


def test_loss_curves_draw_the_lm_loss_and_each_nonzero_router_loss(tmp_path: Path) -> None:
    steps = list(range(1, 11))
    # a MoICE run at top_k = num_experts: 0.3 × 7 = 2.1 of constant aux in every logged loss
    log_history = [
        {
            "loss": 5.1 - 0.1 * step,
            "lm_loss": 3.0 - 0.1 * step,
            "router/attention_balance": 7.0,
            "router/balance": 2.0 + 0.01 * step,
            "router/z": 0.0,
            "router/aux": 2.1,
            "learning_rate": 1e-4,
            "step": step,
            "epoch": step / 10,
        }
        for step in steps
    ]
    log_history += [{"eval_loss": 2.5, "eval_runtime": 1.0, "step": 5}, {"eval_loss": 2.2, "step": 10}]
    log_history += [{"router/entropy": 1.3, "tokens_per_second": 50.0, "step": 10}]  # telemetry: no curve
    log_history.append({"train_runtime": 9.0, "train_loss": 4.5, "step": 10})  # the Trainer's final summary
    fig = loss_figure(log_history)
    lm, router = fig.axes
    lines = _lines(lm)
    assert lines.keys() == {"train LM loss", "eval loss"} and _legend(lm) == ["train LM loss", "eval loss"]
    assert lines["train LM loss"] == (steps, pytest.approx([3.0 - 0.1 * s for s in steps]))  # not the loss with the aux in it
    assert lines["eval loss"] == ([5, 10], [2.5, 2.2])
    assert lm.get_ylabel() == "LM loss"
    # the router losses, each on the router panel; z is zero throughout, so it has no curve
    assert _lines(router) == {
        "balance": (steps, pytest.approx([2.0 + 0.01 * s for s in steps])),
        "attention balance": (steps, [7.0] * 10),
        "aux (weighted sum)": (steps, [2.1] * 10),
    }
    assert _legend(router) == ["balance", "attention balance", "aux (weighted sum)"] and router.get_ylabel() == "router loss"
    assert router.get_shared_x_axes().joined(lm, router) and router.get_xlabel() == "step"
    path = tmp_path / "plots" / "loss.png"
    _assert_png_of(path, plot_loss_curves(log_history, path), fig)


def test_loss_curves_without_router_losses_have_one_panel(tmp_path: Path) -> None:
    log_history = [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}, {"eval_loss": 0.7, "step": 2}]
    (ax,) = loss_figure(log_history).axes
    assert _lines(ax) == {"train loss": ([1, 2], [1.0, 0.5]), "eval loss": ([2], [0.7])}
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "loss")


def test_loss_curves_overwrite_in_place(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "loss.png"
    plot_loss_curves([{"loss": 1.0, "step": 1}], path)
    later = [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}, {"eval_loss": 0.7, "step": 2}]
    _assert_png_of(path, plot_loss_curves(later, path), loss_figure(later))


def _result(logprobs: dict[int, list[float]], exact: dict[int, list[bool]]) -> ProbeResult:
    positions = tuple(PositionScore.from_scores(p, logprobs[p], exact[p]) for p in sorted(logprobs))
    return ProbeResult(KVProbe(pairs=10), "kv retrieval: 10 pairs, seed 0", 10, (100, 120), positions)


def test_position_curve_overlays_models_with_bands(tmp_path: Path) -> None:
    results = {
        "base": _result({0: [-1.0, -2.0], 9: [-2.0, -3.0]}, {0: [True, False], 9: [False, False]}),
        "moice": _result({0: [-1.0, -1.5], 9: [-1.2, -1.0]}, {0: [True, True], 9: [True, False]}),
    }
    fig = position_figure(results, title="base vs moice")
    top, bottom = fig.axes
    assert _lines(top) == {"base": ([0, 9], [-1.5, -2.5]), "moice": ([0, 9], pytest.approx([-1.25, -1.1]))}
    assert _lines(bottom) == {"base": ([0, 9], [0.5, 0.0]), "moice": ([0, 9], [1.0, 0.5])}
    assert len(top.collections) == len(bottom.collections) == 2  # one confidence band per model and panel
    assert _legend(top) == ["base", "moice"] and top.get_title() == "base vs moice"
    assert bottom.get_xlabel() == "position of the queried pair (0..9)" and bottom.get_ylim() == (-0.05, 1.05)
    assert position_figure(results).axes[0].get_title() == "kv retrieval: 10 pairs, seed 0"
    path = tmp_path / "plots" / "position_curve.png"
    _assert_png_of(path, plot_position_curve(results, path, title="base vs moice"), fig)
