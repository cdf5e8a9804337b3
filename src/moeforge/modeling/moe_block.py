"""The MoE block that replaces a dense FFN: a router, routed experts stored fused, optional shared experts.

Experts are stored as 3-D tensors (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), the layout of
transformers 5's Mixtral/Qwen-MoE, and dispatched through ``@use_experts_implementation`` so every
experts backend (moeforge's and transformers') applies. Key names follow Qwen2-MoE (``mlp.gate``,
``mlp.experts``, ``mlp.shared_expert``) so tools that know those names find ours. The activation is the
source family's (SiLU for Llama, GeLU-tanh for Gemma), read from the config's ``ffn_activation``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from moeforge.modeling.configuration import MoeLayerSpec
from moeforge.modeling.routers import build_router


@use_experts_implementation
class MoeforgeExperts(nn.Module):
    """``num_experts`` gated experts stored as 3-D tensors."""

    def __init__(self, config, num_experts: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, config.hidden_size, intermediate_size))
        self.act_fn = ACT2FN[config.ffn_activation]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Eager path: tokens sorted by expert, one matmul pair per active expert.

        The fused weights are unbound once, so autograd sees one view op instead of E indexing ops (whose
        backward would zero-fill a full [E, ...] gradient per expert: cost growing with E²). Weights stored
        in a narrower dtype than the activations (bf16 weights, fp32 compute) are upcast one expert at a time."""
        final = torch.zeros_like(hidden_states)
        if top_k_index.numel() == 0:
            return final
        top_k = top_k_index.shape[1]
        flat_experts = top_k_index.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        token_of_slot = order // top_k
        sorted_states = hidden_states[token_of_slot]
        outputs = []
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        for expert, chunk in enumerate(sorted_states.split(counts)):
            if chunk.shape[0] == 0:
                continue
            gate, up = nn.functional.linear(chunk, gate_up[expert].to(chunk.dtype)).chunk(2, dim=-1)
            outputs.append(nn.functional.linear(self.act_fn(gate) * up, down[expert].to(chunk.dtype)))
        expert_out = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None].to(hidden_states.dtype)
        return final.index_add(0, token_of_slot, expert_out)


class MoeforgeSharedExperts(nn.Module):
    """Always-on experts, fused into one gated MLP (several shared experts with the same (unit) weight are
    exactly one MLP whose intermediate size is their sum)."""

    def __init__(self, config, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.ffn_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoeforgeSparseMoeBlock(nn.Module):
    """Routed experts (top-k) plus optional shared experts, replacing one layer's dense FFN."""

    def __init__(self, config, spec: MoeLayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.gate = build_router(config.hidden_size, spec, config.ffn_activation)
        if config.router_aux_free:
            self.gate.enable_expert_bias()
        self.experts = MoeforgeExperts(config, spec.num_experts, spec.expert_intermediate_size)
        self.shared_expert = MoeforgeSharedExperts(config, spec.shared_intermediate_size) if spec.shared_intermediate_size else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat)
        out = self.experts(flat, indices, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.reshape(shape)
