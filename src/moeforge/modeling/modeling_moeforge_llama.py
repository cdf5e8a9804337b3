"""The ``moeforge_llama`` model: transformers' Llama with an MoE block in chosen layers.

Attention, RoPE, norms, caching and generation are Llama's own code; only the FFN of MoE layers is
replaced. Experts are stored fused (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), the layout of
transformers 5's Mixtral/Qwen-MoE, and dispatched through ``@use_experts_implementation`` so every
experts backend transformers offers (``grouped_mm``, ``batched_mm``, ...) applies here too. Key names
follow Qwen2-MoE (``mlp.gate``, ``mlp.experts``, ``mlp.shared_expert``) so tools that know those names
find ours.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaMLP, LlamaModel, LlamaPreTrainedModel

from moeforge.modeling.configuration_moeforge_llama import MoeforgeLlamaConfig, MoeLayerSpec
from moeforge.modeling.routers import GMMRouter, LinearRouter, MLPRouter, TopKRouter, build_router


@use_experts_implementation
class MoeforgeExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as 3-D tensors."""

    def __init__(self, config: MoeforgeLlamaConfig, num_experts: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, config.hidden_size, intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
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


class MoeforgeSharedExperts(LlamaMLP):
    """Always-on experts, fused into one SwiGLU MLP (several shared experts with the same (unit) weight
    are exactly one MLP whose intermediate size is their sum)."""

    def __init__(self, config: MoeforgeLlamaConfig, intermediate_size: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]


class MoeforgeSparseMoeBlock(nn.Module):
    """Routed experts (top-k) plus optional shared experts, replacing one layer's dense FFN."""

    def __init__(self, config: MoeforgeLlamaConfig, spec: MoeLayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.gate = build_router(config.hidden_size, spec, config.hidden_act)
        if config.router_aux_free:
            self.gate.enable_expert_bias()
        self.experts = MoeforgeExperts(config, spec.num_experts, spec.expert_intermediate_size)
        self.shared_expert = (
            MoeforgeSharedExperts(config, spec.shared_intermediate_size) if spec.shared_intermediate_size else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat)
        out = self.experts(flat, indices, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.reshape(shape)


class MoeforgeLlamaPreTrainedModel(LlamaPreTrainedModel):
    config: MoeforgeLlamaConfig
    config_class = MoeforgeLlamaConfig

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Unless told otherwise, run moeforge's ``auto`` experts backend (registered by ``import moeforge``),
        not transformers' default ``grouped_mm``: it adds the few-token path and the fallbacks."""
        from moeforge.experts import EXPERTS_BACKENDS, DEFAULT_BACKEND

        return super().get_correct_experts_implementation(requested_experts or EXPERTS_BACKENDS[DEFAULT_BACKEND])

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """Our experts dispatch through ``@use_experts_implementation``. The base class finds that out by
        reading the module source and caching the answer on the class, and a subclass of Llama can inherit
        Llama's cached ``False`` (when a Llama was built first), silently forcing eager experts."""
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoeforgeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LinearRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, GMMRouter):
            init.normal_(module.means, mean=0.0, std=1.0)
            init.zeros_(module.log_scales)
        elif isinstance(module, MLPRouter):
            pass  # its nn.Linear children are initialised by the base class
        if isinstance(module, TopKRouter) and module.expert_bias is not None:
            init.zeros_(module.expert_bias)


class MoeforgeLlamaModel(MoeforgeLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: MoeforgeLlamaConfig) -> None:
        LlamaModel.__init__(self, config)
        for layer_idx, layer in enumerate(self.layers):
            spec = config.layer_spec(layer_idx)
            if spec is not None:
                layer.mlp = MoeforgeSparseMoeBlock(config, spec)
        self.post_init()


class MoeforgeLlamaForCausalLM(MoeforgeLlamaPreTrainedModel, LlamaForCausalLM):
    """Llama's causal LM over :class:`MoeforgeLlamaModel`, whose ``loss`` in training mode (labels given)
    includes the router losses weighted by the config's ``router_*_loss_coef``: attached as hooks at
    construction, so ``AutoModelForCausalLM.from_pretrained(dir)`` trains with them in any loop, with no
    moeforge training code. ``moeforge.routing.attach_router_losses(model, ...)`` replaces them (e.g. with a
    recipe's coefficients)."""

    def __init__(self, config: MoeforgeLlamaConfig) -> None:
        from moeforge.routing.hooks import attach_router_losses  # moeforge.routing imports this package
        from moeforge.routing.losses import RouterLossConfig

        MoeforgeLlamaPreTrainedModel.__init__(self, config)
        self.model = MoeforgeLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        attach_router_losses(
            self,
            RouterLossConfig(
                balance_coef=config.router_aux_loss_coef,
                z_coef=config.router_z_loss_coef,
                mi_coef=config.router_mi_loss_coef,
            ),
        )
