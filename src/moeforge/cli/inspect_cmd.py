"""``moeforge inspect PATH [--json]``: what a checkpoint is, without loading its weights."""

from __future__ import annotations

import argparse
import json
from itertools import groupby
from typing import Any

from rich.console import Console
from rich.table import Table

from moeforge.cli.formatting import human_count


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarise a checkpoint: size, total/active parameters, per-layer MoE plan",
        description="Summarise a checkpoint from its config and safetensors headers (no weights are loaded).",
    )
    parser.add_argument("path", help="local HF dir, hub id, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.set_defaults(func=run)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def describe_layer(row: dict[str, Any]) -> str:
    """One layer's shape in words, e.g. ``moe 8 experts top-2, expert ffn 1408, shared ffn 5632, linear gate``
    (then ``; attention moe 3 head groups top-2 (+1 shared)`` for an attention MoE layer)."""
    attention = row.get("attention")
    suffix = ""
    if attention:
        shared = len(attention["shared_experts"] or [])
        suffix = f"; attention moe {attention['num_experts']} head groups top-{attention['top_k']}" + (
            f" (+{shared} shared)" if shared else ""
        )
    if row["kind"] == "dense":
        return f"dense ffn {row['intermediate_size']}{suffix}"
    parts = [f"moe {row['num_experts']} experts top-{row['top_k']}", f"expert ffn {row['expert_intermediate_size']}"]
    if row["shared_intermediate_size"]:
        parts.append(f"shared ffn {row['shared_intermediate_size']}")
    parts.append(f"{row['gate_type']} gate" + (f" ({row['scoring']})" if row["scoring"] else ""))
    return ", ".join(parts) + suffix


def layer_groups(layers: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Collapse consecutive identical layers: ``[("layers 0-29", "moe 8 experts top-2, ...")]``."""
    groups = []
    position = 0
    for description, run in groupby(describe_layer(row) for row in layers):
        count = len(list(run))
        first, last = position, position + count - 1
        groups.append((f"layers {first}-{last}" if count > 1 else f"layer {first}", description))
        position += count
    return groups


def render(report: dict[str, Any], console: Console) -> None:
    summary = Table(title=report["path"], show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    active_share = report["active_parameters"] / report["total_parameters"] if report["total_parameters"] else 1.0
    rows = [
        ("model type", f"{report['model_type']} ({report['architecture']})"),
        ("stored dtype", str(report["dtype"])),
        ("hidden size", str(report["hidden_size"])),
        (
            "layers",
            f"{report['num_layers']} ({report['num_moe_layers']} MoE"
            + (f", {report['num_attention_moe_layers']} attention MoE)" if report.get("num_attention_moe_layers") else ")"),
        ),
        ("attention heads", f"{report['num_attention_heads']} (kv {report['num_key_value_heads']})"),
        ("vocab", f"{report['vocab_size']}" + (" (tied embeddings)" if report["tie_word_embeddings"] else "")),
        ("total parameters", human_count(report["total_parameters"])),
        ("active parameters / token", f"{human_count(report['active_parameters'])} ({active_share:.0%})"),
        ("size on disk", f"{_bytes(report['size_on_disk_bytes'])} ({report['weights_format']})"),
    ]
    for key, value in rows:
        summary.add_row(key, value)
    console.print(summary)
    plan = Table(title="layers", title_justify="left")
    plan.add_column("layers")
    plan.add_column("feed-forward (and attention MoE)" if report.get("num_attention_moe_layers") else "feed-forward")
    for span, description in layer_groups(report["layers"]):
        plan.add_row(span, description)
    console.print(plan)
    if "fidelity" in report:
        console.print("fidelity", style="bold")
        console.print_json(data=report["fidelity"])


def run(args: argparse.Namespace) -> int:
    from moeforge.io.inspection import inspect_checkpoint

    report = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report, Console(highlight=False))
    return 0
