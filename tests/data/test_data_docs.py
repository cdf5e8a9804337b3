"""docs/data.md cannot drift from the readers: every example file in it is read through
:func:`moeforge.data.build_datasets` and must come out in the documented format, with the documented
number of rows and no bad rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeforge.config.data import DataSpec
from moeforge.data import build_datasets
from moeforge.data.formats import FORMAT_STAGE

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"
# ```jsonl {file=NAME format=FMT rows=N [columns=field:column,...]}
_EXAMPLE = re.compile(r"^```\w+ \{file=(\S+) format=(\w+) rows=(\d+)(?: columns=(\S+))?\}\n(.*?)^```$", re.M | re.S)
EXAMPLES = _EXAMPLE.findall(DOC.read_text())


def test_the_doc_has_an_example_of_every_format() -> None:
    assert {fmt for _file, fmt, *_rest in EXAMPLES} == set(FORMAT_STAGE)
    assert {Path(file).suffix for file, *_rest in EXAMPLES} == {".jsonl", ".json", ".txt", ".csv"}


@pytest.mark.parametrize(("file", "fmt", "rows", "columns", "body"), EXAMPLES, ids=[example[0] for example in EXAMPLES])
def test_example_reads_as_documented(tmp_path: Path, file: str, fmt: str, rows: str, columns: str, body: str) -> None:
    path = tmp_path / file
    path.write_text(body)
    source: dict[str, object] = {"path": str(path)}
    if columns:
        source["columns"] = dict(pair.split(":") for pair in columns.split(","))
    built = build_datasets(DataSpec.model_validate({"train": [source]}), FORMAT_STAGE[fmt])
    assert built.stats["sources"][0]["format"] == fmt  # detected from the rows, as the doc says
    assert built.stats["bad_rows"] == 0
    assert built.stats["train_rows"] == int(rows)
    if path.suffix == ".txt":  # the whole file is one text row, newlines kept
        assert built.train["text"] == [body]
