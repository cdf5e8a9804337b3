"""Packing pretraining text: ``pack_texts`` (one batched ``Dataset.map``) against the list-based packer it replaced.

The corpus is ~20 MB of English prose (the ``pt-demo`` documents, each copy numbered so no two texts are
equal) saved with ``save_to_disk`` and memory-mapped back, as a large corpus would be. It is packed into
blocks of ``--max-length`` tokens with the SmolLM2 tokenizer when ``~/.cache/moeforge/smollm2-135m-instruct``
holds it (else the tests' character-level tokenizer), by:
  lists  the old packer, reimplemented here as the baseline: every token appended to Python lists, the
         blocks handed to ``Dataset.from_dict`` at the end;
  map    ``moeforge.data.pack_texts``: batches tokenised and cut to numpy blocks inside ``Dataset.map``,
         written to Arrow (a temporary cache file; ``datasets`` caching is off so no run reuses another's).
Each run is its own process, alternating lists/map for ``--reps`` rounds; wall time is the median. Peak
RSS is the process's VmHWM after packing minus its RSS just before (tokenizer and corpus already loaded),
the largest over the rounds. Both must produce the same blocks (a hash of every token id is compared).

    python benchmarks/packing.py [--mb 20] [--max-length 1024] [--reps 3]
Results: benchmarks/results/packing.json and packing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SMOLLM2 = Path.home() / ".cache" / "moeforge" / "smollm2-135m-instruct"
APPROACHES = ("lists", "map")

CHILD = r"""
import hashlib, json, sys, time
from pathlib import Path
import numpy as np
import datasets
from datasets import Dataset, load_from_disk

corpus, approach, max_length, tokenizer_dir, repo = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
datasets.disable_caching()
datasets.disable_progress_bars()
if tokenizer_dir:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
else:
    sys.path.insert(0, repo)
    from tests.helpers import make_tiny_tokenizer
    tokenizer = make_tiny_tokenizer()
dataset = load_from_disk(corpus)


def lists_pack(dataset, tokenizer, max_length):
    eos, blocks, buffer = tokenizer.eos_token_id, [], []
    for batch in dataset.iter(batch_size=1000):
        for ids in tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
        full = len(buffer) - len(buffer) % max_length
        blocks.extend(buffer[start : start + max_length] for start in range(0, full, max_length))
        del buffer[:full]
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(block) for block in blocks]})


def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024


if approach == "lists":
    pack = lists_pack
else:
    from moeforge.data import pack_texts as pack
before = status("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
start = time.perf_counter()
packed = pack(dataset, tokenizer, max_length)
seconds = time.perf_counter() - start
peak = status("VmHWM:")
digest = hashlib.sha256()
for table in packed.data.column("input_ids").chunks:
    digest.update(np.asarray(table.flatten(), dtype=np.int64).tobytes())
print(json.dumps({"seconds": seconds, "rss_before": before, "peak_growth": peak - before, "blocks": len(packed),
                  "hash": digest.hexdigest()}))
"""


def write_corpus(path: Path, megabytes: float) -> dict:
    """Numbered copies of the pt-demo documents until ``megabytes`` of text, saved as an Arrow dataset."""
    from datasets import Dataset

    from moeforge.data.builtin import builtin_records

    documents = [record["text"] for record in builtin_records("pt-demo")]
    texts, size = [], 0
    while size < megabytes * 1e6:
        text = f"Copy {len(texts) // len(documents)}.\n\n{documents[len(texts) % len(documents)]}"
        texts.append(text)
        size += len(text.encode())
    Dataset.from_dict({"text": texts}).save_to_disk(path)
    return {"texts": len(texts), "text_bytes": size}


def run(corpus: Path, approach: str, max_length: int, tokenizer_dir: str) -> dict:
    command = [sys.executable, "-c", CHILD, str(corpus), approach, str(max_length), tokenizer_dir, str(ROOT.parent)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{approach} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    rows = result["approaches"]
    lines = [
        f"# Packing {result['corpus']['text_bytes'] / 1e6:.1f} MB of text ({result['environment']})",
        "",
        f"{result['corpus']['texts']} texts, tokenizer {result['tokenizer']}, max_length {result['max_length']}: "
        f"{rows['map']['blocks']} blocks. Median of {result['reps']} runs, each in its own process; peak RSS growth = "
        "VmHWM during packing minus RSS before it (worst run). Both produce identical blocks.",
        "",
        "| approach | wall s | peak RSS growth MB |",
        "|---|---|---|",
    ]
    for name in APPROACHES:
        lines.append(f"| {name} | {rows[name]['seconds']:.2f} | {rows[name]['peak_growth'] / 1e6:.0f} |")
    ratios = result["map_over_lists"]
    lines += [
        "",
        f"map / lists: time {ratios['time']:.2f}x, peak RSS growth {ratios['peak_rss_growth']:.3f}x",
        "",
        f"1-minute load average at the start and end: {result['load_average'][0]:.1f}, {result['load_average'][1]:.1f} "
        f"(on {os.cpu_count()} cores; above that, other processes shared the CPUs and wall times are noisy).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    tokenizer_dir = str(SMOLLM2) if (SMOLLM2 / "tokenizer.json").is_file() else ""
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus"
        info = write_corpus(corpus, args.mb)
        print(f"corpus: {info['texts']} texts, {info['text_bytes'] / 1e6:.1f} MB", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in APPROACHES}
        for rep in range(args.reps):
            for name in APPROACHES:
                runs[name].append(run(corpus, name, args.max_length, tokenizer_dir))
                last = runs[name][-1]
                print(f"  round {rep + 1} {name}: {last['seconds']:.2f} s, +{last['peak_growth'] / 1e6:.0f} MB", flush=True)
    if len({r["hash"] for results in runs.values() for r in results}) != 1:
        raise SystemExit("the two packers produced different blocks")
    approaches = {
        name: {
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_growth": max(r["peak_growth"] for r in results),
            "blocks": results[0]["blocks"],
            "runs": results,
        }
        for name, results in runs.items()
    }
    import datasets
    import transformers

    result = {
        "environment": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
        f"datasets {datasets.__version__}, transformers {transformers.__version__}",
        "corpus": info,
        "tokenizer": "SmolLM2-135M-Instruct" if tokenizer_dir else "character-level (tests.helpers)",
        "max_length": args.max_length,
        "reps": args.reps,
        "load_average": [load_at_start, os.getloadavg()[0]],
        "approaches": approaches,
        "map_over_lists": {
            "time": approaches["map"]["seconds"] / approaches["lists"]["seconds"],
            "peak_rss_growth": approaches["map"]["peak_growth"] / approaches["lists"]["peak_growth"],
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "packing.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "packing.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
