"""Perplexity of a causal LM on texts or canonical data rows, with routing statistics from the same pass.

The figure is ``exp`` of the token-weighted mean negative log-likelihood over every scored token: a mean
of per-batch means would weight a short last window like a full one and change with the batch size.
The token stream (see :mod:`moeforge.eval.token_stream`) is cut into non-overlapping windows of
``max_length``; every window but the last is full, so batches never need padding, which keeps the
routing statistics free of pad tokens and the result independent of ``batch_size``. The first token of
each window has no context and is not predicted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby, islice
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from moeforge.errors import MoeforgeError
from moeforge.eval.token_stream import TokenStream, dataset_stream, text_stream
from moeforge.routing import RoutingStats, observe_routers


@dataclass(frozen=True)
class PerplexityResult:
    """``nll``: mean negative log-likelihood per scored token (nats); ``tokens``: how many were scored."""

    nll: float
    perplexity: float
    tokens: int
    routing: RoutingStats

    def to_dict(self) -> dict[str, Any]:
        return {"nll": self.nll, "perplexity": self.perplexity, "tokens": self.tokens, "routing": self.routing.to_dict()}


def _batches(stream: TokenStream, max_length: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids [B, L], scored [B, L])`` batches of equal-length windows, in stream order."""
    starts = range(0, len(stream.ids), max_length)
    windows = [(stream.ids[s : s + max_length], stream.scored[s : s + max_length]) for s in starts]
    windows = [w for w in windows if len(w[0]) >= 2]  # a 1-token tail predicts nothing
    for _, same_length in groupby(windows, key=lambda w: len(w[0])):
        group = list(same_length)
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            yield torch.stack([ids for ids, _ in chunk]), torch.stack([scored for _, scored in chunk])


def _check(model: PreTrainedModel, max_length: int, batch_size: int, max_batches: int | None) -> None:
    if max_length < 2:
        raise MoeforgeError(f"max_length {max_length} must be at least 2 (one token of context, one to predict)")
    if batch_size < 1:
        raise MoeforgeError(f"batch_size {batch_size} must be at least 1")
    if max_batches is not None and max_batches < 1:
        raise MoeforgeError(f"max_batches {max_batches} must be at least 1 (or None for all)")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise MoeforgeError(f"max_length {max_length} exceeds the model's {positions} positions; use {positions} or less")


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    texts: Sequence[str] | None = None,
    dataset: Any = None,
    max_length: int = 512,
    batch_size: int = 4,
    max_batches: int | None = None,
    log: Callable[[str], None] | None = None,
) -> PerplexityResult:
    """Perplexity on ``texts`` (joined by EOS) or on ``dataset`` rows (``text``, or ``prompt`` +
    ``completion`` where only completion tokens are scored), evaluating at most ``max_batches`` batches.

    Runs under ``torch.no_grad()`` in eval mode (the model's previous mode is restored, so training can
    call it mid-run) and collects routing statistics with :func:`moeforge.routing.observe_routers`."""
    if (texts is None) == (dataset is None):
        raise MoeforgeError("perplexity: pass either texts or dataset (exactly one)")
    if tokenizer is None:
        raise MoeforgeError("perplexity needs the model's tokenizer; use a checkpoint that ships its tokenizer files")
    _check(model, max_length, batch_size, max_batches)
    stream = text_stream(texts, tokenizer) if texts is not None else dataset_stream(dataset, tokenizer)
    batches = list(islice(_batches(stream, max_length, batch_size), max_batches))
    if log is not None:
        windows = sum(ids.shape[0] for ids, _ in batches)
        plural = "s" if windows != 1 else ""
        log(f"evaluating {sum(ids.numel() for ids, _ in batches)} tokens in {windows} window{plural} of up to {max_length}")
    nll_sum, scored_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), observe_routers(model) as handle:
            for ids, scored in batches:
                logits = model(input_ids=ids.to(model.device), use_cache=False).logits
                targets = scored[:, 1:].to(logits.device)
                predicted = logits[:, :-1][targets].float()
                labels = ids[:, 1:].to(logits.device)[targets]
                nll_sum += F.cross_entropy(predicted, labels, reduction="sum").item()
                scored_tokens += int(targets.sum())
            routing = handle.pop_stats()
    finally:
        model.train(was_training)
    if scored_tokens == 0:
        raise MoeforgeError("no tokens to evaluate: the texts are empty or hold no completion tokens")
    nll = nll_sum / scored_tokens
    return PerplexityResult(nll=nll, perplexity=math.exp(nll), tokens=scored_tokens, routing=routing)
