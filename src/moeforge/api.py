"""moeforge's Python API: the jobs of the command line as functions, with the same recipes.

``moeforge convert RECIPE`` is ``moeforge.convert(RECIPE)``, ``moeforge train`` is :func:`train`,
``moeforge eval`` is :func:`evaluate`, ``moeforge merge`` is :func:`merge`. A recipe may be given as a
path to its YAML file, a mapping with the YAML's content, or a typed recipe object
(:class:`~moeforge.config.recipe.ConvertRecipe`, :class:`~moeforge.config.train_recipe.TrainRecipe`).
Bad input raises :class:`~moeforge.errors.MoeforgeError` with one line naming the culprit; progress is
reported through :mod:`logging` (logger ``moeforge``), silent unless the caller configures it.

``import moeforge`` resolves these names on first use, so it stays cheap until one is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from moeforge.config.recipe import ConvertRecipe, parse_recipe
from moeforge.config.recipe import load_recipe as _load_yaml
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from moeforge.adapters.merge import MergeResult
    from moeforge.conversion.pipeline import ConversionResult
    from moeforge.eval.evaluate import EvalResult
    from moeforge.training.runner import TrainResult

Recipe = TypeVar("Recipe", ConvertRecipe, TrainRecipe)
RecipeSource = str | Path | Mapping[str, Any]

_KINDS: dict[str, type[ConvertRecipe] | type[TrainRecipe]] = {"convert": ConvertRecipe, "train": TrainRecipe}


def _kind_of(data: Mapping[str, Any]) -> type[ConvertRecipe] | type[TrainRecipe]:
    """A training recipe names a ``stage`` and a ``model``; a conversion recipe a ``source``."""
    return TrainRecipe if "stage" in data or "model" in data else ConvertRecipe


def load_recipe(
    source: RecipeSource, overrides: Mapping[str, Any] | None = None, *, kind: str | None = None
) -> ConvertRecipe | TrainRecipe:
    """Read and validate a recipe: a YAML path or a mapping. ``kind`` is ``"convert"`` or ``"train"``
    (default: told by its keys). ``overrides`` set dotted keys, e.g. ``{"moe.routing.top_k": 2}``."""
    if kind is not None and kind not in _KINDS:
        raise MoeforgeError(f"kind {kind!r} is unknown: use one of {', '.join(_KINDS)}")
    if isinstance(source, Mapping):
        from moeforge.config.recipe import set_dotted

        data = {key: value for key, value in source.items()}
        for dotted, value in (overrides or {}).items():
            set_dotted(data, dotted, value)
        return parse_recipe(data, origin="recipe", model=_KINDS[kind] if kind else _kind_of(data))
    if kind is None:
        import yaml

        path = Path(source)
        try:
            peek = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (yaml.YAMLError, UnicodeDecodeError):
            peek = None  # the full read below reports it
        model = _kind_of(peek) if isinstance(peek, dict) else ConvertRecipe
    else:
        model = _KINDS[kind]
    return _load_yaml(source, dict(overrides or {}), model=model)


def _recipe(source: RecipeSource | ConvertRecipe | TrainRecipe, expected: type[Recipe]) -> Recipe:
    if isinstance(source, (ConvertRecipe, TrainRecipe)):
        recipe = source
    else:
        recipe = load_recipe(source, kind="convert" if expected is ConvertRecipe else "train")
    if not isinstance(recipe, expected):
        raise MoeforgeError(f"a {type(recipe).__name__} was given where a {expected.__name__} is needed")
    return recipe


def convert(recipe: RecipeSource | ConvertRecipe, *, overwrite: bool = False) -> ConversionResult:
    """Turn a dense model into an MoE checkpoint as ``recipe`` says (``moeforge convert``): checked
    against the dense model where the conversion must be exact, written atomically to ``recipe.output``."""
    from moeforge.conversion.pipeline import convert as run

    return run(_recipe(recipe, ConvertRecipe), overwrite=overwrite)


def train(recipe: RecipeSource | TrainRecipe) -> TrainResult:
    """Continued pretraining, SFT or DPO as ``recipe`` says (``moeforge train``); the trained model lands
    in ``recipe.output / "model"``."""
    from moeforge.training.runner import train as run

    return run(_recipe(recipe, TrainRecipe))


def evaluate(model: str | Path, **options: Any) -> EvalResult:
    """Perplexity, routing, probes and lm-eval of ``model`` (``moeforge eval``); options: see
    :func:`moeforge.eval.evaluate.evaluate`."""
    from moeforge.eval.evaluate import evaluate as run

    return run(model, **options)


def merge(
    adapter: str | Path, output: str | Path, *, base: str | None = None, dtype: str = "float32", overwrite: bool = False
) -> MergeResult:
    """Merge a trained adapter into its base (``moeforge merge``): a MoE-LoRA adapter becomes a native MoE
    checkpoint, checked against the adapter model before anything is written."""
    from moeforge.adapters.merge import merge_to_directory
    from moeforge.io.loading import TORCH_DTYPES

    return merge_to_directory(adapter, output, base=base, dtype=_dtype(dtype, TORCH_DTYPES), overwrite=overwrite)


def load_model(
    source: str | Path, *, dtype: str = "float32", device: str = "cpu", adapter: str | Path | None = None, **options: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A supported model (dense, native MoE, moeforge's own; a directory, hub id, ``.gguf`` file or
    ``"default"``) in eval mode, and its tokenizer; ``adapter`` puts a trained adapter on it. Options: see
    :func:`moeforge.io.loading.load_model`."""
    from moeforge.io.loading import TORCH_DTYPES
    from moeforge.io.loading import load_model as run

    return run(source, dtype=_dtype(dtype, TORCH_DTYPES), device=device, adapter=adapter, **options)


def _dtype(name: str, table: Mapping[str, torch.dtype]) -> torch.dtype:
    if name not in table:
        raise MoeforgeError(f"dtype {name!r} is unknown: use one of {', '.join(table)}")
    return table[name]
