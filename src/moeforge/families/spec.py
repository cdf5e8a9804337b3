"""What moeforge must know about a model family, and nothing more.

A :class:`DenseFamily` says where a decoder layer's gated FFN lives, how its weights are stored and
which config field names its activation; everything else about the family (attention variants, norm
placement, RoPE per layer type, multipliers, logit soft-capping, linear-attention layers) is left to
the family's own transformers code, which moeforge runs rather than re-implements. That is what keeps a
family's description a few lines long.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Ffn:
    """A decoder layer's gated FFN ``down(act(gate(x)) * up(x))`` in the checkpoint.

    ``fused_gate_up``: one ``gate_up_proj [2I, H]`` matrix with the gate rows first (Phi-3, GLM-4) instead
    of separate ``gate_proj`` / ``up_proj``."""

    module: str = "mlp"
    fused_gate_up: bool = False

    def weight_names(self) -> tuple[str, ...]:
        """Checkpoint names of the FFN's weights, relative to the decoder layer."""
        inputs = ("gate_up_proj",) if self.fused_gate_up else ("gate_proj", "up_proj")
        return tuple(f"{self.module}.{name}.weight" for name in (*inputs, "down_proj"))

    def intermediate_size(self, shape_of) -> int:
        """The FFN's neuron count from the first weight's shape (``shape_of(name) -> tuple``, relative names)."""
        rows = shape_of(self.weight_names()[0])[0]
        return rows // 2 if self.fused_gate_up else rows

    def split(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [I, H], up [I, H], down [H, I])`` from a layer's tensors (names relative to the layer)."""
        names = self.weight_names()
        if self.fused_gate_up:
            gate, up = tensors[names[0]].chunk(2, dim=0)
            return gate, up, tensors[names[1]]
        return tensors[names[0]], tensors[names[1]], tensors[names[2]]


def _nothing(_config) -> Any:
    return {}


@dataclass(frozen=True)
class Sibling:
    """A native MoE architecture whose decoder is this family's, so it holds a conversion exactly
    (as far as the recipe's MoE options allow: :class:`~moeforge.families.natives.NativeMoe`)."""

    target: str
    problems: Callable[[Any], list[str]] = lambda _config: []
    """Why a given source config's decoder does not fit the target (empty: it fits)."""
    carry: Callable[[Any], dict[str, Any]] = _nothing
    """Target config values derived from the source beyond the fields both configs name alike."""


@dataclass(frozen=True)
class DenseFamily:
    """A dense decoder family moeforge converts (and trains, evaluates, serves)."""

    model_type: str
    """transformers' ``model_type`` of the family's (text) config."""
    title: str
    """How people call it, for messages and docs."""
    traits: str
    """What its decoder has beyond Llama's, in a few words (docs, ``moeforge inspect``)."""
    siblings: tuple[Sibling, ...] = ()
    """Native MoE architectures that can hold a conversion of this family, most portable first (``export: auto``)."""
    activation_field: str = "hidden_act"
    ffn: Ffn = Ffn()
    llama_attention: bool = False
    """Its attention is Llama's: q/k/v/o projections, optional per-head q/k RMSNorm, one RoPE, optional sliding
    window, a scaling factor. moeforge's own attention modules (MoICE, and attention MoE's module that computes
    only the selected head groups) take over such an attention module's projections and recompute it; other
    families keep their attention code untouched (attention MoE weights their heads at ``o_proj``'s input)."""

    def activation(self, config) -> str:
        return getattr(config, self.activation_field)
