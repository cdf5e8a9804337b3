"""A mixture of LoRA experts on a frozen SwiGLU FFN (MixLoRA-style), the building block of MoE adapters.

Expert ``e`` is the frozen FFN with its own low-rank deltas on gate/up/down:
``FFN_e(x) = (W_d + s·B_d^e A_d^e) [act((W_g + s·B_g^e A_g^e) x) ⊙ (W_u + s·B_u^e A_u^e) x]``, and a token's
output is ``Σ_e w_e FFN_e(x)`` over its top-k experts (softmax → top-k → renormalise, as Mixtral).

Cost: the frozen matmuls run once for all experts, not once per expert: ``W_g x`` and ``W_u x`` are shared
(MixLoRA's trick), and because ``W_d`` is linear, ``Σ_e w_e W_d h_e = W_d (Σ_e w_e h_e)``, so the down
projection also runs once on the weighted sum. Only the rank-r deltas are per expert, computed on the
tokens routed to that expert (token-expert pairs sorted by expert; the loop runs over experts, never
over tokens).

Because each expert is a full FFN with merged weights, a dense base with MoE-LoRA on its FFN is exactly a
Mixtral-style MoE: :meth:`MoeLoraMLP.merged_expert` gives expert ``e``'s weights for that export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")


class LoraExperts(nn.Module):
    """``num_experts`` rank-``rank`` deltas for one projection: ``lora_A [E, r, in]`` (Kaiming-uniform, as
    PEFT initialises LoRA A) and ``lora_B [E, out, r]`` (zero: a fresh adapter is the base model)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))
        for expert in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))

    def delta(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return (x @ self.lora_A[expert].T) @ self.lora_B[expert].T

    def merged(self, weight: torch.Tensor, expert: int, scaling: float) -> torch.Tensor:
        """``W + s·B_e A_e`` in fp32, returned in ``weight``'s dtype."""
        delta = self.lora_B[expert].float() @ self.lora_A[expert].float()
        return (weight.float() + scaling * delta).to(weight.dtype)


class AdapterRouter(nn.Module):
    """Linear top-k router on the FFN input, init N(0, std). Follows moeforge's router contract
    (``top_k``, ``num_experts``, forward -> ``(logits, weights, indices)``), so the router losses, telemetry
    and freezing apply to it like to any MoE router."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size) * init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, d]`` -> fp32 ``logits [T, E]``, renormalised top-k ``weights [T, k]``, ``indices [T, k]``."""
        logits = (x @ self.weight.to(x.dtype).T).float()
        top, indices = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), indices


class MoeLoraMLP(nn.Module):
    """Takes over a SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``; same parameter names,
    so the base weights keep their keys) and adds ``router`` and ``experts.<target>``."""

    def __init__(
        self,
        mlp: nn.Module,
        *,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        targets: tuple[str, ...] = LORA_TARGETS,
        router_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.num_experts, self.top_k, self.scaling = num_experts, top_k, alpha / rank
        weight = self.gate_proj.weight
        self.router = AdapterRouter(weight.shape[1], num_experts, top_k, router_init_std)
        self.experts = nn.ModuleDict(
            {
                name: LoraExperts(num_experts, getattr(self, name).in_features, getattr(self, name).out_features, rank)
                for name in targets
            }
        )
        self.to(device=weight.device, dtype=weight.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # off in eval(): outputs are deterministic

    def _deltas(self, target: str, x: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """``s·B_e A_e x`` for expert-sorted rows ``x``, expert by expert on its own rows (None: no LoRA here)."""
        if target not in self.experts:
            return None
        lora, x = self.experts[target], self.dropout(x)
        parts = [lora.delta(rows, e) for e, rows in enumerate(x.split(counts)) if rows.shape[0]]
        return torch.cat(parts) * self.scaling

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.router(x)
        gate, up = self.gate_proj(x), self.up_proj(x)  # the frozen matmuls, once for every expert

        experts = indices.reshape(-1)
        order = experts.argsort(stable=True)
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)[order]
        pair_weights = weights.reshape(-1)[order].to(x.dtype)[:, None]
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()

        rows = x[tokens]
        gate_rows, up_rows = gate[tokens], up[tokens]
        if (delta := self._deltas("gate_proj", rows, counts)) is not None:
            gate_rows = gate_rows + delta
        if (delta := self._deltas("up_proj", rows, counts)) is not None:
            up_rows = up_rows + delta
        hidden = self.act_fn(gate_rows) * up_rows  # [pairs, ffn]

        mixed = hidden.new_zeros(x.shape[0], hidden.shape[1]).index_add_(0, tokens, hidden * pair_weights)
        out = self.down_proj(mixed)  # W_d Σ_e w_e h_e = Σ_e w_e W_d h_e
        if (delta := self._deltas("down_proj", hidden, counts)) is not None:
            out = out.index_add(0, tokens, delta * pair_weights)
        return out.reshape(shape)

    def merged_expert(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert`` as plain FFN weights (``gate_proj``/``up_proj``/``down_proj`` ``[out, in]``): the
        frozen weight plus that expert's scaled LoRA delta, for a Mixtral-style export."""
        with torch.no_grad():
            return {
                name: self.experts[name].merged(getattr(self, name).weight, expert, self.scaling)
                if name in self.experts
                else getattr(self, name).weight.detach().clone()
                for name in LORA_TARGETS
            }
