"""The sparse-upcycling claim at small scale: continue training SmolLM2 dense vs upcycled, on the same tokens.

From the embedded SmolLM2-135M-Instruct, in one run:
  (A) dense      continued pretraining of the dense model;
  (B) upcycled   the same after exact copy-upcycling to 8 experts top-2 (Mixtral; the conversion's fidelity
                 check passes, so A and B start as the same function), moeforge router losses (balance 0.01);
  (C) drop       optional (--drop-upcycling): Drop-Upcycling, r = --drop-ratio (not exact: starts worse).
Each run is ``moeforge.training.train`` (stage pt, fp32) with the same data (built-in pt-demo, or --data FILE),
held-out split (``data.eval_ratio``, the same rows for every run), data order (``training.seed``), cosine
learning-rate schedule and number of steps, in its own process. Held-out loss is the plain LM loss (router
losses are added in training mode only), evaluated every --eval-every steps by the trainer, and before the
first step and after the last one by this script per held-out block, which gives the final gap an
uncertainty: the standard error of the per-block paired difference (held-out sampling only; a single
training seed, so run-to-run variance is not in it).

The runs themselves (child processes, held-out scoring, summaries) are benchmarks/_runs.py, shared with
attention_moe_training.py.

    python benchmarks/upcycle_vs_dense.py [--steps 60 --batch 4 --seq-len 128 --eval-every 10 --lr 1e-4]
                                          [--drop-upcycling --drop-ratio 0.5] [--data FILE]

Defaults: 60 steps x 4 x 128 tokens = 30,720 tokens, about one pass over pt-demo's training split.
Expected wall time on 2 idle cores: ~15-20 min (dense ~6 min, upcycled ~9-10 min, conversion ~1 min);
--drop-upcycling adds ~10 min. The upcycled run needs ~15 GB of memory (fp32 weights, gradients, AdamW).
Results: benchmarks/results/upcycle_vs_dense.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _runs import convert_model, paired_gap, run_child, summarize

RESULTS = Path(__file__).resolve().parent / "results"
NUM_EXPERTS, TOP_K = 8, 2


def verdict(runs: dict[str, dict], gaps: dict[str, dict], args, fidelity: dict) -> str:
    dense, moe = runs["dense"], runs["upcycled"]
    n = dense["eval_blocks"]
    start_gap = abs(moe["start_loss"] - dense["start_loss"])
    parts = [
        f"Both runs saw the same {dense['tokens_seen']:,} training tokens ({dense['steps']} steps, "
        f"{dense['epochs']} epochs of the training split) and were scored on the same {n} held-out blocks of "
        f"{dense['block_tokens']} tokens. They started from the same function (held-out loss {dense['start_loss']:.4f} "
        f"vs {moe['start_loss']:.4f}, |difference| {start_gap:.1e}; conversion max |Δlogit| "
        f"{fidelity['upcycled']['max_abs_logit_diff']:.1e}).",
        f"Dense went {dense['start_loss']:.4f} -> {dense['final_loss']:.4f} ({dense['final_loss'] - dense['start_loss']:+.4f}); "
        f"upcycled {moe['start_loss']:.4f} -> {moe['final_loss']:.4f} ({moe['final_loss'] - moe['start_loss']:+.4f}).",
    ]
    g = gaps["upcycled"]
    z = g["gap"] / g["se"] if g["se"] > 0 else float("inf") * (1 if g["gap"] >= 0 else -1)
    dense_gain = dense["start_loss"] - dense["final_loss"]
    scale = f"; that is {abs(g['gap']) / abs(dense_gain):.0%} of the dense run's own change over the run" if abs(dense_gain) > 1e-9 else ""
    if abs(z) < 2:
        parts.append(
            f"The final gap (upcycled - dense) is {g['gap']:+.4f} ± {g['se']:.4f} nats (paired SE, z = {z:+.1f}){scale}: "
            "within two standard errors of zero, so at this scale no difference is detectable."
        )
    else:
        better = "upcycled" if g["gap"] < 0 else "dense"
        parts.append(
            f"The final gap (upcycled - dense) is {g['gap']:+.4f} ± {g['se']:.4f} nats (paired SE, z = {z:+.1f}){scale}: "
            f"the {better} model ends with the lower held-out loss, beyond two standard errors."
        )
    ratio = (
        moe["train_seconds_excl_eval"] / dense["train_seconds_excl_eval"]
        if dense["train_seconds_excl_eval"] > 0 and moe["train_seconds_excl_eval"] > 0
        else float("nan")
    )
    parts.append(
        f"That is per token, not per unit of compute: the upcycled model holds {moe['total_parameters'] / dense['total_parameters']:.1f}x "
        f"the parameters, ~{gaps['active_ratio']:.2f}x the active parameters per token, and its training took {ratio:.1f}x "
        "the dense run's wall time here (excluding evaluation)."
    )
    if "drop" in runs:
        d, gd = runs["drop"], gaps["drop"]
        zd = gd["gap"] / gd["se"] if gd["se"] > 0 else float("nan")
        parts.append(
            f"Drop-Upcycling (r = {args.drop_ratio}) started at {d['start_loss']:.4f} (conversion not exact) and ended at "
            f"{d['final_loss']:.4f}, {gd['gap']:+.4f} ± {gd['se']:.4f} vs dense (z = {zd:+.1f})."
        )
    parts.append("One seed and a small held-out set: the SE covers held-out sampling only, not run-to-run variance.")
    return " ".join(parts)


def plot(runs: dict[str, dict], gaps: dict, path: Path) -> None:
    """Top: held-out (and per-batch train) loss of every run; bottom: held-out loss minus dense's at each
    evaluation, with +-1 paired SE at the last step (Drop-Upcycling, far off at the start, on its own axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    colors = {"dense": "tab:blue", "upcycled": "tab:orange", "drop": "tab:green"}
    for name, run in runs.items():
        steps, losses = zip(*run["eval_curve"], strict=True)
        top.plot(steps, losses, "o-", color=colors[name], label=f"{name} held-out", markersize=4)
        if run["train_curve"]:
            ts, tl = zip(*run["train_curve"], strict=True)
            suffix = "" if name == "dense" else " (+ router loss)"
            top.plot(ts, tl, "-", color=colors[name], alpha=0.3, linewidth=1, label=f"{name} train batch{suffix}")
    if "drop" in runs:
        top.set_yscale("log")
    top.set_ylabel("loss (nats/token)")
    top.set_title("continued pretraining on the same tokens: dense vs upcycled")
    top.grid(alpha=0.3)
    top.legend(fontsize=8)

    dense = dict(runs["dense"]["eval_curve"])
    axes = {"upcycled": bottom}
    if "drop" in runs:
        axes["drop"] = bottom.twinx()
    for name, ax in axes.items():
        points = [(s, v - dense[s]) for s, v in runs[name]["eval_curve"] if s in dense]
        steps, diffs = zip(*points, strict=True)
        ax.plot(steps, diffs, "o-", color=colors[name], markersize=4, label=f"{name} - dense")
        ax.errorbar([steps[-1]], [gaps[name]["gap"]], yerr=[gaps[name]["se"]], color=colors[name], capsize=4)
        ax.set_ylabel(f"{name} - dense", color=colors[name])
    bottom.axhline(0.0, color="grey", linewidth=0.8)
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-ratio", type=float, default=0.1, help="share of documents held out (data.eval_ratio)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--balance-coef", type=float, default=0.01, help="router balance loss of the MoE runs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--source", type=Path, help="another dense LLaMA-family model dir (default: the embedded SmolLM2)")
    parser.add_argument("--data", type=Path, help="a text/JSONL file moeforge reads (default: built-in pt-demo)")
    parser.add_argument("--drop-upcycling", action="store_true", help="also run (C) Drop-Upcycling")
    parser.add_argument("--drop-ratio", type=float, default=0.5)
    args = parser.parse_args()

    from moeforge.io.embedded import default_model_dir

    wall_start = time.perf_counter()
    source = args.source or default_model_dir()
    data = {"train": [str(args.data.resolve())]} if args.data else {"builtin": "pt-demo"}
    data |= {"eval_ratio": args.eval_ratio, "max_length": args.seq_len, "mix_seed": args.seed}
    training = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "per_device_eval_batch_size": args.batch,
        "learning_rate": args.lr,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": args.warmup_ratio,
        "logging_steps": max(1, args.eval_every // 2),
        "eval_steps": args.eval_every,
        "telemetry_steps": args.eval_every,
        "seed": args.seed,
    }
    work = Path(tempfile.mkdtemp(prefix="moeforge-upcycle-vs-dense-"))
    conversions = {"upcycled": {"num_experts": NUM_EXPERTS, "top_k": TOP_K}}
    if args.drop_upcycling:
        conversions["drop"] = {"num_experts": NUM_EXPERTS, "top_k": TOP_K, "copy": {"drop_ratio": args.drop_ratio}}
    fidelity, raw = {}, {}
    try:
        models = {"dense": str(source)}
        for name, moe in conversions.items():
            fidelity[name] = convert_model(source, work / f"{name}-model", {"moe": moe})
            models[name] = str(work / f"{name}-model")
            print(f"converted {name}: {json.dumps(fidelity[name])}", flush=True)
        for name, model in models.items():
            recipe = {
                "stage": "pt",
                "model": model,
                "output": str(work / f"{name}-run"),
                "overwrite": True,
                "data": data,
                "training": training,
                "router_losses": {"balance_coef": args.balance_coef},
            }
            print(f"training {name} ({args.steps} steps x {args.batch} x {args.seq_len} tokens) ...", flush=True)
            raw[name] = run_child({"name": name, "recipe": recipe}, work)
            shutil.rmtree(work / f"{name}-run", ignore_errors=True)
            last = raw[name]["block_losses_final"]
            print(
                f"  {name}: held-out loss {statistics.fmean(raw[name]['block_losses_start']):.4f} -> "
                f"{statistics.fmean(last):.4f}, {raw[name]['process_seconds']:.0f}s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    runs = {name: summarize(name, out) for name, out in raw.items()}
    dense = runs["dense"]
    gaps: dict = {}
    for name in runs:
        if name != "dense":
            gap, se = paired_gap(dense["block_losses_final"], runs[name]["block_losses_final"])
            start_gap, _ = paired_gap(dense["block_losses_start"], runs[name]["block_losses_start"])
            gaps[name] = {"gap": gap, "se": se, "start_gap": start_gap}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    ffn_share = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers  # dense FFN weights
    gaps["active_ratio"] = (dense["total_parameters"] + (TOP_K - 1) * ffn_share) / dense["total_parameters"]
    text = verdict(runs, gaps, args, fidelity)

    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": str(args.source) if args.source else "SmolLM2-135M-Instruct (fp32)",
        "data": str(args.data or "built-in pt-demo"),
        "settings": vars(args) | {"data": str(args.data) if args.data else None},
        "training": training,
        "conversions": fidelity,
        "gaps_vs_dense": gaps,
        "runs": runs,
        "verdict": text,
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "upcycle_vs_dense.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(runs, gaps, RESULTS / "upcycle_vs_dense.png")

    names = list(runs)
    all_steps = sorted({s for run in runs.values() for s, _ in run["eval_curve"]})
    curves = {name: dict(run["eval_curve"]) for name, run in runs.items()}
    flags = "".join(
        f" {flag} {value}"
        for flag, value, default in (
            ("--steps", args.steps, 60),
            ("--batch", args.batch, 4),
            ("--seq-len", args.seq_len, 128),
            ("--eval-every", args.eval_every, 10),
            ("--eval-ratio", args.eval_ratio, 0.1),
            ("--lr", args.lr, 1e-4),
            ("--warmup-ratio", args.warmup_ratio, 0.1),
            ("--balance-coef", args.balance_coef, 0.01),
            ("--seed", args.seed, 42),
            ("--data", args.data, None),
            ("--source", args.source, None),
        )
        if value != default
    ) + (f" --drop-upcycling --drop-ratio {args.drop_ratio}" if args.drop_upcycling else "")
    lines = [
        f"# Continued pretraining, dense vs upcycled {result['model']} ({result['machine']}, torch {torch.__version__})",
        "",
        f"Data: {result['data']}, {dense['eval_blocks']} held-out blocks of {dense['block_tokens']} tokens "
        f"(eval_ratio {args.eval_ratio}). Each run: {args.steps} steps x {args.batch} x {args.seq_len} tokens, AdamW lr {args.lr:g} "
        f"cosine (warm-up {args.warmup_ratio:g}), seed {args.seed}, fp32; MoE runs: 8 experts top-2, balance loss {args.balance_coef:g}.",
        "",
        "Held-out loss (nats/token; step 0 and the last step computed per block by the script, the rest by the trainer):",
        "",
        "| step | " + " | ".join(names) + " | " + " | ".join(f"{n} - dense" for n in names if n != "dense") + " |",
        "|---|" + "---|" * (2 * len(names) - 1),
    ]
    for step in all_steps:
        values = [curves[n].get(step) for n in names]
        cells = ["-" if v is None else f"{v:.4f}" for v in values]
        diffs = ["-" if v is None or values[0] is None else f"{v - values[0]:+.4f}" for v in values[1:]]
        lines.append(f"| {step} | " + " | ".join(cells + diffs) + " |")
    lines += [
        "",
        "| run | params (M) total / trained | tokens seen | start loss | final loss ± SE | final - dense ± paired SE | training s (excl. eval) | process s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        gap = "-" if name == "dense" else f"{gaps[name]['gap']:+.4f} ± {gaps[name]['se']:.4f}"
        lines.append(
            f"| {name} | {run['total_parameters'] / 1e6:.1f} / {run['trainable_parameters'] / 1e6:.1f} | {run['tokens_seen']:,} | "
            f"{run['start_loss']:.4f} | {run['final_loss']:.4f} ± {run['final_se']:.4f} | {gap} | "
            f"{run['train_seconds_excl_eval']:.1f} | {run['process_seconds']:.0f} |"
        )
    lines += [
        "",
        "Verdict: " + text,
        "",
        "![loss curves](upcycle_vs_dense.png)",
        "",
        f"Reproduce: `python benchmarks/upcycle_vs_dense.py{flags}` (this run: {result['wall_seconds']:.0f} s wall)",
    ]
    (RESULTS / "upcycle_vs_dense.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
