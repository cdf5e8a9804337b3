"""The command line a results file prints to reproduce itself: only the flags that differ from the parser's
defaults, read from the parser, so no script keeps a second copy of its defaults."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def _shown(value: object) -> str:
    if isinstance(value, list | tuple):
        return " ".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def changed_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> str:
    """`` --name value`` for each option ``name`` (its dest) whose value differs from ``parser``'s default."""
    return "".join(
        f" --{name.replace('_', '-')} {_shown(getattr(args, name))}" for name in names if getattr(args, name) != parser.get_default(name)
    )
