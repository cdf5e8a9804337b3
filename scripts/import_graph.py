"""Print moeforge's package import graph and every arrow that points up the layer order.

The layers, top to bottom (a package may import its own layer's packages and anything below):

    cli
    api                                          (moeforge/__init__.py, api.py, registration.py)
    conversion  training  eval  adapters  planning  (the workflows)
    data                                         (datasets, tokenisation, calibration text)
    modeling                                     (moeforge's architecture over any family)
    routing  experts                             (router losses and statistics, experts backends)
    io                                           (checkpoints, loading, publishing outputs)
    config                                       (typed recipes and the names they use: a leaf)
    families                                     (declarative per-family facts)
    errors

Packages of one layer may import each other, but never in a cycle. Every ``import`` counts, also the ones inside functions and under ``TYPE_CHECKING``: a lazy import is still
a dependency. Usage: ``python scripts/import_graph.py [--dot]``; exits 1 when an arrow points up.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moeforge"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("api",),
    ("conversion", "training", "eval", "adapters", "planning"),
    ("data",),
    ("modeling",),
    ("routing", "experts"),
    ("io",),
    ("config",),
    ("families",),
    ("errors",),
)
RANK = {name: len(LAYERS) - i for i, names in enumerate(LAYERS) for name in names}


def unit_of(module: str) -> str:
    """``moeforge.conversion.pipeline`` -> ``conversion``; the package root and its modules -> ``api``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__init__", "api", "registration"):
        return "api"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every moeforge module ``path`` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from moeforge import convert`` imports the subpackage itself
            if target == "moeforge":
                found.update(f"moeforge.{a.name}" for a in node.names if (PACKAGE / a.name).is_dir())
    return {m for m in found if m == "moeforge" or m.startswith("moeforge.")}


def graph() -> dict[tuple[str, str], set[str]]:
    """(importer unit, imported unit) -> the files that make the arrow."""
    arrows: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        src = unit_of(module_name(path))
        for target in imported_modules(path):
            dst = unit_of(target)
            if dst != src:
                arrows[(src, dst)].add(str(path.relative_to(PACKAGE.parent)))
    return arrows


def upward(arrows: dict[tuple[str, str], set[str]]) -> list[str]:
    """One line per arrow that points to a higher layer (or to a unit missing from LAYERS)."""
    problems = []
    for (src, dst), files in sorted(arrows.items()):
        if src not in RANK or dst not in RANK:
            problems.append(f"{src} -> {dst}: not in the layer list ({', '.join(sorted(files))})")
        elif RANK[dst] > RANK[src]:
            problems.append(f"{src} -> {dst} points up ({', '.join(sorted(files))})")
    same_layer = {(s, d) for (s, d) in arrows if s in RANK and d in RANK and RANK[s] == RANK[d]}
    for src, dst in sorted(same_layer):
        if src < dst and (dst, src) in same_layer:
            problems.append(f"{src} <-> {dst} import each other ({', '.join(sorted(arrows[(src, dst)] | arrows[(dst, src)]))})")
    return problems


def main(argv: list[str]) -> int:
    arrows = graph()
    if "--dot" in argv:
        print("digraph moeforge {\n  rankdir=TB;")
        for src, dst in sorted(arrows):
            print(f"  {src} -> {dst};")
        print("}")
    else:
        for names in LAYERS:
            for src in names:
                targets = sorted({dst for (s, dst) in arrows if s == src}, key=lambda d: -RANK.get(d, 99))
                print(f"{src:>9} -> {', '.join(targets) if targets else '(nothing)'}")
    problems = upward(arrows)
    for line in problems:
        print("UPWARD:", line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
