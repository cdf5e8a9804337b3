"""Greedy decoding speed of the upcycled SmolLM2 (8 experts, top-2, native Mixtral export) per experts backend.

Batch 1, a short chat prompt, --new-tokens greedy tokens with transformers' generate() and KV cache, fp32
on CPU. Each backend decodes the same prompt --reps times (interleaved, after one warm-up); the median
tokens/s is reported next to the dense SmolLM2 it was upcycled from, and every backend's tokens are
compared with transformers' eager (an upcycled model with renormalised top-2 equals the dense one, so
all should also match the dense tokens).

    python benchmarks/decode_speed.py [--new-tokens 64 --reps 3]
Results: benchmarks/results/decode_speed.json and decode_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import moeforge  # noqa: F401  (registers moeforge's experts backends)
from moeforge.config.recipe import parse_recipe
from moeforge.conversion import convert
from moeforge.io.embedded import default_model_dir
from moeforge.io.loading import load_model

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ["eager", "grouped_mm", "batched_mm", "moeforge_grouped", "moeforge_per_token", "moeforge_auto"]
PROMPT = "Explain in two sentences why the sky is blue."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    source = default_model_dir()
    with tempfile.TemporaryDirectory() as work:
        moe_dir = Path(work) / "moe"
        recipe = parse_recipe(
            {
                "source": str(source),
                "output": str(moe_dir),
                "moe": {"num_experts": 8, "top_k": 2},
                "dtype": "float32",
                "fidelity": {"check": False},
            }
        )
        convert(recipe, overwrite=True, log=lambda _line: None)
        dense, tokenizer = load_model(source)
        moe, _ = load_model(moe_dir)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]

        def decode(model) -> tuple[float, list[int]]:
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            return time.perf_counter() - start, out[0, ids.shape[1] :].tolist()

        cases = {"dense SmolLM2": (dense, None), **{f"MoE 8x top-2, {b}": (moe, b) for b in BACKENDS}}
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        tokens: dict[str, list[int]] = {}
        for rep in range(args.reps + 1):
            for name, (model, backend) in cases.items():
                if backend:
                    model.set_experts_implementation(backend)
                elapsed, generated = decode(model)
                tokens[name] = generated
                if rep:  # the first round is the warm-up
                    seconds[name].append(elapsed)
    rows = []
    reference = tokens["MoE 8x top-2, eager"]
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append(
            {
                "case": name,
                "seconds": values,
                "tokens_per_second": args.new_tokens / median,
                "same_tokens_as_eager": tokens[name] == reference,
            }
        )
    dense_rate = rows[0]["tokens_per_second"]
    for row in rows:
        row["vs_dense"] = row["tokens_per_second"] / dense_rate
        print(
            f"{row['case']:34s} {row['tokens_per_second']:6.1f} tok/s  {row['vs_dense']:.2f}x dense  same tokens: {row['same_tokens_as_eager']}",
            flush=True,
        )
    wall = time.perf_counter() - started
    meta = {
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "prompt": PROMPT,
        "wall_s": round(wall, 1),
        "command": " ".join(["python", *sys.argv]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Greedy decoding, batch 1 ({meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']})",
        "",
        f"SmolLM2-135M-Instruct and its 8x top-2 upcycled Mixtral, fp32, {args.new_tokens} new tokens, median of {args.reps} interleaved runs.",
        "",
        "| case | tokens/s | vs dense | same tokens as eager |",
        "|---|---|---|---|",
        *[
            f"| {r['case']} | {r['tokens_per_second']:.1f} | {r['vs_dense']:.2f} | {'yes' if r['same_tokens_as_eager'] else 'NO'} |"
            for r in rows
        ],
        "",
        f"Reproduce: `{meta['command']}` (this run: {wall:.0f} s wall)",
        "",
    ]
    (RESULTS / "decode_speed.md").write_text("\n".join(lines))
    print(f"wrote benchmarks/results/decode_speed.json and .md ({wall:.0f} s)")


if __name__ == "__main__":
    main()
