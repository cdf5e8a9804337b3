"""Token-expert pairs ("slots") sorted by expert, and the two row permutations that move activations between
token order and expert order.

A token routed to ``k`` experts owns ``k`` slots (slot ``t·k + j`` is its ``j``-th choice). Expert-major
order makes each expert's rows contiguous, so one GEMM per expert (or one grouped GEMM) covers them.

:func:`dispatch` (token rows -> expert-sorted slot rows) and :func:`combine` (slot rows -> per-token sum) are
each other's adjoints, so each one's backward is the other one's forward: two gathers and a sum over ``k``.
Autograd's own backward of ``x[index]`` is an ``index_put`` with accumulation, and of ``index_add`` a gather
plus a zero-filled buffer; both cost more (profiled on CPU: the accumulating scatter was 5% of a 64-expert
layer's step), and neither knows every token has exactly ``k`` slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class SlotPlan:
    """Where every slot goes. ``order[i]``: the slot at expert-sorted position ``i``; ``inverse``: its
    inverse permutation; ``tokens = order // k``: the token each sorted row comes from."""

    order: torch.Tensor
    inverse: torch.Tensor
    tokens: torch.Tensor
    rows_per_expert: torch.Tensor
    num_tokens: int
    top_k: int

    @cached_property
    def counts(self) -> list[int]:
        """Rows per expert as a host list (on CUDA this syncs once, so GPU paths use :attr:`offsets`)."""
        return self.rows_per_expert.tolist()

    @cached_property
    def offsets(self) -> torch.Tensor:
        """Cumulative rows per expert, int32 (what ``grouped_mm`` takes)."""
        return torch.cumsum(self.rows_per_expert, dim=0, dtype=torch.int32)


def plan_slots(top_k_index: torch.Tensor, num_experts: int) -> SlotPlan:
    """Sort the ``[T, k]`` expert choices by expert (stable: within an expert, token order is kept, which
    makes every backend's summation order, and so its rounding, independent of the sort algorithm)."""
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return SlotPlan(
        order=order,
        inverse=inverse,
        tokens=order // top_k,
        rows_per_expert=torch.bincount(flat, minlength=num_experts),
        num_tokens=num_tokens,
        top_k=top_k,
    )


def _gather(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return rows.index_select(0, tokens)


def _sum_slots(rows: torch.Tensor, inverse: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    return rows.index_select(0, inverse).view(num_tokens, top_k, rows.shape[-1]).sum(1)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tokens: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.num_tokens, ctx.top_k = x.shape[0], top_k
        return _gather(x, tokens)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _sum_slots(grad.contiguous(), inverse, ctx.num_tokens, ctx.top_k), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, tokens: torch.Tensor, inverse: torch.Tensor, num_tokens: int, top_k: int):
        ctx.save_for_backward(tokens)
        return _sum_slots(rows, inverse, num_tokens, top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (tokens,) = ctx.saved_tensors
        return _gather(grad.contiguous(), tokens), None, None, None, None


def _tracked(t: torch.Tensor) -> bool:
    """Whether autograd records this op (else the plain op runs: no Function overhead when decoding)."""
    return torch.is_grad_enabled() and t.requires_grad


def dispatch(x: torch.Tensor, plan: SlotPlan) -> torch.Tensor:
    """``[T, d]`` token rows -> ``[T·k, d]`` rows in expert order (row ``i`` is token ``plan.tokens[i]``)."""
    if not _tracked(x):
        return _gather(x, plan.tokens)
    return _Dispatch.apply(x, plan.tokens, plan.inverse, plan.top_k)


def combine(rows: torch.Tensor, plan: SlotPlan) -> torch.Tensor:
    """``[T·k, d]`` expert-ordered slot rows -> ``[T, d]``: each token's ``k`` rows summed (a reshape-sum, not an
    ``index_add``: deterministic on every device, and bf16 sums accumulate in fp32 inside the reduction)."""
    if not _tracked(rows):
        return _sum_slots(rows, plan.inverse, plan.num_tokens, plan.top_k)
    return _Combine.apply(rows, plan.tokens, plan.inverse, plan.num_tokens, plan.top_k)
