"""The canonical records, after a trip through Arrow, are what TRL's SFT and DPO trainers take."""

from __future__ import annotations

from pathlib import Path

from trl.data_utils import apply_chat_template, is_conversational

from moeforge.config.data import DataSpec
from moeforge.data import build_datasets
from tests.data.files import write_json, write_jsonl
from tests.helpers import make_tiny_tokenizer


def test_mixed_sft_sources_render_with_trl(tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "2 and 2", "output": "4"}])
    chat = write_json(
        tmp_path / "chat.json",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Yo"},
                ]
            }
        ],
    )
    built = build_datasets(DataSpec(train=[str(alpaca), str(chat)]), "sft")
    rendered = sorted((apply_chat_template(row, make_tiny_tokenizer()) for row in built.train), key=str)
    assert all(is_conversational(row) for row in built.train)
    assert rendered == [
        {
            "prompt": "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            "completion": "Yo<|im_end|>\n",
        },
        {
            "prompt": "<|im_start|>user\nAdd.\n\n2 and 2<|im_end|>\n<|im_start|>assistant\n",
            "completion": "4<|im_end|>\n",
        },
    ]


def test_preferences_render_with_trl() -> None:
    row = build_datasets(DataSpec(builtin="dpo-demo", max_rows=1), "dpo").train[0]
    rendered = apply_chat_template(row, make_tiny_tokenizer())
    assert rendered["prompt"].endswith("<|im_start|>assistant\n")
    assert rendered["chosen"] == row["chosen"][0]["content"] + "<|im_end|>\n"
    assert rendered["rejected"] == row["rejected"][0]["content"] + "<|im_end|>\n"
