"""``python -m tests.training.killed_run STEP train RECIPE``: ``moeforge train``, killed at the end of step STEP.

Every rank raises KeyboardInterrupt there (as a Ctrl-C or a scheduler's kill would stop it), from the checkpoint
marker callback the runner installs; the steps after the last checkpoint are lost with the processes. The
single-process version of this contract is tests/training/test_checkpoints.py; this entry runs it under torchrun.
"""

from __future__ import annotations

import sys

import moeforge.training.runner as runner
from moeforge.training.checkpoints import CompleteCheckpointMarker


def main() -> int:
    step = int(sys.argv[1])

    class KillAtStep(CompleteCheckpointMarker):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt
            return super().on_step_end(args, state, control, **kwargs)

    runner.CompleteCheckpointMarker = KillAtStep  # type: ignore[misc]  # the runner builds its marker from this name
    from moeforge.cli.main import main as moeforge_main

    return moeforge_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
