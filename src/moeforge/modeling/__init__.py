"""moeforge's own architecture (``model_type: moeforge``): any supported dense family with MoE blocks.

Used when no native transformers architecture can hold a conversion exactly (a family without a native
MoE sibling, per-layer expert counts, mlp/gmm gates, unnormalised top-k, ...). Importing this package
registers its config with ``AutoConfig``; each family's model classes are built and registered with
``AutoModel`` / ``AutoModelForCausalLM`` the first time a config of that family is read, so no
``trust_remote_code`` is ever needed.
"""

from transformers import AutoConfig

from moeforge.modeling.attention_moe import AttentionRouter, HeadGroupGate, MoeforgeAttentionMoE
from moeforge.modeling.configuration import (
    AttentionMoeLayerSpec,
    LegacyMoeforgeLlamaConfig,
    MoeforgeConfig,
    MoeLayerSpec,
    is_moeforge_config,
    moeforge_config,
)
from moeforge.modeling.modeling import Architecture, MoeforgeForCausalLM, architecture, causal_lm_class, install_moe_blocks
from moeforge.modeling.moe_block import MoeforgeExperts, MoeforgeSharedExperts, MoeforgeSparseMoeBlock
from moeforge.modeling.moice import install_moice  # also registers the ``moice`` config extension
from moeforge.modeling.routers import GMMRouter, LinearRouter, MLPRouter, TopKRouter, build_router, route

AutoConfig.register(MoeforgeConfig.model_type, MoeforgeConfig, exist_ok=True)
AutoConfig.register(LegacyMoeforgeLlamaConfig.model_type, LegacyMoeforgeLlamaConfig, exist_ok=True)

__all__ = [
    "Architecture",
    "AttentionMoeLayerSpec",
    "AttentionRouter",
    "HeadGroupGate",
    "MoeforgeAttentionMoE",
    "GMMRouter",
    "LinearRouter",
    "MLPRouter",
    "MoeLayerSpec",
    "MoeforgeConfig",
    "MoeforgeExperts",
    "MoeforgeForCausalLM",
    "MoeforgeSharedExperts",
    "MoeforgeSparseMoeBlock",
    "TopKRouter",
    "architecture",
    "build_router",
    "causal_lm_class",
    "install_moe_blocks",
    "install_moice",
    "is_moeforge_config",
    "moeforge_config",
    "route",
]
