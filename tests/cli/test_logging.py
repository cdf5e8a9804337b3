"""The library logs; only the ``moeforge`` command puts those lines on the terminal."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeforge.cli.main import configure_logging, main


@pytest.fixture
def moeforge_logger() -> Iterator[logging.Logger]:
    """The ``moeforge`` logger, put back as it was (configure_logging changes it for the process)."""
    logger = logging.getLogger("moeforge")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_the_command_shows_library_info_as_plain_stderr_lines(moeforge_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    configure_logging()  # main may run many times in one process: still one handler, one line
    logging.getLogger("moeforge.train.runner").info("trainable parameters: %s", "1,024")
    logging.getLogger("moeforge.io.loading").debug("not shown")
    captured = capsys.readouterr()
    assert captured.err == "trainable parameters: 1,024\n"
    assert captured.out == ""


def test_main_shows_what_a_command_logs(
    moeforge_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import moeforge.io.embedded as embedded

    def fetched(name: str) -> Path:
        logging.getLogger(embedded.__name__).info("fetching the embedded model %s (one time, %s)...", name, "~100 MB")
        return tmp_path

    monkeypatch.setattr(embedded, "embedded_model_dir", fetched)
    assert main(["fetch-default", "smollm2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "fetching the embedded model smollm2 (one time, ~100 MB)...\n"
    assert captured.out == f"{tmp_path}\n"


def test_library_use_is_quiet_until_configured() -> None:
    code = (
        "import logging, moeforge\n"
        "logging.getLogger('moeforge.train.checkpoints').warning('removing incomplete checkpoint x')\n"
        "logging.getLogger('moeforge.convert.pipeline').info('exact: PASS')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr == ""


def test_the_command_shows_moeforge_warnings_as_one_line(
    moeforge_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import moeforge.io.embedded as embedded
    import moeforge.routing.hooks as hooks

    def fetched(name: str) -> Path:
        # as Python attributes them: a moeforge warning to a line of moeforge, another library's to its own file
        warnings.warn_explicit("router layers 0.attn: the balance loss is constant", UserWarning, hooks.__file__, 269)
        warnings.warn_explicit("torch says so", UserWarning, str(tmp_path / "torch" / "nn.py"), 7)
        warnings.warn_explicit("renamed in v6", FutureWarning, hooks.__file__, 100)  # a deprecation keeps its file:line
        return tmp_path

    monkeypatch.setattr(embedded, "embedded_model_dir", fetched)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _standard  # stand-in for Python's own, which pytest's capture would divert
        assert main(["fetch-default", "smollm2"]) == 0
        assert warnings.showwarning is _standard  # put back: library use keeps standard warnings
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "moeforge: warning: router layers 0.attn: the balance loss is constant",
        f"{tmp_path / 'torch' / 'nn.py'}:7: UserWarning: torch says so",
        f"{hooks.__file__}:100: FutureWarning: renamed in v6",
    ]


def _standard(message, category, filename, lineno, file=None, line=None) -> None:
    print(warnings.formatwarning(message, category, filename, lineno, line="").rstrip("\n"), file=sys.stderr)


def test_library_use_keeps_standard_warnings() -> None:
    code = (
        "import warnings, moeforge, moeforge.routing.hooks as hooks\n"
        "warnings.warn_explicit('constant balance loss', UserWarning, hooks.__file__, 269)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "hooks.py:269: UserWarning: constant balance loss" in result.stderr
    assert "moeforge: warning" not in result.stderr
