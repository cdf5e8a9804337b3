"""Configuration of moeforge's own architecture: any dense family's config plus one MoE spec per layer.

A moeforge checkpoint's ``config.json`` is the source family's config, flat, with ``model_type:
"moeforge"``, ``base_model_type`` (the family, e.g. ``gemma3_text``) and ``moe_layers``. Loading builds,
once per family, a subclass of the family's own config class (:func:`config_class`), so the family's
modeling code reads every field it knows exactly as it would from a dense checkpoint. The class
registered with ``AutoConfig`` (:class:`MoeforgeConfig`) only dispatches on ``base_model_type``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moeforge.errors import MoeforgeError
from moeforge.families import LEGACY_MODEL_TYPES, MOEFORGE_MODEL_TYPE, dense_family, known_dense_family, softmax_attention_layers

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


@dataclass(frozen=True)
class AttentionMoeLayerSpec:
    """The attention MoE of one decoder layer, as stored in ``config.attention_moe_layers[i]``: the layer's
    query heads split into ``num_experts`` equal groups of consecutive heads, each group with the KV heads it
    reads; ``shared_experts`` (group indices) always contribute with weight 1, a router picks ``top_k`` of the
    others per token, whose renormalised weights are multiplied by ``scale``."""

    num_experts: int
    top_k: int
    shared_experts: tuple[int, ...] = ()
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shared_experts", tuple(self.shared_experts))  # JSON gives a list

    @property
    def routed_experts(self) -> tuple[int, ...]:
        return tuple(group for group in range(self.num_experts) if group not in self.shared_experts)

    def problems(self, num_heads: int, num_kv_heads: int) -> list[str]:
        """Why this split does not fit attention with these head counts (empty: it fits)."""
        if num_heads % self.num_experts:
            return [f"num_experts {self.num_experts} does not divide the {num_heads} query heads"]
        size, per_kv = num_heads // self.num_experts, num_heads // num_kv_heads
        problems = []
        if per_kv % size and size % per_kv:
            problems.append(
                f"groups of {size} heads would split the {per_kv} query heads of a KV head unevenly "
                f"(use a multiple or a divisor of {num_kv_heads} groups)"
            )
        if len(set(self.shared_experts)) != len(self.shared_experts) or not all(0 <= g < self.num_experts for g in self.shared_experts):
            problems.append(f"shared_experts {list(self.shared_experts)} must be distinct groups 0-{self.num_experts - 1}")
        if not 1 <= self.top_k <= len(self.routed_experts):
            problems.append(f"top_k {self.top_k} must be between 1 and the {len(self.routed_experts)} routed groups")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shared_experts": list(self.shared_experts)}


class MoeforgeConfigMixin:
    r"""What a moeforge config adds to its family's: ``moe_layers`` (one entry per decoder layer, ``None``
    for the family's dense FFN or a dict of :class:`MoeLayerSpec` fields) and the router loss settings.

    The loss coefficients live here so a loaded model adds its router losses to ``loss`` in any training
    loop (see :mod:`moeforge.routing.hooks`): ``router_aux_loss_coef`` weighs the per-layer switch balance
    loss (the name Mixtral and TRL use), ``router_z_loss_coef`` the z-loss, ``router_mi_loss_coef`` the
    mutual-information loss (attention-MoE routers count as router layers like FFN ones). ``attention_moe_layers``
    (``None`` or one entry per layer: ``None`` or a dict of :class:`AttentionMoeLayerSpec` fields) splits
    attention heads into routed groups. ``router_aux_free`` records that the routers carry DeepSeek-V3's selection bias
    (``expert_bias``, saved with the weights), so loading creates it before the weights are read."""

    base_model_type: str
    moe_layers: list[dict[str, Any] | None]
    attention_moe_layers: list[dict[str, Any] | None] | None
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.moe_layers is None:
            self.moe_layers = [None] * self.num_hidden_layers
        if len(self.moe_layers) != self.num_hidden_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries but num_hidden_layers is {self.num_hidden_layers}")
        if self.attention_moe_layers is not None:
            if len(self.attention_moe_layers) != self.num_hidden_layers:
                raise ValueError(
                    f"attention_moe_layers has {len(self.attention_moe_layers)} entries but num_hidden_layers is {self.num_hidden_layers}"
                )
            kv_heads = getattr(self, "num_key_value_heads", None) or self.num_attention_heads
            attention_layers = softmax_attention_layers(self)
            for index in range(self.num_hidden_layers):
                spec = self.attention_layer_spec(index)
                problems = spec.problems(self.num_attention_heads, kv_heads) if spec else []
                if spec and index not in attention_layers:
                    problems = ["the layer has linear attention, no attention heads to group"]
                if problems:
                    raise ValueError(f"attention_moe_layers[{index}]: {'; '.join(problems)}")

    def layer_spec(self, layer_idx: int) -> MoeLayerSpec | None:
        entry = self.moe_layers[layer_idx]
        return None if entry is None else MoeLayerSpec(**entry)

    def attention_layer_spec(self, layer_idx: int) -> AttentionMoeLayerSpec | None:
        entry = (self.attention_moe_layers or [None] * self.num_hidden_layers)[layer_idx]
        return None if entry is None else AttentionMoeLayerSpec(**entry)

    @property
    def ffn_activation(self) -> str:
        """The activation of the family's FFN (and so of every expert): ``hidden_act`` or the family's name for it."""
        return known_dense_family(self.base_model_type).activation(self)


_FIELDS: dict[str, tuple[Any, Any]] = {
    "moe_layers": (list | None, None),
    "attention_moe_layers": (list | None, None),
    "router_aux_loss_coef": (float, 0.01),
    "router_z_loss_coef": (float, 0.0),
    "router_mi_loss_coef": (float, 0.0),
    "router_aux_free": (bool, False),
}


def _ep_plan(ffn: str) -> dict[str, str]:
    """transformers' expert-parallel plan for moeforge's MoE blocks (at the family's FFN name): the plan of Mixtral
    and Qwen-MoE, whose experts modules share our layout (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
    ``num_experts``, ``@use_experts_implementation``). Layers left dense match no rule."""
    return {
        f"layers.*.{ffn}.experts.gate_up_proj": "grouped_gemm",
        f"layers.*.{ffn}.experts.down_proj": "grouped_gemm",
        f"layers.*.{ffn}.experts": "ep_dispatch_experts",
    }


@functools.cache
def config_class(base_model_type: str) -> type[PretrainedConfig]:
    """The moeforge config class over family ``base_model_type`` (built once, then cached)."""
    family = dense_family(base_model_type)
    if family is None:
        raise MoeforgeError(f"moeforge has no description of model family {base_model_type!r}")
    base = CONFIG_MAPPING[base_model_type]
    namespace: dict[str, Any] = {
        "__module__": "moeforge.modeling.modeling",  # where the class is importable by name (and so picklable)
        "__doc__": f"moeforge MoE over {family.title}: {base.__name__} plus ``moe_layers`` and router-loss settings.",
        "model_type": MOEFORGE_MODEL_TYPE,
        "__annotations__": {"base_model_type": str, **{name: kind for name, (kind, _) in _FIELDS.items()}},
        "base_model_type": base_model_type,
        "base_model_ep_plan": _ep_plan(family.ffn.module),
        **{name: default for name, (_, default) in _FIELDS.items()},
    }
    return strict(type(f"Moeforge{base.__name__}", (MoeforgeConfigMixin, base), namespace))


def _registered(base_model_type: str) -> type[PretrainedConfig]:
    """:func:`config_class`, with the model classes over the family registered with the Auto classes too."""
    from moeforge.modeling.modeling import architecture  # the modeling module imports this one

    return architecture(base_model_type).config_class


class MoeforgeConfig(PretrainedConfig):
    """Registered with ``AutoConfig`` for ``model_type: moeforge``; it is never instantiated itself: reading
    a config dict returns an instance of :func:`config_class` for the dict's ``base_model_type``."""

    model_type = MOEFORGE_MODEL_TYPE
    default_base: str | None = None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:  # type: ignore[override]  # returns the family's class, as AutoConfig does
        base = config_dict.get("base_model_type", cls.default_base)
        if not isinstance(base, str) or dense_family(base) is None:
            raise ValueError(f"moeforge config: base_model_type {base!r} is not a model family moeforge knows")
        return _registered(base).from_dict({**config_dict, "model_type": MOEFORGE_MODEL_TYPE, "base_model_type": base}, **kwargs)


class LegacyMoeforgeLlamaConfig(MoeforgeConfig):
    """``model_type: moeforge_llama`` (moeforge 0.1): a moeforge model over Llama."""

    model_type = "moeforge_llama"
    default_base = LEGACY_MODEL_TYPES[model_type]


def moeforge_config(base: PretrainedConfig, moe_layers: list | None = None, **settings: Any) -> PretrainedConfig:
    """A moeforge config over the dense ``base`` config: the same fields, plus ``moe_layers`` (default: all
    dense) and any router-loss ``settings`` (:data:`_FIELDS`)."""
    from moeforge.modeling.modeling import architecture  # the modeling module imports this one

    arch = architecture(base.model_type)
    values = {key: value for key, value in base.to_dict().items() if key not in ("model_type", "transformers_version")}
    values["architectures"] = [arch.causal_lm_class.__name__]
    return arch.config_class.from_dict({**values, "moe_layers": moe_layers, **settings})


def is_moeforge_config(config: PretrainedConfig) -> bool:
    return isinstance(config, MoeforgeConfigMixin)
