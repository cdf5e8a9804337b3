"""What the router losses need to know about the batch of one forward call, read from its keyword arguments.

Two things: which router tokens are real (``attention_mask``: padding must not count as routing), and how
much this micro-batch weighs in the optimizer step (its label tokens over ``num_items_in_batch``, the
weighting transformers' Trainer gives the LM loss).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class BatchContext:
    attention_mask: torch.Tensor | None = None
    label_tokens: torch.Tensor | None = None
    num_items_in_batch: torch.Tensor | int | float | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> BatchContext:
        """Labels are counted like transformers' Trainer counts ``num_items_in_batch``: pre-shifted
        ``shift_labels`` as they are, else ``labels[..., 1:]`` (the first position predicts nothing)."""
        labels = kwargs.get("shift_labels")
        if labels is None and kwargs.get("labels") is not None:
            labels = kwargs["labels"][..., 1:]
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            warnings.warn("router losses: attention_mask is not a [batch, seq] tensor; every token counts as real", stacklevel=3)
            mask = None
        return cls(
            attention_mask=mask,
            label_tokens=None if labels is None else (labels != IGNORE_INDEX).sum(),
            num_items_in_batch=kwargs.get("num_items_in_batch"),
        )

    def token_mask(self, num_tokens: int) -> torch.Tensor | None:
        """``[T]`` bool mask for a router call over ``num_tokens = batch · new_tokens`` flattened tokens.

        With a KV cache the mask spans past and new positions while the routers see only the new ones,
        which are its last columns."""
        if self.attention_mask is None:
            return None
        batch, columns = self.attention_mask.shape
        if num_tokens % batch or num_tokens // batch > columns:
            raise ValueError(
                f"router call over {num_tokens} tokens does not match attention_mask of shape {tuple(self.attention_mask.shape)}"
            )
        return self.attention_mask[:, columns - num_tokens // batch :].reshape(-1).bool()

    def loss_weight(self) -> torch.Tensor | float:
        """The factor on this micro-batch's aux loss so micro-batches add up like the LM loss.

        With ``num_items_in_batch`` the Trainer neither averages the LM loss per micro-batch nor divides it
        by the accumulation steps: each micro-batch contributes ``sum / num_items_in_batch``. An aux loss
        that is a per-micro-batch mean must then weigh ``label_tokens / num_items_in_batch`` for the
        contributions to sum to the token-weighted mean over the accumulated (and data-parallel) batch."""
        if self.num_items_in_batch is None or self.label_tokens is None:
            return 1.0
        items = self.num_items_in_batch
        if isinstance(items, torch.Tensor):
            items = items.to(self.label_tokens.device)
        return self.label_tokens / items
