"""Checkpoints that survive a kill: a checkpoint counts only once it is completely written.

transformers' Trainer writes ``checkpoint-N`` in place (model, optimizer, RNG, trainer state in turn), so a
kill mid-save leaves a directory that looks like a checkpoint but is not one. After Trainer finishes a
save and every rank has written its own files (RNG states, DeepSpeed's optimizer shards),
:class:`CompleteCheckpointMarker` drops a marker file into it; resuming picks the newest marked checkpoint
and removes unmarked leftovers (the previous checkpoint is never touched by a failed save).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MARKER = "moeforge-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CompleteCheckpointMarker(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's own files (its RNG state, DeepSpeed's shards) are written
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                (checkpoint / MARKER).write_text(f"step {state.global_step}\n")
        return control


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_dir.glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_complete_checkpoint(output_dir: Path, *, remove_incomplete: bool = True) -> Path | None:
    """The newest fully written checkpoint; unmarked ones (a save that was killed) are deleted."""
    latest = None
    for _, path in checkpoints(output_dir):
        if (path / MARKER).is_file():
            latest = path
        elif remove_incomplete:
            logger.warning("removing incomplete checkpoint %s (its save was interrupted)", path)
            shutil.rmtree(path, ignore_errors=True)
    return latest
