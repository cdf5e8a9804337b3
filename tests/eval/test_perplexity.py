"""Perplexity: the token-weighted mean NLL over windows, batch-size invariant, completion-only for chat
rows, with routing statistics from the same forward passes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from moeforge.errors import MoeforgeError
from moeforge.eval.perplexity import perplexity
from moeforge.io.loading import load_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pack my box with five dozen liquor jugs.",
    "Sphinx of black quartz, judge my vow! " * 2,
]
ROWS = [
    {"prompt": [{"role": "user", "content": "What is two plus two?"}], "completion": [{"role": "assistant", "content": "Four."}]},
    {
        "prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}],
        "completion": [{"role": "assistant", "content": "Paris, on the Seine."}],
    },
]


@pytest.fixture(scope="module")
def dense(dense_dir: Path):
    return load_model(dense_dir)


@pytest.fixture(scope="module")
def mixtral(mixtral_dir: Path):
    return load_model(mixtral_dir)


def stream(tokenizer, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for i, text in enumerate(texts):
        ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def manual_nll(model, tokenizer, texts: list[str], max_length: int) -> tuple[float, int]:
    """The definition, spelled out: EOS-joined stream, non-overlapping windows, summed NLL / count."""
    ids = stream(tokenizer, texts)
    total, count = 0.0, 0
    for start in range(0, len(ids), max_length):
        window = torch.tensor(ids[start : start + max_length])
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    return total / count, count


def test_matches_a_manual_loop(dense) -> None:
    model, tokenizer = dense
    nll, count = manual_nll(model, tokenizer, TEXTS, max_length=32)
    result = perplexity(model, tokenizer, texts=TEXTS, max_length=32, batch_size=2)
    assert result.tokens == count
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_token_weighted_so_batch_size_does_not_matter(dense) -> None:
    model, tokenizer = dense
    assert len(stream(tokenizer, TEXTS)) % 40 > 1  # full windows and a short one, batched in different groupings
    results = [perplexity(model, tokenizer, texts=TEXTS, max_length=40, batch_size=b) for b in (1, 2, 4, 16)]
    assert len({r.tokens for r in results}) == 1
    for result in results[1:]:
        assert result.nll == pytest.approx(results[0].nll, rel=1e-5)


def test_max_batches_limits_the_windows(dense) -> None:
    model, tokenizer = dense
    result = perplexity(model, tokenizer, texts=TEXTS, max_length=16, batch_size=2, max_batches=3)
    assert result.tokens == 3 * 2 * 15


def test_dataset_of_text_rows_equals_texts(dense) -> None:
    model, tokenizer = dense
    from_texts = perplexity(model, tokenizer, texts=TEXTS, max_length=32)
    from_rows = perplexity(model, tokenizer, dataset=Dataset.from_list([{"text": t} for t in TEXTS]), max_length=32)
    assert (from_rows.tokens, from_rows.nll) == (from_texts.tokens, pytest.approx(from_texts.nll, rel=1e-6))


def test_chat_rows_score_only_completion_tokens(dense) -> None:
    model, tokenizer = dense
    completion_tokens = 0
    rendered = []
    for row in ROWS:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        completion_tokens += len(tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"])
        rendered.append(full)
    result = perplexity(model, tokenizer, dataset=ROWS, max_length=128)
    assert result.tokens == completion_tokens
    # the same conversations read as plain text score every token (but the first)
    whole = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered)
    assert perplexity(model, tokenizer, texts=["".join(rendered)], max_length=128).tokens == whole - 1


def test_routing_stats_of_an_moe_model(mixtral) -> None:
    model, tokenizer = mixtral
    result = perplexity(model, tokenizer, texts=TEXTS, max_length=40, batch_size=4)
    stats = result.routing
    forwarded = len(stream(tokenizer, TEXTS))  # every token is routed, predicted or not
    assert forwarded == result.tokens + math.ceil(forwarded / 40)  # a window's first token is not predicted
    assert stats.tokens == forwarded
    assert len(stats.load) == model.config.num_hidden_layers
    assert all(int(load.sum()) == forwarded * 2 for load in stats.load)  # top-2


def test_dense_model_has_no_routing_stats(dense) -> None:
    model, tokenizer = dense
    assert perplexity(model, tokenizer, texts=TEXTS, max_length=32).routing.load == []


def test_restores_training_mode(dense) -> None:
    model, tokenizer = dense
    model.train()
    try:
        perplexity(model, tokenizer, texts=TEXTS[:1], max_length=32)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts": TEXTS, "max_length": 256}, "exceeds the model's 128 positions"),
        ({"texts": TEXTS, "dataset": [{"text": "x"}]}, "exactly one"),
        ({"texts": [""]}, "no tokens to evaluate"),
        ({"dataset": [{"question": "?"}]}, "expected 'text' or 'prompt' \\+ 'completion'"),
        ({"texts": TEXTS, "batch_size": 0}, "batch_size 0"),
    ],
)
def test_bad_input(dense, kwargs: dict, message: str) -> None:
    model, tokenizer = dense
    with pytest.raises(MoeforgeError, match=message):
        perplexity(model, tokenizer, **{"max_length": 32, **kwargs})
