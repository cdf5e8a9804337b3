"""Which FFN neurons go where: shared-expert selection and the routed neuron split.

A SwiGLU FFN is a sum over its intermediate neurons j of ``down[:, j] · act(gate_j·x) · (up_j·x)``, so
any partition of the neurons into groups gives experts whose outputs sum back to the dense FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def balanced_assignment(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row to a cluster, at most ``capacity`` rows per cluster, preferring high similarity.

    Every unassigned row bids for its best cluster that still has room; a cluster keeps its strongest
    bidders up to its room and the rest bid again. Each round fills a cluster or ends, so there are at
    most C + 1 rounds of vectorised work."""
    num_rows, num_clusters = similarity.shape
    assignment = torch.full((num_rows,), -1, dtype=torch.long)
    room = torch.full((num_clusters,), capacity, dtype=torch.long)
    while (assignment < 0).any():
        rows = torch.nonzero(assignment < 0).flatten()
        bids = similarity[rows].masked_fill(room == 0, float("-inf")).argmax(dim=1)
        for cluster in bids.unique().tolist():
            bidders = rows[bids == cluster]
            strongest = bidders[torch.argsort(similarity[bidders, cluster], descending=True)[: int(room[cluster])]]
            assignment[strongest] = cluster
            room[cluster] -= len(strongest)
    return assignment


def balanced_kmeans(features: torch.Tensor, num_clusters: int, generator: torch.Generator, iters: int = 15) -> list[torch.Tensor]:
    """Cluster the rows of ``features [N, D]`` into ``num_clusters`` groups of exactly N / num_clusters rows,
    by cosine similarity (k-means with a capacity-constrained assignment step); returns sorted row indices
    per cluster."""
    num_rows = features.shape[0]
    x = F.normalize(features.float(), dim=-1)
    centroids = x[torch.randperm(num_rows, generator=generator)[:num_clusters]].clone()
    assignment = torch.empty(0)
    for _ in range(iters):
        new_assignment = balanced_assignment(x @ centroids.T, num_rows // num_clusters)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        centroids = F.normalize(torch.stack([x[assignment == c].mean(0) for c in range(num_clusters)]), dim=-1)
    return [torch.nonzero(assignment == c).flatten() for c in range(num_clusters)]


def split_neurons(
    method: str,
    neurons: torch.Tensor,
    num_groups: int,
    *,
    up_proj: torch.Tensor,
    activations: torch.Tensor | None,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Split the neuron ids ``neurons`` into ``num_groups`` equal groups.

    ``random``: a random permutation (LLaMA-MoE found it as good as any). ``kmeans``: balanced k-means on
    the normalised ``up_proj`` rows. ``importance``: balanced k-means on each neuron's activation pattern
    over calibration tokens, so neurons that fire together share an expert and a router can pick them.
    ``contiguous``: consecutive blocks (used for granular shards)."""
    if method == "contiguous":
        return list(neurons.chunk(num_groups))
    if method == "random":
        shuffled = neurons[torch.randperm(len(neurons), generator=generator)]
        return [group.sort().values for group in shuffled.chunk(num_groups)]
    if method == "kmeans":
        features = up_proj[neurons]
    elif method == "importance":
        if activations is None:
            raise ValueError("importance split needs calibration activations")
        features = activations[:, neurons].T.abs()
    else:
        raise ValueError(f"unknown split method {method!r}")
    return [neurons[group] for group in balanced_kmeans(features, num_groups, generator)]


def select_shared(
    selection: str, intermediate: int, size: int, *, activations: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(shared neuron ids, remaining neuron ids)``, both sorted. ``importance`` keeps the
    neurons with the largest mean |activation| on calibration text (LLaMA-MoE v2's residual block)."""
    if selection == "first":
        order = torch.arange(intermediate)
    elif selection == "random":
        order = torch.randperm(intermediate, generator=generator)
    elif selection == "importance":
        if activations is None:
            raise ValueError("importance selection needs calibration activations")
        order = torch.argsort(activations.abs().mean(0), descending=True, stable=True)
    else:
        raise ValueError(f"unknown shared selection {selection!r}")
    return order[:size].sort().values, order[size:].sort().values
