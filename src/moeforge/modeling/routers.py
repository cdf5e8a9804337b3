"""Routers: a gate that scores experts per token, and the top-k rule that turns scores into weights.

All gates share :func:`route`, computed in fp32. ``softmax_then_topk`` with ``normalize=True`` and
``topk_then_softmax`` are the same function in exact arithmetic (softmax over the k largest logits);
both are offered because checkpoints and papers name them differently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from moeforge.modeling.configuration import MoeLayerSpec


def route(
    logits: torch.Tensor,
    top_k: int,
    scoring: str,
    normalize: bool,
    selection_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(weights [T, k], indices [T, k])`` from router logits ``[T, E]``.

    ``selection_bias [E]`` (DeepSeek-V3's aux-loss-free balancing) is added to the logits to choose the
    experts only; the weights are always the unbiased ones at the chosen experts. A zero bias chooses
    bit-for-bit what no bias chooses (``x + 0 == x``, so the same top-k of the same values)."""
    logits = logits.float()
    biased = logits if selection_bias is None else logits + selection_bias
    if scoring == "topk_then_softmax":
        top_biased, indices = torch.topk(biased, top_k, dim=-1)
        top_logits = top_biased if selection_bias is None else logits.gather(-1, indices)
        return F.softmax(top_logits, dim=-1), indices
    probs = F.softmax(logits, dim=-1)
    selection = probs if selection_bias is None else F.softmax(biased, dim=-1)
    top_selected, indices = torch.topk(selection, top_k, dim=-1)
    weights = top_selected if selection_bias is None else probs.gather(-1, indices)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


class TopKRouter(nn.Module):
    """Base class: subclasses define ``logits(x)``; routing is shared.

    ``expert_bias`` is ``None`` unless aux-loss-free balancing is enabled (:meth:`enable_expert_bias`): a
    router without it has exactly the parameters, state dict and outputs it had before the bias existed."""

    expert_bias: torch.Tensor | None

    def __init__(self, spec: MoeLayerSpec) -> None:
        super().__init__()
        self.num_experts = spec.num_experts
        self.top_k = spec.top_k
        self.scoring = spec.scoring
        self.normalize = spec.normalize
        self.register_buffer("expert_bias", None)

    def enable_expert_bias(self) -> None:
        """Add the per-expert selection bias ``expert_bias [E]`` (zeros: routing unchanged until it is moved).

        A persistent buffer, so it is saved with the model; the model config's ``router_aux_free`` makes a
        loaded model create it before its weights are read."""
        if self.expert_bias is None:
            device = next(self.parameters()).device
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32, device=device))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden_states [T, H]`` → ``(logits [T, E], weights [T, k] fp32, indices [T, k])``."""
        router_logits = self.logits(hidden_states)
        weights, indices = route(router_logits, self.top_k, self.scoring, self.normalize, self.expert_bias)
        return router_logits, weights, indices


class LinearRouter(TopKRouter):
    """``logits = x Wᵀ`` (Mixtral / Qwen-MoE / Switch). Stored as ``gate.weight [E, H]`` like Mixtral."""

    def __init__(self, hidden_size: int, spec: MoeLayerSpec) -> None:
        super().__init__(spec)
        self.weight = nn.Parameter(torch.empty(spec.num_experts, hidden_size))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight)


class MLPRouter(TopKRouter):
    """``logits = fc2(act(fc1 x))``: a router that can separate experts non-linearly (Dense2MoE ``mlp``)."""

    def __init__(self, hidden_size: int, spec: MoeLayerSpec, hidden_act: str) -> None:
        super().__init__(spec)
        self.fc1 = nn.Linear(hidden_size, spec.gate_hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(spec.gate_hidden_size, spec.num_experts, bias=False)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(hidden_states)))


class GMMRouter(TopKRouter):
    """Gaussian-mixture gate (Dense2MoE ``gmm``): each expert is a diagonal Gaussian over the router input,
    and its logit is the log-likelihood of the token under it. Softmax over logits is then the mixture's
    posterior with equal priors, so k-means centroids and spreads are its natural initialisation."""

    def __init__(self, hidden_size: int, spec: MoeLayerSpec) -> None:
        super().__init__(spec)
        self.means = nn.Parameter(torch.empty(spec.num_experts, hidden_size))
        self.log_scales = nn.Parameter(torch.empty(spec.num_experts, hidden_size))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        inv_var = torch.exp(-2.0 * self.log_scales.float())  # [E, H]
        means = self.means.float()
        # Σ_d (x_d - μ_ed)² / σ_ed², expanded so no [T, E, H] tensor is materialised.
        mahalanobis = (x * x) @ inv_var.T - 2.0 * x @ (means * inv_var).T + (means * means * inv_var).sum(-1)
        log_norm = self.log_scales.float().sum(-1) + 0.5 * x.shape[-1] * math.log(2 * math.pi)
        return -0.5 * mahalanobis - log_norm


def build_router(hidden_size: int, spec: MoeLayerSpec, hidden_act: str) -> TopKRouter:
    if spec.gate_type == "linear":
        return LinearRouter(hidden_size, spec)
    if spec.gate_type == "mlp":
        return MLPRouter(hidden_size, spec, hidden_act)
    if spec.gate_type == "gmm":
        return GMMRouter(hidden_size, spec)
    raise ValueError(f"unknown gate_type {spec.gate_type!r}")
