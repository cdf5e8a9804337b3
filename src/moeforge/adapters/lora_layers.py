"""Plain LoRA parts of a MoE adapter: attention projections (``nn.Linear``) and an MoE base's routed experts.

They live in the same PEFT method as the mixture (one adapter directory, one ``PeftModel``), and both
merge exactly into the base weights.

Routed experts of transformers' MoE models (Mixtral, Qwen-MoE, moeforge_llama) keep every expert's
weights fused in 3-D parameters (``gate_up_proj [E, out, in]``, ``down_proj [E, out, in]``); each expert
gets its own rank-r delta ``B_e A_e`` and the experts module runs unchanged on ``W + s·BA`` (a functional
call), so every experts backend transformers offers (eager, grouped_mm, ...) keeps working.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from moeforge.adapters.moe_lora import AdapterLayer, LoraExperts


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """Names of a routed-experts module's fused 3-D weights (empty: not an experts module)."""
    return [name for name, p in module.named_parameters(recurse=False) if p.ndim == 3 and name in ("gate_up_proj", "down_proj")]


class _SingleAdapter(AdapterLayer):
    """Bookkeeping shared by the plain-LoRA layers: per-adapter scaling, in-place merge / unmerge."""

    other_param_names = ("moe_lora_scaling",)

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.moe_lora_scaling: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []

    def _live_adapters(self) -> list[str]:
        if self.disable_adapters or self.merged:
            return []
        return [name for name in self.active_adapters if name in self.moe_lora_scaling]

    def delta_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in adapter_names or self.active_adapters:
            if adapter in self.merged_adapters or adapter not in self.moe_lora_scaling:
                continue
            with torch.no_grad():
                for name, delta in self.delta_weights(adapter).items():
                    weight = self.base_layer.get_parameter(name)
                    merged = weight.float() + delta
                    if safe_merge and not torch.isfinite(merged).all():
                        raise ValueError(f"merging adapter {adapter} gives non-finite weights in {name}")
                    weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            with torch.no_grad():
                for name, delta in self.delta_weights(adapter).items():
                    weight = self.base_layer.get_parameter(name)
                    weight.copy_((weight.float() - delta).to(weight.dtype))


class LoraLinear(_SingleAdapter):
    """``W x + s·B A dropout(x)`` on an ``nn.Linear`` (A Kaiming-uniform, B zero, like PEFT's LoRA)."""

    adapter_layer_names = ("moe_lora_A", "moe_lora_B")
    base_layer: nn.Linear

    def __init__(self, base_layer: nn.Linear, adapter_name: str, *, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base_layer, adapter_name)
        self.moe_lora_A = nn.ParameterDict()
        self.moe_lora_B = nn.ParameterDict()
        self.moe_lora_dropout = nn.ModuleDict()
        self.update_layer(adapter_name, rank=rank, alpha=alpha, dropout=dropout)

    def update_layer(self, adapter_name: str, *, rank: int, alpha: float, dropout: float, inference_mode: bool = False) -> None:
        weight = self.base_layer.weight
        a = torch.empty(rank, weight.shape[1])
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.moe_lora_A[adapter_name] = nn.Parameter(a.to(weight.device, dtype))
        self.moe_lora_B[adapter_name] = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device, dtype=dtype))
        self.moe_lora_scaling[adapter_name] = alpha / rank
        self.moe_lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # off in eval()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def delta_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        delta = self.moe_lora_B[adapter_name].float() @ self.moe_lora_A[adapter_name].float()
        return {"weight": self.moe_lora_scaling[adapter_name] * delta}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for adapter in self._live_adapters():
            a, b = self.moe_lora_A[adapter], self.moe_lora_B[adapter]
            h = self.moe_lora_dropout[adapter](x).to(a.dtype)
            out = out + ((h @ a.T) @ b.T * self.moe_lora_scaling[adapter]).to(out.dtype)
        return out


class FusedExpertsLora(_SingleAdapter):
    """Per-expert LoRA on a routed-experts module's fused 3-D weights (see the module docstring)."""

    adapter_layer_names = ("moe_lora_gate_up_proj", "moe_lora_down_proj")

    def __init__(self, base_layer: nn.Module, adapter_name: str, *, rank: int, alpha: float) -> None:
        super().__init__(base_layer, adapter_name)
        self.moe_lora_gate_up_proj = nn.ModuleDict()
        self.moe_lora_down_proj = nn.ModuleDict()
        self.update_layer(adapter_name, rank=rank, alpha=alpha)

    def update_layer(self, adapter_name: str, *, rank: int, alpha: float, inference_mode: bool = False) -> None:
        """(No dropout here: the delta is added in weight space, there is no adapter input to drop.)"""
        for name in fused_expert_parameters(self.base_layer):
            weight = self.base_layer.get_parameter(name)
            experts, out_features, in_features = weight.shape
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            getattr(self, f"moe_lora_{name}")[adapter_name] = LoraExperts(experts, in_features, out_features, rank).to(weight.device, dtype)
        self.moe_lora_scaling[adapter_name] = alpha / rank
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _loras(self, adapter_name: str) -> dict[str, LoraExperts]:
        return {
            name: getattr(self, f"moe_lora_{name}")[adapter_name]
            for name in fused_expert_parameters(self.base_layer)
            if adapter_name in getattr(self, f"moe_lora_{name}")
        }

    def delta_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        scaling = self.moe_lora_scaling[adapter_name]
        return {
            name: scaling * torch.einsum("eor,eri->eoi", lora.lora_B.float(), lora.lora_A.float())
            for name, lora in self._loras(adapter_name).items()
        }

    def forward(self, *args, **kwargs) -> torch.Tensor:
        adapters = self._live_adapters()
        if not adapters:
            return self.base_layer(*args, **kwargs)
        weights: dict[str, torch.Tensor] = {name: self.base_layer.get_parameter(name) for name in fused_expert_parameters(self.base_layer)}
        for adapter in adapters:
            for name, lora in self._loras(adapter).items():
                delta = torch.einsum("eor,eri->eoi", lora.lora_B, lora.lora_A) * self.moe_lora_scaling[adapter]
                weights[name] = weights[name] + delta.to(weights[name].dtype)
        return functional_call(self.base_layer, weights, args, kwargs, strict=False)
