"""The recipe sections that spread a training run over processes: ``fsdp:`` and ``expert_parallel:``.

Plain data parallelism needs no section (launch with torchrun / ``accelerate launch``; ``ddp_backend`` picks
gloo or nccl), and DeepSpeed is a config file (``deepspeed:``). FSDP can come from an accelerate config
(``accelerate launch --config_file configs/accelerate/fsdp2.yaml``) or from this section under torchrun;
expert parallelism splits each MoE layer's experts over ranks (transformers' ``DistributedConfig``).
docs/distributed.md has the commands.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class FsdpSpec(BaseModel):
    """``fsdp:``: shard parameters, gradients and optimizer state over the data-parallel ranks (Trainer's
    own FSDP settings; decoder layers are the wrapped units)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KEYS_DOC: ClassVar[str] = 'docs/distributed.md, section "Recipe keys"'

    version: Literal[1, 2] = 2
    """FSDP2 (``fully_shard``, per-parameter DTensors) by default; 1 for the older flat-parameter FSDP."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each layer's forward (ZeRO-3-like); false keeps them to the backward
    (ZeRO-2-like: more memory, one all-gather fewer per layer)."""
    cpu_offload: bool = False
    """Keep sharded parameters and optimizer state in CPU memory."""


class ExpertParallelSpec(BaseModel):
    """``expert_parallel:``: each MoE layer's experts split over ``size`` ranks; tokens travel to their
    experts' rank (all-to-all) and back. The rest of the model is FSDP-sharded over all ranks."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KEYS_DOC: ClassVar[str] = 'docs/distributed.md, section "Recipe keys"'

    size: int = Field(ge=2)
    """Ranks that hold distinct experts; must divide the number of processes and every MoE layer's expert count."""
