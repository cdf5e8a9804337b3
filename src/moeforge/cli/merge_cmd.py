"""``moeforge merge ADAPTER -o OUT``: an adapter folded into its base, as a plain checkpoint any engine serves.

Plain LoRA folds into the weights; a MoE-LoRA on a dense model becomes a native Mixtral-style MoE
(see :mod:`moeforge.adapters.merge`). The merged model is checked against the adapter model before
anything is written.
"""

from __future__ import annotations

import argparse

from moeforge.cli.dtypes import DTYPES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold an adapter into its base model (MoE-LoRA on a dense model -> native Mixtral-style MoE)",
        description="Merge an adapter directory (moeforge train with adapter:, or any PEFT LoRA) into its base and "
        "write a plain transformers checkpoint, checked against the adapter model first.",
    )
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", help="base model (default: the one the adapter records)")
    parser.add_argument("--output", "-o", required=True, help="output directory")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the merge and the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.adapters.merge import merge_to_directory
    from moeforge.io.loading import TORCH_DTYPES

    merge_to_directory(
        args.adapter,
        args.output,
        base=args.base,
        dtype=TORCH_DTYPES[args.dtype],
        overwrite=args.overwrite,
    )
    return 0
