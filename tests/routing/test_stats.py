"""Routing statistics: hand values on a toy model whose routers return fixed logits, then on moeforge_llama,
and the RoutingStats container itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from moeforge.routing import RouterLossConfig, RoutingStats, attach_router_losses, find_routers, observe_routers
from tests.routing.tiny import batch, moeforge_model

# two sequences of 3 tokens, the last token of the second one padding
LAYER_A = [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [3.0, 0.0, 1.0], [5.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 9.0]]
LAYER_B = [
    [1.0, 2.0, 0.0, 0.5],
    [2.0, 1.0, 0.0, 0.5],
    [0.0, 1.0, 2.0, 0.5],
    [1.0, 0.0, 2.0, 0.5],
    [2.0, 0.0, 1.0, 0.5],
    [0.0, 0.0, 0.0, 9.0],
]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


class FixedRouter(nn.Module):
    """Router-shaped like transformers' ``*TopKRouter``, but its logits are given."""

    def __init__(self, logits: list[list[float]], top_k: int) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.tensor(logits))
        self.top_k, self.num_experts = top_k, len(logits[0])

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights, indices = torch.topk(F.softmax(self.fixed, dim=-1), self.top_k, dim=-1)
        return self.fixed, weights, indices


class ToyLM(nn.Module):
    """Runs its routers over the flattened tokens; its 'LM loss' is a constant 1 when labels are given."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([FixedRouter(LAYER_A, 1), FixedRouter(LAYER_B, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput:
        for router in self.layers:
            router(input_ids.reshape(-1, 1).float())
        return CausalLMOutput(loss=None if labels is None else torch.tensor(1.0))


def hand_load(rows: list[list[float]], k: int) -> list[int]:
    valid = [r for r, m in zip(rows, MASK.reshape(-1).tolist(), strict=True) if m]
    load = [0] * len(rows[0])
    for r in valid:
        for e in sorted(range(len(r)), key=lambda e: -r[e])[:k]:
            load[e] += 1
    return load


def hand_entropy(rows: list[list[float]]) -> float:
    valid = [r for r, m in zip(rows, MASK.reshape(-1).tolist(), strict=True) if m]
    total = 0.0
    for r in valid:
        p = [math.exp(x) / sum(math.exp(y) for y in r) for x in r]
        total -= sum(q * math.log(q) for q in p)
    return total / len(valid)


def test_observed_stats_match_hand_counts_and_entropy() -> None:
    model = ToyLM()
    ids = torch.zeros(2, 3, dtype=torch.long)
    with observe_routers(model) as handle:
        model(input_ids=ids, attention_mask=MASK)
        model(input_ids=ids, attention_mask=MASK)
        stats = handle.pop_stats()
    assert stats.tokens == 2 * 5
    expected = [[2 * c for c in hand_load(LAYER_A, 1)], [2 * c for c in hand_load(LAYER_B, 2)]]
    assert [load.tolist() for load in stats.load] == expected
    assert [int(load.sum()) for load in stats.load] == [10 * 1, 10 * 2]  # tokens · k
    assert stats.entropy == pytest.approx([hand_entropy(LAYER_A), hand_entropy(LAYER_B)], rel=1e-5)
    # only the padded token picks expert 2 (layer A) or 3 (layer B): dead, since padding is not counted
    assert hand_load(LAYER_A, 1) == [4, 1, 0] and hand_load(LAYER_B, 2) == [4, 3, 3, 0]
    assert stats.dead_experts() == [[2], [3]]
    assert stats.dead_experts(threshold=0.2) == [[1, 2], [3]]  # expert 1 of layer A: 2/10 selections
    assert handle.pop_stats().tokens == 0  # popped: reset


def test_stats_balance_is_the_balance_loss_and_aux_is_scaled_by_label_share() -> None:
    """On the toy model the only loss is the aux, so the hook's GA weight is visible by hand."""
    model = ToyLM().train()
    handle = attach_router_losses(model, RouterLossConfig(balance_coef=1.0))
    ids = torch.zeros(2, 3, dtype=torch.long)
    labels = torch.tensor([[-100, 5, 5], [-100, 5, -100]])  # 3 label tokens after the shift
    out = model(input_ids=ids, attention_mask=MASK, labels=labels, num_items_in_batch=12)
    balance = out.router_losses["balance"]
    assert out.loss.item() == pytest.approx(1.0 + balance.item() * 3 / 12, rel=1e-6)
    stats = handle.pop_stats()
    assert sum(stats.balance) / 2 == pytest.approx(balance.item(), rel=1e-6)
    # layer A by hand: f = (4, 1, 0)/5 and P = mean probabilities of the 5 real tokens
    valid = torch.tensor(LAYER_A)[MASK.reshape(-1).bool()]
    hand = 3 * (torch.tensor([4.0, 1.0, 0.0]) / 5 * F.softmax(valid, -1).mean(0)).sum()
    assert stats.balance[0] == pytest.approx(hand.item(), rel=1e-6)


def test_moeforge_loads_sum_to_real_tokens_times_k() -> None:
    model = moeforge_model()
    inputs = batch()
    with torch.no_grad(), observe_routers(model) as handle:
        model(**inputs)
        model(**inputs)
        stats = handle.pop_stats()
    tokens = 2 * int(inputs["attention_mask"].sum())
    assert stats.tokens == tokens
    assert [int(load.sum()) for load in stats.load] == [tokens * 2, tokens * 1]
    assert [len(load) for load in stats.load] == [4, 3]
    assert stats.names == ["1", "2"]
    assert all(0 < e < math.log(n) for e, n in zip(stats.entropy, (4, 3), strict=True))


def test_observing_a_dense_model_gives_empty_stats() -> None:
    model = moeforge_model(moe_layers=[None, None, None])
    assert find_routers(model) == []
    with observe_routers(model) as handle:
        model(**batch())
        stats = handle.pop_stats()
    assert (stats.load, stats.tokens, stats.entropy) == ([], 0, [])


def make_stats(load: list[list[int]], tokens: int, entropy: list[float], balance: list[float]) -> RoutingStats:
    return RoutingStats([torch.tensor(x) for x in load], tokens, entropy, balance, [str(i) for i in range(len(load))])


def test_load_fraction_dead_experts_and_merge() -> None:
    a = make_stats([[6, 2, 0, 0], [3, 1, 0]], 8, [1.0, 0.5], [2.0, 1.5])
    b = make_stats([[2, 2, 4, 0], [0, 3, 1]], 4, [0.4, 0.2], [1.0, 1.2])
    assert [f.tolist() for f in a.load_fraction()] == [[0.75, 0.25, 0.0, 0.0], [0.75, 0.25, 0.0]]
    assert a.dead_experts() == [[2, 3], [2]]
    merged = a.merge(b)
    assert [x.tolist() for x in merged.load] == [[8, 4, 4, 0], [3, 4, 1]]
    assert merged.tokens == 12
    assert merged.entropy == pytest.approx([(8 * 1.0 + 4 * 0.4) / 12, (8 * 0.5 + 4 * 0.2) / 12])
    assert merged.balance == pytest.approx([(8 * 2.0 + 4 * 1.0) / 12, (8 * 1.5 + 4 * 1.2) / 12])
    assert merged.dead_experts() == [[3], []]
    assert RoutingStats().merge(a) is a


def test_to_dict_is_json_and_summary_table_reads() -> None:
    stats = make_stats([[6, 2, 0, 0], [3, 1, 0]], 8, [1.0, 0.5], [2.0, 1.5])
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["load"] == [[6, 2, 0, 0], [3, 1, 0]]
    assert data["dead_experts"] == [[2, 3], [2]]
    assert data["tokens"] == 8
    table = stats.summary_table().splitlines()
    assert table[0].split() == ["layer", "experts", "top", "load", "%", "min", "load", "%", "dead", "entropy"]
    assert table[2].split() == ["0", "4", "75.0", "0.0", "2", "1.000"]
    assert table[3].split() == ["1", "3", "75.0", "0.0", "1", "0.500"]
    assert table[-1] == "8 tokens"
