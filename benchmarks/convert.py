"""Conversion speed and memory on a multi-GB sharded checkpoint, next to a plain copy of the same bytes.

Generates a random Llama checkpoint (default: 16 layers, hidden 2048, FFN 5632, bf16, ~2.2 GB in
~500 MB shards; TinyLlama-1.1B's shape), then in one run:
  1. plain copy of the source directory (shutil.copyfile per shard, page cache dropped where allowed),
  2. moeforge convert, partition into 8 experts (writes as many bytes as the source), without and
     with the fidelity check (which runs the dense and MoE models layer by layer on calibration tokens),
  3. moeforge convert, copy-upcycling into 4 experts top-2 (writes ~2.9x the source bytes), with the check.
Each conversion runs in its own process; its peak RSS (VmHWM) is compared with the largest source shard.
Throughput = bytes written per second; ratios are conversion throughput / plain-copy throughput.

    python benchmarks/convert.py [--layers 16 --hidden 2048 --ffn 5632 --shard-mb 500]
Results: benchmarks/results/convert.json and convert.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def generate_source(
    path: Path, layers: int, hidden: int, ffn: int, vocab: int, shard_bytes: int, heads: int | None = None, kv_heads: int | None = None
) -> None:
    """A random Llama checkpoint written shard by shard (never whole in memory), with a config.json.
    Heads default to TinyLlama's proportions (head size 64, 4 query heads per KV head)."""
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    heads = heads or hidden // 64
    kv_heads = kv_heads or max(1, heads // 4)
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        dtype="bfloat16",
    ).save_pretrained(path)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        yield "model.embed_tokens.weight", (vocab, hidden)
        kv = kv_heads * (hidden // heads)
        for i in range(layers):
            p = f"model.layers.{i}."
            for name, shape in (
                ("self_attn.q_proj.weight", (hidden, hidden)),
                ("self_attn.k_proj.weight", (kv, hidden)),
                ("self_attn.v_proj.weight", (kv, hidden)),
                ("self_attn.o_proj.weight", (hidden, hidden)),
                ("mlp.gate_proj.weight", (ffn, hidden)),
                ("mlp.up_proj.weight", (ffn, hidden)),
                ("mlp.down_proj.weight", (hidden, ffn)),
            ):
                yield p + name, shape
            yield p + "input_layernorm.weight", (hidden,)
            yield p + "post_attention_layernorm.weight", (hidden,)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (vocab, hidden)

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], path / name, metadata={"format": "pt"})
        files.append(name)
        for key in shards[-1]:
            weight_map[key] = name
        shards[-1] = {}
        sizes[-1] = 0

    for name, shape in tensors():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += nbytes
    flush()
    total = sum((path / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def drop_page_cache() -> None:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not allowed here: all runs then read from a warm cache alike


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def plain_copy(source: Path, target: Path) -> float:
    drop_page_cache()
    start = time.perf_counter()
    target.mkdir()
    for file in sorted(source.iterdir()):
        shutil.copyfile(file, target / file.name)
    os.sync()
    return time.perf_counter() - start


CHILD = """
import json, sys, time, os
from moeforge.config.recipe import parse_recipe
from moeforge.conversion import convert

def status(field):
    return int([l for l in open('/proc/self/status') if l.startswith(field)][0].split()[1]) * 1024

marks = []  # the peak RSS of each phase: from one log line (one layer) to the next

def mark(line):
    marks.append({"log": line.strip(), "phase_peak_rss_bytes": status("VmHWM"), "rss_bytes": status("VmRSS")})
    try:
        open('/proc/self/clear_refs', 'w').write('5')  # resets VmHWM to the current RSS
    except OSError:
        pass  # then each phase's figure is the peak so far

recipe = parse_recipe(json.loads(sys.argv[1]))
start = time.perf_counter()
convert(recipe, log=mark)
os.sync()
seconds = time.perf_counter() - start
peak = max([status("VmHWM")] + [m["phase_peak_rss_bytes"] for m in marks])
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "marks": marks}))
"""


def run_conversion(
    source: Path, output: Path, moe: dict, tokens: int, check: bool, max_shard_size: str = "500MB", code: Path | None = None
) -> dict:
    """One conversion in a fresh process: its time, peak RSS, and the peak of each phase between log lines.
    ``code``: a moeforge source tree to run instead of the installed one (an earlier version, to compare)."""
    drop_page_cache()
    recipe = {
        "source": str(source),
        "output": str(output),
        "moe": moe,
        "max_shard_size": max_shard_size,
        "calibration": {"num_sequences": 2, "sequence_length": tokens},
        "fidelity": {"check": check},
    }
    env = os.environ | ({"PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"} if code else {})
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(recipe)], capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"conversion failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--calibration-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=ROOT / "_work")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    source = args.work / "source"
    print(f"generating a random Llama: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, bf16 ...", flush=True)
    generate_source(source, args.layers, args.hidden, args.ffn, args.vocab, args.shard_mb * 10**6)
    shards = sorted(source.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    source_bytes = dir_bytes(source)
    print(f"source: {source_bytes / 1e9:.2f} GB in {len(shards)} shards (largest {largest / 1e6:.0f} MB)", flush=True)

    copies = []
    for _ in range(3):  # page-cache state makes single copies noisy: take the median of three
        copies.append(plain_copy(source, args.work / "copy"))
        shutil.rmtree(args.work / "copy")
    copy_seconds = statistics.median(copies)
    copy_rate = source_bytes / copy_seconds
    print(f"plain copy: {copy_seconds:.1f} s median of {[round(c, 2) for c in copies]} ({copy_rate / 1e6:.0f} MB/s)", flush=True)

    partition = {"num_experts": 8, "top_k": 2, "init": "partition"}
    cases = {
        # analytic scale: nothing fitted, so with the check off nothing is run (a pure streaming rewrite)
        "partition 8 experts top-2, analytic scale, no fidelity check (same bytes as source)": ({**partition, "scale": "analytic"}, False),
        "partition 8 experts top-2, fitted scale + fidelity check": (partition, True),
        "copy 4 experts top-2 + fidelity check": ({"num_experts": 4, "top_k": 2, "init": "copy"}, True),
    }
    rows = []
    for name, (moe, check) in cases.items():
        output = args.work / "out"
        measured = run_conversion(source, output, moe, args.calibration_tokens, check)
        written = dir_bytes(output)
        shutil.rmtree(output)
        rate = written / measured["seconds"]
        row = {
            "case": name,
            "seconds": round(measured["seconds"], 2),
            "bytes_written": written,
            "throughput_mb_s": round(rate / 1e6, 1),
            "throughput_vs_plain_copy": round(rate / copy_rate, 3),
            "peak_rss_mb": round(measured["peak_rss_bytes"] / 1e6),
            "peak_rss_vs_largest_shard": round(measured["peak_rss_bytes"] / largest, 2),
            "rss_target_mb": round((2 * largest + 2**30) / 1e6),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "source": {
            "layers": args.layers,
            "hidden": args.hidden,
            "ffn": args.ffn,
            "vocab": args.vocab,
            "dtype": "bfloat16",
            "bytes": source_bytes,
            "shards": len(shards),
            "largest_shard_bytes": largest,
        },
        "calibration_tokens": args.calibration_tokens,
        "plain_copy": {
            "seconds": round(copy_seconds, 2),
            "runs": [round(c, 2) for c in copies],
            "throughput_mb_s": round(copy_rate / 1e6, 1),
        },
        "conversions": rows,
        "targets": {"throughput_vs_plain_copy": ">= 0.5", "peak_rss": "<= 2 x largest shard + 1 GiB"},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "convert.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Conversion benchmark ({result['machine']}, torch {torch.__version__})",
        "",
        f"Source: random Llama, {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, bf16, "
        f"{source_bytes / 1e9:.2f} GB in {len(shards)} shards (largest {largest / 1e6:.0f} MB). "
        f"Plain copy (shutil.copyfile, median of 3): {copy_seconds:.1f} s, {copy_rate / 1e6:.0f} MB/s. Calibration: 2 sequences of {args.calibration_tokens} tokens.",
        "",
        "| case | time (s) | written (GB) | throughput vs plain copy | peak RSS (MB) | RSS / largest shard | RSS target (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['seconds']} | {r['bytes_written'] / 1e9:.2f} | {r['throughput_vs_plain_copy']:.2f} | "
            f"{r['peak_rss_mb']} | {r['peak_rss_vs_largest_shard']} | {r['rss_target_mb']} |"
        )
    lines += ["", "Reproduce: `python benchmarks/convert.py`"]
    (RESULTS / "convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
