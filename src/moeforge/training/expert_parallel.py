"""Expert parallelism (``expert_parallel: {size: N}``) on transformers' own: ``from_pretrained(distributed_config=...)``.

transformers shards the model while it loads it: each MoE layer's experts are split over ``N`` ranks (the model's
``base_model_ep_plan``: ``grouped_gemm`` on the 3-D expert tensors, ``ep_dispatch_experts`` on the experts
module, whose tokens travel to their experts' rank and back with two all-to-alls), and FSDP2 shards the rest
over all ranks. Every rank reads a different batch, as under DDP. Trainer recognises such a model
(``is_distributed_loading_by_transformers``): it leaves wrapping, placement and gradient reduction to the model,
and ``save_pretrained`` gathers the full state dict on rank 0, so the final export is the same checkpoint one
process writes.

What this module adds is the checks, each one line before the model loads, the load's configuration, and
checkpoints that resume:

* the run must be launched with several processes (torchrun), ``N`` must divide their number and every MoE
  layer's expert count;
* the model must have experts and an EP plan (native MoE architectures with one, and moeforge's own, whose
  config class declares the same plan as Mixtral's over its family's FFN module);
* an adapter on the split experts (its deltas would meet the expert shards), MoICE attention (added after the
  sharding, it fails in FSDP2's second step: a freed parameter storage is read) and DPO without an adapter (its
  reference model is a copy of the policy, and FSDP refuses to copy) are refused;
  adapters elsewhere train (Trainer keeps their replicated parameters in sync);
* Trainer refuses to checkpoint the optimizer of a model sharded at load time; :class:`ShardedCheckpoints`
  writes and restores the sharded state itself.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer
from transformers.distributed import (
    DistributedConfig,
    _load_model_checkpoint_distributed,
    _save_model_checkpoint_distributed,
    load_optimizer_distributed,
    save_optimizer_distributed,
)
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from moeforge.config.adapter import EXPERTS_TARGET
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError
from moeforge.io.inspection import layer_plan
from moeforge.io.loading import read_config, resolve_checkpoint


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch(recipe: TrainRecipe) -> None:
    """What the recipe and the launch alone decide (before any conversion or load)."""
    spec = recipe.expert_parallel
    if spec is None:
        return
    world = _world_size()
    if world < 2 or "RANK" not in os.environ:
        raise MoeforgeError(
            f"expert_parallel: size {spec.size} needs a multi-process launch: torchrun --nproc_per_node {spec.size} -m moeforge.cli.main train RECIPE"
        )
    if world % spec.size:
        raise MoeforgeError(
            f"expert_parallel: size {spec.size} does not divide the {world} processes launched: launch a multiple of {spec.size}"
        )
    if recipe.adapter is not None and EXPERTS_TARGET in recipe.adapter.targets:
        raise MoeforgeError(
            f"expert_parallel: adapter.targets: {EXPERTS_TARGET} puts deltas on the experts this run splits over ranks, which is not "
            "supported: target attention or dense FFN modules, or drop expert_parallel:"
        )
    if recipe.stage == "dpo" and recipe.adapter is None:
        raise MoeforgeError(
            "expert_parallel: stage dpo needs a frozen copy of the policy as its reference, and a model sharded at load time "
            "cannot be copied (FSDP refuses deepcopy): train an adapter (the reference is then the model without it), or drop expert_parallel:"
        )
    if recipe.moice is not None:
        raise MoeforgeError(
            "expert_parallel: MoICE attention is not supported on a model sharded at load time: drop the moice: section or expert_parallel:"
        )


def distributed_config(recipe: TrainRecipe) -> DistributedConfig | None:
    """The load's ``DistributedConfig`` for the recipe's ``expert_parallel`` section (None without one), after
    checking that the model has experts that split evenly and an EP plan."""
    spec = recipe.expert_parallel
    if spec is None:
        return None
    config = read_config(resolve_checkpoint(recipe.model, gguf_file=recipe.gguf_file))
    counts = sorted({row["num_experts"] for row in layer_plan(config) if row["num_experts"]})
    if not counts:
        raise MoeforgeError(
            f"expert_parallel: {recipe.model} is a dense model ({config.model_type}): it has no experts to split; convert it first"
        )
    if not type(config).base_model_ep_plan:
        raise MoeforgeError(
            f"expert_parallel: transformers has no expert-parallel plan for {config.model_type}: train it with plain data parallelism or fsdp:"
        )
    uneven = [count for count in counts if count % spec.size]
    if uneven:
        raise MoeforgeError(
            f"expert_parallel: size {spec.size} does not divide the {uneven[0]} experts of a MoE layer: choose a divisor of {math.gcd(*counts)}"
        )
    if getattr(config, "moice", None):
        raise MoeforgeError(
            "expert_parallel: MoICE attention is not supported on a model sharded at load time: train this MoICE model without expert_parallel:"
        )
    return DistributedConfig(fsdp_size=_world_size(), ep_size=spec.size)


def trainer_arguments(recipe: TrainRecipe) -> dict[str, Any]:
    """TrainingArguments for a run on a model sharded at load time: Trainer refuses to checkpoint such a
    model's optimizer itself (``save_only_model``: its checkpoints hold the gathered model, config and trainer
    state); :class:`ShardedCheckpoints` adds the rest."""
    return {"save_only_model": True} if recipe.expert_parallel is not None else {}


MODEL_SHARDS = "sharded_model"
OPTIMIZER_SHARDS = "sharded_optimizer"


# The mixin below is placed before a Trainer class in the MRO; the type checker is told so.
if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class ShardedCheckpoints(_TrainerBase):
    """What a checkpoint of a model sharded at load time needs besides the gathered model Trainer writes, so that
    ``resume`` continues the run: every rank's shard of the model and of the optimizer state (transformers'
    distributed-checkpoint writers, torch DCP underneath), the scheduler and every rank's RNG state. Resuming
    reads the shards back into the already sharded model and optimizer (the gathered model's names are the
    export's, not the model's own, and Trainer's plain ``load_state_dict`` would not reach the DTensors)."""

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer without empty parameter groups (the no-decay group of an adapter run has no
        parameter): torch's distributed optimizer checkpoint cannot restore one (``IndexError`` in
        ``_unflatten_optim_state_dict``), and such a group holds nothing to restore."""
        optimizer = super().create_optimizer(model)
        groups = _unwrapped(optimizer).param_groups
        groups[:] = [group for group in groups if group["params"]]
        return optimizer

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        checkpoint = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        _save_model_checkpoint_distributed(self.model, checkpoint / MODEL_SHARDS)
        save_optimizer_distributed(self.model, _unwrapped(self.optimizer), str(checkpoint / OPTIMIZER_SHARDS))
        if self.args.should_save:
            assert self.lr_scheduler is not None  # created with the optimizer, before the first step
            torch.save(self.lr_scheduler.state_dict(), checkpoint / SCHEDULER_NAME)
        self._save_rng_state(str(checkpoint))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        _load_model_checkpoint_distributed(model or self.model, Path(resume_from_checkpoint) / MODEL_SHARDS)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        load_optimizer_distributed(self.model, _unwrapped(self.optimizer), str(Path(checkpoint) / OPTIMIZER_SHARDS))
        assert self.lr_scheduler is not None  # created with the optimizer, which Trainer made before this
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))


def _unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (DCP steps it once to create empty state)."""
    return getattr(optimizer, "optimizer", optimizer)


def enable_sharded_checkpoints(trainer: Trainer, recipe: TrainRecipe) -> None:
    """Give an expert-parallel run's trainer :class:`ShardedCheckpoints` (its class becomes a subclass mixing it in)."""
    if recipe.expert_parallel is not None:
        cls = type(trainer)
        trainer.__class__ = type(f"ExpertParallel{cls.__name__}", (ShardedCheckpoints, cls), {"__module__": __name__})
