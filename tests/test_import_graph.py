"""The package's imports point down the layer order of scripts/import_graph.py, never up or in a cycle."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "import_graph.py"


def _script():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_no_arrow_points_up() -> None:
    graph = _script()
    assert graph.upward(graph.graph()) == []


def test_an_upward_arrow_is_caught() -> None:
    graph = _script()
    arrows = graph.graph()
    arrows[("io", "modeling")] = {"moeforge/io/loading.py"}
    arrows[("routing", "experts")] = {"moeforge/routing/x.py"}
    arrows[("experts", "routing")] = {"moeforge/experts/y.py"}
    problems = graph.upward(arrows)
    assert "io -> modeling points up (moeforge/io/loading.py)" in problems
    assert any(line.startswith("experts <-> routing import each other") for line in problems)


def test_every_package_has_a_layer() -> None:
    graph = _script()
    packages = {p.name for p in graph.PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in graph.PACKAGE.glob("*.py")} - {"__init__", "api", "registration"}
    assert packages | modules <= set(graph.RANK)
