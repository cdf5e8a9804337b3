"""moeforge's streaming ShardedWriter against the simple alternative: one ``safetensors.torch.save_file`` per shard.

The streaming writer puts every tensor on disk behind a reserved header, on a writer thread and a checksum
thread, and compacts small shards afterwards. The alternative (:class:`SaveFileShardWriter`, defined here)
collects a shard's tensors, ``save_file``s them, checksums the file and lets them go. Two measurements:
  1. the writers alone: the same synthetic stream of Llama-like bf16 tensors (default 14 layers, hidden
     2048, FFN 5632, vocab 32000: ~1.5 GB in 400 MB shards) with index and sha256 per shard; runs
     alternate between the writers, median of 3, each in a fresh process (peak RSS = its VmHWM); a third
     process only produces the stream. Both outputs must hold the same tensors in the same shards;
  2. the writers inside a conversion, the case that needs the most memory in ``benchmarks/convert.py``
     (copy into 4 experts top-2 + fidelity check, 500 MB shards, default 8 layers), once per writer,
     against the project's target: peak RSS under 2 x largest source shard + 1 GiB.

    python benchmarks/shard_writer.py [--layers 14 --shard-mb 400 --repeats 3 --convert-layers 8]
Results: benchmarks/results/shard_writer.json and shard_writer.md.
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
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WRITERS = ("streaming (moeforge)", "save_file per shard")


class SaveFileShardWriter:
    """The alternative under test, with the API the pipeline uses: add, close (→ shard paths, index,
    ``checksums``) and a context manager that removes partial output on error."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.checksums: dict[str, str] = {}
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._written: list[Path] = []
        self._shard_of: dict[str, int] = {}
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        # owned and compact, unless it already is: safetensors refuses views and storage shared within a file
        tensor = tensor.detach().to("cpu")
        storage = tensor.untyped_storage()
        shared = any(t.untyped_storage().data_ptr() == storage.data_ptr() for t in self._shard.values())
        if shared or not tensor.is_contiguous() or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if self._shard and self._shard_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self._shard[name] = tensor
        self._shard_bytes += tensor.nbytes
        self._shard_of[name] = len(self._written)
        self._total += tensor.nbytes

    def _flush(self) -> None:
        self._written.append(self.directory / f".shard-{len(self._written) + 1:05d}.tmp")
        save_file(self._shard, self._written[-1], metadata={"format": "pt"})
        self._shard, self._shard_bytes = {}, 0

    def close(self) -> list[Path]:
        from moeforge.io.safetensors_writer import sha256_file

        self._flush()
        n = len(self._written)
        final = [self.directory / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        final = final if n > 1 else [self.directory / "model.safetensors"]
        for provisional, path in zip(self._written, final, strict=True):
            os.replace(provisional, path)
            self.checksums[path.name] = sha256_file(path)
        if n > 1:
            weight_map = {name: final[i].name for name, i in sorted(self._shard_of.items())}
            index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final

    def __enter__(self) -> SaveFileShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            for path in self._written:
                path.unlink(missing_ok=True)


def writer_class(name: str) -> type:
    from moeforge.io.safetensors_writer import ShardedWriter

    return {WRITERS[0]: ShardedWriter, WRITERS[1]: SaveFileShardWriter}[name]


def llama_shapes(layers: int, hidden: int, ffn: int, vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order a conversion writes them (outer tensors, then layer by layer)."""
    kv = max(1, hidden // 64 // 4) * 64
    yield "model.embed_tokens.weight", (vocab, hidden)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (ffn, hidden)
        yield p + "mlp.up_proj.weight", (ffn, hidden)
        yield p + "mlp.down_proj.weight", (hidden, ffn)


def tensor_stream(args: argparse.Namespace) -> Iterator[tuple[str, torch.Tensor]]:
    """Fresh, owned tensors (as the converter hands them over), cut from one random pool at shifting offsets:
    distinct contents at the cost of a memcpy, so producing the stream costs little next to writing it."""
    shapes = list(llama_shapes(args.layers, args.hidden, args.ffn, args.vocab))
    largest = max(torch.Size(shape).numel() for _, shape in shapes)
    pool = torch.randn(largest + 4096, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    for i, (name, shape) in enumerate(shapes):
        start = (i * 997) % 4096
        yield name, pool[start : start + torch.Size(shape).numel()].clone().view(shape)


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One measured run in this (fresh) process: a conversion (--recipe), or the stream, written unless --output is empty."""
    if args.recipe:
        from moeforge.config.recipe import parse_recipe
        from moeforge.convert import convert, pipeline

        pipeline.ShardedWriter = writer_class(args.writer)  # the pipeline's only writer
        recipe = parse_recipe(json.loads(args.recipe))
        start = time.perf_counter()
        convert(recipe, log=lambda _line: None)
        print(json.dumps({"seconds": time.perf_counter() - start, "base_rss_kib": 0, "peak_rss_kib": kib("VmHWM:")}))
        return
    stream = tensor_stream(args)
    first = next(stream)  # builds the pool: the same baseline for every run
    base = kib("VmRSS:")
    start = time.perf_counter()
    if args.output:
        with writer_class(args.writer)(Path(args.output), args.shard_mb * 10**6) as writer:
            writer.add(*first)
            for name, tensor in stream:
                writer.add(name, tensor)
    else:
        for _ in stream:
            pass
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "base_rss_kib": base, "peak_rss_kib": kib("VmHWM:")}))


def measure(args: argparse.Namespace, writer: str = "", output: Path | None = None, recipe: dict | None = None) -> dict:
    """Run one fresh child; flush its writes to disk (untimed) before the next run."""
    command = [sys.executable, __file__, "--child", f"--writer={writer}", f"--output={output or ''}"]
    command += [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("layers", "hidden", "ffn", "vocab", "shard-mb")]
    command += [f"--recipe={json.dumps(recipe) if recipe else ''}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"run failed:\n{done.stderr[-3000:]}")
    os.sync()
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_outputs(a: Path, b: Path) -> bool:
    """Both directories hold the same shards and index and, tensor by tensor, the same bytes."""
    from safetensors import safe_open

    files = sorted(p.name for p in a.iterdir())
    if files != sorted(p.name for p in b.iterdir()):
        return False
    index = "model.safetensors.index.json"
    if json.loads((a / index).read_text()) != json.loads((b / index).read_text()):
        return False
    for name in (f for f in files if f.endswith(".safetensors")):
        with safe_open(str(a / name), framework="pt") as fa, safe_open(str(b / name), framework="pt") as fb:
            if sorted(fa.keys()) != sorted(fb.keys()) or not all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()):
                return False
    return True


def summary(measured: list[dict]) -> dict:
    return {
        "seconds": round(statistics.median(m["seconds"] for m in measured), 2),
        "runs_seconds": [round(m["seconds"], 2) for m in measured],
        "peak_rss_mb": round(max(m["peak_rss_kib"] for m in measured) * 1024 / 1e6),
        "peak_above_baseline_mb": round(max(m["peak_rss_kib"] - m["base_rss_kib"] for m in measured) * 1024 / 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--convert-layers", type=int, default=8, help="layers of the converted source (0: skip part 2)")
    parser.add_argument("--work", type=Path, default=ROOT / "_work" / "shard_writer")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--writer", default="", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    shutil.rmtree(args.work, ignore_errors=True)
    runs: dict[str, list[dict]] = {name: [] for name in WRITERS}
    stream_runs = []
    for repeat in range(args.repeats):  # alternate, so that load on the machine hits both alike
        stream_runs.append(measure(args))
        for i, name in enumerate(WRITERS):
            shutil.rmtree(args.work / f"out-{i}", ignore_errors=True)
            runs[name].append(measure(args, name, args.work / f"out-{i}"))
            print(f"stream, {name}, run {repeat + 1}: {json.dumps(runs[name][-1])}", flush=True)
    shards = sorted((args.work / "out-0").glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    identical = same_outputs(args.work / "out-0", args.work / "out-1")
    rows = {name: summary(measured) for name, measured in runs.items()}
    stream = summary(stream_runs)
    streaming, simple = rows.values()

    conversion: dict = {}
    if args.convert_layers:
        sys.path.insert(0, str(ROOT))
        from convert import generate_source  # the conversion benchmark's random Llama

        source = args.work / "source"
        generate_source(source, args.convert_layers, args.hidden, args.ffn, args.vocab, 500 * 10**6)
        source_largest = max(p.stat().st_size for p in source.glob("*.safetensors"))
        recipe = {
            "output": str(args.work / "converted"),
            "source": str(source),
            "max_shard_size": "500MB",
            "moe": {"num_experts": 4, "top_k": 2, "init": "copy"},
            "fidelity": {"check": True},
            "calibration": {"num_sequences": 2, "sequence_length": 32},
        }
        for name in WRITERS:
            measured = measure(args, name, recipe=recipe)
            shutil.rmtree(args.work / "converted", ignore_errors=True)
            conversion[name] = {"seconds": round(measured["seconds"], 2), "peak_rss_mb": round(measured["peak_rss_kib"] * 1024 / 1e6)}
            print(f"conversion, {name}: {json.dumps(conversion[name])}", flush=True)
        conversion = {
            "case": "copy 4 experts top-2 + fidelity check, 500 MB shards",
            "layers": args.convert_layers,
            "largest_source_shard_bytes": source_largest,
            "rss_target_mb": round((2 * source_largest + 2**30) / 1e6),
            "writers": conversion,
        }

    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "stream": {
            "layers": args.layers,
            "hidden": args.hidden,
            "ffn": args.ffn,
            "vocab": args.vocab,
            "dtype": "bfloat16",
            "bytes": total,
            "shards": len(shards),
            "largest_shard_bytes": largest,
            "max_shard_mb": args.shard_mb,
        },
        "repeats": args.repeats,
        "producing the stream only": stream,
        "writers": rows,
        "ratio_save_file_over_streaming": {
            "seconds": round(simple["seconds"] / streaming["seconds"], 2),
            "peak_rss": round(simple["peak_rss_mb"] / streaming["peak_rss_mb"], 2),
        },
        "outputs_identical": identical,
        "conversion": conversion,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shard_writer.json").write_text(json.dumps(result, indent=2) + "\n")
    ratio = result["ratio_save_file_over_streaming"]
    lines = [
        f"# Shard writer benchmark ({result['machine']}, torch {torch.__version__})",
        "",
        f"1. The writers alone. Stream: {args.layers} Llama-like layers (hidden {args.hidden}, FFN {args.ffn}, vocab {args.vocab}), "
        f"bf16, {total / 1e9:.2f} GB written as {len(shards)} shards of at most {args.shard_mb} MB (largest {largest / 1e6:.0f} MB), "
        f"with index and sha256 per shard. Median of {args.repeats} runs, each a fresh process; producing the stream "
        f"alone takes {stream['seconds']} s and peaks at {stream['peak_rss_mb']} MB.",
        "",
        "| writer | time (s) | runs (s) | peak RSS (MB) | peak above the stream's baseline (MB) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {r['seconds']} | {r['runs_seconds']} | {r['peak_rss_mb']} | {r['peak_above_baseline_mb']} |"
            for name, r in rows.items()
        ),
        "",
        f"save_file / streaming: time x {ratio['seconds']}, peak RSS x {ratio['peak_rss']}. "
        f"Outputs identical (same shards, index and tensor bytes): {'yes' if identical else 'NO'}.",
    ]
    if conversion:
        lines += [
            "",
            f"2. Inside a conversion: {conversion['case']}, random Llama of {args.convert_layers} layers (largest source shard "
            f"{conversion['largest_source_shard_bytes'] / 1e6:.0f} MB; RSS target 2 x largest shard + 1 GiB = {conversion['rss_target_mb']} MB). One run each.",
            "",
            "| writer | time (s) | peak RSS (MB) | under the target |",
            "|---|---|---|---|",
            *(
                f"| {name} | {c['seconds']} | {c['peak_rss_mb']} | {'yes' if c['peak_rss_mb'] <= conversion['rss_target_mb'] else 'NO'} |"
                for name, c in conversion["writers"].items()
            ),
        ]
    lines += ["", "Reproduce: `python benchmarks/shard_writer.py`"]
    (RESULTS / "shard_writer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
