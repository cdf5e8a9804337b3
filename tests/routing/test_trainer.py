"""End to end with transformers' Trainer: it passes ``num_items_in_batch`` to the model and does not divide
the loss by the accumulation steps, so the router update of batch 4 equals that of 2 micro-batches of 2."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from moeforge.routing import RouterLossConfig, attach_router_losses
from tests.routing.tiny import batch, moeforge_model


def router_update(tmp_path: Path, batch_size: int, accumulation: int) -> torch.Tensor:
    """One SGD step (lr 1, no clipping) on four copies of a row with padding and unscored prompt tokens;
    identical rows make every micro-batch route alike, so only the weighting can differ."""
    model = moeforge_model().train()
    attach_router_losses(model, RouterLossConfig(balance_coef=0.5, mi_coef=0.5))
    row = {k: v[1] for k, v in batch(rows=2).items()}
    gate = model.model.layers[1].mlp.gate.weight
    before = gate.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run-{batch_size}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    Trainer(model=model, args=args, train_dataset=[row] * 4, optimizers=(optimizer, None)).train()
    return gate.detach() - before


def test_accumulated_micro_batches_update_the_router_like_one_batch(tmp_path: Path) -> None:
    whole = router_update(tmp_path, batch_size=4, accumulation=1)
    accumulated = router_update(tmp_path, batch_size=2, accumulation=2)
    assert whole.abs().max() > 1e-2
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)
