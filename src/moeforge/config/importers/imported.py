"""A recipe translated from an original tool's file, and its YAML with a comment on every line.

One translation serves both recipe kinds: a key is recorded for ``convert`` or ``train`` (Dense2MoE's file
holds both the conversion and its router-loss weight), and the recipe of one kind lists the other kind's
keys as comments saying which command writes them. Every key of the source file ends up either behind a
``# from ...`` comment or in a ``# dropped`` comment with the reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Kind = Literal["convert", "train"]
PLAIN = re.compile(r"[A-Za-z_./][\w./-]*")
"""Strings written without quotes (when YAML reads them back as the same string: not ``true``, ``null``)."""


@dataclass(frozen=True)
class Entry:
    kind: Kind
    key: str
    """Dotted moeforge key, e.g. ``moe.routing.gate_type``."""
    value: Any
    comment: str
    """Where the value came from (``from expert_top_k``) or why it was filled in."""


@dataclass
class ImportedRecipe:
    tool: str
    """The original tool, as users know it (``Dense2MoE``)."""
    origin: Path
    kinds: tuple[Kind, ...]
    """The recipe kinds this tool's file can become, the default first."""
    entries: list[Entry] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    """Source key -> why it has no place in a moeforge recipe."""

    def put(self, kind: Kind, key: str, value: Any, comment: str) -> None:
        self.entries.append(Entry(kind, key, value, comment))

    def drop(self, key: str, why: str) -> None:
        self.dropped[key] = why

    def data(self, kind: Kind) -> dict[str, Any]:
        """The nested mapping of ``kind``'s entries (what the YAML says)."""
        tree: dict[str, Any] = {}
        for entry in self.entries:
            if entry.kind == kind:
                *parents, leaf = entry.key.split(".")
                node = tree
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = entry.value
        return tree

    def text(self, kind: Kind) -> str:
        """The recipe as YAML: a header naming the file, ``# from`` comments, and what was left out and why."""
        lines = [
            f"# moeforge {kind} recipe imported by `moeforge import-config` from {self.origin} ({self.tool});",
            "# each key says where it came from, and what was left out says why.",
        ]
        comments = {entry.key: entry.comment for entry in self.entries if entry.kind == kind}
        lines += _render(self.data(kind), comments, "")
        for other in self.kinds:
            entries = [entry for entry in self.entries if entry.kind == other != kind]
            if entries:
                lines += ["", f"# for the {other} recipe (moeforge import-config {self.origin} --kind {other}):"]
                lines += [f"#   {entry.key}: {_flow(entry.value)}  # {entry.comment}" for entry in entries]
        if self.dropped:
            lines += ["", "# left out:"]
            lines += [f"#   {key}: {why}" for key, why in self.dropped.items()]
        return "\n".join(lines) + "\n"


def _render(tree: dict[str, Any], comments: dict[str, str], prefix: str, indent: str = "") -> list[str]:
    lines = []
    for key, value in tree.items():
        dotted = prefix + key
        if isinstance(value, dict) and dotted not in comments:
            lines.append(f"{indent}{key}:")
            lines += _render(value, comments, dotted + ".", indent + "  ")
        else:
            lines.append(f"{indent}{key}: {_flow(value)}  # {comments[dotted]}")
    return lines


def _flow(value: Any) -> str:
    """A value in YAML flow style that reads back as the same value (YAML 1.1 needs ``1.0e-05``, not ``1e-05``)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        return text if "." in text or "e" not in text else text.replace("e", ".0e", 1)
    if isinstance(value, str) and PLAIN.fullmatch(value) and yaml.safe_load(value) == value:
        return value
    if isinstance(value, (int, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flow(str(k))}: {_flow(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)
