"""k-means, once: plain (router init on the router's real input) and balanced (equal-size neuron groups).

Both start from k-means++ seeds: each next centroid is drawn with probability proportional to the squared
distance to the nearest one already chosen, so two seeds rarely land in one cluster (a random start that
does can leave the algorithm in a split that mixes clusters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kmeans_plus_plus(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """``num_clusters`` seed rows of ``points [N, D]``."""
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    for _ in range(1, num_clusters):
        distance = torch.cdist(points, points[chosen]).min(dim=1).values.square()
        probs = distance / distance.sum() if distance.sum() > 0 else torch.full_like(distance, 1 / len(distance))
        chosen.append(int(torch.multinomial(probs, 1, generator=generator)))
    return points[chosen].clone()


def kmeans(points: torch.Tensor, num_clusters: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Plain k-means on ``points [N, D]``; returns the cluster id of every point."""
    points = points.float()
    centers = kmeans_plus_plus(points, num_clusters, generator)
    assignment = torch.zeros(len(points), dtype=torch.long)
    for _ in range(iters):
        assignment = torch.cdist(points, centers).argmin(dim=1)
        updated = torch.stack([points[assignment == c].mean(0) if (assignment == c).any() else centers[c] for c in range(num_clusters)])
        if torch.allclose(updated, centers):
            break
        centers = updated
    return assignment


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
    centroids = kmeans_plus_plus(x, num_clusters, generator)
    assignment = torch.empty(0)
    for _ in range(iters):
        new_assignment = balanced_assignment(x @ centroids.T, num_rows // num_clusters)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        centroids = F.normalize(torch.stack([x[assignment == c].mean(0) for c in range(num_clusters)]), dim=-1)
    return [torch.nonzero(assignment == c).flatten() for c in range(num_clusters)]
