"""What attention MoE costs next to the dense attention it was made from, measured side by side in one run.

Attention MoE (docs/attention_moe.md) keeps every K/V head and the query projection, and runs attention
only for the KV groups some token of the batch selected. So the expectation is: a prefill or training
batch selects nearly every group and costs dense attention plus the router; one-token decoding (batch 1)
runs attention over the cache for the token's ``top_k`` groups only. This script measures both, fp32 on
CPU, at two shapes (groups = KV heads, scale = number of groups, router zero at top_k = all, which is the
dense function, and N(0, 0.02) below it):

  SmolLM2-135M attention   hidden 576, 9 heads, 3 KV heads, head_dim 64    top_k 1, 2, 3 of 3
  Llama-3-8B attention     hidden 4096, 32 heads, 8 KV heads, head_dim 128 top_k 1, 2, 4, 8 of 8 (one layer)

  (a) prefill, one layer: forward (inference mode) and forward+backward (gradients into the input and every
      parameter, as in full training), batch 1 x 512 and 4 x 128 tokens, sdpa;
  (b) decode, one layer: one new token over a cache of 512, 2048, 8192 earlier tokens (batch 1), the cache
      preallocated and written in place so only the layer's own work is timed; with the share of heads
      whose attention was computed;
  (c) whole model: the embedded SmolLM2 with attention MoE on all 30 layers (its dense weights, routers as
      above) vs the dense model, greedy generate() of --new-tokens after a ~512-token prompt (built-in
      text); prefill time (generate of 1 token) and decode tokens/s ((new - 1) / (t_new - t_1)); and the
      held-out LM loss of each on 4 further blocks of 512 tokens (routers untrained: below top_k = all the
      function is no longer the dense one).

Each case is timed interleaved with its dense counterpart: one warm-up, then the median of --reps rounds
(each round of a decode case is the mean of --inner calls), and the ratio of the fastest rounds next to it;
torch's default thread count unless --threads.

    python benchmarks/attention_moe_cost.py [--reps 11 --inner 20 --new-tokens 64] [--skip-model] [--threads 1]
Results: benchmarks/results/attention_moe_cost.json and attention_moe_cost.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from _timing import timed
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

import moeforge  # noqa: F401  (registers moeforge's architecture)
from moeforge.modeling import AttentionMoeLayerSpec, MoeforgeAttentionMoE, causal_lm_class, moeforge_config

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "SmolLM2": {"hidden": 576, "heads": 9, "kv": 3, "head_dim": 64, "top_ks": (1, 2, 3)},
    "Llama-3-8B": {"hidden": 4096, "heads": 32, "kv": 8, "head_dim": 128, "top_ks": (1, 2, 4, 8)},
}
PREFILLS = ((1, 512), (4, 128))
CACHES = (512, 2048, 8192)
ROUTER_STD = 0.02


def attention_spec(groups: int, top_k: int, scale: float | None = None) -> AttentionMoeLayerSpec:
    """Groups = KV heads, all routed; scale = groups by default (the recipe's ``auto``), so top_k = all with a
    zero router is the dense layer."""
    return AttentionMoeLayerSpec(num_experts=groups, top_k=top_k, scale=float(scale or groups))


def init_routers(model: torch.nn.Module, top_k_is_all: bool, seed: int) -> None:
    """Zero routers where every group is selected (the exact conversion), N(0, 0.02) otherwise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoeforgeAttentionMoE):
                weight = module.head_gate.router.weight
                weight.copy_(torch.zeros_like(weight) if top_k_is_all else torch.randn(weight.shape, generator=generator) * ROUTER_STD)


def layer_cases(shape: dict) -> tuple[dict[str, torch.nn.Module], LlamaRotaryEmbedding]:
    """The dense Llama attention layer and its attention MoE at each top_k, sharing the dense weights."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=shape["hidden"],
        intermediate_size=4 * shape["hidden"],
        num_hidden_layers=1,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        head_dim=shape["head_dim"],
        rope_theta=500000.0,
        max_position_embeddings=16384,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dense = LlamaAttention(config, layer_idx=0)
    cases: dict[str, torch.nn.Module] = {"dense": dense}
    for top_k in shape["top_ks"]:
        moe = MoeforgeAttentionMoE(copy.deepcopy(dense), attention_spec(shape["kv"], top_k))
        init_routers(moe, top_k == shape["kv"], seed=top_k)
        cases[f"top-{top_k}/{shape['kv']}"] = moe
    return cases, LlamaRotaryEmbedding(config)


def computed_share(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of the layer's heads whose attention runs for input ``x`` (1 for the dense layer)."""
    if not isinstance(module, MoeforgeAttentionMoE):
        return 1.0
    with torch.no_grad():
        kv_heads = module._computed_kv_heads(module.head_gate(x))
    kv = module.num_heads // module.num_key_value_groups
    if isinstance(kv_heads, slice):  # consecutive KV heads: a slice of the cache
        return (kv_heads.stop - kv_heads.start) / kv
    return 1.0 if kv_heads is None else len(kv_heads) / kv


class WrittenInPlaceCache:
    """``length`` earlier tokens' keys and values plus one free slot that ``update`` writes the new token
    into: the layer sees a full cache with no concatenation, so only its own work is timed."""

    def __init__(self, kv_heads: int, head_dim: int, length: int, generator: torch.Generator) -> None:
        self.keys = torch.randn(1, kv_heads, length + 1, head_dim, generator=generator)
        self.values = torch.randn(1, kv_heads, length + 1, head_dim, generator=generator)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[:, :, -1:] = key
        self.values[:, :, -1:] = value
        return self.keys, self.values


def prefill_rows(shape_name: str, cases: dict, rope: LlamaRotaryEmbedding, reps: int) -> list[dict]:
    hidden = SHAPES[shape_name]["hidden"]
    rows = []
    for batch, length in PREFILLS:
        x = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(1))
        positions = torch.arange(length)[None].expand(batch, length)
        extra = {"position_embeddings": rope(x, positions), "attention_mask": None}
        with torch.inference_mode():
            reference = cases["dense"](x, **extra)[0]
            diffs = {name: (m(x, **extra)[0] - reference).abs().max().item() for name, m in cases.items()}
        for mode in ("fwd", "fwd+bwd"):
            steps = {name: prefill_step(m, x, extra, mode == "fwd+bwd") for name, m in cases.items()}
            seconds = timed(steps, reps)
            for name, (value, best) in seconds.items():
                row = {
                    "shape": shape_name,
                    "tokens": f"{batch}x{length}",
                    "mode": mode,
                    "case": name,
                    "ms": value * 1e3,
                    "vs_dense": value / seconds["dense"][0],
                    "min_vs_dense": best / seconds["dense"][1],
                    "computed_heads": computed_share(cases[name], x),
                    "max_abs_diff_vs_dense": diffs[name],
                }
                rows.append(row)
                print(
                    f"prefill {shape_name:10s} {batch}x{length:<4d} {mode:7s} {name:9s} {row['ms']:9.2f} ms  "
                    f"{row['vs_dense']:.2f}x dense (min {row['min_vs_dense']:.2f}x)  heads computed {row['computed_heads']:.2f}  max|Δ| {diffs[name]:.1e}",
                    flush=True,
                )
    return rows


def prefill_step(module: torch.nn.Module, x: torch.Tensor, extra: dict, backward: bool) -> Callable[[], None]:
    if not backward:

        def forward() -> None:
            with torch.inference_mode():
                module(x, **extra)

        return forward
    x = x.clone().requires_grad_(True)
    params = [*module.parameters(), x]

    def step() -> None:
        out = module(x, **extra)[0]
        out.backward(torch.ones_like(out))
        for p in params:
            p.grad = None

    return step


def decode_step(module: torch.nn.Module, x: torch.Tensor, cache: WrittenInPlaceCache, extra: dict) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            module(x, cache=cache, **extra)

    return call


def decode_rows(shape_name: str, cases: dict, rope: LlamaRotaryEmbedding, reps: int, inner: int) -> list[dict]:
    shape = SHAPES[shape_name]
    rows = []
    for length in CACHES:
        generator = torch.Generator().manual_seed(length)
        x = torch.randn(1, 1, shape["hidden"], generator=generator)
        position = torch.tensor([[length]])
        caches = {name: WrittenInPlaceCache(shape["kv"], shape["head_dim"], length, generator) for name in cases}
        for cache in list(caches.values())[1:]:  # the same earlier tokens for every case
            cache.keys, cache.values = caches["dense"].keys.clone(), caches["dense"].values.clone()
        extra = {"position_embeddings": rope(x, position), "attention_mask": None}
        seconds = timed({name: decode_step(m, x, caches[name], extra) for name, m in cases.items()}, reps, inner)
        for name, (value, best) in seconds.items():
            row = {
                "shape": shape_name,
                "cache": length,
                "case": name,
                "us": value * 1e6,
                "vs_dense": value / seconds["dense"][0],
                "min_vs_dense": best / seconds["dense"][1],
                "computed_heads": computed_share(cases[name], x),
            }
            rows.append(row)
            print(
                f"decode  {shape_name:10s} cache {length:5d} {name:9s} {row['us']:9.1f} us  {row['vs_dense']:.2f}x dense (min {row['min_vs_dense']:.2f}x)  "
                f"heads computed {row['computed_heads']:.2f}",
                flush=True,
            )
    return rows


def attention_moe_model(dense: torch.nn.Module, top_k: int, scale: float | None = None) -> torch.nn.Module:
    """``dense`` with attention MoE on every layer (its weights; routers per :func:`init_routers`)."""
    config = dense.config
    spec = attention_spec(config.num_key_value_heads, top_k, scale).to_dict()
    moe_config = moeforge_config(config, None, attention_moe_layers=[spec] * config.num_hidden_layers)
    model = causal_lm_class(moe_config)(moe_config)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(key.endswith("head_gate.router.weight") for key in missing), (missing, unexpected)
    init_routers(model, top_k == config.num_key_value_heads, seed=top_k)
    return model.eval()


@torch.inference_mode()
def quality_row(name: str, scale: float, model: torch.nn.Module, held_out: torch.Tensor, reference: torch.Tensor) -> dict:
    logits = model(held_out).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), held_out[:, 1:].reshape(-1))
    row = {
        "case": name,
        "scale": scale,
        "held_out_loss": loss.item(),
        "max_abs_logit_diff": (logits - reference).abs().max().item(),
        "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }
    print(
        f"quality SmolLM2 {name:9s} scale {scale:g}  held-out loss {row['held_out_loss']:.4f}  max|Δlogit| "
        f"{row['max_abs_logit_diff']:.2e}  top-1 agreement {row['top1_agreement']:.3f}",
        flush=True,
    )
    return row


def model_rows(reps: int, new_tokens: int, prompt_tokens: int) -> tuple[list[dict], list[dict], dict]:
    """(c): greedy decoding and held-out loss of SmolLM2 with attention MoE on every layer vs the dense model."""
    from moeforge.data.calibration import builtin_text
    from moeforge.io.embedded import default_model_dir
    from moeforge.io.loading import load_model

    dense, tokenizer = load_model(default_model_dir())
    assert tokenizer is not None
    groups = dense.config.num_key_value_heads
    text_ids = tokenizer(builtin_text(), return_tensors="pt")["input_ids"]
    prompt = text_ids[:, :prompt_tokens]
    held_out = text_ids[:, prompt_tokens : prompt_tokens + 4 * 512].view(4, 512)
    models: dict[str, torch.nn.Module] = {"dense": dense}
    models |= {f"top-{k}/{groups}": attention_moe_model(dense, k) for k in range(groups, 0, -1)}

    with torch.inference_mode():
        reference = dense(held_out).logits
    quality = [quality_row(name, 0 if name == "dense" else groups, m, held_out, reference) for name, m in models.items()]
    for k in range(groups - 1, 0, -1):  # scale = top_k: the selected groups' weights sum to k, about 1 each
        quality.append(quality_row(f"top-{k}/{groups}", k, attention_moe_model(dense, k, scale=k), held_out, reference))

    def generate(model: torch.nn.Module, count: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        return out[0, prompt.shape[1] :].tolist()

    tokens: dict[str, list[int]] = {}
    full = {name: (lambda n=name, m=model: tokens.__setitem__(n, generate(m, new_tokens))) for name, model in models.items()}
    first = {name: (lambda m=model: generate(m, 1)) for name, model in models.items()}
    total = {name: median for name, (median, _) in timed(full, reps).items()}
    prefill = {name: median for name, (median, _) in timed(first, reps).items()}
    dense_rate = (new_tokens - 1) / (total["dense"] - prefill["dense"])
    rows = []
    for name in models:
        rate = (new_tokens - 1) / (total[name] - prefill[name])
        row = {
            "case": name,
            "prefill_ms": prefill[name] * 1e3,
            "prefill_vs_dense": prefill[name] / prefill["dense"],
            "decode_tokens_per_second": rate,
            "decode_vs_dense": rate / dense_rate,
            "generate_seconds": total[name],
            "same_tokens_as_dense": tokens[name] == tokens["dense"],
        }
        rows.append(row)
        print(
            f"model   SmolLM2 {name:9s} prefill {row['prefill_ms']:7.1f} ms ({row['prefill_vs_dense']:.2f}x)  decode "
            f"{rate:5.1f} tok/s ({row['decode_vs_dense']:.2f}x)  same tokens {row['same_tokens_as_dense']}",
            flush=True,
        )
    meta = {"prompt_tokens": prompt.shape[1], "held_out_tokens": held_out.numel(), "layers": dense.config.num_hidden_layers}
    return rows, quality, meta


def write_markdown(meta: dict, prefill: list[dict], decode: list[dict], model: list[dict], quality: list[dict]) -> None:
    lines = [
        f"# Attention MoE vs dense attention ({meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']})",
        "",
        "fp32, CPU, sdpa. Groups = KV heads, all routed, scale = groups; router zero at top_k = all (the dense function), "
        f"N(0, {ROUTER_STD}) below it (untrained). Median of {meta['reps']} interleaved rounds after a warm-up; in brackets the "
        "ratio of the fastest rounds (cores shared with other work: where the two differ, interference moved the figure).",
        "",
        "## (a) One layer, prefill (forward in inference mode; forward+backward into the input and all parameters)",
        "",
        "| shape | tokens | case | heads computed | fwd ms | fwd vs dense (min) | fwd+bwd ms | fwd+bwd vs dense (min) | max abs diff vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in prefill:
        if r["mode"] != "fwd":
            continue
        b = next(
            x for x in prefill if x["mode"] == "fwd+bwd" and (x["shape"], x["tokens"], x["case"]) == (r["shape"], r["tokens"], r["case"])
        )
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['case']} | {r['computed_heads']:.2f} | {r['ms']:.2f} | {r['vs_dense']:.2f} ({r['min_vs_dense']:.2f}) | "
            f"{b['ms']:.2f} | {b['vs_dense']:.2f} ({b['min_vs_dense']:.2f}) | {r['max_abs_diff_vs_dense']:.1e} |"
        )
    lines += [
        "",
        f"## (b) One layer, decode: one token over a cache (batch 1; each round the mean of {meta['inner']} calls)",
        "",
        "| shape | cache | case | heads computed | µs | vs dense (min) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['shape']} | {r['cache']} | {r['case']} | {r['computed_heads']:.2f} | {r['us']:.1f} | {r['vs_dense']:.2f} ({r['min_vs_dense']:.2f}) |"
            for r in decode
        ],
    ]
    if model:
        m = meta["model"]
        dense_loss = quality[0]["held_out_loss"]
        lines += [
            "",
            f"## (c) Whole model: SmolLM2-135M-Instruct, attention MoE on all {m['layers']} layers, greedy, batch 1",
            "",
            f"Prompt {m['prompt_tokens']} tokens of built-in text, {meta['new_tokens']} new tokens, median of {meta['model_reps']} "
            f"rounds; prefill = generate() of 1 token, decode = ({meta['new_tokens']} - 1) / (t_{meta['new_tokens']} - t_1).",
            "",
            "| case | prefill ms | vs dense | decode tok/s | vs dense | same tokens as dense |",
            "|---|---|---|---|---|---|",
            *[
                f"| {r['case']} | {r['prefill_ms']:.0f} | {r['prefill_vs_dense']:.2f} | {r['decode_tokens_per_second']:.1f} | "
                f"{r['decode_vs_dense']:.2f} | {'yes' if r['same_tokens_as_dense'] else 'no'} |"
                for r in model
            ],
            "",
            f"Quality without training: LM loss on the next {m['held_out_tokens']} tokens of the built-in text (4 x 512) and agreement "
            "with the dense logits; scale = groups gives the selected groups about groups/top_k each, scale = top_k (the recipe's `auto`) about 1 each.",
            "",
            "| case | scale | held-out loss | vs dense | max abs Δlogit | top-1 agreement |",
            "|---|---|---|---|---|---|",
            *[
                f"| {r['case']} | {r['scale'] or '-'} | {r['held_out_loss']:.4f} | "
                f"{r['held_out_loss'] - dense_loss:+.4f} | {r['max_abs_logit_diff']:.2e} | {r['top1_agreement']:.3f} |"
                for r in quality
            ],
        ]
    lines += ["", f"Reproduce: `{meta['command']}` (this run: {meta['wall_s']:.0f} s wall)", ""]
    (RESULTS / "attention_moe_cost.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--inner", type=int, default=20, help="decode calls per timed round")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--model-reps", type=int, default=3, help="rounds of (c)")
    parser.add_argument("--skip-model", action="store_true", help="layers only: skip (c)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on cores other work shares")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    prefill, decode = [], []
    for shape_name, shape in SHAPES.items():
        cases, rope = layer_cases(shape)
        prefill += prefill_rows(shape_name, cases, rope, args.reps)
        decode += decode_rows(shape_name, cases, rope, args.reps, args.inner)
        del cases
    model, quality, model_meta = ([], [], {}) if args.skip_model else model_rows(args.model_reps, args.new_tokens, args.prompt_tokens)
    wall = time.perf_counter() - started
    meta = {
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shapes": SHAPES,
        "reps": args.reps,
        "inner": args.inner,
        "new_tokens": args.new_tokens,
        "model_reps": args.model_reps,
        "model": model_meta,
        "wall_s": round(wall, 1),
        "command": " ".join(["python", *sys.argv]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_moe_cost.json").write_text(
        json.dumps({"meta": meta, "prefill": prefill, "decode": decode, "model": model, "quality": quality}, indent=2) + "\n"
    )
    write_markdown(meta, prefill, decode, model, quality)
    print(f"wrote benchmarks/results/attention_moe_cost.json and .md ({wall:.0f} s)")


if __name__ == "__main__":
    main()
