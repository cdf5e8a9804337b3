"""Which FFN neurons go where: shared-expert selection and the routed neuron split.

A SwiGLU FFN is a sum over its intermediate neurons j of ``down[:, j] · act(gate_j·x) · (up_j·x)``, so
any partition of the neurons into groups gives experts whose outputs sum back to the dense FFN.
"""

from __future__ import annotations

import torch

from moeforge.conversion.clustering import balanced_kmeans


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
