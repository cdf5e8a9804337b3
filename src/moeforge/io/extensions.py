"""What the layers above I/O add to loading a model, registered by them when they are imported.

The I/O layer loads what transformers loads. Two things of moeforge's own need code from higher layers,
and they plug in here instead of being imported from below (which would make the layers circular):

- a ``config.json`` key whose weights the plain architecture does not create, e.g. ``moice`` (MoICE
  attention routers): :func:`register_config_extension` names the function that installs the modules and
  copies their weights (:mod:`moeforge.modeling.moice` registers ``moice``);
- an adapter put on a loaded model: :func:`register_adapter_loader` (:mod:`moeforge.adapters` registers
  PEFT's, including moeforge's ``MOE_LORA`` method).

``import moeforge`` imports both registrants, so every entry point sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

    from moeforge.io.safetensors_reader import CheckpointReader

ConfigExtension = Callable[["PreTrainedModel", object, "CheckpointReader", Path], None]
"""``(model, the config entry, the checkpoint's reader, its directory)``: install and fill the extension."""
AdapterLoader = Callable[["nn.Module", Path], "nn.Module"]
"""``(base model, adapter directory)`` -> the model with the adapter on it."""

_CONFIG_EXTENSIONS: dict[str, ConfigExtension] = {}
_ADAPTER_LOADERS: list[AdapterLoader] = []


def register_config_extension(key: str, install: ConfigExtension) -> None:
    """Call ``install`` on every loaded model whose config has a truthy ``key`` (idempotent per key)."""
    _CONFIG_EXTENSIONS[key] = install


def register_adapter_loader(load: AdapterLoader) -> None:
    """The function that puts an adapter directory on a loaded model (the last one registered wins)."""
    _ADAPTER_LOADERS.append(load)


def config_extensions(config: object) -> list[tuple[str, object, ConfigExtension]]:
    """The registered extensions ``config`` uses: ``(key, entry, install)``."""
    return [(key, getattr(config, key), install) for key, install in _CONFIG_EXTENSIONS.items() if getattr(config, key, None)]


def adapter_loader() -> AdapterLoader:
    """The registered adapter loader. moeforge registers PEFT's when PEFT is imported
    (:mod:`moeforge.registration`), so importing PEFT here is what registers it."""
    if not _ADAPTER_LOADERS:
        import peft  # noqa: F401

    if not _ADAPTER_LOADERS:
        raise MoeforgeError("loading an adapter needs moeforge's adapter support: `import moeforge` first")
    return _ADAPTER_LOADERS[-1]
