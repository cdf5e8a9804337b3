"""Publishing: outputs appear whole or not at all, existing ones are refused or swapped, leftovers of dead runs go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.errors import MoeforgeError
from moeforge.io.publish import check_output, staged_directory, staged_file, write_json, write_texts


def test_a_staged_directory_appears_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "a" / "model"
    with staged_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
        assert tmp.parent == out.parent
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


def test_a_failure_leaves_nothing_and_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old").write_text("kept")
    with pytest.raises(RuntimeError), staged_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in out.iterdir()] == ["old"]


def test_overwrite_swaps_in_the_new_output(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old").write_text("x")
    with staged_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: (p / "model").mkdir(), "already exists: choose another path or set overwrite"),
        (lambda p: (p / "model").write_text("x"), "exists and is not a directory"),
    ],
)
def test_bad_outputs_are_refused_before_any_work(tmp_path: Path, make, message: str) -> None:
    make(tmp_path)
    with pytest.raises(MoeforgeError, match=message):
        check_output(tmp_path / "model", overwrite=False)


def test_an_output_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoeforgeError, match=r"lies under .*file, which is a file"):
        check_output(tmp_path / "file" / "sub" / "model", overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_parent_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(MoeforgeError, match="is not writable"):
        check_output(locked / "model", overwrite=False)


def test_leftovers_of_killed_runs_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".model.partial-{pid}"
    stale.mkdir()
    (stale / "weights").write_text("big")
    live = tmp_path / f".model.partial-{os.getppid()}"  # a running process's staging directory stays
    live.mkdir()
    with staged_directory(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]


def test_files_are_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), staged_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_several_files_are_written_together(tmp_path: Path) -> None:
    write_texts({tmp_path / "train.jsonl": "a\n", tmp_path / "sub" / "eval.jsonl": "b\n"})
    assert (tmp_path / "train.jsonl").read_text() == "a\n"
    assert (tmp_path / "sub" / "eval.jsonl").read_text() == "b\n"
