"""Publishing outputs so nobody ever sees half of one: the one home of temporary paths and renames.

Every output moeforge writes — converted and merged checkpoints, a training run's final model, the
default-model cache, reports, plots and data files — is written to a temporary sibling and renamed into
place only when complete. A reader (a person, a dashboard, a concurrent run) sees the old output or the
new one, never a mixture; a failed run leaves nothing behind. Siblings live in the same directory so the
rename stays on one filesystem and is atomic.

A run killed with ``kill -9`` cannot clean up: its staging directory (named after its process id) is
removed by the next run that stages the same output once that process is gone, so model-sized leftovers
do not accumulate.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from moeforge.errors import MoeforgeError

_PARTIAL = ".partial-"
_OLD = ".old-"


def check_output(output: Path, *, overwrite: bool) -> None:
    """Refuse an output path before any work is done: one that exists (unless ``overwrite``), is not a
    directory, lies under a file, or cannot be created."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise MoeforgeError(f"output {output} exists and is not a directory: choose another path")
    if output.exists() and not overwrite:
        raise MoeforgeError(f"output {output} already exists: choose another path or set overwrite")
    parent = _existing_ancestor(output.parent)
    if not parent.is_dir():
        raise MoeforgeError(f"output {output} lies under {parent}, which is a file: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoeforgeError(f"output {output}: {parent} is not writable; choose another path")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale(output: Path) -> None:
    """Remove the staging siblings of ``output`` left by runs whose process is gone (``kill -9``)."""
    output = Path(output)
    if not output.parent.is_dir():
        return
    for marker in (_PARTIAL, _OLD):
        for leftover in output.parent.glob(f".{output.name}{marker}*"):
            pid = leftover.name.rsplit(marker, 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def staging_path(output: Path) -> Path:
    """This process's temporary sibling of ``output``."""
    output = Path(output)
    return output.parent / f".{output.name}{_PARTIAL}{os.getpid()}"


@contextmanager
def staged_directory(output: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside ``output`` to write into; on success it becomes ``output``.

    An existing ``output`` is refused up front unless ``overwrite``; with ``overwrite`` it is swapped out
    and deleted only once the new one is in place. On any error (also ``KeyboardInterrupt``) the staging
    directory is removed. If ``output`` appears while staging (a concurrent run of the same job), a
    :class:`MoeforgeError` says so and this run's copy is dropped."""
    output = Path(output)
    check_output(output, overwrite=overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    tmp = staging_path(output)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, output, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, output: Path, overwrite: bool) -> None:
    old = output.parent / f".{output.name}{_OLD}{os.getpid()}"
    if output.exists():
        if not overwrite:
            raise MoeforgeError(f"output {output} appeared while this run wrote it (another run?); this run's copy was dropped")
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside file ``path``; on success it replaces ``path``, on error it is removed.

    Readable by everyone like a normally created file (``mkstemp`` would make it private)."""
    path = Path(path)
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise MoeforgeError(f"{path} lies under {parent}, which is a file: choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o644)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_texts(files: dict[Path, str]) -> None:
    """Write several text files so that either all of them are replaced or none is (all are written to
    temporary siblings first, then renamed)."""
    with ExitStack() as stack:
        for path, text in files.items():
            stack.enter_context(staged_file(path)).write_text(text, encoding="utf-8")


def json_value(value: Any) -> Any:
    """``json.dumps`` fallback: numpy and torch scalars/arrays as numbers and lists, anything else as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (see :func:`json_value` for non-JSON values)."""
    write_texts({Path(path): json.dumps(data, indent=2, default=json_value) + "\n"})
    return Path(path)
