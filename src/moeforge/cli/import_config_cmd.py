"""``moeforge import-config FILE [-o RECIPE.yaml] [--kind convert|train]``: an original tool's settings as a recipe.

Reads a Dense2MoE MoE config, a LLaMA-MoE v2 conversion script or settings, a MoE-adapter ``config.json``
or MoICE settings (see :mod:`moeforge.config.importers`) and prints the recipe, or writes it atomically:
a failed import leaves no file and an existing one untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moeforge.cli.choices import literal_values
from moeforge.config.importers.imported import Kind


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-config",
        help="turn a Dense2MoE / LLaMA-MoE v2 / MoE-adapter / MoICE config into a moeforge recipe",
        description="Translate an original tool's config file into a moeforge recipe (YAML; every key commented "
        "with where it came from, everything left out with why). The recipe is validated before it is written.",
    )
    parser.add_argument("file", help="the original tool's config (.json, .yaml, or a .sh / .py with its variables)")
    parser.add_argument("--output", "-o", type=Path, help="recipe file to write (default: print it)")
    parser.add_argument("--kind", choices=literal_values(Kind), help="recipe kind (default: what the file is mainly about)")
    parser.add_argument("--model", help="the model the recipe starts from, over what the file names")
    parser.add_argument("--rope-theta", type=float, help="MoICE: the target model's RoPE base, to rescale base_set")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.config.importers import import_config
    from moeforge.io.publish import write_texts

    imported = import_config(args.file, kind=args.kind, model=args.model, rope_theta=args.rope_theta)
    if args.output is None:
        print(imported.text, end="")
    else:
        write_texts({args.output: imported.text})
        print(f"wrote {args.output}: a {imported.kind} recipe from {args.file} ({imported.tool})")
    return 0
