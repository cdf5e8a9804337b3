"""Evaluation data as one stream of token ids, each marked as scored or not.

Perplexity is computed over non-overlapping windows cut from this stream, so the stream is the single
place where texts and chat rows become tokens. Plain texts are joined with EOS (every token is scored,
the EOS too: predicting where a document ends is part of language modelling). Chat rows are rendered
with the tokenizer's chat template and only the completion is scored, as in supervised fine-tuning:
the prompt is given, not predicted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from moeforge.errors import MoeforgeError

Message = dict[str, Any]


@dataclass(frozen=True)
class TokenStream:
    """``ids [N]`` and ``scored [N]``: whether predicting ``ids[i]`` counts towards the loss."""

    ids: torch.Tensor
    scored: torch.Tensor

    @classmethod
    def from_pieces(cls, pieces: Iterable[tuple[Sequence[int], bool]]) -> TokenStream:
        ids: list[int] = []
        scored: list[bool] = []
        for piece, counted in pieces:
            ids.extend(piece)
            scored.extend([counted] * len(piece))
        return cls(torch.tensor(ids, dtype=torch.long), torch.tensor(scored, dtype=torch.bool))


def text_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> TokenStream:
    """Texts tokenized without special tokens and joined by EOS; every token is scored."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def pieces() -> Iterable[tuple[Sequence[int], bool]]:
        for i, text in enumerate(texts):
            if i:
                yield eos, True
            yield tokenizer(text, add_special_tokens=False)["input_ids"], True

    return TokenStream.from_pieces(pieces())


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    """``messages`` rendered by the tokenizer's chat template, as text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(text, str), "apply_chat_template(tokenize=False) renders text"  # its annotation covers every mode
    return text


def _render_chat(tokenizer: PreTrainedTokenizerBase, prompt: list[Message], completion: list[Message]) -> tuple[list[int], list[int]]:
    """Prompt and completion token ids of one row, split exactly where the completion starts.

    The prompt (with the generation prompt) must render as a prefix of prompt + completion; the two
    parts are then tokenized separately so the split cannot drift with tokenizer merges."""
    prompt_text = chat_text(tokenizer, prompt, add_generation_prompt=True)
    full_text = chat_text(tokenizer, [*prompt, *completion])
    if not full_text.startswith(prompt_text):
        raise MoeforgeError(
            "the chat template does not render the prompt as a prefix of prompt + completion, so the "
            "completion tokens cannot be told apart; evaluate this data as stage pt (plain text)"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return prompt_ids, completion_ids


def chat_stream(rows: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> TokenStream:
    """``{"prompt": [messages], "completion": [messages]}`` rows; only completion tokens are scored."""
    if not tokenizer.chat_template:
        raise MoeforgeError("the model's tokenizer has no chat template, which sft rows need; evaluate as stage pt (plain text)")

    def pieces() -> Iterable[tuple[Sequence[int], bool]]:
        for row in rows:
            prompt_ids, completion_ids = _render_chat(tokenizer, list(row["prompt"]), list(row["completion"]))
            yield prompt_ids, False
            yield completion_ids, True

    return TokenStream.from_pieces(pieces())


def dataset_stream(dataset: Any, tokenizer: PreTrainedTokenizerBase) -> TokenStream:
    """A dataset of canonical rows (a ``datasets.Dataset`` or a list of dicts), by its columns:
    ``text`` (pretraining) or ``prompt`` + ``completion`` (supervised fine-tuning)."""
    rows = list(dataset)
    if not rows:
        raise MoeforgeError("the evaluation data has no rows; give a file with at least one example")
    columns = set(rows[0])
    if "text" in columns:
        return text_stream([row["text"] for row in rows], tokenizer)
    if {"prompt", "completion"} <= columns:
        return chat_stream(rows, tokenizer)
    raise MoeforgeError(f"evaluation rows have columns {sorted(columns)}; expected 'text' or 'prompt' + 'completion'")
