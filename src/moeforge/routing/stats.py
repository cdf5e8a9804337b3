"""Routing statistics over a window of forward passes: what each layer's router did with the real tokens.

Entropy and balance are token-weighted means over the window, so merging two windows gives the same
numbers as one window over both (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoutingStats:
    """``load[l][e]``: top-k selections of expert ``e`` in MoE layer ``l`` by valid tokens (so
    ``load[l].sum() == tokens · k_l``); ``tokens``: valid tokens seen; ``entropy[l]``: mean router entropy
    in nats; ``balance[l]``: mean switch balance loss (``k`` = balanced); ``names[l]``: a layer label."""

    load: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    entropy: list[float] = field(default_factory=list)
    balance: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def load_fraction(self) -> list[torch.Tensor]:
        """Per layer, each expert's share of the layer's top-k selections (sums to 1; zeros if no tokens)."""
        return [load.float() / load.sum().clamp_min(1).float() for load in self.load]

    def dead_experts(self, threshold: float = 0.0) -> list[list[int]]:
        """Per layer, the experts whose load fraction is ``<= threshold`` (0: never selected)."""
        return [torch.nonzero(f <= threshold).flatten().tolist() for f in self.load_fraction()]

    def all_reduce(self) -> RoutingStats:
        """The statistics of every data-parallel rank together (identity outside torch.distributed): loads and
        tokens summed, entropy and balance token-weighted. Every rank must call it at the same step."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or not self.load:
            return self
        sizes = [len(load) for load in self.load]
        packed = torch.cat(
            [
                torch.cat([load.double().cpu() for load in self.load]),
                torch.tensor([float(self.tokens)], dtype=torch.float64),
                torch.tensor(self.entropy, dtype=torch.float64) * self.tokens,
                torch.tensor(self.balance, dtype=torch.float64) * self.tokens,
            ]
        )
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
        packed = packed.to(device)
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        loads, rest = packed[: sum(sizes)], packed[sum(sizes) :]
        tokens, layers = rest[0].item(), len(sizes)
        denominator = max(tokens, 1.0)
        return RoutingStats(
            load=list(loads.split(sizes)),
            tokens=int(tokens),
            entropy=(rest[1 : 1 + layers] / denominator).tolist(),
            balance=(rest[1 + layers :] / denominator).tolist(),
            names=self.names,
        )

    def merge(self, other: RoutingStats) -> RoutingStats:
        """The statistics of both windows together (same model: same layers and expert counts)."""
        if not self.tokens:
            return other
        if not other.tokens:
            return self
        total = self.tokens + other.tokens

        def mean(a: list[float], b: list[float]) -> list[float]:
            return [(x * self.tokens + y * other.tokens) / total for x, y in zip(a, b, strict=True)]

        return RoutingStats(
            load=[a + b.to(a.device) for a, b in zip(self.load, other.load, strict=True)],
            tokens=total,
            entropy=mean(self.entropy, other.entropy),
            balance=mean(self.balance, other.balance),
            names=self.names,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: integer loads, plain floats."""
        return {
            "tokens": self.tokens,
            "layers": self.names,
            "load": [[int(c) for c in load.tolist()] for load in self.load],
            "entropy": self.entropy,
            "balance": self.balance,
            "dead_experts": self.dead_experts(),
        }

    def summary_table(self) -> str:
        """Plain-text table, one row per MoE layer: layer, experts, top/min load %, dead experts, entropy."""
        header = ("layer", "experts", "top load %", "min load %", "dead", "entropy")
        columns = zip(self.names, self.load_fraction(), self.dead_experts(), self.entropy, strict=True)
        rows = [
            (name, str(len(f)), f"{100 * float(f.max()):.1f}", f"{100 * float(f.min()):.1f}", str(len(dead)), f"{h:.3f}")
            for name, f, dead, h in columns
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in (header, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{self.tokens} tokens")
        return "\n".join(lines)
