"""pack_texts: texts joined with EOS, cut into full blocks, the remainder dropped, streamed through Arrow."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk

from moeforge.data import pack_texts
from moeforge.errors import MoeforgeError
from tests.helpers import make_tiny_tokenizer

EOS = 2
TEXTS = ["abc", "de", "", "fghij", "k", "lmnopqrstu", "vw", "xyz", "0123", "4", "56789"]


def ids(text: str) -> list[int]:
    """The tiny tokenizer's ids: one per printable character, after the 4 special tokens."""
    return [ord(c) - 32 + 4 for c in text]


def reference_blocks(texts: list[str], max_length: int) -> list[list[int]]:
    """The contract spelled out: every text then EOS, one stream, cut into full blocks, the tail dropped."""
    stream = [token for text in texts for token in ids(text) + [EOS]]
    full = len(stream) - len(stream) % max_length
    return [stream[start : start + max_length] for start in range(0, full, max_length)]


def rows(texts: list[str]) -> Dataset:
    return Dataset.from_list([{"text": text, "source": "demo"} for text in texts])


def test_blocks_are_exact() -> None:
    packed = pack_texts(rows(["abc", "de", "fghij"]), make_tiny_tokenizer(), 4)
    expected = [ids("abc") + [EOS], ids("de") + [EOS] + ids("f"), ids("ghij")]  # the final EOS is dropped
    assert list(packed["input_ids"]) == expected
    assert list(packed["labels"]) == expected


@pytest.mark.parametrize("batch", [1, 2, 3, 1000])
@pytest.mark.parametrize("max_length", [2, 5, 7, 16])
def test_equals_the_reference_whatever_the_batch(monkeypatch: pytest.MonkeyPatch, batch: int, max_length: int) -> None:
    monkeypatch.setattr("moeforge.data.packing.BATCH", batch)
    packed = pack_texts(rows(TEXTS), make_tiny_tokenizer(), max_length)
    assert list(packed["input_ids"]) == reference_blocks(TEXTS, max_length)
    assert list(packed["labels"]) == list(packed["input_ids"])


def test_blocks_span_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moeforge.data.packing.BATCH", 2)
    packed = pack_texts(rows(["ab"] * 5), make_tiny_tokenizer(), 5)
    block = ids("ab") + [EOS]
    assert list(packed["input_ids"]) == [(block * 5)[i : i + 5] for i in (0, 5, 10)]


def test_every_text_is_followed_by_one_eos() -> None:
    """Documents are separated (and ended) by EOS alone: no BOS, and an empty text still counts as one."""
    packed = pack_texts(rows(["ab", "", "c"]), make_tiny_tokenizer(), 6)
    assert list(packed["input_ids"]) == [ids("ab") + [EOS, EOS] + ids("c") + [EOS]]


def test_only_the_partial_last_block_is_dropped() -> None:
    tokenizer = make_tiny_tokenizer()
    exact = pack_texts(rows(["ab", "cde"]), tokenizer, 7)  # 3 + 4 tokens: one whole block
    assert list(exact["input_ids"]) == [ids("ab") + [EOS] + ids("cde") + [EOS]]
    short = pack_texts(rows(["ab", "cde"]), tokenizer, 4)  # 7 tokens: one block, 3 dropped
    assert list(short["input_ids"]) == [ids("ab") + [EOS] + ids("c")]


def test_too_little_text_names_the_split() -> None:
    with pytest.raises(MoeforgeError, match="the eval texts make fewer than max_length=64 tokens; lower data.max_length"):
        pack_texts(rows(["short"]), make_tiny_tokenizer(), 64, split="eval")


def test_too_little_text_without_a_split() -> None:
    with pytest.raises(MoeforgeError, match="the texts make fewer than max_length=64 tokens; lower data.max_length or add text"):
        pack_texts(rows(["short"]), make_tiny_tokenizer(), 64)


def test_rows_without_text_are_refused() -> None:
    with pytest.raises(MoeforgeError, match=r"the train texts have no 'text' column \(columns: \['prompt'\]\)"):
        pack_texts(Dataset.from_list([{"prompt": "hi"}]), make_tiny_tokenizer(), 4, split="train")


def test_output_is_a_dataset_of_blocks_only() -> None:
    packed = pack_texts(rows(TEXTS), make_tiny_tokenizer(), 4)
    assert isinstance(packed, Dataset)
    assert packed.column_names == ["input_ids", "labels"]


def test_a_dataset_on_disk_is_packed_into_an_arrow_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A memory-mapped corpus is packed by ``Dataset.map`` into a cache file next to it, batch by batch,
    rather than into Python lists of its tokens; the blocks still cross batches as the reference's do."""
    monkeypatch.setattr("moeforge.data.packing.BATCH", 3)
    texts = TEXTS * 4
    rows(texts).save_to_disk(tmp_path / "corpus")
    packed = pack_texts(load_from_disk(tmp_path / "corpus"), make_tiny_tokenizer(), 6)
    assert packed.cache_files and all(Path(f["filename"]).is_relative_to(tmp_path) for f in packed.cache_files)
    assert list(packed["input_ids"]) == reference_blocks(texts, 6)


def test_deterministic() -> None:
    tokenizer = make_tiny_tokenizer()
    first, second = (pack_texts(rows(TEXTS), tokenizer, 5) for _ in range(2))
    assert first["input_ids"] == second["input_ids"] and first.features == second.features
