"""``training.optim``: the optimizer transformers builds for the run, also under a router learning rate, and the
8-bit (bitsandbytes) ones refused in one line on a machine that cannot run them, before any model loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from transformers import Trainer
from transformers.optimization import Adafactor
from transformers.training_args import OptimizerNames

from moeforge.config.train_recipe import BITSANDBYTES_OPTIMS, Optim
from moeforge.errors import MoeforgeError
from moeforge.training import runner, train
from moeforge.training.freeze import router_parameters
from tests.training.conftest import make_recipe

_find_spec = importlib.util.find_spec


def test_every_choice_is_a_transformers_optimizer_name() -> None:
    assert set(get_args(Optim)) <= {name.value for name in OptimizerNames}
    assert set(BITSANDBYTES_OPTIMS) <= set(get_args(Optim))


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[Trainer]:
    """The Trainer each ``train`` call builds (its optimizer is read after the run)."""
    trainers: list[Trainer] = []
    build = runner._build_trainer

    def keep(*args: Any, **kwargs: Any) -> Trainer:
        trainers.append(build(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(runner, "_build_trainer", keep)
    return trainers


def _optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    optimizer = trainer.optimizer
    assert optimizer is not None
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it during training


@pytest.mark.parametrize(
    ("optim", "cls", "defaults"),
    [
        ("adamw_torch", torch.optim.AdamW, {"fused": None}),
        ("adamw_torch_fused", torch.optim.AdamW, {"fused": True}),
        ("adafactor", Adafactor, {"relative_step": False, "scale_parameter": False}),
        ("sgd", torch.optim.SGD, {"momentum": 0}),
    ],
)
def test_the_trainer_builds_the_named_optimizer(
    models, tmp_path: Path, built: list[Trainer], optim: str, cls: type, defaults: dict
) -> None:
    result = train(make_recipe("pt", models["mixtral"], tmp_path / "out", training={"max_steps": 1, "optim": optim}), log=lambda _: None)
    optimizer = _optimizer(built[0])
    assert type(optimizer) is cls and result.steps == 1
    assert {key: optimizer.defaults[key] for key in defaults} == defaults
    assert optimizer.defaults["lr"] == 1e-3


def test_router_learning_rate_composes_with_the_optimizer(models, tmp_path: Path, built: list[Trainer]) -> None:
    """SGD, as transformers builds it, with the routers in a parameter group of their own (their own lr, the same decay)."""
    training = {"max_steps": 1, "optim": "sgd", "learning_rate": 1e-3, "router_learning_rate": 5e-2, "weight_decay": 0.01}
    train(make_recipe("pt", models["mixtral"], tmp_path / "out", training=training), log=lambda _: None)
    trainer = built[0]
    optimizer = _optimizer(trainer)
    assert type(optimizer) is torch.optim.SGD
    assert [(group["initial_lr"], group["weight_decay"]) for group in optimizer.param_groups] == [(1e-3, 0.01), (5e-2, 0.01)]
    assert trainer.model is not None
    routers = set(router_parameters(trainer.model))
    by_name = {id(p): name for name, p in trainer.model.named_parameters()}
    assert {by_name[id(p)] for p in optimizer.param_groups[1]["params"]} == routers and routers


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
@pytest.mark.parametrize("optim", BITSANDBYTES_OPTIMS)
def test_8bit_optimizers_are_refused_before_anything_loads(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optim: str) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "load_model", no_load)
    out = tmp_path / "out"
    recipe = make_recipe("pt", None, out, convert={"source": str(models["dense"])}, training={"optim": optim})
    with pytest.raises(MoeforgeError) as err:
        train(recipe, log=lambda _: None)
    assert str(err.value) == (
        f"training.optim: {optim} keeps 8-bit optimizer states with bitsandbytes, which needs a CUDA GPU; this machine has none: "
        "use adamw_torch (or adafactor, whose states are small) or run on a CUDA machine with pip install 'moeforge[cuda]'"
    )
    assert not out.exists()  # not even the conversion ran


def test_8bit_optimizer_without_bitsandbytes_names_the_extra(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA machine (simulated) that lacks the extra."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "bitsandbytes" else _find_spec(name, *args))
    recipe = make_recipe("pt", models["mixtral"], tmp_path / "out", training={"optim": "paged_adamw_8bit"})
    with pytest.raises(MoeforgeError) as err:
        train(recipe, log=lambda _: None)
    assert (
        str(err.value) == "training.optim: paged_adamw_8bit needs bitsandbytes: pip install 'moeforge[cuda]' (or pip install bitsandbytes)"
    )
