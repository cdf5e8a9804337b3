"""Initial router weights: random, zeros, k-means on the router's real input, or virtual groups.

Returned names are relative to the router module (``weight`` for linear; ``fc1.weight``/``fc2.weight``
for mlp; ``means``/``log_scales`` for gmm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeforge.conversion.clustering import kmeans


def init_router(
    method: str,
    experts: int,
    gate_type: str,
    gate_hidden_size: int,
    hidden_size: int,
    std: float,
    router_inputs: torch.Tensor | None,
    generator: torch.Generator,
    n_split: int = 1,
) -> dict[str, torch.Tensor]:
    """A router over ``experts`` choices (FFN experts, or attention head groups with gate_type linear);
    ``n_split``: the shards per dense copy that virtual_groups ties together."""
    # The per-expert rows: the linear weight, the mlp gate's output layer, or the gmm means.
    width = gate_hidden_size if gate_type == "mlp" else hidden_size

    def normal(*shape: int) -> torch.Tensor:
        return std * torch.randn(shape, generator=generator)

    if method == "zeros":
        rows = torch.zeros(experts, width)
    elif method == "virtual_groups":
        # one random row per dense copy, repeated for each of its shards: the shards of a copy tie and are
        # selected together, which is what makes granular upcycling exact
        rows = normal(experts // n_split, width).repeat_interleave(n_split, dim=0)
    elif method == "random":
        rows = normal(experts, width)
    elif method == "kmeans":
        if router_inputs is None:
            raise ValueError("kmeans router init needs the router inputs from calibration text")
        assignment = kmeans(router_inputs, experts, generator)
        clusters = [router_inputs[assignment == e] for e in range(experts)]
        centroids = torch.stack([c.mean(0) if len(c) else router_inputs.mean(0) for c in clusters])
        if gate_type == "gmm":
            spread = torch.stack([c.std(0) if len(c) > 1 else router_inputs.std(0) for c in clusters])
            return {"means": centroids, "log_scales": torch.log(spread.clamp_min(1e-3))}
        # unit directions scaled to the norm a random N(0, std) row would have: same logit magnitude
        return {"weight": F.normalize(centroids, dim=-1) * std * math.sqrt(hidden_size)}
    else:
        raise ValueError(f"unknown router init {method!r}")

    if gate_type == "linear":
        return {"weight": rows}
    if gate_type == "mlp":
        return {"fc1.weight": normal(gate_hidden_size, hidden_size), "fc2.weight": rows}
    return {"means": rows, "log_scales": torch.zeros(experts, hidden_size)}
