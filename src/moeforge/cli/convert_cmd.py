"""``moeforge convert [RECIPE.yaml] [flags]``: dense → MoE. Flags override the recipe's values."""

from __future__ import annotations

import argparse
from typing import Any

from moeforge.cli.choices import field_choices
from moeforge.config.recipe import ConvertRecipe, MoESpec, PartitionInit, Routing, load_recipe, parse_recipe, set_dotted

# flag → dotted recipe key; each flag overrides the recipe (or builds one when no recipe is given)
FLAG_KEYS = {
    "source": "source",
    "output": "output",
    "num_experts": "moe.num_experts",
    "top_k": "moe.top_k",
    "init": "moe.init",
    "partition_method": "moe.partition.method",
    "granularity": "moe.granularity",
    "shared_experts": "moe.shared.num_experts",
    "gate_type": "moe.routing.gate_type",
    "router_init": "moe.routing.router_init",
    "export": "export",
    "dtype": "dtype",
    "calibration_file": "calibration.file",
    "seed": "seed",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="upcycle a dense model into a Mixture-of-Experts checkpoint",
        description="Convert a dense decoder (Llama, Qwen, Gemma, Granite, SmolLM3, OLMo, GLM, Phi, ERNIE, EXAONE families) "
        "into an MoE model, check its fidelity, and write it.",
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/); flags below override its values")
    parser.add_argument(
        "--source", help="local HF dir, hub id, .gguf file, 'default' (embedded SmolLM2-135M-Instruct) or 'gemma3' (Gemma 3 270M)"
    )
    parser.add_argument("--output", "-o", help="output directory")
    parser.add_argument("--num-experts", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--init", choices=field_choices(MoESpec, "init"))
    parser.add_argument("--partition-method", choices=field_choices(PartitionInit, "method"))
    parser.add_argument("--granularity", type=int)
    parser.add_argument("--shared-experts", type=int, help="number of always-on shared experts carved from the FFN")
    parser.add_argument("--gate-type", choices=field_choices(Routing, "gate_type"))
    parser.add_argument("--router-init", choices=field_choices(Routing, "router_init"))
    parser.add_argument(
        "--export",
        choices=field_choices(ConvertRecipe, "export"),
        help="target architecture (auto: the most portable that holds the conversion exactly)",
    )
    parser.add_argument("--dtype", choices=field_choices(ConvertRecipe, "dtype"))
    parser.add_argument("--calibration-file", help="plain-text file for calibration (default: built-in sample)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}


def run(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    if args.recipe:
        recipe = load_recipe(args.recipe, overrides)
    else:
        data: dict[str, Any] = {}
        for dotted, value in overrides.items():
            set_dotted(data, dotted, value)
        recipe = parse_recipe(data, origin="flags")
    from moeforge.conversion import convert  # torch and transformers: only once the recipe is valid

    convert(recipe, overwrite=args.overwrite)
    return 0
