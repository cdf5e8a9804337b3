"""``KILL_AT_STEP=N python -m tests.training.killed_run train RECIPE``: ``moeforge train`` killed at the end of step N.

Every rank raises KeyboardInterrupt there (the kill of tests/training/test_checkpoints.py, in launched
processes): that step's update is lost with the processes, the checkpoints completed before it stay.
"""

from __future__ import annotations

import os
import sys

import moeforge.training.runner as runner
from moeforge.training.checkpoints import CompleteCheckpointMarker

KILL_VARIABLE = "KILL_AT_STEP"


class KillAtStep(CompleteCheckpointMarker):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ[KILL_VARIABLE]):
            raise KeyboardInterrupt
        return super().on_step_end(args, state, control, **kwargs)


def main() -> int:
    runner.CompleteCheckpointMarker = KillAtStep  # type: ignore[misc]
    from moeforge.cli.main import main as moeforge_main

    return moeforge_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
