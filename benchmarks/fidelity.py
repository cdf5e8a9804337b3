"""Fidelity of every conversion strategy on the embedded SmolLM2-135M-Instruct, in one run.

For each strategy: max |Δlogit|, top-1 agreement and perplexity (dense vs MoE) on the same calibration
text, plus conversion time. Exact strategies must show round-off-level differences; approximate ones
show how far from the dense model training starts.

    python benchmarks/fidelity.py [--sequences 8 --length 128 --calibration-file FILE]
Results: benchmarks/results/fidelity.json and fidelity.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moeforge.config.recipe import parse_recipe
from moeforge.conversion import convert
from moeforge.io.embedded import default_model_dir

RESULTS = Path(__file__).resolve().parent / "results"

STRATEGIES = {
    "copy 8x top-2 (Mixtral)": {"num_experts": 8, "top_k": 2},
    "copy 8x top-2, no renorm": {"num_experts": 8, "top_k": 2, "routing": {"normalize": False}},
    "copy 8x top-2, Drop-Upcycling r=0.5": {"num_experts": 8, "top_k": 2, "copy": {"drop_ratio": 0.5}},
    "copy 8x top-2, noise 0.1": {"num_experts": 8, "top_k": 2, "copy": {"noise": 0.1}},
    "granular 4 copies x 2 shards, top-4": {"num_experts": 8, "top_k": 4, "init": "granular", "granularity": 2},
    "partition 8, top-8 (k = E)": {"num_experts": 8, "top_k": 8, "init": "partition"},
    "partition 8 random, top-2": {"num_experts": 8, "top_k": 2, "init": "partition"},
    "partition 8 kmeans, top-2": {"num_experts": 8, "top_k": 2, "init": "partition", "partition": {"method": "kmeans"}},
    "partition 8 importance, top-2": {"num_experts": 8, "top_k": 2, "init": "partition", "partition": {"method": "importance"}},
    "partition 8 importance, top-2, kmeans router": {
        "num_experts": 8,
        "top_k": 2,
        "init": "partition",
        "partition": {"method": "importance"},
        "routing": {"router_init": "kmeans"},
    },
    "residual: 1 shared + 7 routed top-1": {"num_experts": 7, "top_k": 1, "shared": {"num_experts": 1}},
    "partition 1 shared + 7 routed top-1": {"num_experts": 7, "top_k": 1, "init": "partition", "shared": {"num_experts": 1}},
    "Dense2MoE layers 16,18,..,28, copy 8x top-2": {
        "num_experts": 8,
        "top_k": 2,
        "placement": {"moe_start_layer": 16, "moe_layer_freq": 2},
    },
    "PMoE 4 experts in layers 0-14, 8 in 15-29, gmm gate": {
        "num_experts": {"0-14": 4, "15-29": 8},
        "top_k": 2,
        "routing": {"gate_type": "gmm", "router_init": "kmeans"},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--calibration-file", type=Path)
    args = parser.parse_args()
    source = default_model_dir()
    calibration = {"num_sequences": args.sequences, "sequence_length": args.length}
    if args.calibration_file:
        calibration["file"] = str(args.calibration_file)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="moeforge-fidelity-"))
    try:
        for name, moe in STRATEGIES.items():
            recipe = parse_recipe({"source": str(source), "output": str(work / "out"), "moe": moe, "calibration": calibration})
            start = time.perf_counter()
            result = convert(recipe, overwrite=True, log=lambda _l: None)
            seconds = time.perf_counter() - start
            f = result.fidelity
            row = {
                "strategy": name,
                "export": result.export,
                "exact_by_construction": result.plan.exact,
                "max_abs_logit_diff": f.max_abs_logit_diff,
                "top1_agreement": f.top1_agreement,
                "perplexity_dense": f.perplexity_dense,
                "perplexity_moe": f.perplexity_moe,
                "seconds": round(seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "calibration_tokens": args.sequences * args.length,
        "calibration": str(args.calibration_file or "built-in sample"),
        "torch": torch.__version__,
    }
    (RESULTS / "fidelity.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Conversion fidelity on SmolLM2-135M-Instruct (fp32, {meta['calibration_tokens']} calibration tokens, {meta['calibration']})",
        "",
        "| strategy | export | exact by construction | max abs Δlogit | top-1 agreement | ppl dense | ppl MoE | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['export']} | {'yes' if r['exact_by_construction'] else 'no'} | {r['max_abs_logit_diff']:.2e} | "
            f"{r['top1_agreement'] * 100:.1f}% | {r['perplexity_dense']:.2f} | {r['perplexity_moe']:.2f} | {r['seconds']} |"
        )
    lines += ["", "Reproduce: `python benchmarks/fidelity.py`"]
    (RESULTS / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
