"""Trainable fraction of MoE-adapter presets on a Llama-2-7B-shaped model, counted, not estimated.

The model is built from its config on the meta device (no weights, no memory), the adapters are put on it
exactly as ``moeforge train`` does (``apply_adapter``), and PEFT's own parameter count is reported. The
presets aim at 0.1%, 0.5%, 1% and 3% of the model (the MoE-adapter users' range: "under 1%" on a
consumer GPU; MixLoRA's published 7B setting is E=8, r=16 with attention LoRA, ~3%).

    python benchmarks/adapter_presets.py          (~10 s; writes benchmarks/results/adapter_presets.{json,md})
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import moeforge  # noqa: F401
from moeforge.adapters.build import apply_adapter
from moeforge.config.adapter import AdapterSpec

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA2_7B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
FFN = ["gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRESETS = {
    "~0.1%": AdapterSpec(num_experts=4, top_k=2, rank=4, targets=["up_proj", "down_proj"], layers=list(range(20, 32))),
    "~0.5%": AdapterSpec(num_experts=4, top_k=2, rank=6, targets=FFN),
    "~1%": AdapterSpec(num_experts=8, top_k=2, rank=6, targets=FFN),
    "~3%": AdapterSpec(num_experts=8, top_k=2, rank=16, targets=FFN + ATTENTION),
}


def count(spec: AdapterSpec) -> tuple[int, int]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LLAMA2_7B)
        adapted = apply_adapter(model, spec)
    return adapted.get_nb_trainable_parameters()


def main() -> None:
    rows = []
    for name, spec in PRESETS.items():
        trainable, total = count(spec)
        rows.append(
            {
                "preset": name,
                "adapter": spec.model_dump(exclude_defaults=True),
                "trainable": trainable,
                "total": total,
                "percent": 100 * trainable / total,
            }
        )
        print(f"{name:>6}: {trainable / 1e6:8.1f} M of {total / 1e9:.2f} B = {100 * trainable / total:.2f}%  {rows[-1]['adapter']}")
    RESULTS.mkdir(exist_ok=True)
    lines = ["| preset | adapter section | trainable | trainable % (of all, as PEFT counts) |", "|---|---|---|---|"]
    lines += [f"| {r['preset']} | `{json.dumps(r['adapter'])}` | {r['trainable'] / 1e6:.1f} M | {r['percent']:.2f}% |" for r in rows]
    for suffix, text in (("json", json.dumps(rows, indent=2)), ("md", "\n".join(lines))):
        tmp = RESULTS / f".adapter_presets.{suffix}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, RESULTS / f"adapter_presets.{suffix}")


if __name__ == "__main__":
    main()
