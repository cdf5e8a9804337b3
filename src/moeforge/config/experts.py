"""The names ``experts_backend`` accepts (recipes, ``load_model``, ``--experts-backend``).

A leaf of names only, so recipes validate without importing the backends; :mod:`moeforge.experts`
registers moeforge's implementations with transformers under these names.
"""

from __future__ import annotations

from moeforge.errors import MoeforgeError

EXPERTS_BACKENDS: dict[str, str] = {
    "auto": "moeforge_auto",
    "eager": "eager",
    "grouped": "moeforge_grouped",
    "per_token": "moeforge_per_token",
    # transformers' own, by their names
    "grouped_mm": "grouped_mm",
    "batched_mm": "batched_mm",
    "sonicmoe": "sonicmoe",
    "deepgemm": "deepgemm",
}
"""moeforge backend name -> transformers experts implementation name."""

DEFAULT_BACKEND = "auto"


def implementation_name(backend: str) -> str:
    """The transformers experts implementation for ``backend``; a one-line error for an unknown name."""
    if backend in EXPERTS_BACKENDS:
        return EXPERTS_BACKENDS[backend]
    if backend in EXPERTS_BACKENDS.values():
        return backend
    raise MoeforgeError(f"experts_backend {backend!r} is unknown: use one of {', '.join(EXPERTS_BACKENDS)}")
