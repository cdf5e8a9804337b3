"""Checkpoints that survive a kill: a checkpoint counts only once it is completely written.

transformers' Trainer writes ``checkpoint-N`` in place (model, optimizer, RNG, trainer state in turn; under
FSDP, DeepSpeed and expert parallelism every rank its own model and optimizer shards), so a kill mid-save
leaves a directory that looks like a checkpoint but is not one. After every rank has finished a save,
:class:`CompleteCheckpointMarker` drops a marker file into it; resuming picks the newest marked checkpoint
and removes unmarked leftovers (the previous checkpoint is never touched by a failed save).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MARKER = "moeforge-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CompleteCheckpointMarker(TrainerCallback):
    """Marks a checkpoint once every rank has written its part: with several processes each rank writes files
    of its own (its RNG state; its model and optimizer shards under FSDP, ZeRO or EP), so rank 0 waits for all of them."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
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
