"""A stand-in for lm-evaluation-harness, which tests never install: records what moeforge hands it."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

BUILTIN_TASKS = ["hellaswag", "arc_easy", "my_task"]


class _AnyTagLoader(yaml.SafeLoader):
    """Like the harness's index, reads a task YAML without resolving ``!function`` tags."""


_AnyTagLoader.add_multi_constructor("!", lambda _loader, _suffix, _node: None)


def indexed_names(include_path: str | list[str] | None) -> list[str]:
    """What the real ``TaskManager`` adds for its include path(s): every ``**/*.yaml`` under them, by its
    ``group`` (group configs) or ``task`` name."""
    paths = [include_path] if isinstance(include_path, str) else include_path or []
    names = []
    for root in paths:
        for file in sorted(Path(root).glob("**/*.yaml")):
            config = yaml.load(file.read_text(), Loader=_AnyTagLoader)  # noqa: S506  (a SafeLoader)
            name = config.get("group", config.get("task")) if isinstance(config, dict) else None
            if isinstance(name, str):
                names.append(name)
    return names


class FakeHarness:
    """Records what moeforge hands to the harness and answers like ``simple_evaluate``."""

    def __init__(self) -> None:
        self.calls: dict[str, Any] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        harness = self
        names = ("lm_eval", "lm_eval.tasks", "lm_eval.models", "lm_eval.models.huggingface")
        root, tasks, models, huggingface = (ModuleType(name) for name in names)

        class TaskManager:
            def __init__(self, include_path: str | list[str] | None = None) -> None:
                harness.calls["include_path"] = include_path
                harness.calls["task_managers"] = harness.calls.get("task_managers", 0) + 1
                self.all_tasks = BUILTIN_TASKS + indexed_names(include_path)

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
