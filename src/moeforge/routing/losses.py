"""Router losses, computed per layer in fp32 over the valid (non-padding) tokens, then averaged over layers.

Per layer, because balance is a property of each layer's experts: transformers'
``load_balancing_loss_func`` sums the routing of all layers before taking the product ``f · P``, so one
layer sending everything to expert 0 and another sending everything to expert 1 look balanced together
(transformers #28093). Padding is masked because pad tokens are routed like any other token and would
otherwise pull the statistics toward whatever the router does with them.

``mask`` is a ``[T]`` bool tensor (True = a real token) shared by every layer, since every router sees the
same tokens; ``None`` means all tokens count. A mask with no valid token gives 0, not NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def token_weights(mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """``[T]`` fp32 weights, 1 for a valid token and 0 for padding, on the logits' device."""
    if mask is None:
        return torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    return mask.to(device=logits.device, dtype=torch.float32).reshape(-1)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the first dim of ``values`` ``[T, ...]`` weighted by ``weights [T]`` (clamped: no sync, no NaN)."""
    shape = (-1,) + (1,) * (values.ndim - 1)
    return (values * weights.reshape(shape)).sum(0) / weights.sum().clamp_min(1.0)


def expert_counts(indices: torch.Tensor, num_experts: int, weights: torch.Tensor) -> torch.Tensor:
    """``[E]`` fp32: how many valid tokens have each expert among their top-k ``indices [T, k]``."""
    slot_weights = weights.unsqueeze(-1).expand_as(indices).reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), slot_weights)


def layer_balance(logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral balance ``E · Σ_e f_e · P_e`` of one layer.

    ``f_e`` is the share of valid tokens whose top-k holds ``e`` (so ``Σ f = k``; it carries no gradient) and
    ``P_e`` the mean router probability of ``e``. Balanced routing gives ``k``; at ``k = E`` every ``f_e = 1``
    and the loss is the constant ``E``. ``indices`` are the selections the router actually made (they differ
    from the logits' top-k under aux-loss-free balancing); by default the logits' top-k."""
    logits = logits.float()
    weights = token_weights(mask, logits)
    if indices is None:
        indices = torch.topk(logits, top_k, dim=-1).indices
    fraction = expert_counts(indices, logits.shape[-1], weights) / weights.sum().clamp_min(1.0)
    mean_prob = _masked_mean(F.softmax(logits, dim=-1), weights)
    return logits.shape[-1] * (fraction * mean_prob).sum()


def layer_z(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss of one layer: mean over valid tokens of ``logsumexp(logits)²`` (keeps logits small)."""
    logits = logits.float()
    return _masked_mean(torch.logsumexp(logits, dim=-1).square(), token_weights(mask, logits))


def layer_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid tokens of the router entropy ``H(p_t)`` in nats (0 = certain, log E = uniform)."""
    logits = logits.float()
    log_probs = F.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return _masked_mean(entropy, token_weights(mask, logits))


def layer_mi(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative token–expert mutual information of one layer: ``mean_t H(p_t) − H(mean_t p_t)``.

    Minimising it makes each token's routing confident (first term) while the experts are used evenly
    overall (second term), the Dense2MoE/ModuleFormer ``mi`` loss. Its minimum is ``−log E``."""
    logits = logits.float()
    weights = token_weights(mask, logits)
    mean_prob = _masked_mean(F.softmax(logits, dim=-1), weights)
    tiny = torch.finfo(torch.float32).tiny  # log(0) would make the gradient of an unused expert NaN
    marginal_entropy = -(mean_prob * mean_prob.clamp_min(tiny).log()).sum()
    return layer_entropy(logits, mask) - marginal_entropy


def layer_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """Mean of per-layer scalars that may live on different devices (a model split with ``device_map``)."""
    device = values[0].device
    return torch.stack([v.to(device) for v in values]).mean()


def switch_balance_loss(logits: Sequence[torch.Tensor], top_k: Sequence[int] | int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`layer_balance` of each layer (``logits[l] [T, E_l]``, ``top_k`` per layer or shared), averaged."""
    ks = [top_k] * len(logits) if isinstance(top_k, int) else list(top_k)
    return layer_mean([layer_balance(x, k, mask) for x, k in zip(logits, ks, strict=True)])


def z_loss(logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`layer_z` of each layer, averaged."""
    return layer_mean([layer_z(x, mask) for x in logits])


def mutual_information_loss(logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`layer_mi` of each layer, averaged."""
    return layer_mean([layer_mi(x, mask) for x in logits])
