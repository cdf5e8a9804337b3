"""Neuron selection and splitting: every neuron lands in exactly one place, groups are balanced."""

from __future__ import annotations

import pytest
import torch

from moeforge.conversion.clustering import balanced_assignment, balanced_kmeans
from moeforge.conversion.neurons import select_shared, split_neurons


def test_balanced_assignment_respects_capacity_and_prefers_similarity():
    similarity = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.9]])
    assignment = balanced_assignment(similarity, capacity=2)
    assert assignment.tolist() == [0, 0, 1, 1]  # row 2 prefers 0 but 0 is full with stronger bidders


def test_balanced_kmeans_recovers_planted_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 10
    points = torch.cat([centers[c] + torch.randn(25, 16, generator=generator) for c in range(4)])
    groups = balanced_kmeans(points, 4, generator)
    assert sorted(len(g) for g in groups) == [25] * 4
    assert sorted(sorted(g.tolist()) for g in groups) == [list(range(25 * c, 25 * c + 25)) for c in range(4)]


@pytest.mark.parametrize("method", ["random", "kmeans", "importance", "contiguous"])
def test_split_is_a_partition(method):
    generator = torch.Generator().manual_seed(0)
    neurons = torch.arange(10, 58)
    up = torch.randn(64, 8, generator=generator)
    activations = torch.randn(100, 64, generator=generator)
    groups = split_neurons(method, neurons, 4, up_proj=up, activations=activations, generator=generator)
    assert [len(g) for g in groups] == [12] * 4
    assert sorted(torch.cat(groups).tolist()) == neurons.tolist()


def test_importance_selection_keeps_the_most_active_neurons():
    activations = torch.zeros(10, 8)
    activations[:, [2, 5]] = 3.0
    activations[:, 7] = -1.0
    shared, rest = select_shared("importance", 8, 3, activations=activations, generator=torch.Generator())
    assert shared.tolist() == [2, 5, 7] and rest.tolist() == [0, 1, 3, 4, 6]


def test_importance_split_groups_co_firing_neurons():
    """Neurons that fire on the same tokens end up in the same expert, so a router can select them."""
    for seed in range(20):  # k-means++ seeds: no draw of the activations or the seeds mixes the two groups
        g = torch.Generator().manual_seed(seed)
        activations = torch.zeros(40, 8)
        for group, tokens in enumerate((slice(0, 20), slice(20, 40))):
            activations[tokens, [group, group + 2, group + 4, group + 6]] = 1.0 + torch.rand(20, 4, generator=g)
        groups = split_neurons("importance", torch.arange(8), 2, up_proj=torch.randn(8, 4), activations=activations, generator=g)
        assert sorted(g.tolist() for g in groups) == [[0, 2, 4, 6], [1, 3, 5, 7]], seed
