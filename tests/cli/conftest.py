"""Fixtures the command tests share with the library tests: tiny checkpoints to evaluate (tests/eval) and
to train, with data files (tests/training)."""

from tests.eval.conftest import dense_dir, harness, mixtral_dir, pmoe_dir  # noqa: F401  (fixtures)
from tests.training.conftest import data_files, models, one_thread  # noqa: F401  (fixtures)
