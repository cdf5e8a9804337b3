"""Does attention MoE cost quality in continued pretraining? FFN-MoE vs FFN-MoE + attention MoE, same tokens.

From the embedded SmolLM2-135M-Instruct, two arms converted with ``export: moeforge`` (the same architecture
and code path, so the only difference is the attention):
  (A) ffn_moe        8 experts top-2, copy upcycling: exactly the dense function;
  (B) ffn_moe+attn   the same plus ``attention_moe: {num_experts: kv_groups, shared: 1, shared_selection:
                     importance, top_k: 1, router_init: random}`` (scale auto = top_k = 1): 3 groups of 3 query heads (one KV
                     head each); every token keeps the layer's most important group and the router picks one of
                     the other two, so a token's attention runs on 2 of 3 groups. Not exact: B starts worse and
                     the question is how much of that the same training recovers.
Why this B: a top_k = all attention MoE is exact but computes everything, so it is not the arm of interest.
Among the settings that keep 2 of 3 groups per token it starts closest to the dense model (held-out loss of
SmolLM2 with untrained N(0, 0.02) routers on all 30 layers, built-in text, dense 2.34: top-2 of 3 with scale
3 gives 7.25, with scale 2 (= top_k, the recipe's auto) 6.05; one shared group (group 1 in every layer) +
top-1 of 2, scale 1, gave 4.23 in a one-off measurement; the others are in benchmarks/results/attention_moe_cost.md). Scale 1 at top-1 gives the
selected group weight 1, as in the dense sum.

Each run is ``moeforge.training.train`` (stage pt, fp32, embeddings frozen, router balance loss on the FFN
and attention routers) in its own process (benchmarks/_runs.py), on the same data (built-in pt-demo), the
same held-out rows (``data.eval_ratio``, split by ``data.mix_seed``, fixed), schedule and number of tokens;
per seed s, ``training.seed`` = s (data order) and arm B's conversion ``seed`` = s (its router init). The
final held-out loss is reported per arm as mean ± SD over seeds, with the per-seed paired difference B - A.

Sized for 2 CPU cores shared with other work: 30 steps x 4 x 128 tokens (15,360 tokens a run, about half an
epoch of pt-demo's training split) took 255-537 s a run there (as other work came and went), 36 min for 3 seeds x 2 arms. That is a short
continued pretraining: it says how fast B's start gap closes, not where either arm would end.

Resumable: every run's result goes to its own JSON under --runs-dir and a rerun skips the runs already there
(with the same settings); converted models are kept under --work until their runs are done. --arms limits
which arms run now; the summary is written once every (arm, seed) has a result.

    python benchmarks/attention_moe_training.py [--seeds 0 1 2 --steps 30 --batch 4 --seq-len 128 --eval-every 10]
                                                [--arms ffn_moe ffn_moe+attn] [--attention-top-k 1 --attention-shared 1 --attention-scale auto]
Results: benchmarks/results/attention_moe_training.json and .md (runs: results/attention_moe_training_runs/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from _flags import changed_flags
from _runs import convert_model, run_child

RESULTS = Path(__file__).resolve().parent / "results"
MOE = {"num_experts": 8, "top_k": 2}
ARMS = ("ffn_moe", "ffn_moe+attn")
REPRODUCED = (
    "seeds", "steps", "batch", "seq_len", "eval_every", "eval_ratio", "lr", "warmup_ratio", "balance_coef", "mix_seed",
    "attention_top_k", "attention_shared", "attention_scale",
)  # fmt: skip
"""The options that change what a run computes: the reproduce line repeats those set off default."""


def attention_section(args) -> dict:
    section: dict = {"num_experts": "kv_groups", "top_k": args.attention_top_k, "shared": args.attention_shared, "router_init": "random"}
    if args.attention_shared:
        section["shared_selection"] = "importance"
    if args.attention_scale != "auto":
        section["scale"] = float(args.attention_scale)
    return section


def settings(args, arm: str) -> dict:
    """What makes a stored run of ``arm`` reusable: one with other settings is not."""
    common = {
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "eval_every": args.eval_every,
        "eval_ratio": args.eval_ratio,
        "lr": args.lr,
        "warmup_ratio": args.warmup_ratio,
        "balance_coef": args.balance_coef,
        "mix_seed": args.mix_seed,
        "moe": MOE,
    }
    return common if arm == "ffn_moe" else common | {"attention_moe": attention_section(args)}


def conversion(arm: str, args, seed: int) -> tuple[dict, int]:
    """The recipe sections of ``arm`` and its conversion seed (A is exact, one conversion for every seed)."""
    sections: dict = {"moe": MOE, "export": "moeforge"}
    if arm == "ffn_moe":
        return sections, 0
    return sections | {"attention_moe": attention_section(args)}, seed


def recipe_for(model: Path, output: Path, args, seed: int) -> dict:
    return {
        "stage": "pt",
        "model": str(model),
        "output": str(output),
        "overwrite": True,
        "data": {"builtin": "pt-demo", "eval_ratio": args.eval_ratio, "max_length": args.seq_len, "mix_seed": args.mix_seed},
        "freeze": ["embeddings"],
        "router_losses": {"balance_coef": args.balance_coef},
        "training": {
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch,
            "per_device_eval_batch_size": args.batch,
            "learning_rate": args.lr,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": args.warmup_ratio,
            "logging_steps": 5,
            "eval_steps": args.eval_every,
            "telemetry_steps": 5,
            "seed": seed,
        },
    }


def converted(arm: str, seed: int, args, work: Path) -> tuple[Path, dict]:
    """The converted model of ``arm`` for ``seed`` under ``work`` (made unless already there) and its fidelity."""
    from moeforge.io.embedded import default_model_dir

    sections, convert_seed = conversion(arm, args, seed)
    model = work / f"{arm}-convert{convert_seed}"
    info_path = model.with_suffix(".conversion.json")
    if not info_path.exists():
        info = convert_model(default_model_dir(), model, sections, seed=convert_seed)
        info_path.write_text(json.dumps(info))
        print(f"  converted {arm} (seed {convert_seed}): {json.dumps(info)}", flush=True)
    return model, json.loads(info_path.read_text())


def run_one(arm: str, seed: int, args, work: Path) -> dict:
    """Train ``arm`` for ``seed`` in a child process; its result."""
    model, info = converted(arm, seed, args, work)
    name = f"{arm}-seed{seed}"
    out = run_child({"name": name, "recipe": recipe_for(model, work / f"{name}-run", args, seed), "score_blocks": False}, work)
    shutil.rmtree(work / f"{name}-run", ignore_errors=True)
    if arm != "ffn_moe":  # arm B's conversion serves this seed only
        shutil.rmtree(model, ignore_errors=True)
    return {"arm": arm, "seed": seed, "settings": settings(args, arm), "conversion": info, "result": out}


def summarize(result: dict) -> dict:
    """A run's held-out loss before and after (the trainer's eval_loss at step 0 and at the last step) and times."""
    history = result["log_history"]
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    summary = next(e for e in reversed(history) if "train_runtime" in e and "train_loss" in e)
    eval_seconds = sum(e["eval_runtime"] for e in history if "eval_runtime" in e)
    return {
        "start_loss": evals[0],
        "final_loss": evals[result["steps"]],
        "eval_curve": sorted(evals.items()),
        "train_curve": [(e["step"], e["lm_loss"]) for e in history if "lm_loss" in e],
        "train_seconds_excl_eval": round(summary["train_runtime"] - eval_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "process_seconds": result["process_seconds"],
        "tokens_seen": result["tokens"],
        "total_parameters": result["total_parameters"],
        "trainable_parameters": result["trainable_parameters"],
    }


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def report(runs: dict[tuple[str, int], dict], args, wall: float) -> None:
    seeds = args.seeds
    summaries = {key: summarize(run["result"]) for key, run in runs.items()}
    arms: dict[str, dict] = {}
    for arm in ARMS:
        rows = [summaries[(arm, s)] for s in seeds]
        finals, starts = [r["final_loss"] for r in rows], [r["start_loss"] for r in rows]
        arms[arm] = {
            "start_mean": statistics.fmean(starts),
            "start_sd": sd(starts),
            "final_mean": statistics.fmean(finals),
            "final_sd": sd(finals),
            "train_seconds_excl_eval_mean": statistics.fmean(r["train_seconds_excl_eval"] for r in rows),
            "process_seconds_mean": statistics.fmean(r["process_seconds"] for r in rows),
            "process_seconds_total": sum(r["process_seconds"] for r in rows),
            "total_parameters": rows[0]["total_parameters"],
            "trainable_parameters": rows[0]["trainable_parameters"],
            "tokens_seen": rows[0]["tokens_seen"],
            "conversion": runs[(arm, seeds[0])]["conversion"],
        }
    paired = []
    for s in seeds:
        a, b = summaries[("ffn_moe", s)], summaries[("ffn_moe+attn", s)]
        paired.append({"seed": s, "start_gap": b["start_loss"] - a["start_loss"], "final_gap": b["final_loss"] - a["final_loss"]})
    gaps = [p["final_gap"] for p in paired]
    difference = {"mean": statistics.fmean(gaps), "sd": sd(gaps), "n": len(gaps)}
    first = summaries[("ffn_moe", seeds[0])]
    result = {
        "machine": f"{os.cpu_count()} CPU cores (shared with other work)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": "SmolLM2-135M-Instruct (fp32)",
        "data": "built-in pt-demo",
        "settings": settings(args, "ffn_moe+attn") | {"seeds": seeds},
        "arms": arms,
        "paired_final_difference_b_minus_a": difference,
        "paired_per_seed": paired,
        "runs": {f"{arm}-seed{s}": summary for (arm, s), summary in summaries.items()},
        "wall_seconds_this_invocation": round(wall, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_moe_training.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    a, b = arms["ffn_moe"], arms["ffn_moe+attn"]
    lines = [
        f"# Continued pretraining: FFN-MoE vs FFN-MoE + attention MoE, {result['model']} ({result['machine']}, torch {torch.__version__})",
        "",
        f"Data: built-in pt-demo, held-out = the trainer's eval split (eval_ratio {args.eval_ratio}, blocks of {args.seq_len} tokens, "
        f"split fixed by mix_seed {args.mix_seed}). Each run: {args.steps} steps x {args.batch} x {args.seq_len} tokens "
        f"({first['tokens_seen']:,} tokens), AdamW lr {args.lr:g} cosine (warm-up {args.warmup_ratio:g}), fp32, embeddings frozen, "
        f"balance loss {args.balance_coef:g} on every router. Both arms: 8 experts top-2 copy upcycling, `export: moeforge`; "
        f"B adds `attention_moe: {json.dumps(attention_section(args))}` (conversion seed = run seed). Seeds {seeds}.",
        "",
        "| arm | params (M) total / trained | start loss (mean ± SD) | final loss (mean ± SD) | training s per run (excl. eval) | process s per run | process s, all seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, v in arms.items():
        lines.append(
            f"| {arm} | {v['total_parameters'] / 1e6:.1f} / {v['trainable_parameters'] / 1e6:.1f} | {v['start_mean']:.4f} ± {v['start_sd']:.4f} | "
            f"{v['final_mean']:.4f} ± {v['final_sd']:.4f} | {v['train_seconds_excl_eval_mean']:.0f} | {v['process_seconds_mean']:.0f} | "
            f"{v['process_seconds_total']:.0f} |"
        )
    lines += [
        "",
        "Per seed (held-out loss, nats/token, the trainer's eval_loss; same held-out blocks and data order within a seed):",
        "",
        "| seed | A start | A final | B start | B final | B - A at start | B - A final |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in paired:
        sa, sb = summaries[("ffn_moe", p["seed"])], summaries[("ffn_moe+attn", p["seed"])]
        lines.append(
            f"| {p['seed']} | {sa['start_loss']:.4f} | {sa['final_loss']:.4f} | {sb['start_loss']:.4f} | {sb['final_loss']:.4f} | "
            f"{p['start_gap']:+.4f} | {p['final_gap']:+.4f} |"
        )
    steps = sorted({step for summary in summaries.values() for step, _ in summary["eval_curve"]})
    curve = {key: dict(summary["eval_curve"]) for key, summary in summaries.items()}
    lines += [
        "",
        "Held-out loss by step (mean over seeds) and the paired gap B - A (mean ± SD over seeds):",
        "",
        "| step | A | B | B - A |",
        "|---|---|---|---|",
    ]
    for step in steps:
        if all(step in curve[(arm, s)] for arm in ARMS for s in seeds):
            step_gaps = [curve[("ffn_moe+attn", s)][step] - curve[("ffn_moe", s)][step] for s in seeds]
            lines.append(
                f"| {step} | {statistics.fmean(curve[('ffn_moe', s)][step] for s in seeds):.4f} | "
                f"{statistics.fmean(curve[('ffn_moe+attn', s)][step] for s in seeds):.4f} | "
                f"{statistics.fmean(step_gaps):+.4f} ± {sd(step_gaps):.4f} |"
            )
    conversions = [runs[("ffn_moe+attn", s)]["conversion"] for s in seeds]
    lines += [
        "",
        "B's conversions (fidelity check against the dense model on calibration text): top-1 agreement "
        + ", ".join(f"{c['top1_agreement']:.3f}" for c in conversions)
        + "; max |Δlogit| "
        + ", ".join(f"{c['max_abs_logit_diff']:.1f}" for c in conversions)
        + f" (seeds {seeds}). A's: exact, max |Δlogit| {a['conversion']['max_abs_logit_diff']:.1e}.",
    ]
    lines += [
        "",
        f"Final B - A over seeds: {difference['mean']:+.4f} ± {difference['sd']:.4f} (mean ± SD of the {difference['n']} per-seed paired "
        f"differences). B's start gap {b['start_mean'] - a['start_mean']:+.4f} is what the untrained attention routers cost; the final "
        "gap is what is left of it after the same training.",
        "",
        f"Reproduce: `python benchmarks/attention_moe_training.py{args.reproduce_flags}` (runs are stored per (arm, seed) and skipped on a rerun).",
    ]
    (RESULTS / "attention_moe_training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run now (the summary needs both)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (and at step 0)")
    parser.add_argument("--eval-ratio", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--balance-coef", type=float, default=0.01)
    parser.add_argument("--mix-seed", type=int, default=42, help="data.mix_seed: the held-out split, the same for every run")
    parser.add_argument("--attention-top-k", type=int, default=1, help="attention_moe.top_k of arm B")
    parser.add_argument("--attention-shared", type=int, default=1, help="attention_moe.shared of arm B (chosen by importance)")
    parser.add_argument("--attention-scale", default="auto", help="attention_moe.scale of arm B: auto (= top_k) or a number")
    parser.add_argument("--runs-dir", type=Path, default=RESULTS / "attention_moe_training_runs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moeforge-attention-moe-training"), help="converted models")
    args = parser.parse_args()
    args.reproduce_flags = changed_flags(parser, args, REPRODUCED)
    started = time.perf_counter()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], dict] = {}
    for seed in args.seeds:
        for arm in ARMS:
            path = args.runs_dir / f"{arm}-seed{seed}.json"
            if path.exists():
                stored = json.loads(path.read_text())
                if stored["settings"] != settings(args, arm):
                    raise SystemExit(f"{path} was run with other settings: move it away or choose another --runs-dir")
                runs[(arm, seed)] = stored
                continue
            if arm not in args.arms:
                continue
            print(f"training {arm}, seed {seed} ({args.steps} steps x {args.batch} x {args.seq_len} tokens) ...", flush=True)
            run = run_one(arm, seed, args, args.work)
            path.write_text(json.dumps(run) + "\n")
            runs[(arm, seed)] = run
            r = run["result"]
            print(
                f"  {arm} seed {seed}: held-out {summarize(r)['start_loss']:.4f} -> {summarize(r)['final_loss']:.4f}, "
                f"{r['process_seconds']:.0f} s",
                flush=True,
            )
    missing = [f"{arm}-seed{s}" for s in args.seeds for arm in ARMS if (arm, s) not in runs]
    if missing:
        print(f"not yet run: {', '.join(missing)} (rerun with those arms for the summary)")
        return
    shutil.rmtree(args.work, ignore_errors=True)
    report(runs, args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
