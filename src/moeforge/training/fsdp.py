"""FSDP training: the recipe's ``fsdp:`` section as Trainer arguments, and what Trainer leaves to moeforge.

Two routes reach the same Trainer FSDP: ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` (the
launcher puts the plugin settings into the environment) and a recipe ``fsdp:`` section under torchrun
(:func:`fsdp_arguments` turns it into ``TrainingArguments(fsdp=True, fsdp_config=...)``). Either way decoder
layers are the wrapped units: transformer-based auto wrap with no class named makes accelerate take the
classes from the model's ``_no_split_modules`` (those the model instantiates), so every family (and a PEFT
adapter on it, which forwards the attribute to its base) is wrapped per decoder layer without a per-family list.

:func:`setup_fsdp_trainer` covers the rest, on the built trainer:

- CPU processes: accelerate turns FSDP on only for accelerator devices (on CPU processes it silently falls back
  to DDP), while torch's ``fully_shard`` runs on gloo. The trainer's accelerator is switched to FSDP there, so
  a machine without a GPU runs (and tests) the sharded code path, not DDP under the FSDP name.
- The final model: with sharded checkpoints Trainer's ``save_model`` writes nothing (it saves weights only
  with full state dicts). At the end of training the plugin switches to full state dicts, so the final
  ``<output>/model`` is gathered (a collective on all ranks) and rank 0 writes the ordinary export.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError

LAUNCH = "torchrun --nproc_per_node N -m moeforge.cli.main train RECIPE (or accelerate launch)"


def _launched() -> bool:
    """Started by torchrun / ``accelerate launch`` (which set the rank variables), with any process count."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_fsdp(recipe: TrainRecipe) -> None:
    """What an FSDP run cannot do, said before any model loads: an ``fsdp:`` recipe in a plain process (Trainer
    would say "Using fsdp only works in distributed training" only after the load), FSDP1 without a GPU, and a router learning rate
    under ``accelerate launch`` FSDP (Trainer refuses an optimizer built before FSDP shards the parameters; the
    recipe's own ``fsdp:`` section refuses the combination when it is read)."""
    if recipe.fsdp is not None and not _launched():
        raise MoeforgeError(f"fsdp: shards the model over processes; launch the run with {LAUNCH}")
    if recipe.fsdp is not None and recipe.fsdp.version == 1 and not torch.cuda.is_available():
        raise MoeforgeError("fsdp.version: 1 (FSDP1) runs on GPUs only (accelerate refuses it on CPU processes): use version 2")
    if recipe.training.router_learning_rate and _accelerate_fsdp():
        raise MoeforgeError(
            "training.router_learning_rate is not supported with FSDP (this accelerate launch config shards the model): "
            "remove it, or launch without FSDP"
        )


def _accelerate_fsdp() -> bool:
    """``accelerate launch`` with an FSDP config (the launcher says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def fsdp_arguments(recipe: TrainRecipe) -> dict[str, Any]:
    """``TrainingArguments`` keys for the recipe's ``fsdp:`` section (none without one)."""
    spec = recipe.fsdp
    if spec is None:
        return {}
    # FSDP1 names the same choice as a sharding strategy
    reshard: bool | str = (
        spec.reshard_after_forward if spec.version == 2 else ("FULL_SHARD" if spec.reshard_after_forward else "SHARD_GRAD_OP")
    )
    config = {
        "version": spec.version,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # no class named: the model's _no_split_modules
        "reshard_after_forward": reshard,
        "cpu_offload": spec.cpu_offload,
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    return {"fsdp": True, "fsdp_config": config}


def setup_fsdp_trainer(trainer: Trainer) -> None:
    """Make an FSDP trainer (from either route) shard on CPU processes too and export a gathered final model;
    nothing for other trainers."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    wanted = trainer.args.fsdp_plugin_args is not None or _accelerate_fsdp()
    if wanted and state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin(**(trainer.args.fsdp_plugin_args or {}))  # none: from the environment
        AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        trainer.is_fsdp_enabled = True
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and trainer.is_fsdp_enabled:
        trainer.add_callback(_GatherFinalModel(plugin))


class _GatherFinalModel(TrainerCallback):
    """After the last checkpoint: full state dicts, so ``save_model`` gathers the weights and rank 0 writes them."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    def on_train_end(self, args, state, control, **kwargs):
        self.plugin.set_state_dict_type("FULL_STATE_DICT")
        return control
