"""docs/api.md's examples run, in order, in one fresh directory, on the embedded SmolLM2."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "api.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_examples_for_every_function() -> None:
    code = "\n".join(examples())
    for name in ("convert", "load_recipe", "load_model", "train", "evaluate"):
        assert f"moeforge.{name}(" in code


@pytest.mark.smollm2
def test_the_examples_run(smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "demo.yaml", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in examples():
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (our own documentation)
    printed = capsys.readouterr().out
    assert "recipe: moe.top_k" in printed  # the validation example's one-line error
    assert "The capital of France is" in printed
