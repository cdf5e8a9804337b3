"""Per-rank memory and step time of one training run under each multi-process engine, next to ``moeforge
plan``'s per-GPU figures for the same recipe.

Cases, one run, same model and global batch: one process; DDP; FSDP2 (recipe ``fsdp:``); DeepSpeed ZeRO-2
and ZeRO-3 (the shipped ``configs/deepspeed/zero2.json`` / ``zero3.json``); expert parallelism over all
ranks (``expert_parallel:``). Each runs ``moeforge train`` under torchrun with --processes ranks (gloo on
CPU, nccl on CUDA) for --steps steps. The model: a random Llama of SmolLM2's width with --layers layers,
copy-upcycled by ``moeforge convert`` into --experts experts, top-2 (Mixtral export).

Every rank records its peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of its
RSS peak (VmHWM) over the RSS right after its imports (the Python / torch / transformers runtime, which
``moeforge plan`` does not count). The table shows the largest rank's figure, its ratio to DDP's, the
plan's per-GPU total and the plan's ratio to DDP: the ratios are what the plan claims about sharding.
On CPU the measured figure also holds what a GPU run keeps elsewhere (the tokenizer, datasets, the
engines' host-side buffers), so compare ratios, not bytes; on a GPU compare both.

    python benchmarks/distributed.py [--processes 2 --layers 8 --experts 8 --steps 3 --device cpu]
    torchrun ... benchmarks/distributed.py --rank RECIPE OUT   (what each case runs; not for direct use)
Results: benchmarks/results/distributed.json and distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import yaml

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
ENGINES = {
    "single": {},
    "ddp": {},
    "fsdp2": {"fsdp": {}},
    "zero2": {"deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")},
    "zero3": {"deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.json")},
    "ep": "expert_parallel",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key + ":"))


def rank_main(recipe: str, out: str) -> NoReturn:
    """One rank: train (the library call: the CLI ends a launched rank before returning), write this rank's peak
    memory to OUT/rank<R>.json, then leave as the CLI does (process group closed, no interpreter teardown)."""
    import torch
    import torch.distributed as dist

    from moeforge.config.recipe import load_recipe
    from moeforge.config.train_recipe import TrainRecipe
    from moeforge.training import train

    runtime = _status_kb("VmRSS") * 1024
    train(load_recipe(recipe, model=TrainRecipe))
    rank = int(os.environ.get("RANK", "0"))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_kb("VmHWM") * 1024 - runtime
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_bytes": peak, "runtime_rss_bytes": runtime}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def build_model(root: Path, layers: int, experts: int) -> Path:
    """A random SmolLM2-width Llama (saved with the embedded model's tokenizer) upcycled into ``experts`` x top-2."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moeforge.config.recipe import parse_recipe
    from moeforge.conversion import convert
    from moeforge.io.embedded import default_model_dir

    torch.manual_seed(0)
    dense = root / "dense"
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152
    )
    LlamaForCausalLM(config).save_pretrained(dense)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(dense)
    moe = root / "moe"
    recipe = {"source": str(dense), "output": str(moe), "export": "mixtral", "moe": {"num_experts": experts, "top_k": 2}}
    convert(parse_recipe(recipe), log=lambda _line: None)
    return moe


def write_recipe(path: Path, model: Path, output: Path, engine: str, args: argparse.Namespace) -> Path:
    per_device = args.batch * (args.processes if engine == "single" else 1)
    extra = {"expert_parallel": {"size": args.processes}} if engine == "ep" else ENGINES[engine]
    recipe = {
        "stage": "pt",
        "model": str(model),
        "output": str(output),
        "dtype": args.dtype,
        "data": {"builtin": "pt-demo", "max_length": args.seq_len},
        "router_losses": {"balance_coef": 0.01},
        "training": {
            "max_steps": args.steps,
            "per_device_train_batch_size": per_device,
            "logging_steps": 1,
            "save_steps": 10_000,
            "telemetry_steps": 10_000,
            "report_to": [],
        },
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def planned(recipe: Path, gpus: int) -> dict:
    from moeforge.planning.report import plan_scenarios
    from moeforge.planning.sources import scenarios

    row = plan_scenarios(str(recipe), scenarios(str(recipe), {"sharding": {"gpus": gpus}}), None).primary
    m = row.memory
    return {"weights": m.weights, "gradients": m.gradients, "optimizer": m.optimizer, "activations": m.activations, "total": m.total}


def run_case(engine: str, recipe: Path, out: Path, args: argparse.Namespace) -> dict:
    processes = 1 if engine == "single" else args.processes
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(_free_port())]
    command += [str(Path(__file__).resolve()), "--rank", str(recipe), str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return {"engine": engine, "error": (done.stderr or done.stdout)[-2000:]}
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {"engine": engine, "processes": processes, "seconds": round(seconds, 1), "peak_bytes": max(r["peak_bytes"] for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank and step (one process: batch x processes)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--output", default="distributed")
    args = parser.parse_args()
    if args.rank:
        rank_main(*args.rank)

    root = Path(tempfile.mkdtemp(prefix="moeforge-distributed-"))
    try:
        model = build_model(root, args.layers, args.experts)
        rows = []
        for engine in args.engines.split(","):
            case = root / engine
            case.mkdir()
            recipe = write_recipe(case / "recipe.yaml", model, case / "run", engine, args)
            result = run_case(engine, recipe, case, args)
            result["plan"] = planned(recipe, result.get("processes", 1))
            rows.append(result)
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = next((r for r in rows if r["engine"] == "ddp" and "error" not in r), None)
    lines = [
        f"# Per-rank memory by engine ({args.processes} processes, {device}, {args.layers} layers, {args.experts} experts top-2, "
        f"{args.dtype}, batch {args.batch} x {args.seq_len} per rank, {args.steps} steps)",
        "",
        "`python benchmarks/distributed.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| engine | wall (s) | measured peak / rank (MB) | vs DDP | plan per GPU (MB) | plan vs DDP |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed: {r['error'].splitlines()[-1][:120]} | | | | |")
            continue
        ratio = f"{r['peak_bytes'] / base['peak_bytes']:.2f}" if base else "-"
        plan_ratio = f"{r['plan']['total'] / base['plan']['total']:.2f}" if base else "-"
        lines.append(
            f"| {r['engine']} | {r['seconds']} | {r['peak_bytes'] / 1e6:.0f} | {ratio} | {r['plan']['total'] / 1e6:.0f} | {plan_ratio} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps({"args": vars(args), "device": device, "rows": rows}, indent=2))
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
