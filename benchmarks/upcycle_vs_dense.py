"""The sparse-upcycling claim at small scale: continue training SmolLM2 dense vs upcycled, tuned, over seeds.

From the embedded SmolLM2-135M-Instruct (a Q4_1 GGUF dequantised to fp32), four arms of continued
pretraining (stage pt, fp32, every weight trained):
  dense          the dense model;
  upcycled       the same after exact copy-upcycling to 8 experts top-2 (Mixtral export; the conversion's
                 fidelity check passes, so both start as the same function), moeforge balance loss 0.01;
  drop_upcycled  the same with Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261): every expert re-draws
                 half of its neurons from N(mean, std) of the dense matrix, which breaks the symmetry between
                 copies at the price of starting as another function (the conversion seed picks the neurons);
  dense_matched  the dense model trained for round(steps x FLOP ratio) steps: as many training FLOPs as an
                 upcycled run (it sees more tokens), at dense's best learning rate.
Every run is ``moeforge.training.train`` in its own process (benchmarks/_runs.py) on the same data (built-in
pt-demo, or --data FILE), the same held-out blocks (``data.eval_ratio``, split by ``data.mix_seed``: fixed),
AdamW with a cosine schedule (warm-up 0.1). Seed s sets the data order (``training.seed``) and, for the
upcycled arm, the conversion seed (its router init), so the seed spread includes the router's start.

Phases (each run is a unit, stored as results/upcycle_vs_dense_runs/<arm>-lr<lr>-seed<seed>.json; a rerun
skips stored units, so an interrupted phase resumes):
  sweep    seed 0, dense, upcycled and drop_upcycled, at every --lrs rate (1e-4, 2e-4, 4e-4), drop_upcycled
           also at the --drop-lrs rates (8e-4, 1.6e-3: its best rate lies above the others');
  seeds    --seeds (1 2) at each arm's best rate: the lowest final held-out loss of its sweep;
  matched  dense_matched at dense's best rate, --matched-seeds (0 1 2);
  all      the three in order (the default).
--report rebuilds results/upcycle_vs_dense.{json,md,png} from the stored units (also done after every phase).
The rate is chosen on seed 0's held-out loss and seed 0 is then one of the reported seeds on the same blocks:
a small selection bias in favour of each arm's best rate (the report also gives the fresh seeds alone).

Held-out loss is the plain LM loss per block (router losses are added in training mode only), scored by the
child on the model in memory every --eval-every steps and after the last one; the trainer's own evaluation
is off. A source model's start losses are the same for every run of it (same weights, same blocks): they are
scored by the first run of each source and passed to the others (the upcycled conversions of seeds 1 and 2
are exact copies too, checked by their fidelity figures, so they take seed 0's start losses; a drop_upcycled
conversion is its seed's own model, so its start losses are shared only between rates of that seed).

FLOPs: training FLOPs per token = 6 x (active parameters) + 6 x layers x seq_len x attention width (the
attention score and value products at full context, an upper bound); active parameters of the upcycled
model = dense parameters + (top_k - 1) x dense FFN weights + router weights (the tied embedding counts once:
its lookup is free, the output head is a matmul).

Sized for 2 CPU cores shared with other work, under flock /tmp/moeforge-cpu.lock. The defaults (20 steps x
4 x 128 tokens = 10,240 tokens a run, a third of pt-demo's training split) took 31 min under the lock for
the first 13 runs (sweep 996 s, seeds 551 s, matched 323 s): ~80-90 s a dense run (~105 s a 32-step matched
one), ~180-205 s an upcycled one (peak 14.9 GB resident: fp32 weights, gradients, AdamW), ~10 s a conversion.
The 7 drop_upcycled runs, added later on a slower machine, took 36 min (210-410 s a run, ~20-25 s a conversion).
Commands (each phase its own lock, so other work can interleave):

    flock /tmp/moeforge-cpu.lock python benchmarks/upcycle_vs_dense.py --phase sweep
    flock /tmp/moeforge-cpu.lock python benchmarks/upcycle_vs_dense.py --phase seeds
    flock /tmp/moeforge-cpu.lock python benchmarks/upcycle_vs_dense.py --phase matched
    python benchmarks/upcycle_vs_dense.py --report
Options: [--steps 20 --batch 4 --seq-len 128 --eval-every 10 --lrs 1e-4 2e-4 4e-4 --drop-lrs 8e-4 1.6e-3 --seeds 1 2
          --matched-seeds 0 1 2]
         [--source DIR] [--data FILE] [--results-dir DIR] [--work DIR] [--max-units N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from _flags import changed_flags
from _runs import convert_model, paired_gap, run_child, summarize

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "upcycle_vs_dense"
MOE = {"num_experts": 8, "top_k": 2}
DROP_RATIO = 0.5
MOE_OF = {"upcycled": MOE, "drop_upcycled": MOE | {"copy": {"drop_ratio": DROP_RATIO}}}  # the converted arms
ARMS = ("dense", "upcycled", "drop_upcycled", "dense_matched")
SWEPT = ("dense", "upcycled", "drop_upcycled")
PHASES = ("sweep", "seeds", "matched")
SHAPE_OF = {"dense": "dense", "dense_matched": "dense", "upcycled": "upcycled", "drop_upcycled": "upcycled"}  # for FLOPs
SOURCE_OF = {"dense": "dense", "dense_matched": "dense", "upcycled": "upcycled", "drop_upcycled": "drop_upcycled"}
"""Which start losses an arm shares: the same source model on the same blocks. Drop-Upcycling's conversions
differ by seed (its re-drawn neurons), so its runs share them only within a seed."""
SEEDED_SOURCE = ("drop_upcycled",)
BLOCK_KEYS = ("seq_len", "eval_ratio", "mix_seed", "data", "source")  # what fixes the held-out blocks
PAIRS = {
    "upcycled_minus_dense_equal_tokens": "upcycled - dense",
    "upcycled_minus_dense_matched_equal_flops": "upcycled - dense_matched",
    "drop_upcycled_minus_upcycled_equal_tokens": "drop_upcycled - upcycled",
}
"""The paired gaps the markdown tabulates per seed (result key: column label)."""
REPRODUCED = (
    "steps", "batch", "seq_len", "eval_every", "eval_ratio", "lrs", "drop_lrs", "warmup_ratio", "balance_coef",
    "mix_seed", "sweep_seed", "seeds", "matched_seeds", "source", "data",
)  # fmt: skip
"""The options that change what a run computes: the results' reproduce lines repeat those set off default."""
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95% Student t quantiles by degrees of freedom (few seeds; scipy is not a dependency)."""
MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)"
MACHINE = f"{os.cpu_count()} CPU cores, shared with other work"


# ------------------------------------------------------------------------------------------- the units


def unit_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}-lr{lr:g}-seed{seed}"


def settings(args, arm: str, steps: int) -> dict:
    """What makes a stored unit of ``arm`` reusable (its rate and seed are in its name)."""
    common = {
        "steps": steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "eval_every": args.eval_every,
        "eval_ratio": args.eval_ratio,
        "warmup_ratio": args.warmup_ratio,
        "mix_seed": args.mix_seed,
        "source": str(args.source) if args.source else None,
        "data": str(args.data) if args.data else None,
    }
    return common | ({"moe": MOE_OF[arm], "balance_coef": args.balance_coef} if arm in MOE_OF else {})


def recipe_for(model: Path, output: Path, args, lr: float, seed: int, steps: int) -> dict:
    data = {"train": [str(args.data.resolve())]} if args.data else {"builtin": "pt-demo"}
    return {
        "stage": "pt",
        "model": str(model),
        "output": str(output),
        "overwrite": True,
        "data": data | {"eval_ratio": args.eval_ratio, "max_length": args.seq_len, "mix_seed": args.mix_seed},
        "router_losses": {"balance_coef": args.balance_coef},
        "training": {
            "max_steps": steps,
            "per_device_train_batch_size": args.batch,
            "per_device_eval_batch_size": args.batch,
            "learning_rate": lr,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": args.warmup_ratio,
            "logging_steps": 5,
            "eval_steps": steps,  # a step strategy (no epoch-end evaluation); the child turns the trainer's evaluation off
            "telemetry_steps": 5,
            "seed": seed,
        },
    }


def source_dir(args) -> Path:
    from moeforge.io.embedded import default_model_dir

    return args.source or default_model_dir()


def converted(arm: str, seed: int, args) -> tuple[Path, dict]:
    """``arm``'s model for conversion ``seed`` under --work (made unless there) and its fidelity."""
    model = args.work / f"{arm}-convert{seed}"
    info_path = model.with_suffix(".conversion.json")
    if not (info_path.exists() and model.is_dir()):
        info = convert_model(source_dir(args), model, {"moe": MOE_OF[arm]}, seed=seed)
        info_path.write_text(json.dumps(info))
        print(f"  converted (seed {seed}): {json.dumps(info)}", flush=True)
    return model, json.loads(info_path.read_text())


def load_units(args) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(args.runs_dir.glob("*.json"))}


def stored(units: dict[str, dict], arm: str, lr: float, seed: int, args, steps: int) -> dict | None:
    """The stored unit, if any; one run with other settings stops the script (move it away, or another --results-dir)."""
    unit = units.get(unit_name(arm, lr, seed))
    if unit is not None and unit["settings"] != settings(args, arm, steps):
        raise SystemExit(
            f"{args.runs_dir / unit_name(arm, lr, seed)}.json was run with other settings: move it away or use another --results-dir"
        )
    return unit


def cached_start(units: dict[str, dict], arm: str, seed: int, args) -> tuple[str, list[float]] | None:
    """Start losses scored by a stored run of the same source model on the same blocks, and that run's name."""
    wanted = settings(args, arm, 0)
    for name, unit in units.items():
        same_source = SOURCE_OF[unit["arm"]] == SOURCE_OF[arm] and (arm not in SEEDED_SOURCE or unit["seed"] == seed)
        if same_source and all(unit["settings"][k] == wanted[k] for k in BLOCK_KEYS):
            if unit["start_losses_from"] is None:
                return name, unit["result"]["block_losses_start"]
    return None


def run_unit(arm: str, lr: float, seed: int, steps: int, args, units: dict[str, dict]) -> dict:
    """Train one unit in a child process and store it (written whole, then renamed)."""
    name = unit_name(arm, lr, seed)
    model, conversion = converted(arm, seed, args) if arm in MOE_OF else (source_dir(args), None)
    spec: dict = {
        "name": name,
        "recipe": recipe_for(model, args.work / f"{name}-run", args, lr, seed, steps),
        "score_every": args.eval_every,
    }
    cached = cached_start(units, arm, seed, args)
    if cached is not None:
        spec["start_losses"] = cached[1]
    print(f"training {name} ({steps} steps x {args.batch} x {args.seq_len} tokens) ...", flush=True)
    out = run_child(spec, args.work)
    shutil.rmtree(args.work / f"{name}-run", ignore_errors=True)
    unit = {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "settings": settings(args, arm, steps),
        "conversion": conversion,
        "start_losses_from": cached[0] if cached else None,
        "result": out,
    }
    path = args.runs_dir / f"{name}.json"
    path.with_suffix(".tmp").write_text(json.dumps(unit) + "\n")
    path.with_suffix(".tmp").rename(path)
    s = summarize(name, out)
    print(f"  {name}: held-out {s['start_loss']:.4f} -> {s['final_loss']:.4f}, {out['process_seconds']:.0f} s", flush=True)
    return unit


# ---------------------------------------------------------------------------------- phases and FLOPs


def rates(arm: str, args) -> list[float]:
    """``arm``'s sweep grid: --lrs, and for drop_upcycled also --drop-lrs (it starts far from the dense function,
    so its best rate may lie above the others')."""
    return sorted({*args.lrs, *(args.drop_lrs if arm == "drop_upcycled" else ())})


def best_rates(units: dict[str, dict], args) -> dict[str, float]:
    """Each swept arm's rate with the lowest final held-out loss at the sweep seed."""
    best = {}
    for arm in SWEPT:
        finals = {}
        for lr in rates(arm, args):
            unit = stored(units, arm, lr, args.sweep_seed, args, args.steps)
            if unit is None:
                raise SystemExit(f"the sweep has no {unit_name(arm, lr, args.sweep_seed)} yet: run --phase sweep first")
            finals[lr] = statistics.fmean(unit["result"]["block_losses_final"])
        best[arm] = min(finals, key=finals.__getitem__)
    return best


def flop_accounting(units: dict[str, dict], args) -> dict:
    """Training FLOPs per token of dense and upcycled (see the module docstring) from a stored run of each."""
    from transformers import AutoConfig

    totals = {}
    for arm in ("dense", "upcycled"):
        unit = next((u for u in units.values() if u["arm"] == arm), None)
        if unit is None:
            raise SystemExit(f"no stored {arm} run yet: run --phase sweep first")
        totals[arm] = unit["result"]["total_parameters"]
    config = AutoConfig.from_pretrained(source_dir(args))
    ffn = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers  # one dense FFN stack
    router = totals["upcycled"] - totals["dense"] - (MOE["num_experts"] - 1) * ffn
    active = {"dense": totals["dense"], "upcycled": totals["dense"] + (MOE["top_k"] - 1) * ffn + router}
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    context = 6 * config.num_hidden_layers * args.seq_len * width
    per_token = {arm: 6 * n + context for arm, n in active.items()}
    return {
        "total_parameters": totals,
        "ffn_parameters": ffn,
        "router_parameters": router,
        "active_parameters": active,
        "active_ratio": active["upcycled"] / active["dense"],
        "attention_context_flops_per_token": context,
        "flops_per_token": per_token,
        "flop_ratio": per_token["upcycled"] / per_token["dense"],
        "matched_steps": round(args.steps * per_token["upcycled"] / per_token["dense"]),
    }


def plan(phase: str, units: dict[str, dict], args) -> list[tuple[str, float, int, int]]:
    """The units (arm, lr, seed, steps) of ``phase``."""
    if phase == "sweep":
        return [(arm, lr, args.sweep_seed, args.steps) for arm in SWEPT for lr in rates(arm, args)]
    best = best_rates(units, args)
    if phase == "seeds":
        return [(arm, best[arm], seed, args.steps) for seed in args.seeds for arm in SWEPT]
    steps = flop_accounting(units, args)["matched_steps"]
    return [("dense_matched", best["dense"], seed, steps) for seed in args.matched_seeds]


# ------------------------------------------------------------------------------------------- the report


def spread(values: list[float]) -> dict:
    """Mean, SD and the 95% t interval of the mean over seeds (n = 1: no spread)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95": None, "values": values}
    sd = statistics.stdev(values)
    half = T975[n - 1] * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "values": values}


def fmt(s: dict, digits: int = 4, sign: str = "") -> str:
    return f"{s['mean']:{sign}.{digits}f}" + ("" if s["sd"] is None else f" ± {s['sd']:.{digits}f}")


def paired(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """Per seed, b - a on the final held-out loss with the per-block paired SE; and over the seeds."""
    rows = []
    for seed in sorted(a.keys() & b.keys()):
        gap, se = paired_gap(a[seed]["block_losses_final"], b[seed]["block_losses_final"])
        rows.append({"seed": seed, "a": a[seed]["final_loss"], "b": b[seed]["final_loss"], "gap": gap, "block_se": se})
    return {"per_seed": rows, "over_seeds": spread([r["gap"] for r in rows]) if rows else None}


def judge(what: str, p: dict, better: str, worse: str) -> str:
    """The claim the seeds support: a side wins only when the 95% t interval over seeds excludes zero."""
    s = p["over_seeds"]
    if s is None:
        return f"{what}: not run."
    if s["ci95"] is None:
        return f"{what}: {fmt(s, sign='+')} nats (one seed: no spread, no claim)."
    text = f"{what}: {fmt(s, sign='+')} nats (mean ± SD over {s['n']} seeds"
    low, high = s["ci95"]
    per_seed = ", ".join(f"{r['gap']:+.4f} ± {r['block_se']:.4f}" for r in p["per_seed"])
    text += f", 95% t interval [{low:+.4f}, {high:+.4f}]; per seed {per_seed}, each ± its per-block paired SE)"
    if high < 0:
        return text + f": {better} ends lower, beyond the seed spread."
    if low > 0:
        return text + f": {worse} ends lower, beyond the seed spread."
    return text + ": the interval includes zero, so the seeds do not separate the two."


def report(args, wall: float | None) -> None:
    """Rebuild the JSON, MD and PNG from the stored units (needs the whole sweep; the rest as far as run)."""
    units = load_units(args)
    best = best_rates(units, args)
    flops = flop_accounting(units, args)
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    seeds = [args.sweep_seed, *args.seeds]
    for arm in ARMS:
        lr = best["dense" if arm == "dense_matched" else arm]
        steps = flops["matched_steps"] if arm == "dense_matched" else args.steps
        for seed in seeds if arm != "dense_matched" else args.matched_seeds:
            unit = stored(units, arm, lr, seed, args, steps)
            if unit is not None:
                runs[arm][seed] = summarize(unit_name(arm, lr, seed), unit["result"]) | {
                    "lr": lr,
                    "flops": unit["result"]["tokens"] * flops["flops_per_token"][SHAPE_OF[arm]],
                    "conversion": unit["conversion"],
                }
    sweep = {
        arm: {
            lr: summarize(unit_name(arm, lr, args.sweep_seed), stored(units, arm, lr, args.sweep_seed, args, args.steps)["result"])
            for lr in rates(arm, args)
        }
        for arm in SWEPT
    }
    arms = {}
    for arm, by_seed in runs.items():
        if by_seed:
            rows = list(by_seed.values())
            arms[arm] = {
                "lr": rows[0]["lr"],
                "steps": rows[0]["steps"],
                "tokens_seen": rows[0]["tokens_seen"],
                "epochs": rows[0]["epochs"],
                "flops_per_run": rows[0]["flops"],
                "seeds": sorted(by_seed),
                "start_loss": spread([r["start_loss"] for r in rows]),  # differs by seed for drop_upcycled only
                "final_loss": spread([r["final_loss"] for r in rows]),
                "train_seconds_excl_eval": spread([r["train_seconds_excl_eval"] for r in rows]),
                "process_seconds": spread([r["process_seconds"] for r in rows]),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in rows),
                "total_parameters": rows[0]["total_parameters"],
                "active_parameters": flops["active_parameters"][SHAPE_OF[arm]],
            }
    equal_tokens = paired(runs["dense"], runs["upcycled"])
    fresh = paired({s: r for s, r in runs["dense"].items() if s != args.sweep_seed}, runs["upcycled"])
    equal_flops = paired(runs["dense_matched"], runs["upcycled"])
    drop_vs_copy = paired(runs["upcycled"], runs["drop_upcycled"])
    drop_vs_dense = paired(runs["dense"], runs["drop_upcycled"])
    all_units = sorted(units.items(), key=lambda kv: (PHASES.index(phase_of(kv[1], args)), kv[0]))
    wall_per_unit = {name: u["result"]["process_seconds"] for name, u in all_units}
    conversions = {arm: {s: r["conversion"] for s, r in runs[arm].items()} for arm in MOE_OF}
    # the median over every run of the arm (all rates and seeds: same steps, same work) resists the shared
    # machine's slow spells better than the mean over the best rate's seeds
    train_median = {
        arm: statistics.median(summarize(name, u["result"])["train_seconds_excl_eval"] for name, u in units.items() if u["arm"] == arm)
        for arm in SWEPT
    }
    time_ratio = train_median["upcycled"] / train_median["dense"]
    verdict = [
        judge("Upcycled - dense at equal tokens", equal_tokens, "upcycled", "dense"),
        judge(
            f"Upcycled - dense_matched at equal training FLOPs ({flops['flop_ratio']:.2f}x the dense steps)",
            equal_flops,
            "upcycled",
            "dense_matched",
        ),
        judge(f"Drop-upcycled (r = {DROP_RATIO:g}) - upcycled at equal tokens", drop_vs_copy, "drop_upcycled", "upcycled"),
        judge(f"Drop-upcycled (r = {DROP_RATIO:g}) - dense at equal tokens", drop_vs_dense, "drop_upcycled", "dense"),
    ]
    verdict.append(
        f"An upcycled run's training took {time_ratio:.1f}x a dense run's wall time here (median over all runs of each arm, "
        f"{train_median['upcycled']:.0f} s vs {train_median['dense']:.0f} s, excluding held-out scoring), "
        f"{'more' if time_ratio > flops['flop_ratio'] else 'less'} than its {flops['flop_ratio']:.2f}x FLOPs."
    )
    result = {
        "machine": MACHINE,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": str(args.source) if args.source else MODEL,
        "data": str(args.data or "built-in pt-demo"),
        "settings": settings(args, "upcycled", args.steps)
        | {
            "lrs": args.lrs,
            "drop_lrs": args.drop_lrs,
            "sweep_seed": args.sweep_seed,
            "seeds": args.seeds,
            "matched_seeds": args.matched_seeds,
        },
        "best_lr": best,
        "flops": flops,
        "sweep_final_loss": {arm: {f"{lr:g}": s["final_loss"] for lr, s in by_lr.items()} for arm, by_lr in sweep.items()},
        "arms": arms,
        "upcycled_minus_dense_equal_tokens": equal_tokens,
        "upcycled_minus_dense_fresh_seeds_only": fresh,
        "upcycled_minus_dense_matched_equal_flops": equal_flops,
        "drop_upcycled_minus_upcycled_equal_tokens": drop_vs_copy,
        "drop_upcycled_minus_dense_equal_tokens": drop_vs_dense,
        "conversions": conversions,
        "train_seconds_median_all_runs": train_median,
        "train_time_ratio": time_ratio,
        "process_seconds_per_unit": wall_per_unit,
        "process_seconds_total": round(sum(wall_per_unit.values()), 1),
        "verdict": " ".join(verdict),
        "runs": {unit_name(arm, r["lr"], s): r for arm, by_seed in runs.items() for s, r in by_seed.items()},
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write(args.results_dir / f"{NAME}.json", json.dumps(result, indent=2, default=str) + "\n")
    plot(runs, sweep, best, args.results_dir / f"{NAME}.png")
    write(args.results_dir / f"{NAME}.md", markdown(result, runs, sweep, args, wall))
    print((args.results_dir / f"{NAME}.md").read_text())


def phase_of(unit: dict, args) -> str:
    if unit["arm"] == "dense_matched":
        return "matched"
    return "sweep" if unit["seed"] == args.sweep_seed else "seeds"


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def markdown(result: dict, runs: dict[str, dict[int, dict]], sweep: dict, args, wall: float | None) -> str:
    flops, arms, best = result["flops"], result["arms"], result["best_lr"]
    first = next(iter(runs["dense"].values()))
    lines = [
        f"# Continued pretraining, dense vs upcycled {result['model']} ({result['machine']}, torch {result['torch']})",
        "",
        f"Data: {result['data']}; held-out: the same {first['eval_blocks']} blocks of {first['block_tokens']} tokens for every run "
        f"(eval_ratio {args.eval_ratio}, split by mix_seed {args.mix_seed}). AdamW, cosine schedule (warm-up {args.warmup_ratio:g}), "
        f"batch {args.batch} x {args.seq_len} tokens, fp32, every weight trained. Upcycled: 8 experts top-2, exact copy upcycling "
        f"(Mixtral export), balance loss {args.balance_coef:g}, conversion seed = run seed (router init). Drop-upcycled: the same "
        f"with Drop-Upcycling (arXiv 2502.19261): each expert re-draws {DROP_RATIO:.0%} of its neurons from N(mean, std) of the "
        "dense matrix (the conversion seed picks them), so it starts as another function. Seed s also sets the data order.",
        "",
        f"## Learning-rate sweep (seed {args.sweep_seed}, {args.steps} steps): final held-out loss",
        "",
        "| lr | " + " | ".join(SWEPT) + " |",
        "|---|" + "---|" * len(SWEPT),
    ]
    for lr in sorted({lr for arm in SWEPT for lr in rates(arm, args)}):
        cells = [
            "-"
            if lr not in sweep[arm]
            else f"**{sweep[arm][lr]['final_loss']:.4f}**"
            if best[arm] == lr
            else f"{sweep[arm][lr]['final_loss']:.4f}"
            for arm in SWEPT
        ]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Best (bold) per arm: " + ", ".join(f"{arm} {lr:g}" for arm, lr in best.items()) + ". The rate is chosen on seed "
        f"{args.sweep_seed}'s held-out loss and seed {args.sweep_seed} is reported below on the same blocks: a small selection "
        "bias toward each arm's best rate (the fresh seeds alone are given too)."
        + "".join(
            f" {arm}'s best rate is at the {'top' if lr == max(rates(arm, args)) else 'bottom'} of its grid: a rate beyond it might do better."
            for arm, lr in best.items()
            if lr in (min(rates(arm, args)), max(rates(arm, args)))
        ),
        "",
        "## Each arm at its best rate (mean ± SD over seeds)",
        "",
        "| arm | lr | steps | tokens | params total / active (M) | train FLOPs per run | seeds | start loss | final loss | per seed | training s per run (excl. scoring) | process s per run | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        per_seed = ", ".join(f"{runs[arm][s]['final_loss']:.4f}" for s in a["seeds"])
        start = fmt(a["start_loss"]) if a["start_loss"]["sd"] else f"{a['start_loss']['mean']:.4f}"
        lines.append(
            f"| {arm} | {a['lr']:g} | {a['steps']} | {a['tokens_seen']:,} | {a['total_parameters'] / 1e6:.1f} / {a['active_parameters'] / 1e6:.1f} | "
            f"{a['flops_per_run']:.2e} | {', '.join(map(str, a['seeds']))} | {start} | {fmt(a['final_loss'])} | {per_seed} | "
            f"{fmt(a['train_seconds_excl_eval'], 0)} | {fmt(a['process_seconds'], 0)} | {a['peak_rss_gb']:.1f} |"
        )
    lines += [
        "",
        f"FLOPs per training token: 6 x active parameters + 6 x layers x seq_len x attention width ({flops['attention_context_flops_per_token'] / 1e6:.1f} M, "
        f"full context): dense {flops['flops_per_token']['dense'] / 1e9:.2f} G, upcycled {flops['flops_per_token']['upcycled'] / 1e9:.2f} G, "
        f"ratio {flops['flop_ratio']:.3f} (active parameters alone: {flops['active_ratio']:.3f}; upcycled active = dense + (top_k - 1) x "
        f"{flops['ffn_parameters'] / 1e6:.1f} M FFN + {flops['router_parameters'] / 1e3:.0f} k router). dense_matched runs "
        f"round({args.steps} x {flops['flop_ratio']:.3f}) = {flops['matched_steps']} steps"
        + (f" ({arms['dense_matched']['epochs']} epochs of the training split)." if "dense_matched" in arms else "."),
        "",
        "## Paired final differences (same seed: same data order, same held-out blocks)",
        "",
        "| seed | " + " | ".join(ARMS) + " | " + " | ".join(f"{label} ± block SE" for label in PAIRS.values()) + " |",
        "|---|" + "---|" * (len(ARMS) + len(PAIRS)),
    ]
    gaps = [{r["seed"]: r for r in result[key]["per_seed"]} for key in PAIRS]
    for seed in sorted(set().union(*(runs[arm].keys() for arm in ARMS))):
        cells = [f"{runs[arm][seed]['final_loss']:.4f}" if seed in runs[arm] else "-" for arm in ARMS]
        cells += [f"{g[seed]['gap']:+.4f} ± {g[seed]['block_se']:.4f}" if seed in g else "-" for g in gaps]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    summary_cells = []
    for key in PAIRS:
        s = result[key]["over_seeds"]
        summary_cells.append(
            "-" if s is None else fmt(s, sign="+") + ("" if s["ci95"] is None else f" [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}]")
        )
    lines.append("| mean ± SD [95% t interval] |" + " |" * len(ARMS) + " " + " | ".join(summary_cells) + " |")
    fresh = result["upcycled_minus_dense_fresh_seeds_only"]["over_seeds"]
    if fresh is not None:
        lines += ["", f"Upcycled - dense on the fresh seeds alone (not used to pick the rates): {fmt(fresh, sign='+')} (n = {fresh['n']})."]
    steps = sorted({step for arm in ARMS for r in runs[arm].values() for step, _ in r["eval_curve"]})
    lines += [
        "",
        "## Held-out loss by step (mean over seeds)",
        "",
        "| step | " + " | ".join(arm for arm in ARMS if runs[arm]) + " |",
        "|---|" + "---|" * sum(bool(runs[arm]) for arm in ARMS),
    ]
    for step in steps:
        cells = []
        for arm in (a for a in ARMS if runs[a]):
            values = [dict(r["eval_curve"]).get(step) for r in runs[arm].values()]
            cells.append("-" if None in values else f"{statistics.fmean(values):.4f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    conversions = result["conversions"]
    lines += [
        "",
        "Conversions (fidelity check against the dense model): max |Δlogit| "
        + "; ".join(
            f"{arm} " + ", ".join(f"{c['max_abs_logit_diff']:.1e} (seed {s})" for s, c in sorted(by_seed.items()))
            for arm, by_seed in conversions.items()
            if by_seed
        )
        + "; start losses of every source model were scored once and shared (same weights, same blocks).",
        "",
        "Verdict (a side wins only when the 95% Student t interval of the per-seed paired differences excludes zero): "
        + result["verdict"]
        + f" Short runs ({args.steps} steps, {arms['dense']['tokens_seen']:,} tokens): this says what the first steps of continued pretraining do, not where either arm would end.",
        "",
        f"![held-out loss curves and the sweep]({NAME}.png)",
        "",
        "Wall time of every run (process seconds, including model loading and held-out scoring): "
        + ", ".join(f"{name} {s:.0f}" for name, s in result["process_seconds_per_unit"].items())
        + f"; total {result['process_seconds_total']:.0f} s, plus the conversions' "
        + ", ".join(f"{c['seconds']:.0f}" for by_seed in conversions.values() for c in by_seed.values())
        + " s"
        + ("" if wall is None else f" (this invocation {wall:.0f} s wall)")
        + ".",
        "",
        "Reproduce (each phase under the shared CPU lock; units already stored are skipped):",
        "",
        "```",
        *(f"flock /tmp/moeforge-cpu.lock python benchmarks/upcycle_vs_dense.py --phase {phase}{args.reproduce_flags}" for phase in PHASES),
        f"python benchmarks/upcycle_vs_dense.py --report{args.reproduce_flags}",
        "```",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[int, dict]], sweep: dict, best: dict[str, float], path: Path) -> None:
    """Held-out loss of each arm at its best rate against tokens and against training FLOPs (mean over seeds,
    band = min..max over seeds), drop_upcycled against the arms it starts from in a panel of its own (it starts
    nats above them, which would flatten the others), and the sweep's final loss against the learning rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(19, 4.5))
    by_tokens, by_flops, drop_ax, sweep_ax = fig.subplots(1, 4)
    colors = {"dense": "tab:blue", "upcycled": "tab:orange", "drop_upcycled": "tab:red", "dense_matched": "tab:green"}
    for arm, by_seed in runs.items():
        if not by_seed:
            continue
        rows = list(by_seed.values())
        steps = sorted(set.intersection(*(set(dict(r["eval_curve"])) for r in rows)))
        values = [[dict(r["eval_curve"])[s] for r in rows] for s in steps]
        mean = [statistics.fmean(v) for v in values]
        per_step = rows[0]["tokens_seen"] / rows[0]["steps"]
        per_token = rows[0]["flops"] / rows[0]["tokens_seen"]
        panels = [(drop_ax, per_step)] if arm in ("dense", "upcycled", "drop_upcycled") else []
        if arm != "drop_upcycled":
            panels += [(by_tokens, per_step), (by_flops, per_step * per_token)]
        for ax, scale in panels:
            x = [s * scale for s in steps]
            ax.plot(x, mean, "o-", color=colors[arm], markersize=3, label=f"{arm} (lr {rows[0]['lr']:g}, {len(rows)} seeds)")
            ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=colors[arm], alpha=0.2)
    by_tokens.set_xlabel("training tokens")
    drop_ax.set_xlabel("training tokens")
    by_flops.set_xlabel("training FLOPs")
    for ax in (by_tokens, by_flops, drop_ax):
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    by_tokens.set_title("equal tokens (band: min..max over seeds)")
    by_flops.set_title("equal compute")
    drop_ax.set_title("Drop-Upcycling vs its starting points")
    for arm, by_lr in sweep.items():
        lrs = sorted(by_lr)
        sweep_ax.plot(lrs, [by_lr[lr]["final_loss"] for lr in lrs], "o-", color=colors[arm], label=arm)
        sweep_ax.plot([best[arm]], [by_lr[best[arm]]["final_loss"]], "*", color=colors[arm], markersize=12)
    sweep_ax.set_xscale("log")
    sweep_ax.set_yscale("log")
    sweep_ax.set_xlabel("learning rate")
    sweep_ax.set_ylabel("final held-out loss, sweep seed (log)")
    sweep_ax.set_title("learning-rate sweep")
    sweep_ax.grid(alpha=0.3)
    sweep_ax.legend(fontsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


# --------------------------------------------------------------------------------------------- the CLI


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=[*PHASES, "all"], default="all")
    parser.add_argument("--report", action="store_true", help="only rebuild the JSON, MD and PNG from the stored runs")
    parser.add_argument("--steps", type=positive(int), default=20)
    parser.add_argument("--batch", type=positive(int), default=4)
    parser.add_argument("--seq-len", type=positive(int), default=128)
    parser.add_argument("--eval-every", type=int, default=10, help="score the held-out blocks every N steps (0: only at the end)")
    parser.add_argument("--eval-ratio", type=float, default=0.1, help="share of documents held out (data.eval_ratio)")
    parser.add_argument("--lrs", type=positive(float), nargs="+", default=[1e-4, 2e-4, 4e-4], help="the sweep's learning rates")
    parser.add_argument("--drop-lrs", type=positive(float), nargs="*", default=[8e-4, 1.6e-3], help="drop_upcycled's further sweep rates")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--balance-coef", type=float, default=0.01, help="router balance loss of the upcycled runs")
    parser.add_argument("--mix-seed", type=int, default=42, help="data.mix_seed: the held-out split, the same for every run")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="further seeds at each arm's best rate")
    parser.add_argument("--matched-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source", type=Path, help="another dense LLaMA-family model dir (default: the embedded SmolLM2)")
    parser.add_argument("--data", type=Path, help="a text/JSONL file moeforge reads (default: built-in pt-demo)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON/MD/PNG and the runs folder go")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moeforge-upcycle-vs-dense"), help="converted models and run outputs")
    parser.add_argument("--max-units", type=positive(int), help="train at most N units now (the rest on a rerun)")
    args = parser.parse_args()
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if not 0 < args.eval_ratio < 1:
        parser.error(f"--eval-ratio must be between 0 and 1, got {args.eval_ratio}")
    if args.sweep_seed in args.seeds:
        parser.error(f"--seeds must not repeat the sweep seed {args.sweep_seed}")
    args.lrs, args.drop_lrs = sorted(set(args.lrs)), sorted(set(args.drop_lrs))
    args.reproduce_flags = changed_flags(parser, args, REPRODUCED)
    args.runs_dir = args.results_dir / f"{NAME}_runs"
    if args.report:
        report(args, None)
        return

    started = time.perf_counter()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    budget = args.max_units
    for phase in PHASES if args.phase == "all" else (args.phase,):
        units = load_units(args)
        for arm, lr, seed, steps in plan(phase, units, args):
            if stored(units, arm, lr, seed, args, steps) is not None:
                continue
            if budget == 0:
                print("--max-units reached: rerun for the rest (converted models stay under --work)")
                return
            args.work.mkdir(parents=True, exist_ok=True)
            units[unit_name(arm, lr, seed)] = run_unit(arm, lr, seed, steps, args, units)
            budget = None if budget is None else budget - 1
        shutil.rmtree(args.work, ignore_errors=True)  # a phase's conversions (its seeds') serve no other phase
    report(args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
