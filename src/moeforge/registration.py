"""moeforge registers itself with transformers and PEFT when they are imported, so ``import moeforge`` stays light.

What gets registered, each by its own package when it is imported:

- :mod:`moeforge.experts`: moeforge's experts backends in transformers' experts interface;
- :mod:`moeforge.modeling`: the ``moeforge`` model type with the Auto classes, and MoICE restoration on load;
- :mod:`moeforge.adapters`: the ``MOE_LORA`` PEFT method, and PEFT as the adapter loader of moeforge's loading.

``import moeforge`` imports none of them (``moeforge --help`` must not pay for torch). Instead it asks to be
told when ``transformers`` (and ``peft``) finish importing, and imports the registrants then, so
``import moeforge; AutoModelForCausalLM.from_pretrained(dir)`` and ``PeftModel.from_pretrained`` work in
either import order. A registrant whose own import is what pulled transformers in is left alone: it
registers itself when its import completes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(module.__spec__, "_initializing", False))


def _register_with_transformers() -> None:
    if not _initializing("moeforge.experts"):
        import moeforge.experts  # noqa: F401  (registers the experts backends)
    if not _initializing("moeforge.modeling"):
        import moeforge.modeling  # noqa: F401  (registers the architecture and the MoICE loader)


def _register_with_peft() -> None:
    if not (_initializing("moeforge.adapters") or _initializing("moeforge.experts")):
        import moeforge.adapters  # noqa: F401  (registers MOE_LORA and the adapter loader)


_AFTER: dict[str, Callable[[], None]] = {"transformers": _register_with_transformers, "peft": _register_with_peft}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a watched top-level package finishes executing (once per package).

    It finds nothing itself: it asks the other finders for the package's spec and wraps that spec's
    loader so the callback follows ``exec_module``. A spec that is only looked at (``importlib.util.find_spec``,
    as transformers does to see whether PEFT is installed) is never executed, so the callback is spent only
    when the package really runs."""

    def __init__(self, callbacks: dict[str, Callable[[], None]]) -> None:
        self.callbacks = callbacks
        self._searching: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.callbacks or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the real finders (this one does not answer while it asks)
        finally:
            self._searching.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenCall(spec.loader, lambda: self._ran(fullname))
        return spec

    def _ran(self, fullname: str) -> None:
        callback = self.callbacks.pop(fullname, None)
        if not self.callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)
        if callback is not None:
            callback()


class _ThenCall(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]) -> None:
        self.loader = loader
        self.callback = callback

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, name: str) -> object:  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, name)


def install() -> None:
    """Register now with what is imported already, and after the import of what is not."""
    pending = {}
    for package, callback in _AFTER.items():
        if package in sys.modules:
            callback()
        else:
            pending[package] = callback
    if pending and not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(pending))
