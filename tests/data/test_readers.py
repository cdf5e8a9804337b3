"""CSV files with a column mapping, and directories written by datasets' save_to_disk."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from moeforge.errors import MoeforgeError
from tests.data.files import records, sft, write_csv


def test_csv_text_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "books.csv", ["title", "body"], [["A", "Once upon a time,\nthe end."], ["B", "More."]])
    assert records(path, "pt", columns={"text": "body"}) == [{"text": "Once upon a time,\nthe end."}, {"text": "More."}]


def test_csv_prompt_completion_mapping(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "qa.csv", ["question", "answer"], [["Hi?", "Hello."]])
    assert records(path, "sft", columns={"prompt": "question", "completion": "answer"}) == [sft("Hi?", "Hello.")]


def test_csv_line_numbers_count_the_header_and_multiline_fields(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "qa.csv", ["question", "answer"], [["two\nlines", "ok"], ["q", "  "]])
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}:4: 'completion' is empty")):
        records(path, "sft", columns={"prompt": "question", "completion": "answer"})


def test_csv_wrong_field_count_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\nonly-one\n")
    with pytest.raises(MoeforgeError, match=re.escape(f"{path}:3: has 1 fields but the header has 2")):
        records(path, "sft", columns={"prompt": "question", "completion": "answer"})


def test_csv_missing_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "books.csv", ["title", "body"], [["A", "text"]])
    expected = f"{path}: column 'content' (for field 'text') is not in the header (title, body); fix columns"
    with pytest.raises(MoeforgeError, match=re.escape(expected)):
        records(path, columns={"text": "content"})


def test_csv_without_header(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(MoeforgeError, match="a CSV needs a header row"):
        records(path, columns={"text": "body"})


def test_hf_dataset_dir(tmp_path: Path) -> None:
    Dataset.from_list([{"instruction": "i", "input": None, "output": "o"}]).save_to_disk(tmp_path / "ds")
    assert records(tmp_path / "ds", "sft") == [sft("i", "o")]


def test_hf_dataset_dict_takes_train_or_the_named_split(tmp_path: Path) -> None:
    DatasetDict(train=Dataset.from_list([{"text": "train row"}]), test=Dataset.from_list([{"text": "test row"}])).save_to_disk(
        tmp_path / "dd"
    )
    assert records(tmp_path / "dd", "pt") == [{"text": "train row"}]
    assert records(tmp_path / "dd", "pt", split="test") == [{"text": "test row"}]
    with pytest.raises(MoeforgeError, match=r"no split 'dev' \(splits: train, test\)"):
        records(tmp_path / "dd", split="dev")


def test_hf_rows_are_checked_with_their_index(tmp_path: Path) -> None:
    Dataset.from_list([{"q": "a", "a": "b"}, {"q": "c", "a": ""}]).save_to_disk(tmp_path / "ds")
    with pytest.raises(MoeforgeError, match=re.escape(f"{tmp_path / 'ds'}[1]: 'completion' is empty")):
        records(tmp_path / "ds", "sft", columns={"prompt": "q", "completion": "a"})


def test_directory_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(MoeforgeError, match="not a dataset written by datasets' save_to_disk"):
        records(tmp_path / "plain")
