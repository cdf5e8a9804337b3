"""``moeforge plan MODEL_OR_RECIPE [--gpu-memory 24GB]``: will this conversion + training run fit, before it starts?"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from rich.console import Console
from rich.table import Table

from moeforge.cli.formatting import human_count
from moeforge.errors import MoeforgeError
from moeforge.planning.memory import DTYPE_BYTES, Optimizer, TrainingSetup

if TYPE_CHECKING:  # the planner imports torch and transformers; the parser must stay light
    from moeforge.planning.report import Plan

SETUP_FLAGS = {"batch_size": "batch size", "seq_len": "sequence length"}
SHARDING_FLAGS = {"gpus": "number of GPUs", "expert_parallel": "expert-parallel size"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="estimate the GPU memory of training a model or recipe (from configs only) and whether it fits",
        description="Count parameters on the meta device and estimate weights, gradients, optimizer states and "
        "activations of a training run, for a model, a convert recipe (the MoE it would write) or a train recipe. "
        "No weights are loaded. Formulas and assumptions: docs/plan.md.",
    )
    parser.add_argument("target", metavar="MODEL_OR_RECIPE", help="model dir, hub id, .gguf, 'default', or a convert/train recipe YAML")
    parser.add_argument("--gpu-memory", help="memory of one GPU, e.g. 24GB, 80GiB, 24000MB (without it: just report)")
    parser.add_argument("--batch-size", type=int, help="per-device train batch size (overrides the recipe)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (overrides data.max_length)")
    parser.add_argument("--dtype", metavar=_metavar(DTYPE_BYTES), help="dtype the weights are trained in")
    parser.add_argument("--optimizer", metavar=_metavar(get_args(Optimizer)), help="optimizer (default adamw)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--gpus", type=int, help="GPUs the run is launched on, one process each (default 1)")
    parser.add_argument(
        "--zero", type=int, metavar="{0,1,2,3}", help="what the GPUs split: ZeRO stage (3 = FSDP full shard; default: the recipe's engine)"
    )
    parser.add_argument(
        "--offload", action=argparse.BooleanOptionalAction, default=None, help="optimizer states (and sharded weights) in host memory"
    )
    parser.add_argument(
        "--expert-parallel", type=int, metavar="N", help="ranks that split each MoE layer's experts (the rest fully sharded)"
    )
    parser.add_argument("--model", help="train recipe only: plan with this model instead (a model or a convert recipe)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)


def _metavar(values: Iterable[str]) -> str:
    """argparse's ``{a,b}`` spelling of the accepted values. Plan checks them itself rather than through
    ``choices=``, so that a bad value is its one-line error (see :func:`setup_overrides`)."""
    return "{" + ",".join(values) + "}"


def setup_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that change the training setup, validated into one-line errors."""
    overrides = _counts(args, SETUP_FLAGS)
    if args.dtype is not None:
        if args.dtype not in DTYPE_BYTES:
            raise MoeforgeError(f"--dtype {args.dtype!r} is unknown: use {', '.join(DTYPE_BYTES)}")
        overrides["dtype"] = args.dtype
        overrides["mixed_precision"] = overrides["master_weights"] = False  # the flag states the training precision outright
    if args.optimizer is not None:
        if args.optimizer not in get_args(Optimizer):
            raise MoeforgeError(f"--optimizer {args.optimizer!r} is unknown: use {', '.join(get_args(Optimizer))}")
        overrides["optimizer"] = args.optimizer
    if args.gradient_checkpointing is not None:
        overrides["gradient_checkpointing"] = args.gradient_checkpointing
    sharding = _sharding_overrides(args)
    return overrides | ({"sharding": sharding} if sharding else {})


def _counts(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """The given integer flags (``{dest: what it counts}``), each at least 1."""
    counts: dict[str, Any] = {}
    for flag, what in flags.items():
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise MoeforgeError(f"--{flag.replace('_', '-')} {value}: the {what} must be at least 1")
        if value is not None:
            counts[flag] = value
    return counts


def _sharding_overrides(args: argparse.Namespace) -> dict[str, Any]:
    sharding = _counts(args, SHARDING_FLAGS)
    if args.zero is not None:
        if args.zero not in (0, 1, 2, 3):
            raise MoeforgeError(f"--zero {args.zero}: ZeRO stages are 0 (nothing split), 1 (optimizer), 2 (+ gradients), 3 (+ weights)")
        sharding["stage"] = args.zero
    if args.offload is not None:
        sharding["offload"] = args.offload
    return sharding


def describe_setup(setup: TrainingSetup) -> str:
    precision = "bf16 autocast on fp32 weights" if setup.mixed_precision else f"{setup.dtype} weights"
    parts = [
        f"{setup.stage}, batch {setup.batch_size} x {setup.seq_len} tokens",
        precision,
        setup.optimizer,
        "gradient checkpointing" if setup.gradient_checkpointing else "no gradient checkpointing",
    ]
    if setup.quantization:
        parts.append(f"{setup.quantization} base")
    sharding = setup.sharding
    if sharding.gpus > 1 or sharding.stage or sharding.expert_parallel > 1:
        split = ["nothing (replicas)", "optimizer states", "gradients + optimizer", "weights + gradients + optimizer"][sharding.stage]
        parts.append(f"per GPU of {sharding.gpus}: ZeRO-{sharding.stage} ({split} split)")
        if sharding.expert_parallel > 1:
            parts.append(f"experts split over {sharding.expert_parallel} ranks")
        if sharding.offload:
            parts.append("offloaded to host memory")
    return ", ".join(parts)


def to_json(plan: Plan, verdicts: dict[int, str]) -> dict[str, Any]:
    from moeforge.planning.report import assumptions

    rows = []
    for index, row in enumerate(plan.rows):
        memory = asdict(row.memory) | {"total": row.memory.total}
        rows.append(
            {
                "name": row.scenario.name,
                "primary": row.scenario.primary,
                "setup": asdict(row.scenario.setup),
                "parameters": {"total": row.counts.total, "trainable": row.counts.trainable, "active_per_token": row.counts.active},
                "memory_bytes": memory,
                "sources": {
                    "parameters": f"counted on the meta device from {row.scenario.origin}",
                    "weights_gradients_optimizer": "parameter counts x bytes per parameter (docs/plan.md)",
                    "activations": "formula per decoder layer (docs/plan.md)",
                },
                "fits": None if plan.gpu_bytes is None else row.memory.total <= plan.gpu_bytes,
                "verdict": verdicts.get(index),
            }
        )
    return {"target": plan.target, "gpu_memory_bytes": plan.gpu_bytes, "scenarios": rows, "assumptions": assumptions(plan)}


def render(plan: Plan, verdicts: dict[int, str], console: Console) -> None:
    from moeforge.planning.report import assumptions, gb

    table = Table(title=f"memory plan: {plan.target}", title_justify="left")
    offloaded = any(row.memory.host for row in plan.rows)
    columns = ["scenario", "total params", "trainable", "active/token", "weights", "gradients", "optimizer", "activations", "total"]
    for column in columns + (["host (offload)"] if offloaded else []):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for row in plan.rows:
        m = row.memory
        name = ("* " if row.scenario.primary and len(plan.rows) > 1 else "") + row.scenario.name
        counts = [human_count(row.counts.total), human_count(row.counts.trainable), human_count(row.counts.active)]
        sizes = [gb(m.weights), gb(m.gradients), gb(m.optimizer), gb(m.activations), gb(m.total)]
        table.add_row(name, *counts, *sizes, *([gb(m.host)] if offloaded else []))
    console.print(table)
    setups = {describe_setup(row.scenario.setup): row.scenario.name for row in plan.rows}
    for text, name in setups.items():
        console.print(f"setup{'' if len(setups) == 1 else f' ({name})'}: {text}")
    for origin in dict.fromkeys(row.scenario.origin for row in plan.rows):
        console.print(f"source: parameters counted on the meta device (no weights read) from {origin}")
    console.print("source: weights, gradients, optimizer = counts x bytes per parameter; activations = per-layer formula (docs/plan.md)")
    for line in assumptions(plan):
        console.print(f"assumes: {line}")
    for index, text in verdicts.items():
        console.print(("" if len(plan.rows) == 1 else f"{plan.rows[index].scenario.name}: ") + text, style="bold")


def run(args: argparse.Namespace) -> int:
    if Path(args.target).suffix in (".yaml", ".yml"):
        from moeforge.api import load_recipe

        load_recipe(args.target)  # a bad recipe is reported before torch and transformers are imported
    from moeforge.planning.report import parse_gpu_memory, plan_scenarios, verdict
    from moeforge.planning.sources import scenarios

    gpu_bytes = parse_gpu_memory(args.gpu_memory) if args.gpu_memory is not None else None
    plan = plan_scenarios(args.target, scenarios(args.target, setup_overrides(args), args.model), gpu_bytes)
    verdicts = {} if gpu_bytes is None else {plan.rows.index(plan.primary): verdict(plan.primary, gpu_bytes)}
    if args.json:
        print(json.dumps(to_json(plan, verdicts), indent=2))
    else:
        render(plan, verdicts, Console(highlight=False, width=160))
    return 0
