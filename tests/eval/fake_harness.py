"""A stand-in for lm-evaluation-harness, which tests never install: records what moeforge hands it."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np
import pytest


class FakeHarness:
    """Records what moeforge hands to the harness and answers like ``simple_evaluate``."""

    def __init__(self) -> None:
        self.calls: dict[str, Any] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        harness = self
        names = ("lm_eval", "lm_eval.tasks", "lm_eval.models", "lm_eval.models.huggingface")
        root, tasks, models, huggingface = (ModuleType(name) for name in names)

        class TaskManager:
            def __init__(self, include_path: str | None = None) -> None:
                harness.calls["include_path"] = include_path
                self.all_tasks = ["hellaswag", "arc_easy", "my_task"]

        class HFLM:
            def __init__(self, **kwargs: Any) -> None:
                harness.calls["hflm"] = kwargs

        def simple_evaluate(**kwargs: Any) -> dict[str, Any]:
            harness.calls["evaluate"] = kwargs
            return {
                "results": {"my_task": {"alias": "my_task", "acc,none": np.float32(0.25), "acc_stderr,none": 0.1}},
                "versions": {"my_task": 1.0},
                "samples": {"my_task": ["bulky per-example logs"]},
            }

        tasks.TaskManager = TaskManager
        huggingface.HFLM = HFLM
        root.simple_evaluate = simple_evaluate
        root.tasks, root.models, models.huggingface = tasks, models, huggingface
        for module in (root, tasks, models, huggingface):
            monkeypatch.setitem(sys.modules, module.__name__, module)
