"""Running ``moeforge train`` on several CPU processes (gloo) from a test: torchrun or ``accelerate launch``.

Each launcher starts ``python -m <module> train RECIPE`` on every rank; ``module`` is ``moeforge.cli.main``, or
:mod:`tests.training.skewed_routing` to starve some experts on one rank. The launcher's own rank variables are
removed from the environment first, so a test run under an outer launcher still starts a fresh group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import yaml

CLI = "moeforge.cli.main"
REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
"""The accelerate and DeepSpeed configs shipped with the repository (the tests use the files users use)."""

_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES and not k.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"
    # this checkout's moeforge and tests, whichever checkout the environment's editable install points at
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _run(command: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run a launcher; past ``timeout`` (a hang) kill it and every rank it started, then raise TimeoutExpired.
    (Killing the launcher alone is not enough: torchrun starts each rank in a session of its own, and the ranks
    hold the output pipes open, so reading the output would wait for them.)"""
    with subprocess.Popen(command, cwd=cwd, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for rank in psutil.Process(process.pid).children(recursive=True):
                rank.kill()
            process.kill()
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def torchrun(recipe: Path, cwd: Path, processes: int = 2, module: str = CLI, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m MODULE train RECIPE``: DDP, or whatever the recipe's own keys set up."""
    return run_module(module, ["train", str(recipe)], cwd, processes, timeout)


def run_module(module: str, args: list[str], cwd: Path, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m MODULE ARGS...``: any entry module, e.g. a test's own per-rank check."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    return _run([*command, "-m", module, *args], cwd, timeout)


def accelerate_launch(
    config: Path, recipe: Path, cwd: Path, processes: int = 2, module: str = CLI, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG -m MODULE train RECIPE`` with one of the shipped configs."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    return _run([*command, "-m", module, "train", str(recipe)], cwd, timeout)


def check(done: subprocess.CompletedProcess) -> None:
    """Fail with both streams' tails when a launch failed."""
    assert done.returncode == 0, f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def pt_recipe(
    model: Path, output: Path, data: Path, per_device: int, *, steps: int, save_steps: int | None, telemetry_steps: int, **extra
) -> dict:
    """The multi-process tests' recipe: packed pt rows of 32 tokens from ``data``, lr 1e-3 constant, one log line
    per step; ``extra['training']`` keys are merged over those, other ``extra`` keys are recipe keys."""
    training = {
        "max_steps": steps,
        "per_device_train_batch_size": per_device,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "save_steps": save_steps,
        "telemetry_steps": telemetry_steps,
        "report_to": [],
        **extra.pop("training", {}),
    }
    return {
        "stage": "pt",
        "model": str(model),
        "output": str(output),
        "data": {"train": [str(data)], "max_length": 32},
        "training": training,
        **extra,
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def history(output: Path, step: int) -> list[dict]:
    """Trainer's log history as the checkpoint of ``step`` holds it."""
    return json.loads((output / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
