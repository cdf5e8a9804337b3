"""moeforge's own architecture (``moeforge_llama``): Llama with per-layer MoE blocks.

Used only when no native transformers architecture can hold a conversion exactly (per-layer expert
counts, mlp/gmm gates, unnormalised top-k, ...). Importing this package registers it with the Auto
classes, so no ``trust_remote_code`` is ever needed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from moeforge.modeling.configuration_moeforge_llama import MoeLayerSpec, MoeforgeLlamaConfig
from moeforge.modeling.modeling_moeforge_llama import (
    MoeforgeExperts,
    MoeforgeLlamaForCausalLM,
    MoeforgeLlamaModel,
    MoeforgeSparseMoeBlock,
)
from moeforge.modeling.routers import GMMRouter, LinearRouter, MLPRouter, TopKRouter, build_router, route

AutoConfig.register(MoeforgeLlamaConfig.model_type, MoeforgeLlamaConfig, exist_ok=True)
AutoModel.register(MoeforgeLlamaConfig, MoeforgeLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(MoeforgeLlamaConfig, MoeforgeLlamaForCausalLM, exist_ok=True)

__all__ = [
    "GMMRouter",
    "LinearRouter",
    "MLPRouter",
    "MoeLayerSpec",
    "MoeforgeExperts",
    "MoeforgeLlamaConfig",
    "MoeforgeLlamaForCausalLM",
    "MoeforgeLlamaModel",
    "MoeforgeSparseMoeBlock",
    "TopKRouter",
    "build_router",
    "route",
]
