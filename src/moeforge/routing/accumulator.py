"""Running sums of routing statistics, kept as device tensors so recording a forward pass never syncs.

The only host transfer is in :meth:`RoutingAccumulator.pop`, once per report. Loads are summed in float64:
float32 stops counting exactly past 2**24 selections, which a long training window reaches.
"""

from __future__ import annotations

import torch

from moeforge.routing.stats import RoutingStats


class RoutingAccumulator:
    """Per-layer sums since the last :meth:`pop`; several can follow one handle (logging, aux-free balancing)."""

    def __init__(self, names: list[str], num_experts: list[int]) -> None:
        self.names = names
        self.num_experts = num_experts
        self._reset()

    def _reset(self) -> None:
        layers = len(self.names)
        self.load: list[torch.Tensor | None] = [None] * layers
        self.tokens: list[torch.Tensor | None] = [None] * layers
        self.entropy_sum: list[torch.Tensor | None] = [None] * layers
        self.balance_sum: list[torch.Tensor | None] = [None] * layers

    def add(self, layer: int, counts: torch.Tensor, tokens: torch.Tensor, entropy: torch.Tensor, balance: torch.Tensor) -> None:
        """One router call: ``counts [E]`` selections of valid tokens, ``tokens`` valid tokens, and that call's
        mean ``entropy`` and ``balance`` (weighted by ``tokens`` so windows average per token)."""
        tokens = tokens.to(torch.float64, copy=True)  # copies: the sums are updated in place below
        values = (counts.to(torch.float64, copy=True), tokens, entropy.double() * tokens, balance.double() * tokens)
        for sums, value in zip((self.load, self.tokens, self.entropy_sum, self.balance_sum), values, strict=True):
            current = sums[layer]
            sums[layer] = value if current is None else current.add_(value)

    def pop(self) -> RoutingStats:
        """The statistics since the last pop (layers never reached report zero load), then start afresh."""
        tokens = [0.0 if t is None else float(t) for t in self.tokens]

        def per_token(sums: list[torch.Tensor | None]) -> list[float]:
            return [0.0 if s is None else float(s) / max(t, 1.0) for s, t in zip(sums, tokens, strict=True)]

        stats = RoutingStats(
            load=[
                torch.zeros(e, dtype=torch.int64) if load is None else load.round().long().cpu()
                for load, e in zip(self.load, self.num_experts, strict=True)
            ],
            tokens=int(max(tokens, default=0.0)),
            entropy=per_token(self.entropy_sum),
            balance=per_token(self.balance_sum),
            names=list(self.names),
        )
        self._reset()
        return stats
