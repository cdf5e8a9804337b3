"""moeforge: dense decoder language models into Mixture-of-Experts models.

The Python API (:mod:`moeforge.api`, docs/api.md): :func:`convert`, :func:`train`, :func:`evaluate`,
:func:`merge`, :func:`load_model`, :func:`load_recipe` with :class:`ConvertRecipe` / :class:`TrainRecipe`,
resolved on first use.

Importing moeforge is light (no torch): it registers its architecture (``model_type: moeforge``, over any
supported family) with transformers' Auto classes as soon as transformers is imported, so ``import moeforge;
AutoModelForCausalLM.from_pretrained(path)`` loads any checkpoint moeforge wrote, without
``trust_remote_code``; likewise the ``MOE_LORA`` PEFT method once PEFT is imported (``import moeforge;
PeftModel.from_pretrained(base, adapter_dir)``), and its experts backends in transformers' experts interface
(``experts_implementation="moeforge_auto"``, ...). How: :mod:`moeforge.registration`.

Progress and notes go to the ``moeforge`` logger (a child per module, ``logging.getLogger(__name__)``) and
stay silent until the application configures logging; the ``moeforge`` command shows them on stderr.
"""

from __future__ import annotations

import logging
from importlib import import_module
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from moeforge import registration
from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from moeforge.api import convert, evaluate, load_model, load_recipe, merge, train
    from moeforge.config.recipe import ConvertRecipe
    from moeforge.config.train_recipe import TrainRecipe

__version__ = version("moeforge")

registration.install()
# a library stays quiet unless its user configures logging (Python's last-resort handler would print warnings)
logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "convert": "moeforge.api",
    "train": "moeforge.api",
    "evaluate": "moeforge.api",
    "merge": "moeforge.api",
    "load_model": "moeforge.api",
    "load_recipe": "moeforge.api",
    "ConvertRecipe": "moeforge.config.recipe",
    "TrainRecipe": "moeforge.config.train_recipe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeforge' has no attribute {name!r}")


__all__ = [  # noqa: F822 (resolved by __getattr__)
    "ConvertRecipe",
    "MoeforgeError",
    "TrainRecipe",
    "__version__",
    "convert",
    "evaluate",
    "load_model",
    "load_recipe",
    "merge",
    "train",
]
