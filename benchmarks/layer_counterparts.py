"""MoE-LoRA and MoICE layers against their plain counterparts, one layer at SmolLM2-135M's shapes.

Pairs, same input (batch 4 x 256 tokens, hidden 576, fp32, CPU), forward and forward+backward (backward
into the input and the trainable tensors, as in training):
  FFN        frozen SwiGLU FFN (1536) with PEFT LoRA r=65 on gate/up/down (12.4 M trainable in the full
             model, matching MoE-LoRA below)  vs  MoE-LoRA 8 experts r=8 top-2 on gate/up/down, with
             moeforge's default experts backend (auto: grouped GEMMs) and with eager (a loop over experts).
  attention  Llama attention (9 heads, 3 KV heads, sdpa)  vs  MoICE attention with the 7 default RoPE bases
             (all mixed, as released) and with top-2 bases per token and head; only the routers train.
Ratios are against the plain counterpart, timed interleaved in the same run (median of --reps).

    python benchmarks/layer_counterparts.py [--reps 7]
Results: benchmarks/results/layer_counterparts.json and layer_counterparts.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from _timing import timed
from transformers import LlamaConfig, LlamaForCausalLM

import moeforge  # noqa: F401
from moeforge.adapters.build import apply_adapter
from moeforge.config.adapter import AdapterSpec
from moeforge.config.moice import MoiceSpec
from moeforge.modeling.moice import apply_moice

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, LENGTH = 4, 256
FFN_TARGETS = ["gate_proj", "up_proj", "down_proj"]


def smollm2_layer() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def _randomise_trainable(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)


def ffn_cases(base: LlamaForCausalLM) -> dict[str, torch.nn.Module]:
    lora = apply_adapter(copy.deepcopy(base), AdapterSpec(method="lora", rank=65, alpha=130, dropout=0.0, targets=FFN_TARGETS))
    moe = apply_adapter(copy.deepcopy(base), AdapterSpec(num_experts=8, top_k=2, rank=8, alpha=16, dropout=0.0, targets=FFN_TARGETS))
    moe_eager = copy.deepcopy(moe)
    for model in (lora, moe, moe_eager):
        _randomise_trainable(model)
    moe.config._experts_implementation = "moeforge_auto"
    moe_eager.config._experts_implementation = "eager"
    layer = lambda m: m.base_model.model.model.layers[0].mlp  # noqa: E731
    return {"FFN + LoRA r65": layer(lora), "MoE-LoRA 8x r8 top-2 (auto)": layer(moe), "MoE-LoRA 8x r8 top-2 (eager)": layer(moe_eager)}


def attention_cases(base: LlamaForCausalLM) -> dict[str, torch.nn.Module]:
    plain = copy.deepcopy(base)
    for p in plain.parameters():
        p.requires_grad_(False)
    cases = {"attention (sdpa)": plain.model.layers[0].self_attn}
    for label, spec in (("MoICE 7 bases (all)", MoiceSpec()), ("MoICE 7 bases, top-2", MoiceSpec(topk=2))):
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        apply_moice(model, spec, seed=0)
        cases[label] = model.model.layers[0].self_attn
    return cases


def make_step(module, x: torch.Tensor, backward: bool, extra: dict):
    params = [p for p in module.parameters() if p.requires_grad] + [x]

    def step():
        out = module(x, **extra)
        out = out[0] if isinstance(out, tuple) else out
        if backward:
            out.backward(torch.ones_like(out))
            for p in params:
                p.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    started = time.perf_counter()
    base = smollm2_layer()
    x = torch.randn(BATCH, LENGTH, 576, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    positions = torch.arange(LENGTH)[None].expand(BATCH, LENGTH)
    rope = base.model.rotary_emb(x, positions)
    groups = {
        "ffn": (ffn_cases(base), {}),
        "attention": (attention_cases(base), {"position_embeddings": rope, "attention_mask": None, "position_ids": positions}),
    }
    rows = []
    for group, (cases, extra) in groups.items():
        plain = next(iter(cases))
        for mode in ("fwd", "fwd+bwd"):
            steps = {name: make_step(m, x, mode == "fwd+bwd", extra) for name, m in cases.items()}
            seconds = {name: median for name, (median, _) in timed(steps, args.reps).items()}
            for name, value in seconds.items():
                rows.append({"group": group, "case": name, "mode": mode, "ms": value * 1e3, "vs_plain": value / seconds[plain]})
                print(f"{group:9s} {mode:7s} {name:30s} {value * 1e3:8.1f} ms  {value / seconds[plain]:.2f}x", flush=True)
    wall = time.perf_counter() - started
    meta = {
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": BATCH,
        "length": LENGTH,
        "reps": args.reps,
        "wall_s": round(wall, 1),
        "command": " ".join(["python", *sys.argv]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layer_counterparts.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# MoE-LoRA and MoICE layers vs their plain counterparts ({meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']})",
        "",
        f"One layer at SmolLM2-135M shapes, batch {BATCH} x {LENGTH} tokens, fp32; median of {args.reps} interleaved runs.",
        "",
        "| layer | case | fwd ms | fwd vs plain | fwd+bwd ms | fwd+bwd vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for group, (cases, _) in groups.items():
        for name in cases:
            f, b = (next(r for r in rows if r["group"] == group and r["case"] == name and r["mode"] == m) for m in ("fwd", "fwd+bwd"))
            lines.append(f"| {group} | {name} | {f['ms']:.1f} | {f['vs_plain']:.2f} | {b['ms']:.1f} | {b['vs_plain']:.2f} |")
    lines += ["", f"Reproduce: `{meta['command']}` (this run: {wall:.0f} s wall)", ""]
    (RESULTS / "layer_counterparts.md").write_text("\n".join(lines))
    print(f"wrote benchmarks/results/layer_counterparts.json and .md ({wall:.0f} s)")


if __name__ == "__main__":
    main()
