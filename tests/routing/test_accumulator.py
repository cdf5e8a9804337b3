"""Gradient accumulation as transformers' Trainer does it: every micro-batch gets the same
``num_items_in_batch`` (label tokens of the whole accumulated batch) and losses are summed, not averaged.

The LM loss of a micro-batch is ``sum / num_items_in_batch``; the aux must weigh ``label tokens /
num_items_in_batch`` for the micro-steps to add up to one step over the whole batch. The balance and MI
losses are statistics of a micro-batch (f and P are shares within it), so the sums agree exactly when the
halves route alike (each half holds the same rows as the other); the z-loss is a per-token mean and
agrees for any halves of equal token counts.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from moeforge.routing import RouterLossConfig, attach_router_losses, find_routers
from tests.routing.tiny import batch, label_tokens, mixtral_model, moeforge_model

MODELS: dict[str, Callable[[], nn.Module]] = {"moeforge_llama": moeforge_model, "mixtral": mixtral_model}


def rows(inputs: dict[str, torch.Tensor], index: slice | list[int]) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in inputs.items()}


def step(model: nn.Module, micro_batches: list[dict], num_items: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Summed loss and aux over the micro-batches, and the accumulated router gradients."""
    model.zero_grad()
    total, aux = torch.zeros(()), torch.zeros(())
    for micro in micro_batches:
        out = model(**micro, num_items_in_batch=torch.tensor(num_items))
        out.loss.backward()
        total, aux = total + out.loss.detach(), aux + out.router_aux_loss.detach()
        n = label_tokens(micro["labels"])
        torch.testing.assert_close(out.router_aux_loss.detach(), out.router_losses["aux"] * n / num_items)
    grads = [p.grad.clone() for r in find_routers(model) for p in r.module.parameters()]
    return total, aux, grads


@pytest.mark.parametrize("arch", list(MODELS))
def test_two_micro_steps_equal_one_step_over_the_batch(arch: str) -> None:
    model = MODELS[arch]().train()
    attach_router_losses(model, RouterLossConfig(balance_coef=0.5, z_coef=0.01, mi_coef=0.5))
    pair = batch(rows=2)  # two rows with padding and unscored prompt tokens
    whole = {k: torch.cat([v, v]) for k, v in pair.items()}
    num_items = label_tokens(whole["labels"])

    loss_whole, aux_whole, grads_whole = step(model, [whole], num_items)
    loss_halves, aux_halves, grads_halves = step(model, [rows(whole, slice(0, 2)), rows(whole, slice(2, 4))], num_items)

    torch.testing.assert_close(loss_halves, loss_whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_halves, aux_whole, rtol=1e-5, atol=1e-7)
    assert aux_whole > 0
    for g_halves, g_whole in zip(grads_halves, grads_whole, strict=True):
        torch.testing.assert_close(g_halves, g_whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", list(MODELS))
def test_z_loss_accumulates_exactly_over_different_halves(arch: str) -> None:
    model = MODELS[arch]().train()
    attach_router_losses(model, RouterLossConfig(balance_coef=0.0, z_coef=0.1))
    whole = batch(rows=4, pad=False)
    num_items = label_tokens(whole["labels"])

    loss_whole, aux_whole, grads_whole = step(model, [whole], num_items)
    loss_halves, aux_halves, grads_halves = step(model, [rows(whole, [0, 1]), rows(whole, [2, 3])], num_items)

    torch.testing.assert_close(aux_halves, aux_whole, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_halves, loss_whole, rtol=1e-5, atol=1e-6)
    for g_halves, g_whole in zip(grads_halves, grads_whole, strict=True):
        torch.testing.assert_close(g_halves, g_whole, rtol=1e-4, atol=1e-6)


def test_without_num_items_each_micro_batch_adds_its_plain_aux() -> None:
    model = moeforge_model().train()
    attach_router_losses(model, RouterLossConfig(balance_coef=0.5))
    out = model(**batch())
    torch.testing.assert_close(out.router_aux_loss.detach(), out.router_losses["aux"])
