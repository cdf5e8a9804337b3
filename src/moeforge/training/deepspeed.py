"""DeepSpeed ZeRO (a recipe's ``deepspeed:`` config): what moeforge adds to transformers' integration.

transformers runs the engine (it fills the config's ``"auto"`` values from the recipe, wraps Trainer's
optimizer unless the config names its own, and under ZeRO-3 gathers the full weights when it saves a model if
``stage3_gather_16bit_weights_on_model_save`` is true). moeforge adds three things:

- the config is checked before any model loads: it is a JSON object, and a ZeRO-3 config gathers the weights
  on save, because ``OUTPUT/model`` must be the full native export (without the gather, Trainer writes
  DeepSpeed's shards there instead of a model);
- MoE blocks become ZeRO-3 leaf modules (:func:`register_zero3_leaves`);
- a checkpoint is resumed only by the engine that wrote it: DeepSpeed's is a ``global_stepN`` directory with
  one optimizer shard per rank, which only DeepSpeed with the same number of ranks reads (a run without
  DeepSpeed would silently restart its optimizer from zero; Trainer or DeepSpeed would fail mid-load).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from torch import nn

from moeforge.errors import MoeforgeError
from moeforge.routing.hooks import find_routers

GATHER_ON_SAVE = "stage3_gather_16bit_weights_on_model_save"
_SHARDS = "*zero_pp_rank_*_optim_states.pt"
"""One per data-parallel rank in a ZeRO checkpoint's tag directory (``bf16_`` prefixed under ZeRO-1 bf16)."""


def read_config(path: Path) -> dict:
    """The DeepSpeed JSON config as a mapping; one-line errors for a file that is unreadable or not one."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as error:
        raise MoeforgeError(
            f"deepspeed: cannot read {path} ({error.strerror}): name a DeepSpeed JSON config, e.g. configs/deepspeed/zero3.json"
        ) from None
    except ValueError as error:
        raise MoeforgeError(f"deepspeed: {path} is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise MoeforgeError(f"deepspeed: {path} must hold a JSON object (DeepSpeed's config keys)")
    return config


def check_config(path: Path | None) -> None:
    """Fail before any model loads if the recipe's ``deepspeed:`` config cannot train or save the run."""
    if path is None:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise MoeforgeError("deepspeed: this recipe trains with DeepSpeed, which is not installed: pip install 'moeforge[deepspeed]'")
    zero = read_config(path).get("zero_optimization") or {}
    if zero.get("stage") == 3 and not zero.get(GATHER_ON_SAVE, False):
        raise MoeforgeError(
            f"deepspeed: {path} is ZeRO-3 without zero_optimization.{GATHER_ON_SAVE}: true, so the trained model would be "
            "saved as DeepSpeed shards, not a model: set it true (as configs/deepspeed/zero3.json does)"
        )


def register_zero3_leaves(model: nn.Module) -> None:
    """Register every module that owns a router (the MoE block; for a MoE-LoRA adapter, the MLP that holds
    the adapter's router) as a ZeRO-3 leaf: its weights are gathered whole when it starts.

    A block that runs each expert as its own submodule, only for the experts its tokens picked, would
    otherwise hang ZeRO-3 under skewed routing: a rank whose tokens skip an expert skips that expert's
    all-gather, which the other ranks wait in. The blocks trained here keep their experts as stacked tensors
    (transformers 5's natives, moeforge's block, MoE-LoRA), which every forward gathers whole; skewed routing
    completes on them even without the registration (checked with :mod:`tests.training.skewed_routing`
    under ZeRO-3); the registration keeps any other block safe."""
    from deepspeed.utils import set_z3_leaf_modules

    routers = {id(module) for module in find_routers(model)}
    blocks = {type(m) for m in model.modules() if any(id(child) in routers for child in m.children())}
    if blocks:
        set_z3_leaf_modules(model, list(blocks))


def _shard_count(checkpoint: Path) -> int | None:
    """How many ranks wrote the checkpoint's ZeRO optimizer shards; None if it holds no DeepSpeed state."""
    latest = checkpoint / "latest"
    if not latest.is_file():
        return None
    return len(list((checkpoint / latest.read_text().strip()).glob(_SHARDS)))


def check_resume(checkpoint: Path, *, deepspeed: bool, world_size: int) -> None:
    """Refuse to resume a checkpoint with an engine (or a number of ZeRO ranks) that cannot read its optimizer."""
    shards = _shard_count(checkpoint)
    if deepspeed and shards is None:
        raise MoeforgeError(
            f"resume: {checkpoint} was written without DeepSpeed (no DeepSpeed state in it): resume it without deepspeed:, "
            "or set overwrite: true to start afresh"
        )
    if not deepspeed and shards is not None:
        raise MoeforgeError(
            f"resume: {checkpoint} holds DeepSpeed's sharded optimizer state: resume it with the deepspeed: config that wrote it, "
            "or set overwrite: true to start afresh"
        )
    if deepspeed and shards and shards != world_size:  # (ZeRO stage 0 keeps one whole optimizer: no shards)
        raise MoeforgeError(
            f"resume: {checkpoint} was written by {shards} DeepSpeed ranks and this run has {world_size}: launch {shards} "
            "processes to resume it (ZeRO's optimizer shards are per rank), or set overwrite: true to start afresh"
        )
