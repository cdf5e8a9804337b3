"""One linear map per expert over expert-sorted rows: ``out[rows of e] = x[rows of e] @ W_e^T``.

Two implementations with the same result:

* PyTorch's ``grouped_mm`` (one call for all experts; on CUDA a real grouped GEMM kernel, on CPU a loop of
  ``mm`` in C++), used where it works;
* a loop of ``mm`` over the non-empty experts (the fallback), which works for every dtype, layout and
  compiler.

``grouped_mm`` does not work everywhere, so :func:`grouped_mm_supported` checks each known failure first
(PyTorch 2.13): rows and weights must start 16-byte aligned with 16-byte aligned row strides on CPU; fp64
is rejected; inductor fails on it for every dtype but bf16; on CUDA it needs compute capability 8.0 and
a 16-bit dtype. Its backward also fails when the incoming gradient is expanded (zero-stride, e.g. from
``out.sum().backward()``), so the output's gradient is made contiguous on the way back.
"""

from __future__ import annotations

import torch

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: torch.Tensor) -> bool:
    """Starts on a 16-byte boundary and every non-unit stride (so every row) is a multiple of 16 bytes."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride() if s != 1)


def grouped_mm_supported(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm(x, weight_t, offs=...)`` runs (forward and backward) here."""
    if not hasattr(torch.nn.functional, "grouped_mm") or x.dtype != weight_t.dtype:
        return False
    if x.dtype not in GROUPED_MM_DTYPES or x.shape[0] == 0:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        return x.dtype != torch.float32 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu":
        return False
    out_row_bytes = weight_t.shape[-1] * x.element_size()  # the output's rows (and its gradient's)
    return _aligned(x) and _aligned(weight_t) and out_row_bytes % 16 == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (``grouped_mm``'s backward rejects expanded ones)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _looped(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The fallback. ``weight.unbind(0)`` is one view op for autograd: indexing ``weight[e]`` per expert
    would zero-fill a full ``[E, ...]`` gradient for every expert in backward (cost growing with E²)."""
    per_expert = weight.unbind(0)
    outputs = [torch.nn.functional.linear(rows, per_expert[e]) for e, rows in enumerate(x.split(counts)) if rows.shape[0]]
    if not outputs:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: list[int] | None, *, use_grouped_mm: bool | None = None
) -> torch.Tensor:
    """``x [S, in]`` (expert-sorted rows), ``weight [E, out, in]`` (the ``nn.Linear`` / transformers layout)
    -> ``[S, out]``. ``offsets`` (int32 cumulative counts) feed ``grouped_mm``, ``counts`` the loop; pass
    ``use_grouped_mm`` to force one implementation (tests, benchmarks), else it is chosen per call."""
    weight = weight.to(x.dtype)
    weight_t = weight.transpose(-2, -1)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x, weight_t)
    if use_grouped_mm:
        out = torch.nn.functional.grouped_mm(x, weight_t, offs=offsets)
        return _ContiguousGrad.apply(out) if out.requires_grad else out
    if counts is None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    return _looped(x, weight, counts)
