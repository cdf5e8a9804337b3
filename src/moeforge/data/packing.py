"""Pretraining blocks: texts tokenised, joined with EOS, cut into blocks of exactly ``max_length`` tokens.

Packing wastes no compute on padding and lets every block be a full-length training example; the EOS
after each text tells the model where one document ends and the next begins.

The corpus streams through one batched ``Dataset.map``: each batch of texts is tokenised, appended to
the tokens left over from the previous batch, and the full blocks go out as numpy rows that ``datasets``
writes straight to Arrow. Only one batch's tokens are ever held in Python, so a corpus far larger than
memory packs the same way as a small one (a dataset loaded from disk is packed into a cache file).
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import numpy as np

from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

BATCH = 1000


class _BlockCutter:
    """The batched map function: texts in, full blocks out, the tail carried into the next batch.

    Blocks span batch boundaries, so the carry makes the function depend on seeing batches in order:
    ``pack_texts`` therefore maps in one process (``num_proc`` unset). The carry left after the last
    batch is the dropped remainder.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: int, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.eos = eos
        self.max_length = max_length
        self.carry = np.empty(0, dtype=np.int64)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        count = sum(len(piece) for piece in ids) + len(ids)
        fresh = np.fromiter(chain.from_iterable(chain(piece, (self.eos,)) for piece in ids), np.int64, count)
        tokens = np.concatenate([self.carry, fresh])
        full = len(tokens) - len(tokens) % self.max_length
        self.carry = tokens[full:].copy()
        blocks = tokens[:full].reshape(-1, self.max_length)
        return {"input_ids": blocks, "labels": blocks}


def pack_texts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, split: str | None = None) -> Dataset:
    """``{"input_ids", "labels"}`` blocks of ``max_length`` tokens from ``dataset``'s ``text`` column.

    Texts are tokenised without special tokens and each is followed by EOS; the final partial block is
    dropped. ``labels`` equal ``input_ids`` (the model shifts them). ``split`` ("train", "eval") only
    names the data in the error raised when it is too short to fill one block.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MoeforgeError("data: the tokenizer has no EOS token to separate packed texts; use a tokenizer that has one")
    texts = f"{split} texts" if split else "texts"
    if "text" not in dataset.column_names:
        raise MoeforgeError(f"data: the {texts} have no 'text' column (columns: {dataset.column_names}); pretraining packs text rows")
    packed = dataset.map(
        _BlockCutter(tokenizer, eos, max_length),
        batched=True,
        batch_size=BATCH,
        input_columns="text",
        remove_columns=dataset.column_names,
        desc=f"Packing {texts}",
    )
    if len(packed) == 0:
        raise MoeforgeError(f"data: the {texts} make fewer than max_length={max_length} tokens; lower data.max_length or add text")
    return packed
