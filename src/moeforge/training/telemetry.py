"""What the routers and the losses do while training: logged as the run goes, plotted at each checkpoint and at the end.

Three pieces, each feeding the Trainer's log (so the console, TensorBoard and W&B all see the same numbers):

- :class:`RouterLossMeter` splits every logged ``loss`` into ``lm_loss`` and the router losses behind the
  weighted aux that the model's forward added to it (``router/balance``, ``router/z``, ``router/mi``,
  ``router/attention_balance`` unscaled; ``router/aux`` their coefficient-weighted sum), averaged over the
  same optimizer steps as the ``loss`` next to them. Without the split a constant aux (MoICE at
  top_k = num_experts adds 0.3 × 7 = 2.1) reads as a loss that will not go down.
- :class:`TelemetryCallback`: every ``every`` optimizer steps the routing statistics accumulated since the
  last report become a few scalars (router entropy, dead experts, the most loaded expert's share, tokens/s),
  the full per-layer loads go to ``routing.jsonl``, and experts that stopped getting tokens are warned about.
  Plots (loss curves, expert-load heatmap, load over time) are written to ``<output>/plots``.
- :class:`LogLineCallback` prints each log as one line, in place of the Trainer's dicts of stringified numbers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from moeforge.eval.plots import plot_expert_load, plot_load_over_time, plot_loss_curves
from moeforge.routing.batch import BatchContext
from moeforge.routing.stats import RoutingStats

logger = logging.getLogger(__name__)

ROUTER_LOSSES = ("balance", "z", "mi", "attention_balance", "aux")
"""The router losses of ``output.router_losses`` logged as ``router/<name>`` (``aux``: the weighted sum)."""

MIN_EXPECTED_SELECTIONS = 50
"""An expert counts as dead only when a balanced router would have given it at least this many selections."""


class RouterLossMeter:
    """Router losses of the training forwards since the last :meth:`pop`, weighted like the loss Trainer logs.

    A forward hook on the trained model reads ``output.router_losses`` (set by the router-loss handle) of every
    forward that runs in training mode with gradients (not evaluation, not a DPO reference pass). Each
    micro-batch weighs what its aux weighs in the optimizer step: ``label tokens / num_items_in_batch`` when
    the trainer passes ``num_items_in_batch``, else 1 (a per-micro-batch mean, averaged over the accumulation
    steps), so the weighted mean of ``aux`` is exactly what the router losses added to the logged ``loss``
    (with packed or equal-length micro-batches; otherwise up to the token counts of the micro-batches).
    Sums stay on the device between logs: recording a forward never syncs."""

    def __init__(self, model: nn.Module) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._weight: torch.Tensor | None = None
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        losses = getattr(output, "router_losses", None)
        if not losses or not module.training or not torch.is_grad_enabled():
            return
        # only the keys that weigh the micro-batch: the attention mask is the handle's to check and warn about
        batch = BatchContext.from_kwargs({key: kwargs.get(key) for key in ("labels", "shift_labels", "num_items_in_batch")})
        device = losses["aux"].device
        weight = torch.as_tensor(batch.loss_weight(), dtype=torch.float64, device=device)
        self._weight = weight if self._weight is None else self._weight + weight
        for key in ROUTER_LOSSES:
            if key in losses:
                value = weight * losses[key].to(device, torch.float64)
                self._sums[key] = value if key not in self._sums else self._sums[key] + value

    def pop(self) -> dict[str, float]:
        """``{name: weighted mean}`` since the last pop (every data-parallel rank together), then start afresh;
        empty when no training forward reported router losses. Every rank must call it at the same step."""
        sums, weight = self._sums, self._weight
        self._sums, self._weight = {}, None
        if weight is None:
            return {}
        keys = sorted(sums)
        packed = torch.stack([*(sums[key] for key in keys), weight])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed)
        values = packed.cpu().tolist()
        return {key: value / max(values[-1], 1e-12) for key, value in zip(keys, values, strict=False)}

    def breakdown(self, loss: float) -> dict[str, float]:
        """The log entries next to a logged ``loss``: ``lm_loss`` (the loss without the weighted aux) and each
        ``router/<name>``; empty for a model without router losses (its ``loss`` is the LM loss already)."""
        means = self.pop()
        if not means:
            return {}
        return {"lm_loss": loss - means.get("aux", 0.0), **{f"router/{key}": means[key] for key in ROUTER_LOSSES if key in means}}

    def detach(self) -> None:
        self._hook.remove()


def dead_experts(stats: RoutingStats) -> dict[str, list[int]]:
    """``{layer label: the experts that got no token}`` over the window of ``stats``, counting only layers where
    a zero means something: a balanced router would have given each of the layer's experts at least
    :data:`MIN_EXPECTED_SELECTIONS` selections (``selections / experts``). Below that a zero is sampling
    noise (an expert with a tenth of its fair share gets no token in a window of 50 expected ones with
    probability e^-5, under 1%); above it, it means the router has stopped sending it anything."""
    dead = {}
    for name, load in zip(stats.names, stats.load, strict=True):
        experts = (load == 0).nonzero().flatten().tolist()
        if experts and float(load.sum()) / len(load) >= MIN_EXPECTED_SELECTIONS:
            dead[name] = experts
    return dead


class TelemetryCallback(TrainerCallback):
    def __init__(self, handle, output_dir: Path, every: int) -> None:
        self.handle = handle
        self.output_dir = Path(output_dir)
        self.every = every
        self.trainer: Trainer | None = None  # set by the runner: trainer.log() reaches every reporting callback
        self.history: list[tuple[int, RoutingStats]] = []
        self._last_time = time.perf_counter()
        self._last_tokens = 0
        self._last_step = 0
        self._warned_dead: frozenset[tuple[str, int]] = frozenset()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_step = state.global_step  # a resumed run's first window starts at its checkpoint
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.handle is not None:  # the extra backward of the gradient norm only on reported steps
            self.handle.measure_grad_norm = (state.global_step + 1) % self.every == 0
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every or self.handle is None:
            return control
        self.handle.measure_grad_norm = False
        stats = self.handle.pop_stats().all_reduce()  # every rank's tokens, not rank 0's share
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        metrics = {"tokens_per_second": round((tokens - self._last_tokens) / max(now - self._last_time, 1e-9), 1)}
        self._last_time, self._last_tokens = now, tokens
        first, self._last_step = self._last_step + 1, state.global_step
        if stats.tokens:
            self.history.append((state.global_step, stats))
            fractions = stats.load_fraction()
            metrics |= {
                "router/entropy": round(sum(stats.entropy) / len(stats.entropy), 4),
                "router/dead_experts": sum(len(dead) for dead in stats.dead_experts()),
                "router/max_load": round(max(float(f.max()) for f in fractions), 4),
            }
            # the router losses themselves go with each logged loss (RouterLossMeter); this one is measured here
            if "attention_balance_grad_norm" in self.handle.losses:  # MoICE routers
                metrics["router/attention_balance_grad_norm"] = round(float(self.handle.losses["attention_balance_grad_norm"]), 6)
            if state.is_world_process_zero:
                with (self.output_dir / "routing.jsonl").open("a") as handle:
                    handle.write(json.dumps({"step": state.global_step, **stats.to_dict()}) + "\n")
                self._warn_dead(stats, first, state.global_step)
        if self.trainer is not None:
            # trainer.log() runs on_log, which clears control.should_log: the step's own loss log would be lost
            should_log = control.should_log
            self.trainer.log(metrics)
            control.should_log = should_log
        return control

    def _warn_dead(self, stats: RoutingStats, first: int, last: int) -> None:
        """One warning line when the set of dead (layer, expert) pairs changes to a non-empty one; the same set
        in later windows, or an expert flickering back into it, is not repeated every step."""
        per_layer = dead_experts(stats)
        dead = frozenset((name, expert) for name, experts in per_layer.items() for expert in experts)
        if not dead or dead == self._warned_dead:
            return
        self._warned_dead = dead
        sizes = dict(zip(stats.names, (len(load) for load in stats.load), strict=True))
        layers = ", ".join(f"layer {name}: {len(experts)} of {sizes[name]}" for name, experts in per_layer.items())
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        logger.warning("warning: experts got no tokens over %s (%s tokens): %s", steps, f"{stats.tokens:,}", layers)

    def write_plots(self, log_history: list[dict]) -> list[Path]:
        plots = self.output_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        written = [plot_loss_curves(log_history, plots / "loss.png")]
        if self.history:
            written.append(plot_expert_load(self.history[-1][1], plots / "expert_load.png", title=f"step {self.history[-1][0]}"))
            written.append(plot_load_over_time(self.history, plots / "expert_load_over_time.png"))
        return written

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write_plots(state.log_history)
        return control


_COMPONENTS = (("balance", "balance"), ("z", "z"), ("mi", "mi"), ("attention_balance", "attn balance"))


def format_log_line(logs: Mapping[str, Any], step: int, max_steps: int, tokens_per_second: float | None) -> str | None:
    """One line for a Trainer log: a training step's (``step 20/100  lm_loss 2.314  router aux 0.012 (balance
    1.02 z 0.00)  lr 5e-05  grad_norm 0.83  12.3 tok/s``), an evaluation's, or the end of training; None for
    the routing telemetry's entries (they go to routing.jsonl, the plots and the dead-expert warning)."""
    prefix = f"step {step}/{max_steps}"
    if "loss" in logs:
        parts = [prefix, f"lm_loss {logs['lm_loss']:.4g}" if "lm_loss" in logs else f"loss {logs['loss']:.4g}"]
        if "router/aux" in logs:
            shown = [f"{label} {logs[f'router/{key}']:.3g}" for key, label in _COMPONENTS if f"router/{key}" in logs]
            parts.append(f"router aux {logs['router/aux']:.3g}" + (f" ({' '.join(shown)})" if shown else ""))
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.3g}")
        if "grad_norm" in logs:
            parts.append(f"grad_norm {logs['grad_norm']:.3g}")
        if tokens_per_second is not None:
            parts.append(f"{tokens_per_second:.1f} tok/s")
        return "  ".join(parts)
    if "eval_loss" in logs:
        return f"{prefix}  eval_loss {logs['eval_loss']:.4g}"
    if "train_runtime" in logs:
        return f"training done: {step} steps in {logs['train_runtime']:.1f} s"
    return None


class LogLineCallback(TrainerCallback):
    """Prints each Trainer log as one line through ``log`` (the runner's: the ``moeforge`` logger), on the
    main process only. The runner turns the progress bar off and removes transformers' PrinterCallback:
    a bar redrawn on the same terminal as these lines garbles both, and the lines carry the step count."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self._time = time.perf_counter()
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._time, self._tokens = time.perf_counter(), state.num_input_tokens_seen
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        speed = None
        if "loss" in logs:  # tokens/s since the previous training line
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            speed = (tokens - self._tokens) / max(now - self._time, 1e-9) if tokens else None
            self._time, self._tokens = now, tokens
        line = format_log_line(logs, state.global_step, state.max_steps, speed)
        if line is not None:
            self.log(line)
        return control
