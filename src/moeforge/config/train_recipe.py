"""The training recipe (``moeforge train RECIPE.yaml``): stage, model, data, router losses, freezing, schedule.

Names follow the tools moeforge replaces: Dense2MoE's ``stage: pt | sft`` (its ``aux_loss_type: mi |
switch`` with ``aux_loss_weight`` become ``router_losses.mi_coef`` / ``balance_coef``), LLaMA-MoE v2's
``freeze_gate``, transformers' TrainingArguments names under ``training``. Dense2MoE's ``--Dense2MoE
--MoE_config_path`` (convert, then train, in one run) is ``model: convert.yaml`` or a ``convert:`` section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moeforge.config.adapter import AdapterSpec
from moeforge.config.data import DataSpec
from moeforge.config.distributed import ExpertParallelSpec, FsdpSpec
from moeforge.config.experts import DEFAULT_BACKEND, EXPERTS_BACKENDS
from moeforge.config.moice import MoiceSpec
from moeforge.config.recipe import ConvertRecipe, load_recipe
from moeforge.config.router_losses import RouterLossConfig
from moeforge.config.seed import Seed
from moeforge.errors import MoeforgeError

FreezeGroup = Literal["router", "attention_router", "experts", "attention", "embeddings", "dense_layers", "norms", "all_but_new"]
PRESETS: dict[str, tuple[FreezeGroup, ...]] = {
    # train only the routers, FFN and attention (MoICE) ones, e.g. to settle routing before touching experts
    "router_only": ("experts", "attention", "embeddings", "dense_layers", "norms"),
    # train the experts (routed and shared), keep routers and everything else fixed
    "experts_only": ("router", "attention_router", "attention", "embeddings", "dense_layers", "norms"),
    # MoICE: only the attention (RoPE-base) routers train; FFN routers and experts stay as they are
    "moice": ("router", "experts", "attention", "embeddings", "dense_layers", "norms"),
}
# the MoICE paper's released recipe: lr 1e-4, constant, a few steps
MOICE_SCHEDULE = {"learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.0}
Optim = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "adamw_8bit", "paged_adamw_8bit"]
"""transformers' ``OptimizerNames`` worth a recipe (tests/training/test_optim.py keeps them a subset): the
full-precision ones run anywhere; the 8-bit ones are bitsandbytes' (:data:`BITSANDBYTES_OPTIMS`)."""
BITSANDBYTES_OPTIMS: tuple[Optim, ...] = ("adamw_8bit", "paged_adamw_8bit")
"""Optimizers that need bitsandbytes and a CUDA GPU (the ``moeforge[cuda]`` extra)."""
RECIPE_SUFFIXES = (".yaml", ".yml")
CONVERTED_DIR = "converted"
"""Where an inline ``convert:`` section writes by default, inside the run's ``output``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Schedule(_Strict):
    """Optimiser and loop settings, passed to transformers' TrainingArguments (same names)."""

    optim: Optim = "adamw_torch_fused"
    """The optimizer transformers builds (default: its own default with torch >= 2.8, so recipes without the key
    train as before); with ``router_learning_rate`` the same optimizer gets the routers as their own group."""
    learning_rate: Annotated[float, Field(gt=0)] = 2e-5
    router_learning_rate: Annotated[float, Field(gt=0)] | None = None
    """A separate learning rate for router parameters (None: same as learning_rate)."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    num_train_epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = -1
    per_device_train_batch_size: Annotated[int, Field(ge=1)] = 4
    per_device_eval_batch_size: Annotated[int, Field(ge=1)] = 4
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    logging_steps: Annotated[int, Field(ge=1)] = 10
    eval_steps: Annotated[int, Field(ge=1)] | None = None
    save_steps: Annotated[int, Field(ge=1)] | None = None
    save_total_limit: Annotated[int, Field(ge=1)] | None = 2
    seed: Seed = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    dataloader_num_workers: Annotated[int, Field(ge=0)] = 0
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    telemetry_steps: Annotated[int, Field(ge=1)] = 10
    """How often per-layer expert load, router entropy, dead experts and balance loss are logged."""
    beta: Annotated[float, Field(gt=0)] = 0.1
    """DPO temperature (TRL's beta)."""


def _convert_recipe(path: Path) -> ConvertRecipe:
    """``model: PATH.yaml``, read as the convert recipe it must be (a training recipe there is a mistake)."""
    if not path.is_file():
        raise MoeforgeError(f"model: {path} does not exist: name a model, or an existing convert recipe (see recipes/)")
    try:
        keys = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        keys = None  # load_recipe reports it
    if isinstance(keys, dict) and "stage" in keys:
        raise MoeforgeError(f"model: {path} is a training recipe; name the model it trains, or a convert recipe (keys source:, moe:)")
    return load_recipe(path)


class TrainRecipe(_Strict):
    KEYS_DOC: ClassVar[str] = 'README.md, section "Training"'

    stage: Literal["pt", "sft", "dpo"]
    model: str
    """Any model moeforge loads: local dir, hub id, .gguf, 'default', a dense or MoE checkpoint; or a convert
    recipe (``.yaml``), which becomes ``convert`` (and ``model`` its output)."""
    convert: ConvertRecipe | None = None
    """Convert first (Dense2MoE in one run), then train the converted model; ``output`` defaults to
    ``<output>/converted``, and ``resume: true`` reuses a complete conversion there."""
    gguf_file: str | None = None
    output: Path
    data: DataSpec
    router_losses: RouterLossConfig = Field(default_factory=RouterLossConfig)
    freeze: list[FreezeGroup] = Field(default_factory=list)
    preset: Literal["router_only", "experts_only", "moice"] | None = None
    moice: MoiceSpec | None = None
    """Give the model MoICE attention (new routers) before training; see :class:`MoiceSpec`."""
    adapter: AdapterSpec | None = None
    """Train adapters on the frozen model instead of the model (MoE-LoRA, LoRA, MoE bottleneck); the output
    is a PEFT adapter directory. ``freeze`` / ``preset`` then only freeze parts of the adapter (e.g. its routers)."""
    freeze_gate: bool = False
    """LLaMA-MoE v2's switch: keep the routers fixed (same as adding 'router' to freeze)."""
    freeze_layers: list[int] | str | None = None
    """Decoder layers frozen whole: a list or ranges like "0-21" or "0-3,8" (train only the top of the model)."""
    training: Schedule = Field(default_factory=Schedule)
    dtype: Literal["float32", "bfloat16"] = "float32"
    experts_backend: str = DEFAULT_BACKEND
    """How MoE layers run their experts (``auto`` picks per call; see docs/performance.md). Also runs the
    per-expert deltas of MoE adapters."""
    resume: bool = False
    """Continue from the newest complete checkpoint in ``output`` (a killed run picks up where it stopped)."""
    overwrite: bool = False
    deepspeed: Path | None = None
    """A DeepSpeed JSON config, passed through to transformers (MoE blocks become ZeRO-3 leaf modules)."""
    ddp_backend: Literal["gloo", "nccl"] | None = None
    fsdp: FsdpSpec | None = None
    """Shard the model over the data-parallel ranks with FSDP (launch with torchrun); see :class:`FsdpSpec`."""
    expert_parallel: ExpertParallelSpec | None = None
    """Split each MoE layer's experts over ranks; see :class:`ExpertParallelSpec`."""

    @model_validator(mode="before")
    @classmethod
    def _conversion(cls, data: Any) -> Any:
        """Both Dense2MoE forms become one: a ``convert`` section and ``model`` naming its output, so the
        convert recipe is validated here (errors name ``convert.moe.top_k``) and the rest of training sees a
        checkpoint path like any other."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        model, convert = data.get("model"), data.get("convert")
        if isinstance(model, str) and Path(model).suffix in RECIPE_SUFFIXES:
            if convert is not None:
                raise ValueError(f"model: {model} is a convert recipe and the recipe has a convert: section too; keep one")
            recipe = _convert_recipe(Path(model))
            return {**data, "convert": recipe, "model": str(recipe.output)}
        if model is None and convert is None:
            raise ValueError("model: required key is missing; name the model to train, or add a convert: section that makes it")
        if isinstance(convert, dict):
            if "output" not in convert and data.get("output") is not None:
                convert = data["convert"] = {**convert, "output": str(Path(str(data["output"])) / CONVERTED_DIR)}
            if model is None and convert.get("output") is not None:
                data["model"] = str(convert["output"])
        return data

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_config_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file: name a DeepSpeed JSON config, e.g. configs/deepspeed/zero3.json")
        return value

    @field_validator("experts_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in EXPERTS_BACKENDS:
            raise ValueError(f"{value!r} is unknown: use one of {', '.join(EXPERTS_BACKENDS)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainRecipe:
        if self.convert is not None and Path(self.model) != self.convert.output:
            raise ValueError(
                f"model: {self.model} is not convert.output {self.convert.output}: leave model out (the converted model trains) or make them equal"
            )
        if self.convert is not None and self.gguf_file is not None:
            raise ValueError("gguf_file: the converted model is safetensors; a GGUF source belongs in convert.gguf_file")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in output, overwrite starts afresh")
        if self.stage == "dpo" and self.data.builtin not in (None, "dpo-demo"):
            raise ValueError(f"data.builtin: {self.data.builtin} is not a preference dataset; stage dpo needs dpo-demo or files")
        if isinstance(self.freeze_layers, str) and not re.fullmatch(r"\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*", self.freeze_layers):
            raise ValueError(f"freeze_layers: {self.freeze_layers!r} must be layer indices or ranges like '0-21' or '0-3,8'")
        if self.preset == "moice":  # the paper's schedule where the recipe sets none of its own
            defaults = {k: v for k, v in MOICE_SCHEDULE.items() if k not in self.training.model_fields_set}
            object.__setattr__(self, "training", self.training.model_copy(update=defaults))
        if self.adapter is not None and self.moice is not None:
            raise ValueError(
                "adapter and moice exclude each other in one run: train the MoICE routers first, then an adapter on that model"
            )
        if self.adapter is not None and self.freeze_layers is not None:
            raise ValueError("freeze_layers has no effect with an adapter (the base is frozen): choose adapter.layers instead")
        engines = [key for key in ("deepspeed", "fsdp", "expert_parallel") if getattr(self, key) is not None]
        if len(engines) > 1:
            raise ValueError(f"{' and '.join(engines)} exclude each other: choose one way to shard the run (docs/distributed.md)")
        if self.training.router_learning_rate and self.deepspeed:
            raise ValueError("training.router_learning_rate is not supported with deepspeed (DeepSpeed builds its own optimizer)")
        if self.training.router_learning_rate and self.fsdp:
            raise ValueError(
                "training.router_learning_rate is not supported with fsdp (Trainer refuses an optimizer built before FSDP shards the parameters): remove one"
            )
        return self

    @property
    def frozen_layers(self) -> set[int]:
        if self.freeze_layers is None:
            return set()
        if isinstance(self.freeze_layers, list):
            return set(self.freeze_layers)
        layers: set[int] = set()
        for part in self.freeze_layers.split(","):
            start, _, end = part.strip().partition("-")
            layers.update(range(int(start), int(end or start) + 1))
        return layers

    @property
    def frozen_groups(self) -> tuple[FreezeGroup, ...]:
        groups = list(self.freeze)
        if self.preset:
            groups += PRESETS[self.preset]
        if self.freeze_gate:
            groups.append("router")
        return tuple(dict.fromkeys(groups))
