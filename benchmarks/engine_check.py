"""Engine check: do moeforge's exports compute the dense model's function in the engines people serve with?

For every dense family moeforge converts and every export it offers that family (its native MoE siblings
and moeforge's own architecture), a tiny random source is copy-upcycled (4 experts, top-2; shared experts
or dense layers where the target is there for them) and run in

- transformers 5 (this environment; natives in a fresh interpreter that never imports moeforge),
- transformers 4.5x (another Python, ``--transformers4-python``; moeforge's architecture needs transformers 5),
- llama.cpp: its ``convert_hf_to_gguf.py`` (``--llama-cpp``, the source tree; run by ``--converter-python``,
  a Python with the converter's pinned transformers 4.57, torch, sentencepiece and numpy) then its runtime
  through llama-cpp-python (``--llama-python``, a Python where ``import llama_cpp`` works),

and compared on the same token ids (max |Δlogit| over every position, and the greedy continuation: 16
tokens, token ids compared, so tokenizers play no part) with the dense source run in transformers 5, the
ground truth, and with the dense source run by the same engine. A cell reads ``<mark> <Δ vs the dense
source in this engine> · <Δ vs the dense source in transformers 5>``. A dense source passes when it matches
transformers 5 (the engine reads the family right); an export passes when it matches transformers 5, or
matches the dense source in its engine where that one passes (llama.cpp keeps its KV cache in fp16: its
figures differ from transformers' by more than the export does). Match = max |Δlogit| <= 1e-2 x max
|logit|; a greedy token that differs is reported (random tiny models have near-ties that fp16 noise flips).
``--real`` adds SmolLM2-135M-Instruct and Gemma 3 270M cases.

The tiny sources are the test models of ``tests/families/tiny.py`` with, where llama.cpp hard-codes a choice
of the released models, that choice (:data:`AS_RELEASED`): Gemma 3's 5:1 sliding pattern and attention
scale, SmolLM3's no-RoPE interval, Qwen3.5's head size (its mRoPE sections need 256), no sliding window
for Mistral and EXAONE 4 (as their current releases). The limits with other settings are in docs/engines.md.

Tiny sources use SmolLM2's tokenizer (llama.cpp's converter identifies a BPE tokenizer by hashing its output
on a fixed text and refuses unknown ones; SmolLM2's is known). Building llama.cpp: docs/engines.md.

    python benchmarks/engine_check.py --llama-cpp LLAMA_CPP_DIR --llama-python PY_WITH_LLAMA_CPP \
        --transformers4-python PY_WITH_TRANSFORMERS_4_57 [--real] [--families llama qwen3 ...]

Writes benchmarks/results/engines.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import moeforge  # noqa: E402,F401  (registers moeforge's architecture)
from moeforge.config.recipe import parse_recipe  # noqa: E402
from moeforge.conversion import convert  # noqa: E402
from moeforge.conversion.export import export_choices  # noqa: E402
from moeforge.io.embedded import embedded_model_dir  # noqa: E402
from moeforge.io.loading import copy_tokenizer_files, read_config  # noqa: E402
from tests.families.tiny import FAMILY_CONFIGS, build_family  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IDS = [1, 504, 3458, 5915, 260, 13100, 690, 19467, 28, 253, 2254, 314, 5549, 30, 216, 4237, 2113, 28, 3458, 47]
PROMPT = IDS[:8]
NEW_TOKENS = 16
TOLERANCE = 1e-2
MOE = {"num_experts": 4, "top_k": 2}
TARGET_OPTIONS: dict[str, dict[str, Any]] = {
    # what each export is for: shared experts, dense layers; everything else plain routed experts
    "granitemoeshared": {"shared": {"num_experts": 1}},
    "qwen3_5_moe_text": {"shared": {"num_experts": 1}},
}
AS_RELEASED: dict[str, dict[str, Any]] = {
    "gemma3_text": {"num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"], "query_pre_attn_scalar": 16},
    "smollm3": {"no_rope_layer_interval": 4},
    "qwen3_5_text": {"head_dim": 256},
    "mistral": {"sliding_window": None},
    "exaone4": {"sliding_window": None, "layer_types": ["full_attention"] * 4},
}
EXTRA_CASES = {  # (family, target, moe options, label)
    "llama": [
        ("qwen2_moe", {"shared": {"num_experts": 1}, "placement": {"moe_layer_freq": 2}}, "shared + dense layers"),
        ("qwen2_moe", {"routing": {"normalize": False, "router_init": "zeros"}}, "unnormalised top-k, zero router"),
    ],
    "qwen2": [("qwen2_moe", {"routing": {"normalize": False, "router_init": "zeros"}}, "unnormalised top-k, zero router")],
}

_TRANSFORMERS_WORKER = r"""
import json, sys, numpy as np, torch
from transformers import AutoModelForCausalLM
spec = json.load(sys.stdin)
out = {}
for case in spec["cases"]:
    try:
        model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([spec["ids"]])).logits[0].float().numpy()
            ids = torch.tensor([spec["prompt"]])
            for _ in range(spec["new_tokens"]):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        np.save(case["logits"], logits)
        out[case["name"]] = {"ok": True, "greedy": ids[0, len(spec["prompt"]):].tolist(), "class": type(model).__name__, "logits": case["logits"]}
    except Exception as err:
        out[case["name"]] = {"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"}
if spec.get("forbid_moeforge"):
    assert not any(name.startswith("moeforge") for name in sys.modules), "moeforge was imported"
json.dump(out, sys.stdout)
"""

_LLAMA_CPP_WORKER = r"""
import json, sys, numpy as np
from llama_cpp import Llama
spec = json.load(sys.stdin)
case = spec["case"]
llm = Llama(model_path=case["gguf"], n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
llm.eval(spec["ids"])
np.save(case["logits"], np.array(llm.scores[: len(spec["ids"])], dtype=np.float32))
llm.reset()
ids = list(spec["prompt"])
llm.eval(ids)
greedy = []
for _ in range(spec["new_tokens"]):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    greedy.append(token)
    llm.eval([token])
json.dump({"ok": True, "greedy": greedy}, sys.stdout)
"""


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    interesting = [line for line in lines if any(word in line for word in ("Error", "error", "Exception", "assert", "not found", "failed"))]
    return (interesting or lines or ["(no output)"])[-1][:300]


def _run_here(case: dict[str, Any]) -> dict[str, Any]:
    """A moeforge export in this interpreter (which imported moeforge): logits on IDS, greedy continuation of PROMPT."""
    model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        np.save(case["logits"], model(torch.tensor([IDS])).logits[0].numpy())
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return {"ok": True, "greedy": out[0, len(PROMPT) :].tolist(), "logits": case["logits"]}


def _worker_case(case: dict[str, Any], engine: str) -> dict[str, str]:
    return {"name": case["name"], "dir": str(case["dir"]), "logits": f"{case['logits']}.{engine}.npy"}


def _tokenizer_problem(entry: dict[str, Any]) -> bool:
    """llama.cpp's converter refuses a tokenizer it does not know for the family (the tiny sources borrow SmolLM2's)."""
    error = entry.get("error") or ""
    return entry.get("stage") == "convert_hf_to_gguf" and any(
        word in error for word in ("tokenizer", "pre-tokenizer", "KeyError: '<|", "KeyError: '[gMASK]'")
    )


def _loaded(entry: dict[str, Any]) -> tuple[np.ndarray, list[int]]:
    return np.load(entry["logits"]), entry["greedy"]


def _compare(reference: tuple[np.ndarray, list[int]], logits: np.ndarray, greedy: list[int]) -> dict[str, Any]:
    ref_logits, ref_greedy = reference
    diff = float(np.abs(logits - ref_logits).max()) if logits.shape == ref_logits.shape else float("inf")
    scale = float(np.abs(ref_logits).max())
    same = greedy == ref_greedy
    finite = bool(np.isfinite(logits).all())
    return {
        "pass": bool(finite and diff <= TOLERANCE * scale),
        "max_abs_logit_diff": diff if finite else None,
        "max_abs_logit": scale,
        "greedy_equal": same,
        "why": None if finite else "NaN logits",
    }


def _transformers(python: str, cases: list[dict[str, Any]], *, forbid_moeforge: bool) -> dict[str, Any]:
    spec = {"cases": cases, "ids": IDS, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "forbid_moeforge": forbid_moeforge}
    result = subprocess.run([python, "-c", _TRANSFORMERS_WORKER], input=json.dumps(spec), capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        return {case["name"]: {"ok": False, "error": _first_line(result.stderr)} for case in cases}
    return json.loads(result.stdout)


def _llama_cpp(args: argparse.Namespace, directory: Path, work: Path, family: str) -> dict[str, Any]:
    gguf, logits = work / f"{directory.name}.gguf", work / f"{directory.name}.llama.npy"
    converter = args.converter_python or args.llama_python
    command = [converter, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(directory), "--outfile", str(gguf), "--outtype", "f32"]
    if family.startswith("qwen3_5"):
        command.append("--no-mtp")  # transformers-saved Qwen3.5 checkpoints have no multi-token-prediction layers
    started = time.perf_counter()
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # leave the llama.cpp tree as it is
    converted = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=environment)
    if converted.returncode != 0:
        return {"ok": False, "stage": "convert_hf_to_gguf", "error": _first_line(converted.stderr + converted.stdout)}
    spec = {"case": {"gguf": str(gguf), "logits": str(logits)}, "ids": IDS, "prompt": PROMPT, "new_tokens": NEW_TOKENS}
    ran = subprocess.run([args.llama_python, "-c", _LLAMA_CPP_WORKER], input=json.dumps(spec), capture_output=True, text=True, timeout=1800)
    gguf.unlink(missing_ok=True)
    if ran.returncode != 0:
        return {"ok": False, "stage": "llama.cpp runtime", "error": _first_line(ran.stderr)}
    out = json.loads(ran.stdout)
    out["logits"], out["seconds"] = str(logits), round(time.perf_counter() - started, 1)
    return out


def _tiny_source(family: str, path: Path, tokenizer: Path) -> Path:
    model = build_family(family, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, **AS_RELEASED.get(family, {}))
    model.save_pretrained(path)
    copy_tokenizer_files(tokenizer, path)
    return path


def _convert(source: Path, output: Path, target: str, moe: dict[str, Any]) -> None:
    recipe = parse_recipe(
        {"source": str(source), "output": str(output), "export": target, "moe": {**MOE, **moe}, "calibration": {"num_sequences": 2}}
    )
    result = convert(recipe, log=lambda _line: None)
    assert result.fidelity.passed, f"{output.name}: conversion not exact"


def _cases(args: argparse.Namespace, work: Path, tokenizer: Path) -> list[dict[str, Any]]:
    cases = []
    for family in args.families:
        source = _tiny_source(family, work / f"{family}-dense", tokenizer)
        cases.append({"family": family, "model": "tiny", "target": "dense source", "label": "", "dir": source, "source": source})
        config = read_config(source)
        plans = [(target, TARGET_OPTIONS.get(target, {}), "") for target in export_choices(config)] + EXTRA_CASES.get(family, [])
        for index, (target, moe, label) in enumerate(plans):
            output = work / f"{family}-{target}-{index}"
            _convert(source, output, target, moe)
            cases.append({"family": family, "model": "tiny", "target": target, "label": label, "dir": output, "source": source})
    if args.real:
        smollm2, gemma3 = embedded_model_dir("default"), embedded_model_dir("gemma3")
        cases.append({"family": "llama", "model": "SmolLM2-135M", "target": "dense source", "label": "", "dir": smollm2, "source": smollm2})
        for index, (target, moe, label) in enumerate(
            [
                ("mixtral", {}, ""),
                ("granitemoeshared", {"shared": {"num_experts": 1}}, ""),
                ("qwen2_moe", {"shared": {"num_experts": 1}, "placement": {"moe_layer_freq": 2}}, "shared + dense layers"),
                ("qwen2_moe", {"routing": {"normalize": False, "router_init": "zeros"}}, "unnormalised top-k, zero router"),
                ("moeforge", {"routing": {"gate_type": "mlp"}}, "mlp gate"),
            ]
        ):
            output = work / f"smollm2-{target}-{index}"
            _convert(smollm2, output, target, moe)
            cases.append({"family": "llama", "model": "SmolLM2-135M", "target": target, "label": label, "dir": output, "source": smollm2})
        cases.append(
            {"family": "gemma3_text", "model": "Gemma 3 270M", "target": "dense source", "label": "", "dir": gemma3, "source": gemma3}
        )
        output = work / "gemma3-moeforge"
        _convert(gemma3, output, "moeforge", {})
        cases.append({"family": "gemma3_text", "model": "Gemma 3 270M", "target": "moeforge", "label": "", "dir": output, "source": gemma3})
    return cases


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    if entry.get("skipped"):
        return f"n/a ({entry['skipped']})"
    if not entry.get("ok", True) or "pass" not in entry:
        error = entry.get("error") or entry.get("why")
        if _tokenizer_problem(entry):
            return f"n/a (the converter needs the family's own tokenizer: {error})"
        return f"❌ {entry.get('stage', 'load')}: {error}"

    def figure(comparison: dict[str, Any] | None) -> str:
        if comparison is None:
            return "—"
        diff = comparison["max_abs_logit_diff"]
        return ("NaN" if diff is None else f"{diff:.1e}") + ("" if comparison["greedy_equal"] else " (greedy differs)")

    return f"{'✅' if entry['pass'] else '❌'} {figure(entry['vs_dense_here'])} · {figure(entry['vs_transformers5'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree (holds convert_hf_to_gguf.py)")
    parser.add_argument("--llama-python", help="a Python where import llama_cpp works")
    parser.add_argument("--converter-python", help="a Python for convert_hf_to_gguf.py (default: --llama-python)")
    parser.add_argument("--transformers4-python", help="a Python with transformers 4.5x")
    parser.add_argument("--families", nargs="+", default=list(FAMILY_CONFIGS), choices=list(FAMILY_CONFIGS))
    parser.add_argument("--real", action="store_true", help="add SmolLM2-135M-Instruct and Gemma 3 270M cases")
    parser.add_argument("--output", default="engines")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="moeforge-engines-"))
    try:
        tokenizer = embedded_model_dir("default")
        cases = _cases(args, work, tokenizer)
        for case in cases:
            case["name"], case["logits"] = case["dir"].name, str(work / f"{case['dir'].name}.npy")
        plain = [case for case in cases if case["target"] != "moeforge"]  # natives and sources: no moeforge import
        runs: dict[str, dict[str, Any]] = {}
        runs["transformers5"] = _transformers(sys.executable, [_worker_case(case, "t5") for case in plain], forbid_moeforge=True)
        for case in cases:
            if case["target"] == "moeforge":  # needs moeforge's classes: this interpreter
                runs["transformers5"][case["name"]] = _run_here(case)
        if args.transformers4_python:
            runs["transformers4"] = _transformers(
                args.transformers4_python, [_worker_case(case, "t4") for case in plain], forbid_moeforge=True
            )
            for case in cases:
                if case["target"] == "moeforge":
                    runs["transformers4"][case["name"]] = {"skipped": "moeforge's architecture needs transformers 5"}
        if args.llama_cpp:
            runs["llama.cpp"] = {}
            for case in cases:
                entry = (
                    {"skipped": "llama.cpp has no moeforge architecture"}
                    if case["target"] == "moeforge"
                    else _llama_cpp(args, Path(case["dir"]), work, case["family"])
                )
                runs["llama.cpp"][case["name"]] = entry
                print(f"{case['model']} {case['family']} -> {case['target']} {case['label']}: {entry.get('error', 'ran')}", flush=True)
        sources = {case["source"]: case["name"] for case in cases if case["target"] == "dense source"}
        truth = {source: _loaded(runs["transformers5"][name]) for source, name in sources.items()}
        for engine, results in runs.items():
            for case in cases:
                entry, dense = results[case["name"]], results[sources[case["source"]]]
                if entry.get("ok"):
                    entry["vs_transformers5"] = _compare(truth[case["source"]], *_loaded(entry))
                    entry["vs_dense_here"] = _compare(_loaded(dense), *_loaded(entry)) if dense.get("ok") else None
                    dense_right = dense.get("ok") and _compare(truth[case["source"]], *_loaded(dense))["pass"]
                    entry["pass"] = entry["vs_transformers5"]["pass"] or bool(
                        case["target"] != "dense source" and dense_right and entry["vs_dense_here"]["pass"]
                    )
                elif _tokenizer_problem(entry) and case["target"] != "dense source" and _tokenizer_problem(dense):
                    entry = {"skipped": "the dense source does not convert either: " + dense["error"]}
                case[engine] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    engines = [name for name in ("transformers5", "transformers4", "llama.cpp") if any(name in case for case in cases)]
    rows = [
        {k: (str(v) if isinstance(v, Path) else v) for k, v in case.items() if k not in ("dir", "source", "logits", "name")}
        for case in cases
    ]
    for row in rows:
        for engine in engines:
            row.get(engine, {}).pop("logits", None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    (RESULTS / f"{args.output}.json").write_text(json.dumps({"versions": versions, "tolerance": TOLERANCE, "cases": rows}, indent=2) + "\n")
    header = "| model | family | export | " + " | ".join(engines) + " |"
    lines = [
        f"# Engine check (`python benchmarks/engine_check.py`, {time.perf_counter() - started:.0f} s)",
        "",
        f"Each cell: max |Δlogit| on {len(IDS)} tokens vs the dense source run by the same engine · vs the dense source in "
        f"transformers {versions['transformers']} (the truth), and whether any of {NEW_TOKENS} greedy tokens differs. ✅: "
        f"the export matches the truth, or matches the dense source in this engine where that one matches the truth (max "
        f"|Δlogit| <= {TOLERANCE} x max |logit|). transformers5: natives and sources loaded without importing moeforge. "
        "llama.cpp: f32 GGUF, fp16 KV cache. Tiny sources: `tests/families/tiny.py`, with llama.cpp's hard-coded "
        "choices as released (`AS_RELEASED` in the script).",
        "",
        header,
        "|" + "---|" * (3 + len(engines)),
    ]
    for case in cases:
        export = case["target"] + (f" ({case['label']})" if case["label"] else "")
        lines.append(f"| {case['model']} | {case['family']} | {export} | " + " | ".join(_cell(case.get(name)) for name in engines) + " |")
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
