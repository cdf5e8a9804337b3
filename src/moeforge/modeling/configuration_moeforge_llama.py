"""Configuration of the ``moeforge_llama`` architecture: a LlamaConfig plus one MoE spec per layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

GateType = Literal["linear", "mlp", "gmm"]
Scoring = Literal["softmax_then_topk", "topk_then_softmax"]


@dataclass(frozen=True)
class MoeLayerSpec:
    """The MoE block of one decoder layer, as stored in ``config.moe_layers[i]``."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int = 0
    gate_type: GateType = "linear"
    gate_hidden_size: int = 256
    scoring: Scoring = "softmax_then_topk"
    normalize: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@strict
class MoeforgeLlamaConfig(LlamaConfig):
    r"""LlamaConfig with ``moe_layers``: one entry per decoder layer, ``None`` for a dense FFN or a dict of
    :class:`MoeLayerSpec` fields for an MoE block. Everything else (attention, RoPE, norms) is Llama's.

    The router loss coefficients live here so a loaded model adds its router losses to ``loss`` in any
    training loop (see :mod:`moeforge.routing.hooks`): ``router_aux_loss_coef`` weighs the per-layer switch
    balance loss (the name Mixtral and TRL use), ``router_z_loss_coef`` the z-loss, ``router_mi_loss_coef`` the
    mutual-information loss. ``router_aux_free`` records that the routers carry DeepSeek-V3's selection bias
    (``expert_bias``, saved with the weights), so loading creates it before the weights are read."""

    model_type = "moeforge_llama"
    moe_layers: list | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_mi_loss_coef: float = 0.0
    router_aux_free: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.moe_layers is None:
            self.moe_layers = [None] * self.num_hidden_layers
        if len(self.moe_layers) != self.num_hidden_layers:
            raise ValueError(
                f"moe_layers has {len(self.moe_layers)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )

    def layer_spec(self, layer_idx: int) -> MoeLayerSpec | None:
        entry = self.moe_layers[layer_idx]
        return None if entry is None else MoeLayerSpec(**entry)
