"""Benchmarks through lm-evaluation-harness, an optional extra (``pip install 'moeforge[eval]'``).

The model is loaded by moeforge (so ``moeforge_llama`` checkpoints load without remote code, and bad
paths fail with moeforge's one-line messages) and handed to the harness as an instance; the harness is
imported only when asked for, so moeforge works without it.

Tasks are named as ``lm_eval --tasks`` takes them: registered names (tasks, groups, tags), a path to a
task ``.yaml`` file, or a directory of them. A path becomes the name(s) its YAML defines, with its
directory added to the harness's include paths, so every task is a name the harness has indexed and
:func:`prepare_tasks` can check them all before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml

from moeforge.errors import MoeforgeError
from moeforge.io.publish import json_value, write_json

INSTALL_HINT = "lm-eval tasks need lm-evaluation-harness: pip install 'moeforge[eval]'"
# what the harness returns that describes the scores; the rest (samples, per-task configs) is bulk
_KEPT_KEYS = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
# the only suffix the harness indexes (it globs **/*.yaml), so the only one a task path may have
_TASK_SUFFIX = ".yaml"


def import_lm_eval() -> ModuleType:
    """The ``lm_eval`` package, or a :class:`MoeforgeError` with the install command."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM)
        import lm_eval.tasks  # noqa: F401  (TaskManager)
    except ImportError:
        raise MoeforgeError(INSTALL_HINT) from None
    return lm_eval


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads harness task YAMLs for their names only: ``!function`` and other tags become ``None``
    instead of failing, as the harness's own index reads them before resolving functions."""


_TaskYamlLoader.add_multi_constructor("!", lambda _loader, _suffix, _node: None)


def _yaml_task_name(path: Path) -> str | None:
    """The name the harness indexes ``path`` under: ``group`` for a group config, else ``task``
    (a Python task has both ``class`` and ``task``); ``None`` when the file defines neither."""
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506  (a SafeLoader)
    except (OSError, yaml.YAMLError) as err:
        raise MoeforgeError(f"lm-eval task file {path} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        return None
    name = config.get("group") if "group" in config and "class" not in config else config.get("task")
    return name if isinstance(name, str) else None


def resolve_task_paths(tasks: list[str]) -> tuple[list[str], dict[str, Path], list[Path]]:
    """Task names for ``tasks`` as ``lm_eval --tasks`` reads them, with no harness needed.

    Returns the names (in order, without repeats), the file each path-given name came from (for
    messages), and the directories to add to the harness's include paths."""
    names: list[str] = []
    sources: dict[str, Path] = {}
    directories: list[Path] = []
    for task in tasks:
        path = Path(task).expanduser()
        if path.is_dir():
            found = {name: file for file in sorted(path.glob(f"*{_TASK_SUFFIX}")) if (name := _yaml_task_name(file)) is not None}
            if not found:
                raise MoeforgeError(f"lm-eval task directory {path} has no {_TASK_SUFFIX} file that defines a task or group")
        elif task.endswith(_TASK_SUFFIX):
            if not path.is_file():
                raise MoeforgeError(f"lm-eval task file {path} does not exist")
            name = _yaml_task_name(path)
            if name is None:
                raise MoeforgeError(f"lm-eval task file {path} defines no task name: give it a `task:` (or `group:`) key")
            found = {name: path}
        else:
            found = {}
            if task not in names:
                names.append(task)
        for name, file in found.items():
            if name not in names:
                names.append(name)
            sources.setdefault(name, file)
            if file.parent not in directories:
                directories.append(file.parent)
    return names, sources, directories


@dataclass(frozen=True)
class HarnessTasks:
    """Checked task names and the harness ``TaskManager`` that knows them, built once by
    :func:`prepare_tasks` (building one indexes every task YAML the harness ships, which takes seconds)."""

    names: list[str]
    manager: Any


def prepare_tasks(tasks: list[str], include_path: str | Path | None = None) -> HarnessTasks:
    """Import the harness and check that it knows every one of ``tasks`` (names, groups, tags, task
    ``.yaml`` files or directories of them; ``include_path`` adds a directory of task YAMLs), without
    loading any model."""
    tasks = [task.strip() for task in tasks if task.strip()]
    if not tasks:
        raise MoeforgeError("lm-eval: name at least one task, e.g. hellaswag")
    if include_path is not None and not Path(include_path).is_dir():
        raise MoeforgeError(f"lm-eval include path {include_path} is not a directory of task YAML files")
    lm_eval = import_lm_eval()
    names, sources, directories = resolve_task_paths(tasks)
    given = [Path(include_path)] if include_path is not None else []
    include_paths = [str(path) for path in dict.fromkeys([*given, *directories])]
    manager = lm_eval.tasks.TaskManager(include_path=include_paths or None)
    unknown = [f"{name} (from {sources[name]})" if name in sources else name for name in names if name not in manager.all_tasks]
    if unknown:
        raise MoeforgeError(
            f"lm-eval: unknown task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks`,"
            " give a task .yaml path, or add their YAML directory as the include path"
        )
    return HarnessTasks(names, manager)


def run_lm_eval(
    model_path: str | Path,
    tasks: HarnessTasks,
    *,
    limit: float | None = None,
    batch_size: int = 1,
    output: Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the harness ``tasks`` (from :func:`prepare_tasks`) on the model at ``model_path``, with at
    most ``limit`` examples per task (a fraction when < 1).

    Writes the scores to ``output`` (JSON) and returns them: ``results`` per task, plus versions and
    few-shot counts so a figure can be reproduced."""
    lm_eval = import_lm_eval()
    from moeforge.io.loading import load_model

    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    if tokenizer is None:
        raise MoeforgeError(f"{model_path} has no tokenizer files; lm-eval needs a checkpoint that ships its tokenizer")
    harness_model = lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    raw = lm_eval.simple_evaluate(model=harness_model, tasks=list(tasks.names), limit=limit, task_manager=tasks.manager)
    # numpy scalars and the like become plain JSON values, so what is returned is what was written
    scores = json.loads(json.dumps({key: raw[key] for key in _KEPT_KEYS if key in raw}, default=json_value))
    write_json(output, scores)
    return scores
