"""The ``moice:`` recipe section: which RoPE bases the attention heads choose among, and how.

MoICE (Lin et al., NeurIPS 2024, arXiv 2406.19598) gives every attention head a small router that mixes
attention computed with several RoPE bases ("in-context experts"). The official release hard-codes the
set ``[10000, 17500, 18000, 19000, 20000, 22500, 25000]`` for Llama-2 (native θ = 10000); for another θ
the same ratios apply, which is the default here. The resolved settings are stored in the checkpoint's
``config.json`` under ``moice`` so loading never needs fields patched by hand.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from moeforge.errors import MoeforgeError

DEFAULT_BASE_RATIOS = (1.0, 1.75, 1.8, 1.9, 2.0, 2.25, 2.5)


class MoiceSpec(BaseModel):
    """What a user writes; :meth:`resolve` fills in the model-dependent defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KEYS_DOC: ClassVar[str] = 'docs/moice.md, section "The moice: section"'

    base_set: list[float] | None = None
    """RoPE bases, the model's native θ first (default: θ · [1, 1.75, 1.8, 1.9, 2.0, 2.25, 2.5])."""
    topk: int | None = Field(None, ge=1)
    """Bases mixed per token and head (default: all of them, as in the released recipe)."""
    router_aux_loss_coef: float = Field(default=0.3, ge=0)
    router_scope: Literal["layer_shared", "per_head"] = "layer_shared"
    """One router per layer shared by its heads (official), or one per head."""
    router_input: Literal["query_base0", "query_mean"] = "query_base0"
    """The router reads the query rotated with the native base (official), or its mean over all bases."""
    layers: list[int] | str | None = None
    """Decoder layers that get MoICE attention: all by default, or a list / ranges like "0-3,8"."""
    router_init_std: float = Field(default=0.02, gt=0)

    def resolve(self, native_theta: float, num_layers: int) -> ResolvedMoice:
        bases = list(self.base_set) if self.base_set is not None else [native_theta * r for r in DEFAULT_BASE_RATIOS]
        if not bases:
            raise MoeforgeError("moice.base_set is empty: give at least the model's native rope_theta")
        if any(b <= 0 for b in bases):
            raise MoeforgeError(f"moice.base_set {bases}: RoPE bases must be positive")
        if abs(bases[0] - native_theta) > 1e-6 * native_theta:
            raise MoeforgeError(
                f"moice.base_set starts with {bases[0]:g} but this model's rope_theta is {native_theta:g}: the first base "
                f"must be the native one (the router reads the query rotated with it, and routing everything to it "
                f"must give back the original model); put {native_theta:g} first"
            )
        topk = self.topk if self.topk is not None else len(bases)
        if topk > len(bases):
            raise MoeforgeError(f"moice.topk {topk} exceeds the {len(bases)} bases in base_set; use at most {len(bases)}")
        layers = _parse_layers(self.layers, num_layers)
        return ResolvedMoice(
            base_set=bases,
            topk=topk,
            router_aux_loss_coef=self.router_aux_loss_coef,
            router_scope=self.router_scope,
            router_input=self.router_input,
            layers=layers,
            router_init_std=self.router_init_std,
        )


class ResolvedMoice(BaseModel):
    """Concrete settings for one model; this is what ``config.json`` stores under ``moice``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_set: list[float]
    topk: int
    router_aux_loss_coef: float
    router_scope: Literal["layer_shared", "per_head"]
    router_input: Literal["query_base0", "query_mean"]
    layers: list[int]
    router_init_std: float = 0.02

    @property
    def num_bases(self) -> int:
        return len(self.base_set)


def _parse_layers(layers: list[int] | str | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, str):
        if not re.fullmatch(r"\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*", layers):
            raise MoeforgeError(f"moice.layers {layers!r}: use layer indices or ranges like '0-3,8'")
        chosen: set[int] = set()
        for part in layers.split(","):
            start, _, end = part.strip().partition("-")
            chosen.update(range(int(start), int(end or start) + 1))
    else:
        chosen = set(layers)
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad or not chosen:
        raise MoeforgeError(f"moice.layers: {bad or 'none'} not in this model's layers 0-{num_layers - 1}")
    return sorted(chosen)
