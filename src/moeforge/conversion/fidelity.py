"""How closely a converted MoE reproduces its dense source, on the same calibration tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FidelityReport:
    tokens: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    perplexity_dense: float
    perplexity_moe: float
    max_abs_logit: float
    tolerance: float | None
    exact_expected: bool

    @property
    def passed(self) -> bool:
        return not self.exact_expected or self.max_abs_logit_diff <= (self.tolerance or 0.0)

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def lines(self) -> list[str]:
        verdict = (
            ("exact: PASS" if self.passed else "exact: FAIL") + f" (tolerance {self.tolerance:.2e})"
            if self.exact_expected
            else "not function-preserving by construction (approximate init); figures are informative"
        )
        return [
            f"fidelity on {self.tokens} calibration tokens, MoE vs dense:",
            f"  max |Δlogit|      {self.max_abs_logit_diff:.3e}   (max |logit| {self.max_abs_logit:.1f})",
            f"  mean |Δlogit|     {self.mean_abs_logit_diff:.3e}",
            f"  top-1 agreement   {self.top1_agreement * 100:.2f}%",
            f"  perplexity        dense {self.perplexity_dense:.3f}   moe {self.perplexity_moe:.3f}",
            f"  {verdict}",
        ]


def default_tolerance(dense_logits: torch.Tensor, num_layers: int) -> float:
    """fp32 round-off budget: re-associating the FFN sums perturbs each layer at ~1e-7 relative, and the
    error grows through the layers; 1e-5 · max|logit| · √layers (plus a floor) covers it with margin
    while any real mismatch (a wrong scale, a swapped expert) is orders of magnitude larger."""
    return 1e-5 * max(1.0, dense_logits.abs().max().item()) * max(1.0, num_layers**0.5) + 1e-5


def compare(
    dense_logits: torch.Tensor, moe_logits: torch.Tensor, input_ids: torch.Tensor, *, exact_expected: bool, tolerance: float | None
) -> FidelityReport:
    diff = (dense_logits - moe_logits).abs()
    targets = input_ids[:, 1:].reshape(-1)

    def perplexity(logits: torch.Tensor) -> float:
        return float(torch.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)))

    return FidelityReport(
        tokens=input_ids.numel(),
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        top1_agreement=float((dense_logits.argmax(-1) == moe_logits.argmax(-1)).float().mean()),
        perplexity_dense=perplexity(dense_logits),
        perplexity_moe=perplexity(moe_logits),
        max_abs_logit=float(dense_logits.abs().max()),
        tolerance=tolerance,
        exact_expected=exact_expected,
    )
