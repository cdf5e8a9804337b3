"""Benchmarks through lm-evaluation-harness, an optional extra (``pip install 'moeforge[eval]'``).

The model is loaded by moeforge (so ``moeforge_llama`` checkpoints load without remote code, and bad
paths fail with moeforge's one-line messages) and handed to the harness as an instance; the harness is
imported only when asked for, so moeforge works without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from moeforge.errors import MoeforgeError
from moeforge.io.publish import json_value, write_json

INSTALL_HINT = "lm-eval tasks need lm-evaluation-harness: pip install 'moeforge[eval]'"
# what the harness returns that describes the scores; the rest (samples, per-task configs) is bulk
_KEPT_KEYS = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")


def import_lm_eval() -> ModuleType:
    """The ``lm_eval`` package, or a :class:`MoeforgeError` with the install command."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM)
        import lm_eval.tasks  # noqa: F401  (TaskManager)
    except ImportError:
        raise MoeforgeError(INSTALL_HINT) from None
    return lm_eval


def run_lm_eval(
    model_path: str | Path,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    limit: float | None = None,
    batch_size: int = 1,
    output: Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run harness ``tasks`` (names, groups or tags; ``include_path`` adds a directory of task YAMLs)
    on the model at ``model_path``, with at most ``limit`` examples per task (a fraction when < 1).

    Writes the scores to ``output`` (JSON) and returns them: ``results`` per task, plus versions and
    few-shot counts so a figure can be reproduced."""
    lm_eval = import_lm_eval()
    from moeforge.io.loading import load_model

    if not tasks:
        raise MoeforgeError("lm-eval: name at least one task, e.g. hellaswag")
    if include_path is not None and not Path(include_path).is_dir():
        raise MoeforgeError(f"lm-eval include path {include_path} is not a directory of task YAML files")
    task_manager = lm_eval.tasks.TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        raise MoeforgeError(
            f"lm-eval: unknown task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks`"
            " or add their YAML directory as the include path"
        )
    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    if tokenizer is None:
        raise MoeforgeError(f"{model_path} has no tokenizer files; lm-eval needs a checkpoint that ships its tokenizer")
    harness_model = lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    raw = lm_eval.simple_evaluate(model=harness_model, tasks=list(tasks), limit=limit, task_manager=task_manager)
    # numpy scalars and the like become plain JSON values, so what is returned is what was written
    scores = json.loads(json.dumps({key: raw[key] for key in _KEPT_KEYS if key in raw}, default=json_value))
    write_json(output, scores)
    return scores
