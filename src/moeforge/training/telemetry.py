"""What the routers do while training: logged every N steps, plotted at each checkpoint and at the end.

Every ``every`` optimizer steps the routing statistics accumulated since the last report are turned into
a few scalars in the trainer's log (so the progress bar, TensorBoard and W&B get them) — mean balance
loss, mean router entropy, dead experts, the most loaded expert's share, tokens/s — while the full
per-layer loads go to ``routing.jsonl``. Plots (loss curves, expert-load heatmap, load over time) are
written to ``<output>/plots``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from moeforge.eval.plots import plot_expert_load, plot_load_over_time, plot_loss_curves
from moeforge.routing.stats import RoutingStats


class TelemetryCallback(TrainerCallback):
    def __init__(self, handle, output_dir: Path, every: int) -> None:
        self.handle = handle
        self.output_dir = Path(output_dir)
        self.every = every
        self.trainer: Trainer | None = None  # set by the runner: trainer.log() reaches every reporting callback
        self.history: list[tuple[int, RoutingStats]] = []
        self._last_time = time.perf_counter()
        self._last_tokens = 0

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
        if stats.tokens:
            self.history.append((state.global_step, stats))
            fractions = stats.load_fraction()
            metrics |= {
                "router/balance": round(sum(stats.balance) / len(stats.balance), 4),
                "router/entropy": round(sum(stats.entropy) / len(stats.entropy), 4),
                "router/dead_experts": sum(len(dead) for dead in stats.dead_experts()),
                "router/max_load": round(max(float(f.max()) for f in fractions), 4),
            }
            for key in ("attention_balance", "attention_balance_grad_norm"):  # MoICE routers
                if key in self.handle.losses:
                    metrics[f"router/{key}"] = round(float(self.handle.losses[key]), 6)
            if state.is_world_process_zero:
                with (self.output_dir / "routing.jsonl").open("a") as handle:
                    handle.write(json.dumps({"step": state.global_step, **stats.to_dict()}) + "\n")
        if self.trainer is not None:
            # trainer.log() runs on_log, which clears control.should_log: the step's own loss log would be lost
            should_log = control.should_log
            self.trainer.log(metrics)
            control.should_log = should_log
        return control

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
