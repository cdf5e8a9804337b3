"""pack_texts: texts joined with EOS, cut into full blocks, the remainder dropped."""

from __future__ import annotations

import pytest
from datasets import Dataset

from moeforge.data import pack_texts
from moeforge.errors import MoeforgeError
from tests.helpers import make_tiny_tokenizer

EOS = 2


def ids(text: str) -> list[int]:
    """The tiny tokenizer's ids: one per printable character, after the 4 special tokens."""
    return [ord(c) - 32 + 4 for c in text]


def test_blocks_are_exact() -> None:
    texts = Dataset.from_list([{"text": "abc"}, {"text": "de"}, {"text": "fghij"}])
    packed = pack_texts(texts, make_tiny_tokenizer(), 4)
    expected = [ids("abc") + [EOS], ids("de") + [EOS] + ids("f"), ids("ghij")]  # the final EOS is dropped
    assert list(packed["input_ids"]) == expected
    assert list(packed["labels"]) == expected


def test_blocks_span_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moeforge.data.packing.BATCH", 2)
    texts = Dataset.from_list([{"text": "ab"}] * 5)
    packed = pack_texts(texts, make_tiny_tokenizer(), 5)
    block = ids("ab") + [EOS]
    assert list(packed["input_ids"]) == [(block * 5)[i : i + 5] for i in (0, 5, 10)]


def test_too_little_text() -> None:
    with pytest.raises(MoeforgeError, match="fewer than max_length=64 tokens; lower data.max_length or add text"):
        pack_texts(Dataset.from_list([{"text": "short"}]), make_tiny_tokenizer(), 64)
