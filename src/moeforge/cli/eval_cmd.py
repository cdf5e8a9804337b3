"""``moeforge eval MODEL``: perplexity and expert routing on text, optionally lm-eval benchmarks, and a
side-by-side comparison with a second model (base vs upcycled vs trained).

Writes ``eval.json`` (every figure printed) and ``expert_load.png`` into ``--output`` (default
``MODEL/eval`` for a local model, else ``./moeforge-eval``).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeforge.cli.data_cmd import parse_columns
from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from moeforge.eval.inputs import EvalInputs
    from moeforge.eval.perplexity import PerplexityResult

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _device() -> str:
    """A GPU when there is one: evaluation is forward passes only and gains the most from it."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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
        "--stage", choices=["pt", "sft"], help="how to read --data: pt (text) or sft (completion-only loss); default pt"
    )
    parser.add_argument("--max-length", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-batches", type=int, help="evaluate at most this many batches")
    parser.add_argument("--output", "-o", type=Path, metavar="DIR", help="where eval.json and expert_load.png go")
    parser.add_argument(
        "--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks, run on MODEL (needs moeforge[eval])"
    )
    parser.add_argument("--lm-eval-include", type=Path, metavar="DIR", help="directory of extra lm-eval task YAMLs")
    parser.add_argument("--limit", type=float, help="lm-eval: at most N examples per task (a fraction when < 1)")
    parser.add_argument("--compare", metavar="OTHER_MODEL", help="evaluate a second model on the same text, side by side")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.set_defaults(func=run)


def _tasks(args: argparse.Namespace) -> list[str]:
    """The requested lm-eval tasks; checks the lm-eval flags and that the harness is installed."""
    if args.lm_eval is None:
        for flag, value in (("--lm-eval-include", args.lm_eval_include), ("--limit", args.limit)):
            if value is not None:
                raise MoeforgeError(f"{flag} only applies to lm-eval; add --lm-eval TASKS")
        return []
    from moeforge.eval.lm_eval import import_lm_eval

    if args.limit is not None and args.limit <= 0:
        raise MoeforgeError(f"--limit {args.limit} must be positive (a count, or a fraction when < 1)")
    import_lm_eval()  # fail before loading anything when the extra is missing
    return [task.strip() for task in args.lm_eval.split(",") if task.strip()]


def _output_dir(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return args.output
    local = Path(args.model).expanduser()
    return local / "eval" if local.is_dir() else Path("moeforge-eval")


def _evaluate(source: str, args: argparse.Namespace, inputs: EvalInputs) -> PerplexityResult:
    """Load ``source``, measure it, and free it before the next model is loaded."""
    from moeforge.eval.perplexity import perplexity
    from moeforge.models.loading import load_model

    model, tokenizer = load_model(source, dtype=DTYPES[args.dtype], device=_device())
    if tokenizer is None:
        raise MoeforgeError(f"{source} has no tokenizer files; eval needs a checkpoint that ships its tokenizer")
    result = perplexity(
        model,
        tokenizer,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        log=lambda line: print(f"{source}: {line}", flush=True),
        **inputs.perplexity_kwargs(),
    )
    del model
    gc.collect()
    return result


def _lm_eval(args: argparse.Namespace, tasks: list[str], output: Path) -> dict[str, Any]:
    """Run the harness on MODEL, print one line per task (scores without their standard errors)."""
    from moeforge.eval.lm_eval import run_lm_eval

    print(f"lm-eval: {', '.join(tasks)}")
    scores = run_lm_eval(
        args.model,
        tasks,
        include_path=args.lm_eval_include,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        batch_size=args.batch_size,
        output=output,
        dtype=DTYPES[args.dtype],
        device=_device(),
    )
    for task, metrics in scores.get("results", {}).items():
        shown = [f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float) and "stderr" not in name]
        print(f"  {task}: {', '.join(shown)}")
    return scores


def run(args: argparse.Namespace) -> int:
    from moeforge.eval.atomic import write_json
    from moeforge.eval.inputs import load_inputs
    from moeforge.eval.plots import plot_expert_load
    from moeforge.eval.report import comparison_lines, has_routers, result_line, routing_text

    for flag, value in (("--stage", args.stage), ("--columns", args.columns)):
        if value is not None and args.data is None:
            raise MoeforgeError(f"{flag} only applies to --data FILE")
    tasks = _tasks(args)
    output = _output_dir(args)
    inputs = load_inputs(args.text, args.data, args.stage or "pt", args.columns)
    print(f"evaluating on {inputs.description}")
    result = _evaluate(args.model, args, inputs)
    report: dict[str, Any] = {"model": args.model, "data": inputs.description, "max_length": args.max_length, **result.to_dict()}
    print(f"{args.model}: {result_line(result)}")
    print(routing_text(result.routing))
    written = [write_json(output / "eval.json", report)]  # saved now: the steps below can take long
    if has_routers(result.routing):
        written.append(plot_expert_load(result.routing, output / "expert_load.png", title=f"{args.model}: expert load"))
    if args.compare:
        other = _evaluate(args.compare, args, inputs)
        print(f"{args.compare}:")
        print(routing_text(other.routing))
        print("\n".join(comparison_lines(args.model, result, args.compare, other)))
        report["compare"] = {"model": args.compare, **other.to_dict(), "delta_perplexity": other.perplexity - result.perplexity}
        if has_routers(other.routing):
            path = output / "expert_load_compare.png"
            written.append(plot_expert_load(other.routing, path, title=f"{args.compare}: expert load"))
    if tasks:
        report["lm_eval"] = _lm_eval(args, tasks, output / "lm_eval.json")
        written.append(output / "lm_eval.json")
    write_json(output / "eval.json", report)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
