"""Experts execution backends: how a layer of ``E`` experts runs its token-expert pairs.

``experts_backend`` (recipes, ``load_model``, ``--experts-backend``) names one of :data:`EXPERTS_BACKENDS`;
each maps to an experts implementation registered with transformers' ``ExpertsInterface``, so moeforge's
own models and native exports (Mixtral, Qwen2-MoE) take the same names. MoE-LoRA adapters run their
per-expert deltas on the same grouped primitive (:func:`grouped_linear`).
"""

from __future__ import annotations

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeforge.config.experts import DEFAULT_BACKEND, EXPERTS_BACKENDS, implementation_name
from moeforge.experts.backends import (
    PER_TOKEN_MAX_SLOTS,
    auto_experts_forward,
    grouped_experts_forward,
    per_token_experts_forward,
)
from moeforge.experts.grouped_linear import grouped_linear, grouped_mm_supported
from moeforge.experts.slots import SlotPlan, combine, dispatch, plan_slots

_REGISTERED = {
    "moeforge_auto": auto_experts_forward,
    "moeforge_grouped": grouped_experts_forward,
    "moeforge_per_token": per_token_experts_forward,
}


def register() -> None:
    """Add moeforge's experts functions to transformers' ``ExpertsInterface`` (its documented extension
    point; idempotent). Runs when this package is imported (see :mod:`moeforge.registration`)."""
    for name, function in _REGISTERED.items():
        ALL_EXPERTS_FUNCTIONS.register(name, function)


register()


__all__ = [
    "DEFAULT_BACKEND",
    "EXPERTS_BACKENDS",
    "PER_TOKEN_MAX_SLOTS",
    "SlotPlan",
    "auto_experts_forward",
    "combine",
    "dispatch",
    "grouped_experts_forward",
    "grouped_linear",
    "grouped_mm_supported",
    "implementation_name",
    "per_token_experts_forward",
    "plan_slots",
    "register",
]
