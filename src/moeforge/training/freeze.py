"""Which parameters train: freeze groups by role (router, experts, attention, embeddings, dense layers).

Roles come from the module tree, not from name patterns, so the same recipe works on moeforge_llama,
Mixtral, Qwen2-MoE and Qwen3-MoE: a router is a module with ``top_k`` and ``num_experts`` (plus Qwen's
``shared_expert_gate``), an ``attention_router`` one that also has ``decisions_per_token`` (MoICE's RoPE-base
routers, attention MoE's head routers; inside ``self_attn`` but not ``attention``),
experts are ``experts`` / ``shared_expert`` modules (and a MoE adapter's expert deltas), attention is ``self_attn``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from moeforge.errors import MoeforgeError

ROLES = ("router", "attention_router", "experts", "attention", "embeddings", "dense_layers", "norms")
NEW_ROLES = ("router", "attention_router")
# a MoE adapter's expert deltas (moeforge.adapters): moe_lora_{gate,up,down}_proj, moe_lora_ffn, moe_lora_shared_*
ADAPTER_EXPERT_PARTS = (
    "moe_lora_gate",
    "moe_lora_up",
    "moe_lora_down",
    "moe_lora_ffn",
    "moe_lora_shared",
)  # what conversion / MoICE create; all_but_new trains only these


def _role_of_module(name: str, module: nn.Module) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if hasattr(module, "top_k") and hasattr(module, "num_experts") and any(True for _ in module.parameters(recurse=False)):
        return "attention_router" if hasattr(module, "decisions_per_token") else "router"
    if leaf == "shared_expert_gate":
        return "router"
    if leaf in ("experts", "shared_expert", "shared_experts") or leaf.startswith(ADAPTER_EXPERT_PARTS):
        return "experts"
    if leaf == "self_attn":
        return "attention"
    if leaf in ("embed_tokens", "lm_head"):
        return "embeddings"
    if leaf == "mlp" and (hasattr(module, "gate_proj") or hasattr(module, "gate_up_proj")):  # a dense FFN (fused: Phi-3, GLM-4)
        return "dense_layers"
    return None


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Map every parameter name to its role (``norms`` for what no rule claims: RMSNorm weights). The
    innermost claiming module wins: a MoICE or head router inside ``self_attn`` is a router, not attention."""
    roles: dict[str, str] = {}
    modules = sorted(model.named_modules(), key=lambda item: -item[0].count(".") if item[0] else 1)
    for module_name, module in modules:
        role = _role_of_module(module_name, module)
        if role is None:
            continue
        prefix = f"{module_name}." if module_name else ""
        for param_name, _ in module.named_parameters():
            roles.setdefault(prefix + param_name, role)
    for name, _ in model.named_parameters():
        roles.setdefault(name, "norms")
    return roles


def _layer_of(name: str) -> int | None:
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _layer_count(model: nn.Module) -> int:
    """The decoder's layer count: one more than the highest layer index among the parameter names."""
    indices = [index for name, _ in model.named_parameters() if (index := _layer_of(name)) is not None]
    return max(indices, default=-1) + 1


def apply_freeze(model: nn.Module, groups: Iterable[str], layers: Iterable[int] = (), *, keep_frozen: bool = False) -> tuple[int, int]:
    """Freeze the parameters of ``groups`` and every parameter of the decoder ``layers``; with
    ``keep_frozen`` a parameter already frozen stays frozen (an adapter model: only adapter parts train). ``all_but_new``
    freezes everything a dense source already had, i.e. all but the routers (the only parameters an
    upcycling conversion, attention MoE or MoICE creates; norms freeze too). Returns ``(trainable, total)`` parameter counts."""
    groups, layers = set(groups), set(layers)
    count = _layer_count(model)
    beyond = sorted(i for i in layers if not 0 <= i < count)
    if beyond:
        raise MoeforgeError(f"freeze_layers: layer {beyond[0]} is not in this model (layers 0-{count - 1}); fix the range")
    roles = parameter_roles(model)
    if "all_but_new" in groups:
        if not set(roles.values()) & (set(NEW_ROLES) - groups):
            raise MoeforgeError("freeze: all_but_new trains only the routers, but they are frozen too or this model has none")
        groups |= set(ROLES) - set(NEW_ROLES)
    trainable = total = 0
    for name, parameter in model.named_parameters():
        frozen = roles[name] in groups or _layer_of(name) in layers or (keep_frozen and not parameter.requires_grad)
        parameter.requires_grad_(not frozen)
        total += parameter.numel()
        trainable += 0 if frozen else parameter.numel()
    if trainable == 0:
        raise MoeforgeError(f"freeze: {sorted(groups)} (layers {sorted(layers)}) leaves no trainable parameter in this model; freeze less")
    return trainable, total


def router_parameters(model: nn.Module) -> list[str]:
    return [name for name, role in parameter_roles(model).items() if role in NEW_ROLES]
