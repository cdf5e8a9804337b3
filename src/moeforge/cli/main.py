"""Entry point of the ``moeforge`` command.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the parser it adds sets
``func(args) -> int``. User errors (:class:`~moeforge.errors.MoeforgeError`) become one line on stderr
and exit code 2; anything else is a bug and keeps its traceback. The library's progress lines, logged to
the ``moeforge`` logger, are shown on stderr as plain lines, and moeforge's own warnings as
``moeforge: warning: ...`` lines (:func:`moeforge_warnings`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import moeforge
from moeforge import __version__
from moeforge.cli import (
    chat_cmd,
    convert_cmd,
    data_cmd,
    eval_cmd,
    fetch_cmd,
    import_config_cmd,
    inspect_cmd,
    merge_cmd,
    plan_cmd,
    train_cmd,
)
from moeforge.errors import MoeforgeError

SUBCOMMANDS = (convert_cmd, train_cmd, eval_cmd, data_cmd, inspect_cmd, chat_cmd, merge_cmd, fetch_cmd, plan_cmd, import_config_cmd)


class _StderrHandler(logging.StreamHandler):
    """Writes each line to the ``sys.stderr`` of the moment, not the one at setup: ``main`` may run many
    times in one process (tests, an embedding program) with stderr swapped in between."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def configure_logging() -> None:
    """Show the library's INFO and above on stderr as bare messages, as the command's own output; once per
    process however often ``main`` runs. Other loggers (transformers, ...) are left as they are."""
    logger = logging.getLogger("moeforge")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


_PACKAGE_DIR = Path(moeforge.__file__).resolve().parent


def _is_moeforge_warning(category: type[Warning], filename: str) -> bool:
    """A ``UserWarning`` that Python attributes to a line of moeforge's code: the library's own warnings (its
    ``stacklevel`` points at moeforge's caller, which on the command line is moeforge too). Deprecation and
    future warnings, which concern the libraries moeforge calls, keep their usual form."""
    try:
        inside = Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False
    return issubclass(category, UserWarning) and inside


@contextmanager
def moeforge_warnings() -> Iterator[None]:
    """While a command runs, show moeforge's warnings as ``moeforge: warning: MESSAGE``: a user of the command
    needs the message, not the file, line and source text of the library code that raised it. Only the
    command installs this (and puts the previous hook back): library use from Python keeps standard warnings."""
    previous = warnings.showwarning

    def show(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None, line: str | None = None
    ) -> None:
        if _is_moeforge_warning(category, filename):
            print(f"moeforge: warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeforge",
        description="Turn dense decoder language models (Llama, Qwen, Gemma, Granite, SmolLM, OLMo, GLM, Phi, ERNIE, "
        "EXAONE families) into Mixture-of-Experts models; train, evaluate and ship them.",
    )
    parser.add_argument("--version", action="version", version=f"moeforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # moeforge prints its own progress; transformers' per-load bars would bury it. transformers reads this when
    # it is imported, which the commands do later (the parser and --help must not pay for it)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    configure_logging()
    try:
        with moeforge_warnings():
            return int(args.func(args) or 0)
    except MoeforgeError as err:
        print(f"moeforge {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"moeforge {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
