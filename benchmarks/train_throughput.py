"""Training-step throughput and memory: dense SmolLM2 vs its 8x top-2 upcycled MoE vs a FLOP-matched dense model.

One training step = forward (labels given) + backward + gradient clipping (1.0, as moeforge's training
does) + AdamW step + zero_grad, fp32, on CPU. Every case runs in its own process (clean peak memory) on
the same token batches (built-in pt-demo text, packed into --seq-len blocks), does --warmup untimed
steps (the first one also allocates AdamW's state), then --steps timed ones; the median is reported.

Cases, in one run:
  (a) dense      the embedded SmolLM2-135M-Instruct (FFN 1536).
  (b) moe/<b>    SmolLM2 copy-upcycled to 8 experts top-2 (exact conversion, exported as Mixtral and run by
                 transformers), moeforge router losses attached (balance 0.01), for each experts backend
                 <b> registered with transformers, moeforge's included (set via model.set_experts_implementation). Each backend is
                 first probed on a tiny random Mixtral (forward + backward, loss compared with eager); one
                 that errors is skipped with its error recorded. batched_mm gathers one copy of the expert
                 weights per (token, expert) pair and keeps it for backward; it is skipped, with the
                 estimate as the reason, when that alone would exceed the memory available.
  (c) dense-ffn  a SmolLM2-shaped Llama whose FFN has the MoE's ACTIVE size (intermediate = top_k x 1536 =
                 3072), random init: the same active parameters per token as (b), the FLOP-matched baseline.
  (d) router-only (b) on its fastest backend with everything but the routers frozen (preset: router_only),
                 i.e. training only the parameters an upcycling conversion creates.

Throughput = batch x seq-len tokens / median step time; ratios are against (c) and (a). Memory: the
process's RSS just before the first step (weights loaded, free heap returned with malloc_trim; the part
that is file-backed is safetensors pages transformers keeps mapped) and its peak (VmHWM, reset to the
current RSS at that moment via /proc/self/clear_refs) over the warm-up and timed steps; the delta is
what training adds: gradients, AdamW state, activations.

Allocator: children run with glibc's MALLOC_MMAP_MAX_=0 and a huge MALLOC_TRIM_THRESHOLD_, so memory
freed after a step is reused by the next one instead of being unmapped and faulted in again. On the
2-core VM this was written on, the default allocator made identical dense steps (4 x 32 tokens) take 1.3
to 18 s (fresh pages are slow to fault in there); tuned, they took 1.0 s +- 3%. The peak RSS is the same
either way (MoE grouped_mm, 4 x 128: 15.4 GB default, 15.2 GB tuned). --system-malloc times the default.

Memory: the MoE cases need ~16-18 GB at the default 4 x 256 (fp32 weights 2.8 GB + gradients 2.8 GB +
AdamW state 5.5 GB + activations); --seq-len 128 saves ~1-2 GB. Expected wall time of the default run on
2 idle cores: ~7 min (conversion ~1 min, five cases of 1 + 5 steps); other load on the machine stretches it.

    python benchmarks/train_throughput.py [--batch 4 --seq-len 256 --warmup 1 --steps 5 --threads N]
Results: benchmarks/results/train_throughput.json and train_throughput.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
NUM_EXPERTS, TOP_K = 8, 2
LEARNING_RATE = 1e-5


# ------------------------------------------------------------------------------------------ child side


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _build(case: dict):
    from transformers import AutoConfig, LlamaForCausalLM

    from moeforge.config.train_recipe import PRESETS
    from moeforge.io.loading import load_model
    from moeforge.routing import RouterLossConfig, attach_router_losses
    from moeforge.training.freeze import apply_freeze

    dtype = getattr(torch, case.get("dtype", "float32"))
    if case["kind"] == "dense_ffn":
        config = AutoConfig.from_pretrained(case["source"])
        config.intermediate_size = case["intermediate_size"]
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        model, _ = load_model(case["source"], dtype=dtype)
    model.to(case.get("device", "cpu"))
    if case["kind"] == "moe":
        model.set_experts_implementation(case["backend"])
        attach_router_losses(model, RouterLossConfig())
    if case.get("router_only"):
        apply_freeze(model, PRESETS["router_only"])
    return model


def _parameter_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inactive = 0
    for name, module in model.named_modules():
        if name.endswith(".experts") and hasattr(module, "num_experts"):
            size = sum(p.numel() for p in module.parameters())
            inactive += size - size * TOP_K // module.num_experts
    return {"total": total, "trainable": trainable, "active_per_token": total - inactive}


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to return


def run_case(case: dict) -> dict:
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    device = torch.device(case.get("device", "cpu"))
    blocks = torch.load(case["tokens"]).to(device)
    model = _build(case)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    batch = case["batch"]
    n = blocks.shape[0]

    def step(i: int) -> float:
        rows = [(i * batch + j) % n for j in range(batch)]
        ids = blocks[rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    gc.collect()
    _trim_heap()
    rss_before = _status_kb("VmRSS") * 1024
    rss_file_before = _status_kb("RssFile") * 1024
    peak_reset = _reset_peak_rss()
    losses, seconds = [], []
    for i in range(case["warmup"] + case["steps"]):
        start = time.perf_counter()
        losses.append(step(i))  # .item() waits for the device
        if i >= case["warmup"]:
            seconds.append(time.perf_counter() - start)
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "gpu_peak_allocated_bytes": gpu_peak,
        "step_seconds": [round(s, 3) for s in seconds],
        "losses": [round(v, 4) for v in losses],
        "rss_before_bytes": rss_before,
        "rss_file_before_bytes": rss_file_before,
        "peak_rss_bytes": _status_kb("VmHWM") * 1024,
        "peak_reset": peak_reset,
        "parameters": _parameter_counts(model),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------- parent side


def make_token_blocks(source: Path, seq_len: int, path: Path) -> int:
    """pt-demo text packed (EOS-separated) into ``seq_len`` blocks, saved as one int64 tensor."""
    from moeforge.data import pack_texts
    from moeforge.data.builtin import builtin_dataset
    from moeforge.io.loading import load_tokenizer

    blocks = pack_texts(builtin_dataset("pt-demo"), load_tokenizer(source), seq_len)
    tensor = torch.tensor(blocks["input_ids"], dtype=torch.long)
    torch.save(tensor, path)
    return tensor.shape[0]


def probe_backends() -> dict[str, dict]:
    """Every experts backend transformers registers, tried on a tiny random Mixtral on CPU (fp32):
    forward + backward, loss compared with eager's on the same weights and tokens."""
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    import moeforge  # noqa: F401  (registers moeforge's experts backends)

    config = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).float()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = None
    probes = {}
    for backend in ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]:
        try:
            model.set_experts_implementation(backend)
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            reference = loss.item() if backend == "eager" else reference
            probes[backend] = {"ok": True, "loss_diff_vs_eager": abs(loss.item() - reference)}
        except Exception as error:  # noqa: BLE001 - any failure means the backend is not usable here
            text = str(error).strip().splitlines()
            probes[backend] = {"ok": False, "error": f"{type(error).__name__}: {text[0] if text else ''}"}
    return probes


def batched_mm_bytes(layers: int, tokens: int, hidden: int, ffn: int) -> int:
    """What batched_mm's per-(token, expert) weight gathers hold for backward over all layers (fp32)."""
    return layers * tokens * TOP_K * 3 * hidden * ffn * 4


def available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}


def run_child(case: dict, system_malloc: bool) -> dict:
    env = dict(os.environ) if system_malloc else {**os.environ, **TUNED_MALLOC}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    if done.returncode < 0:
        return {"error": f"killed by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9 else "")}
    if done.returncode or not lines:
        errors = [line for line in done.stderr.strip().splitlines() if "Error" in line] or done.stderr.strip().splitlines()
        return {"error": f"exit {done.returncode}: {(errors or ['(no output)'])[-1][:300]}"}
    return json.loads(lines[-1])


def convert_moe(source: Path, output: Path) -> float:
    from moeforge.config.recipe import parse_recipe
    from moeforge.conversion import convert

    start = time.perf_counter()
    recipe = parse_recipe(
        {
            "source": str(source),
            "output": str(output),
            "moe": {"num_experts": NUM_EXPERTS, "top_k": TOP_K},
            "dtype": "float32",
            "fidelity": {"check": False},
        }
    )
    convert(recipe, overwrite=True, log=lambda _line: None)
    return time.perf_counter() - start


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first allocates AdamW state)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--backends", default="all", help="comma-separated experts backends, or 'all' registered")
    parser.add_argument("--source", type=Path, help="another dense LLaMA-family model dir (default: the embedded SmolLM2)")
    parser.add_argument("--moe-dir", type=Path, help="reuse an fp32 8x top-2 Mixtral upcycled from the source (skips converting)")
    parser.add_argument("--no-router-only", action="store_true", help="skip case (d)")
    parser.add_argument("--system-malloc", action="store_true", help="children use glibc malloc's defaults (see above)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs: see benchmarks/README.md)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute dtype")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for --dtype (H100 SXM bf16: 989): adds MFU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))), flush=True)
        return

    from transformers import AutoConfig

    from moeforge.io.embedded import default_model_dir

    wall_start = time.perf_counter()
    source = args.source or default_model_dir()
    dense_config = AutoConfig.from_pretrained(source)
    tokens = args.batch * args.seq_len
    work = Path(tempfile.mkdtemp(prefix="moeforge-train-throughput-"))
    try:
        blocks_file = work / "tokens.pt"
        n_blocks = make_token_blocks(source, args.seq_len, blocks_file)
        print(
            f"data: pt-demo packed into {n_blocks} blocks of {args.seq_len} tokens; batch {args.batch} x {args.seq_len} = "
            f"{tokens} tokens/step, {args.warmup} warm-up + {args.steps} timed steps per case",
            flush=True,
        )
        probes = probe_backends()
        print(
            "experts backends (probe on a tiny Mixtral): " + ", ".join(f"{b} {'ok' if p['ok'] else 'ERROR'}" for b, p in probes.items()),
            flush=True,
        )
        wanted = list(probes) if args.backends == "all" else [b.strip() for b in args.backends.split(",") if b.strip()]

        if args.moe_dir:
            moe_dir, convert_seconds = args.moe_dir, None
        else:
            moe_dir = work / "moe"
            convert_seconds = convert_moe(source, moe_dir)
            print(f"converted SmolLM2 -> Mixtral 8x top-2 (fp32) in {convert_seconds:.0f}s", flush=True)

        common = {
            "tokens": str(blocks_file),
            "batch": args.batch,
            "warmup": args.warmup,
            "steps": args.steps,
            "threads": args.threads,
            "device": args.device,
            "dtype": args.dtype,
        }
        ffn = dense_config.intermediate_size
        moe_bytes = sum(f.stat().st_size for f in Path(moe_dir).glob("*.safetensors"))  # fp32 weights
        cases: list[tuple[str, str, dict | None, str | None]] = [  # (name, role, case, skip reason)
            (f"(a) dense source (FFN {ffn})", "dense", {"kind": "dense", "source": str(source)}, None),
        ]
        for backend in wanted:
            name = f"(b) MoE 8x top-2, experts={backend}"
            probe = probes.get(backend)
            if probe is None:
                cases.append((name, "moe", None, "not a registered experts backend"))
            elif not probe["ok"]:
                cases.append((name, "moe", None, f"probe failed: {probe['error']}"))
            elif backend == "moeforge_per_token":
                cases.append((name, "moe", None, "a per-pair loop for decoding a few tokens, not for training batches"))
            elif (
                backend == "batched_mm"
                and (gathered := batched_mm_bytes(dense_config.num_hidden_layers, tokens, dense_config.hidden_size, ffn)) + 4 * moe_bytes
                > available_bytes()
            ):
                cases.append(
                    (
                        name,
                        "moe",
                        None,
                        (
                            f"batched_mm would hold ~{gathered / 2**30:,.0f} GiB of gathered expert weights for backward "
                            f"(layers x tokens x top_k x 3 x hidden x ffn x 4 B) on top of ~{4 * moe_bytes / 2**30:.0f} GiB of "
                            f"weights, gradients and AdamW state: more than the {available_bytes() / 2**30:.0f} GiB available"
                        ),
                    )
                )
            else:
                cases.append((name, "moe", {"kind": "moe", "source": str(moe_dir), "backend": backend}, None))
        cases.append(
            (
                f"(c) dense, FFN {TOP_K * ffn} (= MoE active), random init",
                "dense_ffn",
                {"kind": "dense_ffn", "source": str(source), "intermediate_size": TOP_K * ffn},
                None,
            )
        )

        rows = []

        def measure(name: str, role: str, case: dict | None, skip: str | None) -> None:
            row = {"case": name, "role": role, "backend": (case or {}).get("backend")}
            if skip:
                row["skipped"] = skip
            else:
                out = run_child({**case, **common}, args.system_malloc)
                if "error" in out:
                    row["skipped"] = out["error"]
                else:
                    median = statistics.median(out["step_seconds"])
                    row |= out | {"median_step_seconds": round(median, 3), "tokens_per_second": round(tokens / median, 1)}
            rows.append(row)
            shown = row.get("skipped") or f"{row['tokens_per_second']} tok/s, steps {row['step_seconds']} s"
            print(f"{name}: {shown}", flush=True)

        for name, role, case, skip in cases:
            measure(name, role, case, skip)
        if not args.no_router_only:
            moe_rows = [r for r in rows if r["role"] == "moe" and "tokens_per_second" in r]
            if moe_rows:
                best = max(moe_rows, key=lambda r: r["tokens_per_second"])["backend"]
                measure(
                    f"(d) MoE router-only (preset router_only), experts={best}",
                    "router_only",
                    {"kind": "moe", "source": str(moe_dir), "backend": best, "router_only": True},
                    None,
                )
            else:
                measure("(d) MoE router-only", "router_only", None, "no MoE backend ran")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(role: str) -> float | None:
        return next((r["tokens_per_second"] for r in rows if r["role"] == role and "tokens_per_second" in r), None)

    dense_rate, matched_rate = rate("dense"), rate("dense_ffn")
    for row in rows:
        if "tokens_per_second" in row:
            row["vs_flop_matched_dense"] = round(row["tokens_per_second"] / matched_rate, 3) if matched_rate else None
            row["vs_dense"] = round(row["tokens_per_second"] / dense_rate, 3) if dense_rate else None
            row["peak_rss_delta_bytes"] = row["peak_rss_bytes"] - row["rss_before_bytes"] if row["peak_reset"] else None
            if args.peak_tflops:  # PaLM's count: 6 x active parameters + 12 x layers x hidden x seq-len per token
                flops = (
                    6 * row["parameters"]["active_per_token"]
                    + 12 * dense_config.num_hidden_layers * dense_config.hidden_size * args.seq_len
                )
                row["mfu"] = round(row["tokens_per_second"] * flops / (args.peak_tflops * 1e12), 4)

    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": str(args.source) if args.source else "SmolLM2-135M-Instruct (fp32)",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step": f"forward + backward + clip_grad_norm(1.0) + AdamW(lr 1e-5) + zero_grad, {args.dtype}",
        "device": args.device,
        "peak_tflops": args.peak_tflops,
        "malloc": "glibc defaults" if args.system_malloc else TUNED_MALLOC,
        "convert_seconds": round(convert_seconds, 1) if convert_seconds else None,
        "backend_probes": probes,
        "grouped_mm_native": hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")

    def fmt_ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    threads = next((r["threads"] for r in rows if "threads" in r), torch.get_num_threads())
    lines = [
        f"# Training-step throughput, dense vs upcycled MoE ({result['machine']}, {threads} torch threads, "
        f"torch {torch.__version__}, transformers {result['transformers']})",
        "",
        f"Model: {result['model']}. One step: {result['step']}; batch {args.batch} x {args.seq_len} = {tokens} tokens of pt-demo text; "
        f"median of {args.steps} timed steps after {args.warmup} warm-up. Each case in its own process. RSS before = "
        "weights loaded (file-backed: safetensors pages still mapped); peak delta = peak RSS over the steps minus that "
        "(gradients, AdamW state, activations). "
        + ("glibc malloc defaults." if args.system_malloc else "glibc malloc tuned to reuse freed memory (see the script)."),
        "",
        "| case | params total / trainable / active per token (M) | step s: median (min-max) | tokens/s | vs (c) FLOP-matched | vs (a) dense | RSS before, MiB (file-backed) | peak RSS delta (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} | | | | | | |")
            continue
        p = r["parameters"]
        lines.append(
            f"| {r['case']} | {p['total'] / 1e6:.1f} / {p['trainable'] / 1e6:.2f} / {p['active_per_token'] / 1e6:.1f} | "
            f"{r['median_step_seconds']:.2f} ({min(r['step_seconds']):.2f}-{max(r['step_seconds']):.2f}) | "
            f"{r['tokens_per_second']:.0f} | {fmt_ratio(r['vs_flop_matched_dense'])} | {fmt_ratio(r['vs_dense'])} | "
            f"{_mb(r['rss_before_bytes'])} ({_mb(r['rss_file_before_bytes'])}) | {_mb(r['peak_rss_delta_bytes'])} |"
        )
    gpu = [r for r in rows if r.get("gpu_peak_allocated_bytes")]
    if gpu:
        lines += ["", "| case | GPU peak allocated (MiB) | MFU |", "|---|---|---|"]
        lines += [f"| {r['case']} | {_mb(r['gpu_peak_allocated_bytes'])} | {r.get('mfu', '-')} |" for r in gpu]
    failed = [f"{b} ({p['error']})" for b, p in probes.items() if not p["ok"]]
    ok = [f"{b} (|Δloss| vs eager {p['loss_diff_vs_eager']:.1e})" for b, p in probes.items() if p["ok"] and b != "eager"]
    lines += [
        "",
        f"Experts backends probed on a tiny Mixtral (fp32, CPU): usable {', '.join(ok) or 'none besides eager'}; "
        f"failing {', '.join(failed) or 'none'}.",
        "Step times on a shared machine are noisy: compare ratios from the same run only.",
        "",
        "Reproduce: `python benchmarks/train_throughput.py"
        + "".join(
            f" {flag} {value}"
            for flag, value, default in (
                ("--batch", args.batch, 4),
                ("--seq-len", args.seq_len, 256),
                ("--warmup", args.warmup, 1),
                ("--steps", args.steps, 5),
                ("--threads", args.threads, None),
                ("--backends", args.backends, "all"),
                ("--source", args.source, None),
                ("--device", args.device, "cpu"),
                ("--dtype", args.dtype, "float32"),
                ("--peak-tflops", args.peak_tflops, None),
            )
            if value != default
        )
        + (" --system-malloc" if args.system_malloc else "")
        + "`"
        + f" (this run: {result['wall_seconds']:.0f} s wall)",
    ]
    (RESULTS / "train_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
