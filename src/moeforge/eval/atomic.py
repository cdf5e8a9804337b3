"""Atomic file writes for evaluation outputs.

Reports and plots are written next to checkpoints and read by people and dashboards while training is
still running; writing to a temporary file in the same directory and renaming it into place means a
reader never sees half a PNG or half a JSON document, and a crash leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o644)  # mkstemp makes it private; reports and plots are meant to be read
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_value(value: Any) -> Any:
    """``json.dumps`` fallback: numpy and torch scalars/arrays as numbers and lists, anything else as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (see :func:`json_value` for non-JSON values)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=json_value) + "\n")
    return Path(path)
