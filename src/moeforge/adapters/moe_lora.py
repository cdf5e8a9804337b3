"""A mixture of small experts on a frozen SwiGLU FFN (MixLoRA-style), as a PEFT tuner layer.

``moe_lora``: expert ``e`` is the frozen FFN with its own low-rank deltas on gate/up/down:
``FFN_e(x) = (W_d + s·B_d^e A_d^e) [act((W_g + s·B_g^e A_g^e) x) ⊙ (W_u + s·B_u^e A_u^e) x]``, and a token's
output is ``Σ_e w_e FFN_e(x)`` over its top-k experts (softmax → top-k → renormalise, as Mixtral). An
optional shared expert is one more delta that every token gets inside each of its experts, so it merges
into every expert of a Mixtral export.

``moe_bottleneck``: the frozen FFN plus a routed mixture of bottleneck adapters beside it,
``FFN(x) + s·Σ_e w_e U_e SiLU(D_e x)`` (not mergeable into an FFN).

Cost: the frozen matmuls run once for all experts, not once per expert: ``W_g x`` and ``W_u x`` are shared
(MixLoRA's trick), and because ``W_d`` is linear, ``Σ_e w_e W_d h_e = W_d (Σ_e w_e h_e)``, so the down
projection also runs once on the weighted sum. Only the rank-r deltas are per expert, computed on the
tokens routed to that expert: token-expert pairs sorted by expert, one grouped GEMM per delta matrix
(:mod:`moeforge.experts`, the primitive moeforge's MoE layers use; ``experts_backend: eager`` makes it an
explicit loop over experts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypedDict, cast

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from moeforge.errors import MoeforgeError
from moeforge.experts import SlotPlan, combine, dispatch, grouped_linear, plan_slots

LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")


class SwiGLUMLP(Protocol):
    """The MLP a :class:`MoeLoraLayer` wraps (what :func:`~moeforge.adapters.peft_method.is_swiglu_mlp` checks)."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: Callable[[torch.Tensor], torch.Tensor]


class MoeLoraSettings(TypedDict):
    """Per-adapter settings of a :class:`MoeLoraLayer` (``moe_lora_settings[adapter]``)."""

    method: str
    """``moe_lora`` or ``moe_bottleneck``."""
    scaling: float
    """``alpha / rank``."""
    top_k: int


class LoraExperts(nn.Module):
    """``num_experts`` rank-``rank`` deltas for one projection: ``lora_A [E, r, in]`` (Kaiming-uniform, as
    PEFT initialises LoRA A) and ``lora_B [E, out, r]`` (zero: a fresh adapter is the base model)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))
        for expert in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))

    def delta(self, x: torch.Tensor, expert: int, scaling: float = 1.0) -> torch.Tensor:
        """``scaling · B_e A_e x`` for one expert (scaled at rank r, the cheap end), in ``x``'s dtype."""
        low = (x.to(self.lora_A.dtype) @ self.lora_A[expert].T) * scaling
        return (low @ self.lora_B[expert].T).to(x.dtype)

    def grouped_delta(self, rows: torch.Tensor, plan: SlotPlan, scaling: float, grouped_mm: bool | None) -> torch.Tensor:
        """``scaling · B_e A_e x`` for expert-sorted rows, each through its own expert."""
        low = _grouped(rows.to(self.lora_A.dtype), self.lora_A, plan, grouped_mm) * scaling
        return _grouped(low, self.lora_B, plan, grouped_mm).to(rows.dtype)

    def delta_weight(self, expert: int) -> torch.Tensor:
        """``B_e A_e`` in fp32."""
        return self.lora_B[expert].float() @ self.lora_A[expert].float()


class BottleneckExperts(nn.Module):
    """``num_experts`` bottleneck adapters ``U_e SiLU(D_e x)``: ``down [E, r, d]`` (Kaiming-uniform) and
    ``up [E, d, r]`` (zero: a fresh adapter is the base model)."""

    def __init__(self, num_experts: int, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(num_experts, rank, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_experts, hidden_size, rank))
        for expert in range(num_experts):
            nn.init.kaiming_uniform_(self.down.data[expert], a=math.sqrt(5))

    def delta(self, x: torch.Tensor, expert: int, scaling: float = 1.0) -> torch.Tensor:
        """``scaling · U_e SiLU(D_e x)`` for one expert, in ``x``'s dtype."""
        low = nn.functional.silu(x.to(self.down.dtype) @ self.down[expert].T) * scaling
        return (low @ self.up[expert].T).to(x.dtype)

    def grouped_delta(self, rows: torch.Tensor, plan: SlotPlan, scaling: float, grouped_mm: bool | None) -> torch.Tensor:
        """``scaling · U_e SiLU(D_e x)`` for expert-sorted rows, each through its own expert."""
        low = nn.functional.silu(_grouped(rows.to(self.down.dtype), self.down, plan, grouped_mm)) * scaling
        return _grouped(low, self.up, plan, grouped_mm).to(rows.dtype)


def _grouped(rows: torch.Tensor, weight: torch.Tensor, plan: SlotPlan, grouped_mm: bool | None) -> torch.Tensor:
    counts = None if rows.device.type == "cuda" else plan.counts
    return grouped_linear(rows, weight, plan.offsets, counts, use_grouped_mm=grouped_mm)


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


class AdapterLayer(nn.Module, BaseTunerLayer):
    """Base of moeforge's tuner layers (this mixture and the plain-LoRA parts in
    :mod:`moeforge.adapters.lora_layers`): the one class PEFT's ``tuner_layer_cls`` names."""


class MoeLoraLayer(AdapterLayer):
    """Wraps a SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) as ``base_layer`` and adds,
    per adapter name, a router, the experts and optionally a shared delta. One adapter is active at a time.

    Every adapter tensor sits at ``moe_lora_<part>.<adapter>.<tensor>`` (one ModuleDict per part, keyed by
    adapter name), the layout PEFT and transformers' PEFT integration both map to the adapter-free
    checkpoint key ``moe_lora_<part>.<tensor>``."""

    adapter_layer_names = (
        "moe_lora_router",
        *(f"moe_lora_{part}" for part in (*LORA_TARGETS, "ffn")),
        *(f"moe_lora_shared_{part}" for part in (*LORA_TARGETS, "ffn")),
    )
    other_param_names = ("moe_lora_settings",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **settings) -> None:
        super().__init__()
        self.base_layer = base_layer
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ModuleDict())
        self.moe_lora_dropout = nn.ModuleDict()
        self.moe_lora_settings: dict[str, MoeLoraSettings] = {}
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, **settings)

    def update_layer(
        self,
        adapter_name: str,
        *,
        method: str,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        dropout: float,
        targets: tuple[str, ...],
        shared_expert: bool,
        router_init_std: float,
        inference_mode: bool = False,
    ) -> None:
        base = self.mlp
        hidden = base.gate_proj.in_features
        weight = base.gate_proj.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32  # a quantised base computes in float
        parts: dict[str, nn.Module] = {"router": AdapterRouter(hidden, num_experts, top_k, router_init_std)}
        if method == "moe_bottleneck":
            parts["ffn"] = BottleneckExperts(num_experts, hidden, rank)
            if shared_expert:
                parts["shared_ffn"] = BottleneckExperts(1, hidden, rank)
        else:
            for name in targets:
                projection = getattr(base, name)
                parts[name] = LoraExperts(num_experts, projection.in_features, projection.out_features, rank)
                if shared_expert:
                    parts[f"shared_{name}"] = LoraExperts(1, projection.in_features, projection.out_features, rank)
        for part, module in parts.items():
            self._parts(part)[adapter_name] = module.to(device=weight.device, dtype=dtype)
        self.moe_lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # off in eval()
        self.moe_lora_settings[adapter_name] = {"method": method, "scaling": alpha / rank, "top_k": top_k}
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @property
    def mlp(self) -> SwiGLUMLP:
        """``base_layer``, typed as the SwiGLU MLP it was checked to be before wrapping (torch types every
        module attribute as ``Tensor | Module``)."""
        return cast(SwiGLUMLP, self.base_layer)

    def _parts(self, part: str) -> nn.ModuleDict:
        """``moe_lora_<part>``: adapter name -> module (one of :attr:`adapter_layer_names`)."""
        parts: nn.ModuleDict = getattr(self, f"moe_lora_{part}")
        return parts

    def router(self, adapter: str) -> AdapterRouter:
        """The router of ``adapter``."""
        router = self._parts("router")[adapter]
        assert isinstance(router, AdapterRouter), f"moe_lora_router.{adapter} is a {type(router).__name__}"
        return router

    def part(self, part: str, adapter: str) -> LoraExperts | BottleneckExperts | None:
        """The experts of ``part`` (a LoRA target, ``ffn``, or ``shared_`` + either) of ``adapter``; None: not adapted."""
        parts = self._parts(part)
        if adapter not in parts:
            return None
        experts = parts[adapter]
        assert isinstance(experts, (LoraExperts, BottleneckExperts)), f"moe_lora_{part}.{adapter} is a {type(experts).__name__}"
        return experts

    def _adapter(self) -> str | None:
        active = [name for name in self.active_adapters if name in self._parts("router")]
        if self.disable_adapters or not active:
            return None
        if len(active) > 1:
            raise MoeforgeError(f"MoE adapters run one at a time; {active} are active: call set_adapter with one name")
        return active[0]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._adapter()
        if adapter is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router = self.router(adapter)
        _, weights, indices = router(x)
        settings = self.moe_lora_settings[adapter]
        plan = plan_slots(indices, router.num_experts)
        routed = _Routed(plan, weights.reshape(-1)[plan.order].to(x.dtype)[:, None], self._grouped_mm())
        if settings["method"] == "moe_bottleneck":
            out = self._bottleneck(adapter, x, routed, settings["scaling"])
        else:
            out = self._moe_lora(adapter, x, routed, settings["scaling"])
        return out.reshape(shape)

    def _grouped_mm(self) -> bool | None:
        """The experts backend of the model this FFN belongs to: ``eager`` loops over experts; anything else
        lets the grouped primitive pick (``grouped_mm`` where it works)."""
        backend = getattr(getattr(self.base_layer, "config", None), "_experts_implementation", None)
        return False if backend == "eager" else None

    def _deltas(self, adapter: str, target: str, rows: torch.Tensor, routed: _Routed, scaling: float) -> torch.Tensor | None:
        """``s·B_e A_e x`` for expert-sorted (already dropped-out) rows, each row through its expert
        (None: no LoRA on ``target``)."""
        experts = self.part(target, adapter)
        return None if experts is None else experts.grouped_delta(rows, routed.plan, scaling, routed.grouped_mm)

    def _shared(self, adapter: str, target: str, x: torch.Tensor, scaling: float) -> torch.Tensor | None:
        shared = self.part(f"shared_{target}", adapter)
        return None if shared is None else shared.delta(x, 0, scaling)

    def _moe_lora(self, adapter: str, x: torch.Tensor, routed: _Routed, scaling: float) -> torch.Tensor:
        base, plan, dropout = self.mlp, routed.plan, self.moe_lora_dropout[adapter]
        gate, up = base.gate_proj(x), base.up_proj(x)  # the frozen matmuls, once for every expert
        dropped = dropout(x)  # once per token, shared by the gate and up deltas (not once per pair and target)
        if (shared := self._shared(adapter, "gate_proj", dropped, scaling)) is not None:
            gate = gate + shared
        if (shared := self._shared(adapter, "up_proj", dropped, scaling)) is not None:
            up = up + shared
        rows = dispatch(dropped, plan)
        gate_rows, up_rows = dispatch(gate, plan), dispatch(up, plan)
        if (delta := self._deltas(adapter, "gate_proj", rows, routed, scaling)) is not None:
            gate_rows = gate_rows + delta
        if (delta := self._deltas(adapter, "up_proj", rows, routed, scaling)) is not None:
            up_rows = up_rows + delta
        hidden = base.act_fn(gate_rows) * up_rows  # [pairs, ffn]

        mixed = combine(hidden * routed.weights, plan)  # Σ_e w_e h_e per token
        out = base.down_proj(mixed)  # W_d Σ_e w_e h_e = Σ_e w_e W_d h_e
        if (shared_down := self.part("shared_down_proj", adapter)) is not None:  # linear too: Σ_e w_e ΔW h_e = ΔW Σ_e w_e h_e
            out = out + shared_down.delta(dropout(mixed), 0, scaling)
        if (delta := self._deltas(adapter, "down_proj", dropout(hidden), routed, scaling)) is not None:
            out = out + combine(delta * routed.weights, plan)
        return out

    def _bottleneck(self, adapter: str, x: torch.Tensor, routed: _Routed, scaling: float) -> torch.Tensor:
        out = self.base_layer(x)
        dropped = self.moe_lora_dropout[adapter](x)
        if (shared := self._shared(adapter, "ffn", dropped, scaling)) is not None:
            out = out + shared
        delta = self._deltas(adapter, "ffn", dispatch(dropped, routed.plan), routed, scaling)
        assert delta is not None, "a moe_bottleneck adapter always has its experts (moe_lora_ffn)"
        return out + combine(delta * routed.weights, routed.plan)

    def merged_expert(self, expert: int, adapter: str = "default") -> dict[str, torch.Tensor]:
        """Expert ``expert`` as plain FFN weights (``gate_proj``/``up_proj``/``down_proj`` ``[out, in]``): the
        frozen weight plus that expert's (and the shared) scaled LoRA delta, for a Mixtral-style export."""
        settings = self.moe_lora_settings[adapter]
        if settings["method"] != "moe_lora":
            raise MoeforgeError(
                f"a {settings['method']} adapter is not a set of FFNs and cannot be merged into experts; use method moe_lora"
            )
        merged: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in LORA_TARGETS:
                weight = getattr(self.base_layer, name).weight
                total = weight.float().clone()
                for part, index in ((name, expert), (f"shared_{name}", 0)):
                    if isinstance(lora := self.part(part, adapter), LoraExperts):  # every part of a moe_lora adapter is one
                        total += settings["scaling"] * lora.delta_weight(index)
                merged[name] = total.to(weight.dtype)
        return merged

    def merged_expert_tensors(self, adapter: str = "default") -> dict[str, torch.Tensor]:
        """This layer as an MoE block in moeforge's canonical layout (relative to ``mlp.``): ``gate.weight
        [E, d]`` (the router), ``experts.gate_up_proj [E, 2f, d]``, ``experts.down_proj [E, d, f]``."""
        router = self.router(adapter)
        merged = [self.merged_expert(e, adapter) for e in range(router.num_experts)]
        return {
            "gate.weight": router.weight.detach().to(self.mlp.gate_proj.weight.dtype).clone(),
            "experts.gate_up_proj": torch.stack([torch.cat([m["gate_proj"], m["up_proj"]]) for m in merged]),
            "experts.down_proj": torch.stack([m["down_proj"] for m in merged]),
        }

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise MoeforgeError("a mixture of experts cannot be folded into one FFN: export it with `moeforge merge` (native Mixtral)")

    def unmerge(self) -> None:
        """Nothing is ever merged in place (see :meth:`merge`)."""


class _Routed:
    """Token-expert pairs sorted by expert (the plan), their routing weights in that order, and the
    grouped-GEMM choice (None: per call)."""

    __slots__ = ("plan", "weights", "grouped_mm")

    def __init__(self, plan: SlotPlan, weights: torch.Tensor, grouped_mm: bool | None) -> None:
        self.plan, self.weights, self.grouped_mm = plan, weights, grouped_mm
