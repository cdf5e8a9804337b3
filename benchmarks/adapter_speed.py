"""Training-step and inference speed of MoE-LoRA (mixture of LoRA experts on the frozen FFN) vs plain PEFT LoRA.

Cases, on the embedded SmolLM2-135M-Instruct (fp32, CPU, torch threads = all cores), in ONE process:
  (a) moe_lora top-2  8 LoRA experts of rank --rank on gate/up/down of every layer, top-2 routing, moeforge's
                      router losses attached (Switch balance, 0.01), as training uses them;
  (b) lora            PEFT's own LoraConfig on gate/up/down of every layer, its rank chosen so that its trainable
                      parameter count is the closest possible to (a)'s (both counts are printed);
  (d) moe_lora top-1  (a) with top_k 1 (same parameters; --no-top1 skips it).
Every adapter uses alpha = 2 x rank (scaling 2, MixLoRA's 16/8) and the AdapterSpec default dropout (0.05).

Training step = forward (labels = inputs) + backward + clip_grad_norm(1.0, as moeforge's training does) +
AdamW (lr 1e-4) + zero_grad. The token batches are the built-in pt-demo text packed into --seq-len blocks,
exactly as benchmarks/train_throughput.py builds them; round i gives every case the same batch. The cases
are interleaved (round i runs every case once, in an order rotated by one each round) so that other load
on the machine hits all of them alike; --warmup rounds are untimed (the first allocates AdamW's state),
then --steps timed rounds. Reported: median and min step time, tokens/s, and the ratios to (b) as
median(a)/median(b), min(a)/min(b) and the median of the per-round ratios a_i/b_i (paired: the same
round saw the same load). Issue target: MoE-LoRA/LoRA <= 1.3x; MixLoRA reports 2.2x for its own code.

Memory (cheap, load-independent): the bytes autograd saves for backward in one training forward
(activations, deduplicated by storage, weights excluded; measured with saved_tensors_hooks), and the
adapter's training state (weights + gradients + AdamW's two moments = 16 B per trainable parameter).
Process RSS is not split per case: all cases share one process (needed for interleaving).

Inference: forward only (eval mode, inference_mode, same batch, full logits), --infer-steps timed after one
warm-up, interleaved likewise, for (a), (b), (d), and the merged models: (b) merged into the weights
(merge_and_unload: a plain dense Llama, i.e. the base model's cost) and (a) exported by
moeforge.adapters.merge.merge_adapter as a native Mixtral (8 experts = the FFN with each expert's deltas
folded in), run by transformers with each experts backend in --merged-backends; the largest |logit|
difference between the adapter model and its merged form is reported as a sanity check.

Allocator: like train_throughput.py, the script re-executes itself with glibc's MALLOC_MMAP_MAX_=0 and a
huge MALLOC_TRIM_THRESHOLD_ (freed memory is reused instead of unmapped and faulted in again; on the
2-core VM that made identical steps vary 1.3-18 s); --system-malloc keeps glibc's defaults.

Expected wall time of the default run (batch 4 x 256, rank 8, 2 + 7 rounds of 3 cases, 1 + 5 inference
rounds of 6 models) on 2 idle cores: ~5 min (measured 274-303 s); other load on the machine stretches it
(the load average at start, after training and at end is recorded, with the git commit measured). Memory:
the process peaks at ~11 GiB during training (four copies of the 0.54 GB model, MoE-LoRA top-2's ~3.5 GiB
of saved activations, and the tuned allocator keeping what the other cases freed) and ~14 GiB in all (the
2.4 GB Mixtral export).

    python benchmarks/adapter_speed.py [--batch 4 --seq-len 256 --rank 8 --experts 8 --warmup 2 --steps 7
                                        --infer-steps 5 --threads N --no-top1 --no-merged
                                        --merged-backends grouped_mm,eager --system-malloc]
Results: benchmarks/results/adapter_speed.json and adapter_speed.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import TUNED_MALLOC, _status_kb, _trim_heap  # noqa: E402  (benchmarks/ helper)

RESULTS = Path(__file__).resolve().parent / "results"
FFN = ["gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 1e-4


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` via a temporary file in the same folder and a rename (no half-written results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def source_revision() -> dict:
    """The git commit measured, and whether src/ differed from it (results from a tree being edited)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "src")
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "src_modified": [line[3:] for line in dirty.splitlines()]}


def token_blocks(seq_len: int) -> torch.Tensor:
    """pt-demo packed (EOS-separated) into ``seq_len`` blocks: train_throughput.py's batches."""
    from moeforge.data import pack_texts
    from moeforge.data.builtin import builtin_dataset
    from moeforge.io.embedded import default_model_dir
    from moeforge.io.loading import load_tokenizer

    blocks = pack_texts(builtin_dataset("pt-demo"), load_tokenizer(default_model_dir()), seq_len)
    return torch.tensor(blocks["input_ids"], dtype=torch.long)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_params_per_rank(base: torch.nn.Module, targets: list[str]) -> int:
    """Trainable parameters of a rank-1 PEFT LoRA on ``targets`` of every layer: sum of in + out features."""
    return sum(getattr(layer.mlp, t).in_features + getattr(layer.mlp, t).out_features for layer in base.model.layers for t in targets)


def matched_rank(target: int, per_rank: int) -> int:
    low = max(1, target // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - target), r))


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one training forward (by storage; parameters excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return tensor
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def interleaved(names: list[str], rounds: int, run) -> dict[str, list[float]]:
    """``run(name, round)`` for every name in every round, order rotated by one each round; seconds per call."""
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            run(name, i)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float], tokens: int) -> dict:
    median = statistics.median(seconds)
    return {
        "seconds": [round(s, 3) for s in seconds],
        "median_s": round(median, 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
        "tokens_per_s": round(tokens / median, 1),
    }


def ratios(a: list[float], b: list[float]) -> dict:
    return {
        "median_ratio": round(statistics.median(a) / statistics.median(b), 3),
        "min_ratio": round(min(a) / min(b), 3),
        "paired_median_ratio": round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of each MoE-LoRA expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=None, help="plain LoRA rank (default: matched to MoE-LoRA's trainable count)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training rounds first")
    parser.add_argument("--steps", type=int, default=7, help="timed training rounds; medians are reported")
    parser.add_argument("--infer-steps", type=int, default=5, help="timed inference rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-top1", action="store_true", help="skip case (d), MoE-LoRA top-1")
    parser.add_argument("--no-merged", action="store_true", help="skip the merged models' inference")
    parser.add_argument("--merged-backends", default="grouped_mm,eager", help="experts backends for the merged Mixtral")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc malloc's defaults (see above)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for adapter_speed.json / .md")
    args = parser.parse_args()
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})

    import moeforge  # noqa: F401  (registers the MOE_LORA PEFT method)
    from moeforge.adapters.build import apply_adapter
    from moeforge.config.adapter import AdapterSpec
    from moeforge.config.router_losses import RouterLossConfig
    from moeforge.io.loading import load_model
    from moeforge.routing.hooks import attach_router_losses

    wall_start = time.perf_counter()
    load_start = os.getloadavg()
    revision = source_revision()
    torch.set_num_threads(args.threads or os.cpu_count())
    blocks = token_blocks(args.seq_len)
    tokens = args.batch * args.seq_len

    def batch(i: int) -> torch.Tensor:
        return blocks[[(i * args.batch + j) % blocks.shape[0] for j in range(args.batch)]]

    print(
        f"data: pt-demo packed into {blocks.shape[0]} blocks of {args.seq_len}; batch {args.batch} x {args.seq_len} = "
        f"{tokens} tokens; {torch.get_num_threads()} torch threads; load avg {load_start}",
        flush=True,
    )

    torch.manual_seed(0)
    base, _ = load_model("default", dtype=torch.float32)
    base.requires_grad_(False)
    moe_specs = {
        "(a) moe_lora top-2": AdapterSpec(
            method="moe_lora", num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=2.0 * args.rank, targets=FFN
        )
    }
    if not args.no_top1 and args.top_k != 1:
        moe_specs["(d) moe_lora top-1"] = moe_specs["(a) moe_lora top-2"].model_copy(update={"top_k": 1})
    models, handles = {}, {}
    for name, spec in moe_specs.items():
        torch.manual_seed(0)
        models[name] = apply_adapter(copy.deepcopy(base), spec)
        handles[name] = attach_router_losses(models[name], RouterLossConfig(balance_coef=0.01))
    moe_count = trainable_count(models["(a) moe_lora top-2"])
    per_rank = lora_params_per_rank(base, FFN)
    lora_rank = args.lora_rank or matched_rank(moe_count, per_rank)
    lora_name = f"(b) lora r={lora_rank}"
    torch.manual_seed(0)
    models[lora_name] = apply_adapter(copy.deepcopy(base), AdapterSpec(method="lora", rank=lora_rank, alpha=2.0 * lora_rank, targets=FFN))
    names = ["(a) moe_lora top-2", lora_name, *(n for n in moe_specs if n.startswith("(d)"))]
    counts = {name: trainable_count(models[name]) for name in names}
    print(
        "trainable parameters: "
        + ", ".join(f"{n} {c:,}" for n, c in counts.items())
        + f" (lora ranks {max(1, moe_count // per_rank)}/{max(1, moe_count // per_rank) + 1} would give "
        f"{max(1, moe_count // per_rank) * per_rank:,}/{(max(1, moe_count // per_rank) + 1) * per_rank:,})",
        flush=True,
    )

    # ---------------------------------------------------------------------------------------- training
    optimizers, losses = {}, {name: [] for name in names}
    for name in names:
        models[name].train()
        params = [p for p in models[name].parameters() if p.requires_grad]
        optimizers[name] = (params, torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0))

    def train_step(name: str, i: int) -> None:
        params, optimizer = optimizers[name]
        ids = batch(i)
        loss = models[name](input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[name].append(round(loss.item(), 4))

    gc.collect()
    _trim_heap()
    train_seconds = interleaved(names, args.warmup + args.steps, train_step)
    training = {}
    for name in names:
        timed = train_seconds[name][args.warmup :]
        training[name] = summary(timed, tokens) | {"trainable_parameters": counts[name], "losses": losses[name]}
        print(
            f"train {name}: median {training[name]['median_s']:.2f} s (min {training[name]['min_s']:.2f}), "
            f"{training[name]['tokens_per_s']:.0f} tok/s; steps {training[name]['seconds']}",
            flush=True,
        )
    for name in names:
        training[name] |= ratios(train_seconds[name][args.warmup :], train_seconds[lora_name][args.warmup :])
    load_mid = os.getloadavg()

    memory = {}
    for name in names:
        memory[name] = {"saved_activation_bytes": saved_activation_bytes(models[name], batch(0)), "adapter_state_bytes": 16 * counts[name]}
        models[name].zero_grad(set_to_none=True)
    for handle in handles.values():
        handle.detach()  # inference below: no losses; and the merge deep-copies the model
    peak_training = _status_kb("VmHWM") * 1024
    for _, optimizer in optimizers.values():
        optimizer.state.clear()  # AdamW moments are not needed for inference
    gc.collect()
    _trim_heap()  # the tuned allocator keeps freed memory; hand the training peak back before the merge

    # --------------------------------------------------------------------------------------- inference
    infer_models = dict(models)
    merged_info: dict[str, dict] = {}
    if not args.no_merged:
        from moeforge.adapters.merge import merge_adapter

        for model in models.values():
            model.eval()
        probe = batch(0)
        with torch.inference_mode():
            reference = {name: models[name](input_ids=probe).logits for name in ("(a) moe_lora top-2", lora_name)}
        start = time.perf_counter()
        dense = copy.deepcopy(models[lora_name]).merge_and_unload()
        merged_info["(b) merged: dense Llama"] = {"merge_s": round(time.perf_counter() - start, 2), "of": lora_name}
        infer_models["(b) merged: dense Llama"] = dense
        start = time.perf_counter()
        mixtral = merge_adapter(copy.deepcopy(models["(a) moe_lora top-2"]))
        merge_s = round(time.perf_counter() - start, 2)
        available = [b.strip() for b in args.merged_backends.split(",") if b.strip()]
        for backend in available:
            key = f"(a) merged: {type(mixtral).__name__} experts={backend}"
            try:
                mixtral.set_experts_implementation(backend)
                with torch.inference_mode():
                    mixtral(input_ids=probe[:1, :8])
            except Exception as error:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
                merged_info[key] = {"skipped": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}
                continue
            # one object, backend switched per call: keeps memory to one export
            infer_models[key] = (mixtral, backend)
            merged_info[key] = {"merge_s": merge_s, "of": "(a) moe_lora top-2"}
        with torch.inference_mode():
            merged_info["(b) merged: dense Llama"]["max_abs_logit_diff"] = float(
                (dense(input_ids=probe).logits - reference[lora_name]).abs().max()
            )
            for key, value in infer_models.items():
                if isinstance(value, tuple):
                    value[0].set_experts_implementation(value[1])
                    merged_info[key]["max_abs_logit_diff"] = float(
                        (value[0](input_ids=probe).logits - reference["(a) moe_lora top-2"]).abs().max()
                    )
        del reference

    for value in infer_models.values():
        (value[0] if isinstance(value, tuple) else value).eval()

    def infer_step(name: str, i: int) -> None:
        value = infer_models[name]
        if isinstance(value, tuple):
            value[0].set_experts_implementation(value[1])
            value = value[0]
        with torch.inference_mode():
            value(input_ids=batch(i))

    gc.collect()
    _trim_heap()
    infer_names = list(infer_models)
    infer_seconds = interleaved(infer_names, 1 + args.infer_steps, infer_step)
    inference = {}
    for name in infer_names:
        inference[name] = summary(infer_seconds[name][1:], tokens) | ratios(infer_seconds[name][1:], infer_seconds[lora_name][1:])
        inference[name] |= merged_info.get(name, {})
        print(
            f"infer {name}: median {inference[name]['median_s']:.3f} s, {inference[name]['tokens_per_s']:.0f} tok/s "
            f"({inference[name]['median_ratio']:.2f}x lora)",
            flush=True,
        )
    skipped = {k: v["skipped"] for k, v in merged_info.items() if "skipped" in v}

    load_end = os.getloadavg()
    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "revision": revision,
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens,
        "vocab_size": base.config.vocab_size,
        "warmup_rounds": args.warmup,
        "timed_rounds": args.steps,
        "infer_rounds": args.infer_steps,
        "moe_lora": {
            "experts": args.experts,
            "top_k": args.top_k,
            "rank": args.rank,
            "alpha": 2.0 * args.rank,
            "targets": FFN,
            "router_losses": "balance 0.01 (attach_router_losses)",
        },
        "lora": {
            "rank": lora_rank,
            "alpha": 2.0 * lora_rank,
            "targets": FFN,
            "params_per_rank": per_rank,
            "rank_matched": args.lora_rank is None,
        },
        "step": "forward(labels) + backward + clip_grad_norm(1.0) + AdamW(lr 1e-4) + zero_grad, fp32",
        "malloc": "glibc defaults" if args.system_malloc else TUNED_MALLOC,
        "load_avg": {"start": load_start, "after_training": load_mid, "end": load_end},
        "peak_rss_bytes": {"training": peak_training, "whole_run": _status_kb("VmHWM") * 1024},
        "training": training,
        "memory": memory,
        "inference": inference,
        "inference_skipped": skipped,
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    write_atomic(args.output / "adapter_speed.json", json.dumps(result, indent=2) + "\n")
    md = markdown(result, args, lora_name)
    write_atomic(args.output / "adapter_speed.md", md)
    print(md)


def markdown(r: dict, args, lora_name: str) -> str:
    a = r["training"]["(a) moe_lora top-2"]
    mib = 2**20
    lines = [
        f"# MoE-LoRA vs LoRA: training-step and inference speed ({r['machine']}, {r['torch_threads']} torch threads, "
        f"torch {r['torch']}, transformers {r['transformers']}, peft {r['peft']})",
        "",
        f"Model: {r['model']}. Batch {r['batch']} x {r['seq_len']} = {r['tokens_per_step']} tokens of pt-demo text, the same "
        f"batch for every case in a round. Training step: {r['step']}. Cases interleaved (order rotated each round); "
        f"{r['warmup_rounds']} untimed + {r['timed_rounds']} timed rounds. MoE-LoRA: {r['moe_lora']['experts']} experts, "
        f"rank {r['moe_lora']['rank']} each, on gate/up/down of all 30 layers, alpha 2 x rank, router balance loss 0.01. "
        f"LoRA: PEFT LoraConfig on gate/up/down, rank {r['lora']['rank']} "
        + ("(matched: closest trainable count to MoE-LoRA's)" if r["lora"]["rank_matched"] else "(--lora-rank)")
        + f", alpha 2 x rank. Load average (1/5/15 min) at start {fmt_load(r['load_avg']['start'])}, after training "
        f"{fmt_load(r['load_avg']['after_training'])}, at end {fmt_load(r['load_avg']['end'])} (2 cores shared with other work). "
        f"Code: commit {r['revision']['commit']}"
        + (f", src/ modified: {', '.join(r['revision']['src_modified'])}." if r["revision"]["src_modified"] else ", src/ clean."),
        "",
        "## Training step",
        "",
        "| case | trainable params | vs (a) | step s: median (min-max) | tokens/s | vs LoRA: median / min / paired | saved activations MiB | adapter state MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in r["training"].items():
        m = r["memory"][name]
        lines.append(
            f"| {name} | {t['trainable_parameters']:,} | {t['trainable_parameters'] / a['trainable_parameters']:.3f} | "
            f"{t['median_s']:.2f} ({t['min_s']:.2f}-{t['max_s']:.2f}) | {t['tokens_per_s']:.0f} | "
            f"{t['median_ratio']:.2f} / {t['min_ratio']:.2f} / {t['paired_median_ratio']:.2f} | "
            f"{m['saved_activation_bytes'] / mib:,.0f} | {m['adapter_state_bytes'] / mib:,.0f} |"
        )
    lines += [
        "",
        f"**MoE-LoRA (top-{r['moe_lora']['top_k']}) / LoRA step time: {a['median_ratio']:.2f}x** (median of each; "
        f"min/min {a['min_ratio']:.2f}x, median of per-round ratios {a['paired_median_ratio']:.2f}x). "
        "Issue target <= 1.3x; MixLoRA measures 2.2x for its implementation.",
        "",
        "Saved activations = bytes autograd keeps for backward in one training forward (deduplicated by storage, "
        f"weights excluded; includes the {r['batch']} x {r['seq_len']} x {r['vocab_size']} fp32 logits, "
        f"{r['batch'] * r['seq_len'] * r['vocab_size'] * 4 / mib:,.0f} MiB, common to all). Adapter state = "
        "16 B per trainable parameter (fp32 weight, gradient, two AdamW moments).",
        "",
        "## Inference (forward only, eval mode, full logits)",
        "",
        "| model | forward s: median (min-max) | tokens/s | vs LoRA (unmerged): median / min / paired | max abs logit diff vs adapter |",
        "|---|---|---|---|---|",
    ]
    for name, t in r["inference"].items():
        diff = t.get("max_abs_logit_diff")
        lines.append(
            f"| {name} | {t['median_s']:.3f} ({t['min_s']:.3f}-{t['max_s']:.3f}) | {t['tokens_per_s']:.0f} | "
            f"{t['median_ratio']:.2f} / {t['min_ratio']:.2f} / {t['paired_median_ratio']:.2f} | "
            f"{'-' if diff is None else f'{diff:.1e}'} |"
        )
    for name, why in r["inference_skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | |")
    lines += [
        "",
        "Step times on a shared machine are noisy: compare the ratios from one run (the cases ran interleaved).",
        "",
        "Reproduce: `python benchmarks/adapter_speed.py"
        + "".join(
            f" {flag} {value}"
            for flag, value, default in (
                ("--batch", args.batch, 4),
                ("--seq-len", args.seq_len, 256),
                ("--rank", args.rank, 8),
                ("--experts", args.experts, 8),
                ("--top-k", args.top_k, 2),
                ("--lora-rank", args.lora_rank, None),
                ("--warmup", args.warmup, 2),
                ("--steps", args.steps, 7),
                ("--infer-steps", args.infer_steps, 5),
                ("--threads", args.threads, None),
                ("--merged-backends", args.merged_backends, "grouped_mm,eager"),
            )
            if value != default
        )
        + "".join(
            f" {flag}"
            for flag, on in (("--no-top1", args.no_top1), ("--no-merged", args.no_merged), ("--system-malloc", args.system_malloc))
            if on
        )
        + f"` (this run: {r['wall_seconds']:.0f} s wall; process peak RSS {r['peak_rss_bytes']['training'] / 2**30:.1f} GiB "
        f"during training, {r['peak_rss_bytes']['whole_run'] / 2**30:.1f} GiB in all)",
    ]
    return "\n".join(lines) + "\n"


def fmt_load(load) -> str:
    return "/".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    main()
