"""lm-evaluation-harness is optional: its absence is a one-line install hint, and when present it gets
the model moeforge loaded (see :mod:`tests.eval.fake_harness`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from moeforge.errors import MoeforgeError
from moeforge.eval.lm_eval import INSTALL_HINT, run_lm_eval
from tests.eval.fake_harness import FakeHarness


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail even where it is installed
    with pytest.raises(MoeforgeError) as err:
        run_lm_eval(tmp_path, ["hellaswag"], output=tmp_path / "out.json")
    assert str(err.value) == INSTALL_HINT
    assert "pip install 'moeforge[eval]'" in INSTALL_HINT


def test_arguments_reach_the_harness(harness: FakeHarness, mixtral_dir: Path, tmp_path: Path) -> None:
    include = tmp_path / "tasks"
    include.mkdir()
    output = tmp_path / "out" / "lm_eval.json"
    scores = run_lm_eval(mixtral_dir, ["my_task"], include_path=include, limit=5, batch_size=3, output=output)

    assert harness.calls["include_path"] == str(include)
    hflm = harness.calls["hflm"]
    assert isinstance(hflm["pretrained"], PreTrainedModel) and hflm["pretrained"].config.model_type == "mixtral"
    assert hflm["tokenizer"] is not None and hflm["batch_size"] == 3
    evaluate = harness.calls["evaluate"]
    assert evaluate["tasks"] == ["my_task"] and evaluate["limit"] == 5
    assert evaluate["task_manager"].all_tasks  # the manager that knows the included tasks
    assert scores["results"]["my_task"]["acc,none"] == pytest.approx(0.25)
    assert "samples" not in scores
    assert json.loads(output.read_text()) == scores


def test_unknown_task_is_named(harness: FakeHarness, tmp_path: Path) -> None:
    with pytest.raises(MoeforgeError, match="unknown task\\(s\\) helaswag"):
        run_lm_eval(tmp_path, ["hellaswag", "helaswag"], output=tmp_path / "out.json")
    assert "hflm" not in harness.calls  # refused before any model was loaded
