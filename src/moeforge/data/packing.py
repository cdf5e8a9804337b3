"""Pretraining blocks: texts tokenised, joined with EOS, cut into blocks of exactly ``max_length`` tokens.

Packing wastes no compute on padding and lets every block be a full-length training example; the EOS
after each text tells the model where one document ends and the next begins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

BATCH = 1000


def pack_texts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """``{"input_ids", "labels"}`` blocks of ``max_length`` tokens from ``dataset``'s ``text`` column.

    Texts are tokenised without special tokens and each is followed by EOS; the final partial block is
    dropped. ``labels`` equal ``input_ids`` (the model shifts them).
    """
    from datasets import Dataset

    eos = tokenizer.eos_token_id
    if eos is None:
        raise MoeforgeError(
            "data: the tokenizer has no EOS token to separate packed texts; use a tokenizer that has one"
        )
    blocks: list[list[int]] = []
    buffer: list[int] = []
    for batch in dataset.iter(batch_size=BATCH):
        for ids in tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
        full = len(buffer) - len(buffer) % max_length
        blocks.extend(buffer[start : start + max_length] for start in range(0, full, max_length))
        del buffer[:full]
    if not blocks:
        raise MoeforgeError(
            f"data: the texts make fewer than max_length={max_length} tokens; lower data.max_length or add text"
        )
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(block) for block in blocks]})
