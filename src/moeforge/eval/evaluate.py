"""Evaluate a model, optionally side by side with a second one: the job behind ``moeforge eval`` and
:func:`moeforge.evaluate`.

One call measures perplexity and per-layer routing on the chosen text, runs an optional position probe
and lm-evaluation-harness tasks, and writes ``eval.json`` (every figure), ``expert_load.png`` (and
``expert_load_compare.png``, and ``expert_load_difference.png`` when both models route the same layers) and ``position_curve.png`` into ``output``. Everything that can be checked
without a model (inputs, probe prompts, the harness being installed) is checked before the first load;
each model is freed before the next one is loaded, so two large models never share memory.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from moeforge.config.experts import DEFAULT_BACKEND
from moeforge.errors import MoeforgeError
from moeforge.eval.inputs import EvalInputs, EvalStage, load_inputs
from moeforge.eval.perplexity import PerplexityResult, perplexity
from moeforge.eval.probes import ProbeResult, ProbeSpec, run_probe
from moeforge.eval.report import has_routers
from moeforge.io.loading import TORCH_DTYPES, load_model, resolve_checkpoint
from moeforge.io.publish import check_output, write_json

if TYPE_CHECKING:
    from moeforge.eval.lm_eval import HarnessTasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEval:
    """One model's figures."""

    source: str
    perplexity: PerplexityResult
    probe: ProbeResult | None = None


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured and wrote. ``report`` is the content of ``eval.json``."""

    model: ModelEval | None
    """``None`` when only lm-eval ran (``perplexity=False``)."""
    data: str | None
    """Where the text came from (``None`` with no perplexity pass)."""
    output: Path
    report: dict[str, Any]
    compare: ModelEval | None = None
    lm_eval: dict[str, Any] | None = None
    written: list[Path] = field(default_factory=list)

    @property
    def probes(self) -> dict[str, ProbeResult]:
        return _probe_results(self.model, self.compare)


def _probe_results(first: ModelEval | None, second: ModelEval | None) -> dict[str, ProbeResult]:
    """Probe results by model; a model compared with itself (another dtype, say) keeps its own entry."""
    if first is None:
        return {}
    found = {first.source: first.probe} if first.probe is not None else {}
    if second is not None and second.probe is not None:
        found[second.source if second.source != first.source else f"{second.source} (compare)"] = second.probe
    return found


def default_output(model: str | Path) -> Path:
    """``MODEL/eval`` for a local model, else ``./moeforge-eval``."""
    local = Path(model).expanduser()
    return local / "eval" if local.is_dir() else Path("moeforge-eval")


def _device() -> str:
    """A GPU when there is one: evaluation is forward passes only and gains the most from it."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Settings(TypedDict):
    """How :func:`_measure` loads and runs each model (the same for the compared one)."""

    dtype: str
    device: str
    experts_backend: str
    max_length: int
    batch_size: int
    max_batches: int | None


def _measure(
    source: str,
    inputs: EvalInputs,
    probe: ProbeSpec | None,
    *,
    dtype: str,
    device: str,
    experts_backend: str,
    max_length: int,
    batch_size: int,
    max_batches: int | None,
) -> ModelEval:
    """Load ``source``, measure it (and probe it), and free it before the next model is loaded."""
    model, tokenizer = load_model(source, dtype=TORCH_DTYPES[dtype], device=device, experts_backend=experts_backend)
    if tokenizer is None:
        raise MoeforgeError(f"{source} has no tokenizer files; evaluation needs a checkpoint that ships its tokenizer")

    def log(line: str) -> None:
        logger.info("%s: %s", source, line)

    result = perplexity(
        model,
        tokenizer,
        max_length=max_length,
        batch_size=batch_size,
        max_batches=max_batches,
        log=log,
        **inputs.perplexity_kwargs(),
    )
    probed = run_probe(model, tokenizer, probe, batch_size=batch_size, log=log) if probe is not None else None
    del model
    gc.collect()
    return ModelEval(source, result, probed)


def _lm_eval_tasks(tasks: Sequence[str], include: Path | None, limit: float | None) -> HarnessTasks | None:
    """The harness tasks to run, checked against the harness's task index before any model is loaded."""
    if not any(task.strip() for task in tasks):
        for name, value in (("lm_eval_include", include), ("lm_eval_limit", limit)):
            if value is not None:
                raise MoeforgeError(f"{name} only applies to lm-eval tasks; name some in lm_eval_tasks")
        return None
    if limit is not None and limit <= 0:
        raise MoeforgeError(f"lm_eval_limit {limit} must be positive (a count, or a fraction when < 1)")
    from moeforge.eval.lm_eval import prepare_tasks

    return prepare_tasks(list(tasks), include)


def _lm_eval_only(tasks: HarnessTasks | None, given: dict[str, object]) -> None:
    """With ``perplexity=False`` only the harness runs: the inputs of the perplexity pass would be
    silently ignored, so naming one is an error, as is leaving nothing to run."""
    if tasks is None:
        raise MoeforgeError("perplexity=False leaves nothing to evaluate: name lm_eval_tasks, or keep the perplexity pass")
    for name, value in given.items():
        if value:
            raise MoeforgeError(f"{name} needs the perplexity pass; drop it or leave perplexity=True")


def _perplexity_pass(
    source: str,
    other: str | None,
    inputs: EvalInputs,
    probe: ProbeSpec | None,
    settings: _Settings,
    out: Path,
    report: dict[str, Any],
    written: list[Path],
) -> tuple[ModelEval, ModelEval | None]:
    """Measure ``source`` (and ``other``) on ``inputs``, adding their figures to ``report`` and the
    plots to ``written``; ``eval.json`` is saved after the first model, since the rest can take long."""
    logger.info("evaluating %s on %s", source, inputs.description)
    first = _measure(source, inputs, probe, **settings)
    report.update({"data": inputs.description, "max_length": settings["max_length"], **first.perplexity.to_dict()})
    written.append(write_json(out / "eval.json", report))
    if has_routers(first.perplexity.routing):
        from moeforge.eval.plots import plot_expert_load

        written.append(plot_expert_load(first.perplexity.routing, out / "expert_load.png", title=f"{source}: expert load"))
    second = _measure(other, inputs, probe, **settings) if other is not None else None
    if second is not None:
        delta = second.perplexity.perplexity - first.perplexity.perplexity
        report["compare"] = {"model": other, **second.perplexity.to_dict(), "delta_perplexity": delta}
        if has_routers(second.perplexity.routing):
            from moeforge.eval.plots import plot_expert_load

            path = out / "expert_load_compare.png"
            written.append(plot_expert_load(second.perplexity.routing, path, title=f"{other}: expert load"))
        from moeforge.eval.plots import can_compare_load, plot_load_difference

        if can_compare_load(first.perplexity.routing, second.perplexity.routing):
            path = out / "expert_load_difference.png"
            title = f"expert load: {other} − {source} (percentage points)"
            written.append(plot_load_difference(first.perplexity.routing, second.perplexity.routing, path, title))
    probes = _probe_results(first, second)
    if probes:
        from moeforge.eval.plots import plot_position_curve

        report["probes"] = {name: probed.to_dict() for name, probed in probes.items()}
        written.append(plot_position_curve(probes, out / "position_curve.png"))
    return first, second


def evaluate(
    model: str | Path,
    *,
    text: Sequence[str | Path] = (),
    data: str | Path | None = None,
    stage: EvalStage = "pt",
    columns: dict[str, str] | None = None,
    compare: str | Path | None = None,
    output: str | Path | None = None,
    max_length: int = 512,
    batch_size: int = 4,
    max_batches: int | None = None,
    dtype: str = "float32",
    device: str | None = None,
    experts_backend: str = DEFAULT_BACKEND,
    probe: ProbeSpec | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_include: str | Path | None = None,
    lm_eval_limit: float | None = None,
    perplexity: bool = True,
) -> EvalResult:
    """Perplexity and routing of ``model`` on ``text`` files, a ``data`` file (read as training reads it,
    by ``stage``: ``pt`` text or ``sft`` completion-only loss) or the built-in sample; with ``compare``, a
    second model on the same tokens; ``probe`` (:class:`~moeforge.eval.probes.KVProbe`,
    :class:`~moeforge.eval.probes.MDQAProbe`) on both; ``lm_eval_tasks`` on ``model`` (needs
    ``moeforge[eval]``; names, or task ``.yaml`` files and directories as ``lm_eval --tasks`` takes them).
    ``perplexity=False`` runs the lm-eval tasks alone (``eval.json`` then holds their scores, and no
    expert-load plot is drawn). Writes into ``output`` (default: :func:`default_output`) and returns every figure."""
    if dtype not in TORCH_DTYPES:
        raise MoeforgeError(f"dtype {dtype!r} is unknown: use one of {', '.join(TORCH_DTYPES)}")
    source, other = str(model), str(compare) if compare is not None else None
    include = Path(lm_eval_include) if lm_eval_include is not None else None
    tasks = _lm_eval_tasks(lm_eval_tasks, include, lm_eval_limit)
    if not perplexity:
        _lm_eval_only(
            tasks, {"text": text, "data": data, "columns": columns, "compare": compare, "probe": probe, "max_batches": max_batches}
        )
    if probe is not None:
        probe.prompts()  # a malformed probe fails before any model is loaded
    out = Path(output) if output is not None else default_output(source)
    check_output(out, overwrite=True)  # a file in the way or an unwritable parent: before any model loads
    for model_source in (source, other):
        if model_source is not None:
            resolve_checkpoint(model_source)  # a missing second model fails now, not after the first is measured
    settings: _Settings = {
        "dtype": dtype,
        "device": device or _device(),
        "experts_backend": experts_backend,
        "max_length": max_length,
        "batch_size": batch_size,
        "max_batches": max_batches,
    }
    report: dict[str, Any] = {"model": source}
    written: list[Path] = []
    first: ModelEval | None = None
    second: ModelEval | None = None
    description = None
    if perplexity:
        inputs = load_inputs([Path(p) for p in text], str(data) if data is not None else None, stage, columns)
        description = inputs.description
        first, second = _perplexity_pass(source, other, inputs, probe, settings, out, report, written)
    scores = None
    if tasks is not None:
        from moeforge.eval.lm_eval import run_lm_eval

        logger.info("lm-eval: %s", ", ".join(tasks.names))
        limit = int(lm_eval_limit) if lm_eval_limit is not None and lm_eval_limit >= 1 else lm_eval_limit
        scores = run_lm_eval(
            source,
            tasks,
            limit=limit,
            batch_size=batch_size,
            output=out / "lm_eval.json",
            dtype=TORCH_DTYPES[dtype],
            device=settings["device"],
        )
        report["lm_eval"] = scores
        written.append(out / "lm_eval.json")
    eval_json = write_json(out / "eval.json", report)
    if eval_json not in written:  # lm-eval alone: nothing was written before the harness ran
        written.insert(0, eval_json)
    return EvalResult(first, description, out, report, second, scores, written)
