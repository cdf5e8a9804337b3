"""The ``--experts-backend`` option the commands that run a model share."""

import argparse

from moeforge.config.experts import DEFAULT_BACKEND, EXPERTS_BACKENDS


def add_experts_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experts-backend",
        choices=list(EXPERTS_BACKENDS),
        default=DEFAULT_BACKEND,
        help="how MoE layers run their experts (default auto: picked per call by device, dtype and tokens)",
    )
