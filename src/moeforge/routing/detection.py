"""Finding the routers of an MoE model, whatever its architecture.

transformers 5's Mixtral/Qwen2-MoE/Qwen3-MoE routers (``*TopKRouter``) and moeforge's own
(:class:`moeforge.modeling.routers.TopKRouter`) share one contract: integer ``top_k`` and ``num_experts``
attributes and a forward returning ``(logits [T, E], weights [T, k], indices [T, k])``. Detecting that
contract rather than class names keeps this module free of model imports (no import cycle with
``moeforge.modeling``, which attaches the losses itself) and covers future architectures of the same shape.
A MoE block that also carries both attributes is skipped in favour of the router inside it; the output
shape is checked on the first call (:func:`split_router_output`), since a forward's return cannot be
known before it runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from moeforge.errors import MoeforgeError


@dataclass(frozen=True)
class RouterRef:
    """One router, in model order: its qualified name, a short label for tables, and its shape."""

    name: str
    label: str
    module: nn.Module
    num_experts: int
    top_k: int
    per_token: int = 1
    """Routing decisions each token makes (MoICE: one per attention head); rows of a call = tokens · this."""
    balance_coef: float | None = None
    """A balance coefficient of the router's own (MoICE's 0.3) instead of the recipe's FFN one."""


def _is_router_like(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, attr, None), int) for attr in ("top_k", "num_experts"))


def _label(name: str) -> str:
    """``model.layers.12.mlp.gate`` -> ``12``: the decoder layer, which is what a reader looks for;
    ``12.attn`` for a MoICE router (RoPE bases) and ``12.heads`` for an attention MoE one (head groups),
    since a layer can have an FFN router and both of those."""
    match = re.search(r"layers\.(\d+)\.", name)
    if not match:
        return name
    if ".self_attn." not in name:
        return match.group(1)
    return f"{match.group(1)}.heads" if ".head_gate." in name else f"{match.group(1)}.attn"


def find_routers(model: nn.Module) -> list[RouterRef]:
    """The model's routers in module (= layer) order; empty for a dense model."""
    candidates = [(name, module) for name, module in model.named_modules() if _is_router_like(module)]
    inner = {name for name, _ in candidates}
    return [
        RouterRef(
            name,
            _label(name),
            module,
            module.num_experts,
            module.top_k,
            getattr(module, "decisions_per_token", 1),
            getattr(module, "balance_coef", None),
        )
        for name, module in candidates
        if not any(other.startswith(f"{name}.") for other in inner)
    ]


def split_router_output(router: RouterRef, output: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [T, E], indices [T, k])`` of one router call; a module that only looked like a router
    (wrong output) is an error rather than a silently wrong loss."""
    if (
        isinstance(output, tuple)
        and len(output) == 3
        and all(isinstance(t, torch.Tensor) for t in output)
        and output[0].shape[-1] == router.num_experts
        and output[2].shape[-1] == router.top_k
    ):
        return output[0].reshape(-1, router.num_experts), output[2].reshape(-1, router.top_k)
    raise MoeforgeError(
        f"{router.name} ({type(router.module).__name__}) has top_k and num_experts but does not return "
        f"(logits [T, {router.num_experts}], weights, indices [T, {router.top_k}]); router losses cannot read it"
    )
