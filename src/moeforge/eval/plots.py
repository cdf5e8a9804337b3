"""Training and routing plots written as PNG files (used by ``moeforge eval`` and by training).

Figures are built with matplotlib's object API on the Agg canvas, never through ``pyplot``: no display
is needed, no global backend is switched under a notebook that imported moeforge, and plotting from a
training callback thread is safe. Each file is written atomically, so a dashboard polling the output
directory never reads a half-written image.

Each plot is two steps: a ``*_figure`` function builds the :class:`~matplotlib.figure.Figure` (what tests
inspect: lines, labels, cells) and ``plot_*`` writes it with :func:`save_png`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moeforge.io.publish import staged_file

if TYPE_CHECKING:
    from moeforge.eval.probes import ProbeResult
    from moeforge.routing import RoutingStats

# the router losses training logs next to each loss (moeforge.training.telemetry), in panel order
_ROUTER_LOSSES = {
    "router/balance": "balance",
    "router/z": "z",
    "router/mi": "mi",
    "router/attention_balance": "attention balance",
    "router/aux": "aux (weighted sum)",
}
_MAX_TICKS = 12


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (on the Agg canvas, whatever backend pyplot uses)."""
    FigureCanvasAgg(fig)
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def _series(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(e["step"], e[key]) for e in log_history if "step" in e and _is_number(e.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def plot_loss_curves(log_history: list[dict], path: Path) -> Path:
    """:func:`loss_figure` as a PNG at ``path``."""
    return save_png(loss_figure(log_history), path)


def loss_figure(log_history: list[dict]) -> Figure:
    """The LM loss, train and eval, against ``step`` (a transformers ``TrainerState.log_history``), and the router
    losses in a panel of their own below.

    The train curve is ``lm_loss`` where training logged it (the logged ``loss`` minus the weighted router
    aux): the aux is on its own scale and can be a large constant (MoICE at top_k = num_experts adds 2.1),
    so ``loss`` itself would not show how the language model learns. An eval loss is the LM loss already.
    The router panel has a curve per router loss that is non-zero somewhere (unscaled, and their weighted
    sum ``aux``); a model without router losses gets the LM panel only."""
    lm_key = "lm_loss" if any(_is_number(e.get("lm_loss")) for e in log_history) else "loss"
    router_keys = [k for k in _ROUTER_LOSSES if any(_is_number(e.get(k)) and e[k] != 0 for e in log_history)]
    fig = Figure(figsize=(8, 6 if router_keys else 4))
    axes = fig.subplots(2 if router_keys else 1, 1, sharex=True, squeeze=False)[:, 0]
    train_label = "train LM loss" if lm_key == "lm_loss" else "train loss"
    for key, label, style in ((lm_key, train_label, ".-"), ("eval_loss", "eval loss", "o-")):
        steps, values = _series(log_history, key)
        if steps:
            axes[0].plot(steps, values, style, label=label, markersize=3)
    axes[0].set_ylabel("LM loss" if lm_key == "lm_loss" else "loss")
    axes[0].set_title("loss curves")
    for key in router_keys:
        axes[1].plot(*_series(log_history, key), "-", label=_ROUTER_LOSSES[key])
    if router_keys:
        axes[1].set_ylabel("router loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[-1].set_xlabel("step")
    return fig


def _fraction_grid(stats: RoutingStats) -> np.ndarray:
    """``[layers, max experts]`` load fractions; layers with fewer experts are padded with NaN."""
    fractions = [f.detach().float().cpu().numpy() for f in stats.load_fraction()]
    if not fractions:
        raise ValueError("the routing statistics hold no MoE layer (a dense model) - nothing to plot")
    grid = np.full((len(fractions), max(len(f) for f in fractions)), np.nan)
    for layer, fraction in enumerate(fractions):
        grid[layer, : len(fraction)] = fraction
    return grid


def plot_expert_load(stats: RoutingStats, path: Path, title: str = "") -> Path:
    """:func:`expert_load_figure` as a PNG at ``path``."""
    return save_png(expert_load_figure(stats, title), path)


def expert_load_figure(stats: RoutingStats, title: str = "") -> Figure:
    """Heatmap of the share of top-k selections each expert received, one row per MoE layer.

    Cells past a layer's own expert count (models with per-layer expert counts) are grey. Layers that route
    densely (top_k = num_experts: every expert gets every token) are flat by construction, not balanced;
    the title says so (:func:`_dense_note`) rather than let the flat rows pass for balance."""
    grid = _fraction_grid(stats)
    layers, experts = grid.shape
    fig = Figure(figsize=(min(16, 3 + 0.4 * experts), min(14, 2 + 0.3 * layers)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    _layer_ticks(ax, stats.names, layers)
    ax.set_xlabel("expert")
    heading = title or f"expert load over {stats.tokens} tokens"
    note = _dense_note(stats)
    ax.set_title(f"{heading}\n{note}" if note else heading)
    return fig


def can_compare_load(first: RoutingStats, second: RoutingStats) -> bool:
    """Two models' loads can be set side by side cell by cell: the same MoE layers with the same expert counts
    (base vs trained from one conversion), not merely two MoE models."""
    return bool(first.load) and first.names == second.names and [len(x) for x in first.load] == [len(x) for x in second.load]


def plot_load_difference(first: RoutingStats, second: RoutingStats, path: Path, title: str = "") -> Path:
    """:func:`load_difference_figure` as a PNG at ``path``."""
    return save_png(load_difference_figure(first, second, title), path)


def load_difference_figure(first: RoutingStats, second: RoutingStats, title: str = "") -> Figure:
    """Heatmap of how each expert's share of the routed tokens moved from ``first`` to ``second``
    (second − first, in percentage points), on a scale centred at zero: which experts training made busier
    (red) or idler (blue). Only for loads :func:`can_compare_load` accepts."""
    if not can_compare_load(first, second):
        raise ValueError("the two models' MoE layers differ; their expert loads cannot be compared cell by cell")
    difference = 100 * (_fraction_grid(second) - _fraction_grid(first))
    layers, experts = difference.shape
    bound = float(np.nanmax(np.abs(difference))) if np.isfinite(difference).any() else 0.0
    fig = Figure(figsize=(min(16, 3 + 0.4 * experts), min(14, 2 + 0.3 * layers)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    image = ax.imshow(
        np.ma.masked_invalid(difference), aspect="auto", cmap=cmap, vmin=-bound or -1.0, vmax=bound or 1.0, interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, label="change in share of routed tokens (percentage points)")
    _layer_ticks(ax, first.names, layers)
    ax.set_xlabel("expert")
    ax.set_title(title or "expert load: second − first")
    return fig


def _dense_layers(stats: RoutingStats) -> list[str]:
    """Labels of the layers where every expert got every token: each expert's count equals the tokens seen.

    Routing statistics do not carry top_k, but at top_k < num_experts no expert can reach that count (a
    layer's counts add up to tokens · top_k), so the test has no false positives. ``stats.tokens`` is the
    largest layer's count of routing rows; a dense layer with fewer rows (an FFN router next to per-head
    attention routers) is not flagged and keeps its plain, flat row."""
    if not stats.tokens:
        return []
    names = stats.names if len(stats.names) == len(stats.load) else [str(i) for i in range(len(stats.load))]
    return [name for name, load in zip(names, stats.load, strict=True) if bool((load == stats.tokens).all())]


def _dense_note(stats: RoutingStats) -> str:
    """The subtitle for dense layers, or ``""`` when every layer routes sparsely."""
    dense = _dense_layers(stats)
    if not dense:
        return ""
    which = "every layer" if len(dense) == len(stats.load) else ("layer " if len(dense) == 1 else "layers ") + ", ".join(dense)
    return f"dense routing in {which} (top_k = num_experts): every expert gets every token, so the load is flat by construction"


def _layer_ticks(ax: Any, names: Sequence[str], layers: int) -> None:
    """Label rows with the decoder layer each MoE layer sits in (they differ when some layers stay dense)."""
    ax.set_yticks(range(layers), names if len(names) == layers else [str(i) for i in range(layers)])
    ax.set_ylabel("layer")


def _load_cv(stats: RoutingStats) -> np.ndarray:
    """Per layer, the coefficient of variation (std / mean) of the expert load fractions; NaN for a
    window without tokens (all loads zero)."""
    grid = _fraction_grid(stats)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanstd(grid, axis=1) / np.nanmean(grid, axis=1)


def plot_load_over_time(history: list[tuple[int, RoutingStats]], path: Path) -> Path:
    """:func:`load_over_time_figure` as a PNG at ``path``."""
    return save_png(load_over_time_figure(history), path)


def load_over_time_figure(history: list[tuple[int, RoutingStats]]) -> Figure:
    """Heatmap of load imbalance over training: one column per recorded step, one row per MoE layer,
    colour = coefficient of variation of the expert load (0 = perfectly balanced; a layer whose load
    collapses onto one of E experts reaches sqrt(E - 1)).

    One number per layer and step keeps 30 layers x hundreds of steps readable, and is comparable
    across layers with different expert counts, which per-expert curves would not be."""
    if not history:
        raise ValueError("no routing statistics recorded yet - nothing to plot")
    steps = [step for step, _ in history]
    columns = [_load_cv(stats) for _, stats in history]
    grid = np.full((max(len(c) for c in columns), len(columns)), np.nan)
    for t, column in enumerate(columns):
        grid[: len(column), t] = column
    fig = Figure(figsize=(min(16, 4 + 0.15 * len(steps)), min(14, 2 + 0.3 * grid.shape[0])))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="load coefficient of variation (0 = balanced)")
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), _MAX_TICKS)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    _layer_ticks(ax, max((stats.names for _, stats in history), key=len), grid.shape[0])
    ax.set_xlabel("step")
    ax.set_title("expert load imbalance over training")
    return fig


def plot_position_curve(results: Mapping[str, ProbeResult], path: Path, title: str = "") -> Path:
    """:func:`position_figure` as a PNG at ``path``."""
    return save_png(position_figure(results, title), path)


def position_figure(results: Mapping[str, ProbeResult], title: str = "") -> Figure:
    """A position probe's curves, one line per model so a base model and its MoICE version overlay:
    mean answer log-prob against the fact's position (top) and exact match (bottom), each with its
    bootstrap 95% interval as a shaded band. A flat curve means no "lost in the middle"."""
    fig = Figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, result in results.items():
        positions = [p.position for p in result.positions]
        for ax, mean, ci in (
            (top, [p.logprob for p in result.positions], [p.logprob_ci for p in result.positions]),
            (bottom, [p.exact_match for p in result.positions], [p.exact_match_ci for p in result.positions]),
        ):
            (line,) = ax.plot(positions, mean, "o-", label=name, markersize=4)
            ax.fill_between(positions, [lo for lo, _ in ci], [hi for _, hi in ci], color=line.get_color(), alpha=0.2)
    first = next(iter(results.values()))
    top.set_ylabel("answer log-prob (nats)")
    top.set_title(title or first.description)
    bottom.set_ylabel("exact match")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_xlabel(first.position_label)
    bottom.set_xticks([p.position for p in first.positions])
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend()
    return fig
