"""``moeforge eval MODEL``: perplexity and expert routing on text, optionally lm-eval benchmarks and a
long-context position probe, and a side-by-side comparison with a second model (base vs upcycled vs
trained, or base vs MoICE).

Writes ``eval.json`` (every figure printed), ``expert_load.png`` and, with ``--probe``,
``position_curve.png`` into ``--output`` (default ``MODEL/eval`` for a local model, else ``./moeforge-eval``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from moeforge.cli.choices import literal_values
from moeforge.cli.data_cmd import parse_columns
from moeforge.cli.dtypes import DTYPES
from moeforge.cli.experts_option import add_experts_backend
from moeforge.errors import MoeforgeError
from moeforge.eval.inputs import EvalStage
from moeforge.eval.probes import PROBE_KINDS

if TYPE_CHECKING:
    from moeforge.eval.probes import ProbeSpec


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity, expert load and (optionally) lm-eval benchmarks of a model; compare two models",
        description="Evaluate a dense or MoE checkpoint: perplexity on text (built-in sample by default), "
        "per-layer routing statistics, optional lm-evaluation-harness tasks, and --compare against another model.",
    )
    parser.add_argument("model", help="local HF dir, hub id, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--text", action="extend", nargs="+", type=Path, default=[], metavar="FILE", help="plain-text file(s), one text each"
    )
    parser.add_argument("--data", metavar="FILE", help="data file as training reads it (.jsonl, .json, .csv, .txt, dataset dir)")
    parser.add_argument(
        "--columns", type=parse_columns, help="--data: map moeforge fields to your columns, e.g. text=body (required for CSV)"
    )
    parser.add_argument(
        "--stage", choices=literal_values(EvalStage), help="how to read --data: pt (text) or sft (completion-only loss); default pt"
    )
    parser.add_argument("--max-length", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=4)
    add_experts_backend(parser)
    parser.add_argument("--max-batches", type=int, help="evaluate at most this many batches")
    parser.add_argument("--output", "-o", type=Path, metavar="DIR", help="where eval.json and expert_load.png go")
    parser.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="comma-separated lm-evaluation-harness tasks, run on MODEL (needs moeforge[eval]): names, task .yaml files or directories",
    )
    parser.add_argument("--lm-eval-include", type=Path, metavar="DIR", help="directory of extra lm-eval task YAMLs")
    parser.add_argument("--limit", type=float, help="lm-eval: at most N examples per task (a fraction when < 1)")
    parser.add_argument(
        "--no-perplexity",
        dest="perplexity",
        action="store_false",
        help="run only the --lm-eval tasks: no perplexity pass, no expert-load plot (eval.json holds the lm-eval scores)",
    )
    parser.add_argument("--compare", metavar="OTHER_MODEL", help="evaluate a second model on the same text, side by side")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    probes = parser.add_argument_group("position probes", "where in a long prompt a model finds a fact (docs/probes.md)")
    probes.add_argument(
        "--probe",
        choices=PROBE_KINDS,
        help="kv: generated key-value retrieval; mdqa: multi-document QA over --probe-docs (also run on --compare)",
    )
    probes.add_argument("--probe-docs", type=Path, metavar="FILE", help="mdqa: JSONL rows {question, answer, gold, distractors}")
    probes.add_argument("--probe-pairs", type=int, metavar="N", help="kv: key-value lines per prompt (default 24)")
    probes.add_argument(
        "--probe-positions", metavar="I,J,...", help="where the fact goes, 0-based (default 5 spread evenly, first and last)"
    )
    probes.add_argument("--probe-samples", type=int, metavar="N", help="prompts per position (default 50; mdqa: the first N rows)")
    probes.add_argument("--probe-seed", type=int, metavar="S", help="kv: seed of the prompts (default 0; another seed = held-out prompts)")
    probes.add_argument(
        "--chat-template", action="store_true", help="ask the probe question as a user turn with the tokenizer's chat template"
    )
    parser.set_defaults(func=run)


def _tasks(args: argparse.Namespace) -> list[str]:
    """The requested lm-eval tasks, after checking that the lm-eval flags come together."""
    if args.lm_eval is None:
        given = {"--lm-eval-include": args.lm_eval_include, "--limit": args.limit, "--no-perplexity": None if args.perplexity else True}
        for flag, value in given.items():
            if value is not None:
                raise MoeforgeError(f"{flag} only applies to lm-eval; add --lm-eval TASKS")
        return []
    if args.limit is not None and args.limit <= 0:
        raise MoeforgeError(f"--limit {args.limit} must be positive (a count, or a fraction when < 1)")
    return args.lm_eval.split(",")


def _positions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise MoeforgeError(f"--probe-positions {text!r}: give comma-separated integers, e.g. 0,6,12") from None


def _probe_spec(args: argparse.Namespace) -> ProbeSpec | None:
    """The requested probe, after checking that its flags come together; evaluate() builds its prompts before
    any model loads, so a value out of range or a malformed --probe-docs row still fails first."""
    from moeforge.eval.probes import KVProbe, MDQAProbe

    given = {
        "--probe-docs": args.probe_docs,
        "--probe-pairs": args.probe_pairs,
        "--probe-positions": args.probe_positions,
        "--probe-samples": args.probe_samples,
        "--probe-seed": args.probe_seed,
        "--chat-template": args.chat_template or None,
    }
    for flag, value in given.items():
        if value is not None and args.probe is None:
            raise MoeforgeError(f"{flag} only applies to probes; add --probe kv or --probe mdqa")
    if args.probe is None:
        return None
    only = {"--probe-docs": "mdqa", "--probe-pairs": "kv", "--probe-seed": "kv"}
    for flag, probe in only.items():
        if given[flag] is not None and args.probe != probe:
            raise MoeforgeError(f"{flag} only applies to --probe {probe}")
    if args.probe == "mdqa" and args.probe_docs is None:
        raise MoeforgeError("--probe mdqa needs --probe-docs FILE (JSONL rows {question, answer, gold, distractors})")
    chosen = {
        "positions": _positions(args.probe_positions) if args.probe_positions is not None else None,
        "samples": args.probe_samples,
        "pairs": args.probe_pairs,
        "seed": args.probe_seed,
    }
    settings = {field: value for field, value in chosen.items() if value is not None}  # the rest: the spec's defaults
    if args.probe == "kv":
        spec: ProbeSpec = KVProbe(chat_template=args.chat_template, **settings)
    else:
        spec = MDQAProbe(args.probe_docs, chat_template=args.chat_template, **settings)
    return spec


def run(args: argparse.Namespace) -> int:
    from moeforge.eval.evaluate import evaluate
    from moeforge.eval.probes import ProbeValueError, format_table
    from moeforge.eval.report import comparison_lines, result_line, routing_text

    for flag, value in (("--stage", args.stage), ("--columns", args.columns)):
        if value is not None and args.data is None:
            raise MoeforgeError(f"{flag} only applies to --data FILE")
    if not args.perplexity:
        perplexity_flags = {
            "--text": args.text,
            "--data": args.data,
            "--compare": args.compare,
            "--max-batches": args.max_batches,
            "--probe": args.probe,
        }
        for flag, value in perplexity_flags.items():
            if value:
                raise MoeforgeError(f"{flag} needs the perplexity pass; drop it or --no-perplexity")
    try:
        result = evaluate(
            args.model,
            text=args.text,
            data=args.data,
            stage=args.stage or "pt",
            columns=args.columns,
            compare=args.compare,
            output=args.output,
            max_length=args.max_length,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
            dtype=args.dtype,
            experts_backend=args.experts_backend,
            probe=_probe_spec(args),
            lm_eval_tasks=_tasks(args),
            lm_eval_include=args.lm_eval_include,
            lm_eval_limit=args.limit,
            perplexity=args.perplexity,
        )
    except ProbeValueError as err:  # a probe setting, checked by evaluate() before any load: named by its flag
        raise MoeforgeError(f"--probe-{err.field} {err.detail}") from None
    if result.model is not None:
        print(f"evaluated on {result.data}")
        print(f"{args.model}: {result_line(result.model.perplexity)}")
        print(routing_text(result.model.perplexity.routing))
    if result.model is not None and result.compare is not None:
        print(f"{args.compare}:")
        print(routing_text(result.compare.perplexity.routing))
        print("\n".join(comparison_lines(args.model, result.model.perplexity, args.compare, result.compare.perplexity)))
    if result.probes:
        print(format_table(result.probes))
    if result.lm_eval is not None:
        for task, metrics in result.lm_eval.get("results", {}).items():
            shown = [f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float) and "stderr" not in name]
            print(f"  {task}: {', '.join(shown)}")
    print("wrote " + ", ".join(str(path) for path in result.written))
    return 0
