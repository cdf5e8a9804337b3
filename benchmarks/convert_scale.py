"""Conversion at Llama-3-8B scale: peak RSS against layer size and layer count, and throughput.

Per-layer memory is what decides whether a conversion fits, so the source is a random checkpoint with
Llama-3-8B's shapes (hidden 4096, FFN 14336, 32 heads, 8 KV heads, vocabulary 128256, bf16) but only a
few layers (default 1, 2 and 4). Each source is converted, each conversion in its own process:
  - copy-upcycling into 8 experts top-2 (Mixtral-style; one MoE layer = 8 x 352 MB = 2.8 GB of bf16),
    with and without the fidelity check (dense and MoE streams run on calibration tokens),
  - 64 fine-grained experts top-8, the LLaMA-MoE v2 way: `init: partition` splits each FFN's 14336 neurons
    into 64 experts of 224 (one MoE layer = the dense FFN's 352 MB), fitted scale + fidelity check, and
    analytic scale without the check (a pure streaming rewrite),
and, for layer size, a half-width FFN source (7168) copied into 8 experts (1.4 GB per MoE layer).
Peak RSS (VmHWM) is compared with the largest source shard (the embedding alone is 1.05 GB here) and
with the target 2 x largest shard + 1 GiB; the peak of each phase (reset between log lines: the tensors
outside the layers, each layer, what follows the last layer) shows whether it grows with the layer count.
Throughput = bytes written per second, next to a plain copy of the source. ``--baseline REV`` also runs
every conversion with moeforge's src/ at that git revision and compares the output shards' sha256.

    python benchmarks/convert_scale.py [--layers 1 2 4] [--half-ffn-layers 2] [--baseline REV]
Results: benchmarks/results/convert_scale.json and .md. Needs ~17 GB of disk under --work (removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from convert import RESULTS, ROOT, dir_bytes, generate_source, plain_copy, run_conversion  # the conversion benchmark's helpers

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
COPY8 = {"num_experts": 8, "top_k": 2, "init": "copy"}
PARTITION64 = {"num_experts": 64, "top_k": 8, "init": "partition"}


def moe_layer_bytes(moe: dict, ffn: int) -> int:
    """Bytes of one converted FFN in bf16: every expert's three matrices plus the router."""
    experts = moe["num_experts"]
    expert_size = ffn // experts if moe["init"] == "partition" else ffn
    return 2 * (experts * 3 * expert_size * HIDDEN + experts * HIDDEN)


def cases(ffn: int, half: bool) -> list[tuple[str, dict, bool]]:
    """(name, moe section, fidelity check) for one source; the half-width source only copies."""
    copy = [("copy 8 top-2 + check", COPY8, True), ("copy 8 top-2, no check", COPY8, False)]
    if half:
        return copy
    return copy + [
        ("partition 64 top-8, fitted scale + check", PARTITION64, True),
        ("partition 64 top-8, analytic scale, no check", {**PARTITION64, "scale": "analytic"}, False),
    ]


def phases(measured: dict) -> dict:
    """Peak RSS per phase (MB) from the child's log marks: until the embeddings and head are written (with
    the streams' inputs; versions without that log line count it in layer 0), each layer, and what follows
    the last layer (the fidelity check's logits, closing the output)."""
    logs = [m["log"] for m in measured["marks"]]
    peaks = [m["phase_peak_rss_bytes"] for m in measured["marks"]]
    layers = [i for i, log in enumerate(logs) if log.startswith("layer ")]
    outside = next((i for i, log in enumerate(logs) if log.startswith("outside the layers")), None)
    return {
        "peak_rss_mb": round(measured["peak_rss_bytes"] / 1e6),
        "outside_layers_peak_rss_mb": round(max(peaks[: outside + 1]) / 1e6) if outside is not None else None,
        "layer_peak_rss_mb": [round(peaks[i] / 1e6) for i in layers],
        "after_layers_peak_rss_mb": round(max(peaks[layers[-1] + 1 :], default=0) / 1e6),
    }


def measure_source(work: Path, layers: int, ffn: int, args: argparse.Namespace, half: bool, baseline: Path | None) -> dict:
    source = work / "source"
    shutil.rmtree(source, ignore_errors=True)
    print(f"generating a random Llama-3-8B-shaped checkpoint: {layers} layers, FFN {ffn} ...", flush=True)
    generate_source(source, layers, HIDDEN, ffn, VOCAB, args.shard_mb * 10**6, HEADS, KV_HEADS)
    shards = sorted(source.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    source_bytes = dir_bytes(source)
    copies = []
    for _ in range(3):  # page-cache state makes single copies noisy: median of three
        copies.append(plain_copy(source, work / "copy"))
        shutil.rmtree(work / "copy")
    copy_rate = source_bytes / statistics.median(copies)
    print(
        f"source: {source_bytes / 1e9:.2f} GB in {len(shards)} shards (largest {largest / 1e6:.0f} MB); plain copy {copy_rate / 1e6:.0f} MB/s",
        flush=True,
    )
    rows = []
    for name, moe, check in cases(ffn, half):
        output = work / "out"
        measured = run_conversion(source, output, moe, args.calibration_tokens, check, args.out_shard)
        largest_out = max(p.stat().st_size for p in output.glob("*.safetensors"))
        written = dir_bytes(output)
        checksums = json.loads((output / "moeforge.json").read_text())["checksums"]
        shutil.rmtree(output)
        rate = written / measured["seconds"]
        row = {
            "case": name,
            "layers": layers,
            "ffn": ffn,
            "fidelity_check": check,
            "moe_layer_mb": round(moe_layer_bytes(moe, ffn) / 1e6),
            "source_gb": round(source_bytes / 1e9, 2),
            "largest_source_shard_mb": round(largest / 1e6),
            "largest_output_shard_mb": round(largest_out / 1e6),
            "seconds": round(measured["seconds"], 1),
            "written_gb": round(written / 1e9, 2),
            "throughput_mb_s": round(rate / 1e6, 1),
            "throughput_vs_plain_copy": round(rate / copy_rate, 3),
            **phases(measured),
            "peak_rss_vs_largest_source_shard": round(measured["peak_rss_bytes"] / largest, 2),
            "rss_target_mb": round((2 * largest + 2**30) / 1e6),
        }
        if baseline is not None and layers in args.baseline_layers:  # the same conversion with the earlier code
            before = run_conversion(source, output, moe, args.calibration_tokens, check, args.out_shard, code=baseline)
            same = json.loads((output / "moeforge.json").read_text())["checksums"] == checksums
            shutil.rmtree(output)
            row["before"] = {"seconds": round(before["seconds"], 1), **phases(before), "identical_shards": same}
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(source)
    return {
        "layers": layers,
        "ffn": ffn,
        "bytes": source_bytes,
        "largest_shard_bytes": largest,
        "plain_copy_mb_s": round(copy_rate / 1e6, 1),
        "rows": rows,
    }


def markdown(result: dict, command: str) -> list[str]:
    lines = [
        f"# Conversion at Llama-3-8B scale ({result['machine']}, torch {result['torch']})",
        "",
        f"Source: random Llama, hidden {HIDDEN}, FFN {FFN} (half-width: {FFN // 2}), {HEADS} heads / {KV_HEADS} KV heads, "
        f"vocabulary {VOCAB}, bf16, source shards of at most {result['source_shard_mb']} MB (the 1.05 GB embedding and head "
        f"each fill one), output shards of {result['output_shard']}. Calibration: 2 sequences of {result['calibration_tokens']} tokens. "
        "Each conversion runs in its own process; peak RSS = VmHWM, per phase reset between log lines "
        "(outer: until the embeddings and head are written, with the streams' inputs; per layer; after: the fidelity "
        "check's logits and closing the output).",
        "",
    ]
    baseline = result.get("baseline")
    header = (
        "| recipe | layers | FFN | layer MoE (MB) | check | time (s) | written (GB) | MB/s | vs plain copy | peak RSS (MB) "
        "| outer / per layer / after (MB) | largest source / output shard (MB) | RSS target (MB) |"
    )
    if baseline:
        header += f" before ({baseline}): time (s), peak RSS (MB), per layer (MB) | same shards (sha256) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for source in result["sources"]:
        for r in source["rows"]:
            line = (
                f"| {r['case']} | {r['layers']} | {r['ffn']} | {r['moe_layer_mb']} | {'yes' if r['fidelity_check'] else 'no'} | "
                f"{r['seconds']} | {r['written_gb']} | {r['throughput_mb_s']:.0f} | {r['throughput_vs_plain_copy']:.2f} | {r['peak_rss_mb']} | "
                f"{r['outside_layers_peak_rss_mb']} / {', '.join(map(str, r['layer_peak_rss_mb']))} / {r['after_layers_peak_rss_mb']} | "
                f"{r['largest_source_shard_mb']} / {r['largest_output_shard_mb']} | {r['rss_target_mb']} |"
            )
            if "before" in r:
                b = r["before"]
                line += f" {b['seconds']}, {b['peak_rss_mb']}, {', '.join(map(str, b['layer_peak_rss_mb']))} | {'yes' if b['identical_shards'] else 'NO'} |"
            lines.append(line)
    return [*lines, "", f"Reproduce: `{command}`"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--half-ffn-layers", type=int, nargs="*", default=[2], help="layer counts of the half-width FFN source")
    parser.add_argument("--shard-mb", type=int, default=500, help="source shard size")
    parser.add_argument("--out-shard", default="500MB", help="output max_shard_size")
    parser.add_argument("--calibration-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=ROOT / "_work_scale")
    parser.add_argument("--output", default="convert_scale", help="results/<output>.json and .md")
    parser.add_argument("--baseline", help="a git revision: also run the conversions with moeforge as it was there")
    parser.add_argument("--baseline-layers", type=int, nargs="*", default=[1, 2, 4], help="layer counts (full width) run with --baseline")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    baseline = None
    if args.baseline:  # that revision's src/, exported next to the checkpoints
        args.work.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", args.baseline, "src"], cwd=ROOT.parent, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(args.work)], input=archive, check=True)
        baseline = args.work / "src"
    sources: list[dict] = []
    runs = [(layers, FFN, False) for layers in args.layers] + [(layers, FFN // 2, True) for layers in args.half_ffn_layers]
    for layers, ffn, half in runs:
        sources.append(measure_source(args.work, layers, ffn, args, half, baseline))
        write_results(args, sources)  # after every source: a long run that is stopped keeps what it measured
    shutil.rmtree(args.work, ignore_errors=True)


def write_results(args: argparse.Namespace, sources: list[dict]) -> None:
    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        "torch": torch.__version__,
        "shape": {"hidden": HIDDEN, "ffn": FFN, "heads": HEADS, "kv_heads": KV_HEADS, "vocab": VOCAB, "dtype": "bfloat16"},
        "source_shard_mb": args.shard_mb,
        "output_shard": args.out_shard,
        "calibration_tokens": args.calibration_tokens,
        "baseline": args.baseline,
        "sources": sources,
        "targets": {"peak_rss": "<= 2 x largest source shard + 1 GiB, and not growing with the layer count"},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python " + " ".join(["benchmarks/convert_scale.py", *sys.argv[1:]])
    lines = markdown(result, command)
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
