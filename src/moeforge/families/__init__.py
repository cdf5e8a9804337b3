"""Per-family facts, declared once: which dense decoders convert and which native MoE architectures hold them."""

from __future__ import annotations

from moeforge.errors import MoeforgeError
from moeforge.families.dense import DENSE_FAMILIES
from moeforge.families.natives import NATIVE_MODEL_TYPES, NATIVE_MOES, LlamaCpp, MoeKeys, NativeMoe, native_moe
from moeforge.families.spec import DenseFamily, Ffn, Sibling

MOEFORGE_MODEL_TYPE = "moeforge"
"""moeforge's own architecture: any family above with MoE blocks (:mod:`moeforge.modeling`)."""
LEGACY_MODEL_TYPES = {"moeforge_llama": "llama"}
"""Model types earlier moeforge versions wrote, and the family they meant."""

_BY_TYPE = {family.model_type: family for family in DENSE_FAMILIES}
DENSE_MODEL_TYPES: tuple[str, ...] = tuple(_BY_TYPE)


def dense_family(model_type: str) -> DenseFamily | None:
    """The description of dense family ``model_type``, or None when moeforge does not know it."""
    return _BY_TYPE.get(model_type)


def known_dense_family(model_type: str) -> DenseFamily:
    """The description of ``model_type``, for code past the point where the family was checked."""
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise MoeforgeError(f"model_type {model_type!r} is not a dense family moeforge converts: {', '.join(DENSE_MODEL_TYPES)}")
    return family


def known_native_moe(model_type: str) -> NativeMoe:
    """The native MoE architecture ``model_type``, for code past the point where the target was chosen."""
    native = native_moe(model_type)
    if native is None:
        raise MoeforgeError(f"model_type {model_type!r} is not a native MoE architecture moeforge exports: {', '.join(NATIVE_MODEL_TYPES)}")
    return native


__all__ = [
    "DENSE_FAMILIES",
    "DENSE_MODEL_TYPES",
    "LEGACY_MODEL_TYPES",
    "MOEFORGE_MODEL_TYPE",
    "NATIVE_MODEL_TYPES",
    "NATIVE_MOES",
    "DenseFamily",
    "Ffn",
    "LlamaCpp",
    "MoeKeys",
    "NativeMoe",
    "Sibling",
    "dense_family",
    "known_dense_family",
    "known_native_moe",
    "native_moe",
    "source_family",
    "has_llama_attention",
    "softmax_attention_layers",
]


def has_llama_attention(config) -> bool:
    """Whether a model of this config has Llama's attention (its family's, for moeforge's architecture its base
    family's): what MoICE takes over, and where attention MoE runs moeforge's own module
    (:attr:`DenseFamily.llama_attention`)."""
    family = dense_family(getattr(config, "base_model_type", None) or config.model_type)
    native = native_moe(config.model_type)
    return bool((family and family.llama_attention) or (native and native.llama_attention))


def source_family(config, source: str) -> DenseFamily:
    """The dense family of a conversion source's ``config``; a one-line error naming the families moeforge
    converts otherwise."""
    family = dense_family(config.model_type)
    if family is not None:
        return family
    raise MoeforgeError(
        f"source: {source} is a {config.model_type} model; convert takes a dense decoder of one of these families: "
        f"{', '.join(DENSE_MODEL_TYPES)}"
    )


def softmax_attention_layers(config) -> list[int]:
    """The decoder layers with softmax attention (a ``self_attn``, whose heads attention MoE can group): every
    layer but the linear-attention ones of hybrid families (Qwen3.5's gated delta-net layers, ``layer_types``
    entry ``linear_attention``)."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [index for index, kind in enumerate(kinds) if kind != "linear_attention"]
