"""``train(recipe)``: one recipe → transformers' Trainer (pt) or TRL's SFTTrainer / DPOTrainer (sft / dpo).

moeforge adds only what those trainers lack for MoE models: converting a dense model first (Dense2MoE in
one run), router losses in the model's forward (per layer, padding masked, weighted like the LM loss),
freezing by role, a separate router learning rate, routing telemetry and plots, checkpoints that count only
when complete, and a final checkpoint in the model's own (native where possible) architecture with its
provenance, chained to the conversion's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import torch
import transformers
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainingArguments, default_data_collator

from moeforge.config.router_losses import RouterLossConfig
from moeforge.config.train_recipe import BITSANDBYTES_OPTIMS, TrainRecipe
from moeforge.conversion import convert
from moeforge.data import build_datasets, pack_texts
from moeforge.errors import MoeforgeError
from moeforge.io.loading import TORCH_DTYPES, load_model, resolve_checkpoint
from moeforge.io.publish import check_output, staged_directory, staging_path
from moeforge.io.quantization import Bits, require_bitsandbytes
from moeforge.io.safetensors_writer import sha256_file
from moeforge.modeling import is_moeforge_config
from moeforge.routing.hooks import attach_router_losses, find_routers
from moeforge.training import deepspeed, expert_parallel
from moeforge.training.checkpoints import CompleteCheckpointMarker, latest_complete_checkpoint
from moeforge.training.freeze import apply_freeze, router_parameters
from moeforge.training.fsdp import check_fsdp, fsdp_arguments, setup_fsdp_trainer
from moeforge.training.telemetry import LogLineCallback, RouterLossMeter, TelemetryCallback
from moeforge.training.trl_trainers import LossBreakdownMixin, MoeTrainer, RouterAwareDPOTrainer, RouterAwareSFTTrainer

FINAL_DIR = "model"
CONVERSION_FILES = ("config.json", "moeforge.json")
"""What a finished conversion holds (it is renamed into place only when complete, moeforge.json among the last)."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    output: Path
    model_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    trainable_parameters: int
    total_parameters: int
    plots: list[Path]
    log_history: list[dict]
    """Trainer's log: per-step loss, lr, eval loss, routing telemetry."""


def _prepare_output(recipe: TrainRecipe) -> None:
    """Check, clear (``overwrite``) and create the output directory: rank 0's job under a launcher. Another rank
    could find rank 0's conversion already under way there (and take it for an old run, or delete it); rank 0
    failing here ends the launch, and the others write nothing before they meet it in the first collective."""
    if not _rank_zero():
        return
    output = recipe.output
    check_output(output, overwrite=True)  # a file in the way, an unwritable parent
    if output.exists() and any(output.iterdir()) and not (recipe.resume or recipe.overwrite):
        raise MoeforgeError(f"output {output} already holds a run: set resume: true to continue it or overwrite: true to start afresh")
    if recipe.overwrite:
        shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)


def _check_optim(recipe: TrainRecipe) -> None:
    """bitsandbytes' 8-bit optimizers run on CUDA only: said before any conversion or model load."""
    optim = recipe.training.optim
    if optim in BITSANDBYTES_OPTIMS:
        require_bitsandbytes(
            f"training.optim: {optim}", "keeps 8-bit optimizer states", "use adamw_torch (or adafactor, whose states are small)"
        )


def _convert_first(recipe: TrainRecipe, log: Callable[[str], None]) -> None:
    """Dense2MoE in one run: write the MoE the ``convert`` section describes, with the fidelity check it asks
    for (a failed exact check raises FidelityError and nothing trains); on ``resume``, reuse a complete
    conversion instead of converting again."""
    spec = recipe.convert
    if spec is None:
        return
    output = spec.output
    complete = all((output / name).is_file() for name in CONVERSION_FILES)
    if recipe.resume and complete:
        log(f"convert: reusing the conversion in {output} (resume)")
        return
    if not _rank_zero():
        _wait_for_conversion(output, log)
        return
    if output.exists() and not recipe.overwrite:
        state = "holds a conversion: set resume: true to train on it" if complete else "holds no complete conversion: remove it"
        raise MoeforgeError(f"convert.output {output} {state}, or set overwrite: true to convert again")
    log(f"convert: converting {spec.source} into {output} before training")
    try:
        convert(spec, overwrite=recipe.overwrite, log=log)
    except MoeforgeError as error:  # the conversion's own messages name keys of the convert section
        raise type(error)(f"convert: {error}") from None


def _wait_for_conversion(output: Path, log: Callable[[str], None], poll_seconds: float = 2.0) -> None:
    """Under torchrun every rank runs the recipe; rank 0 converts and the others wait for its published
    output (published whole, so complete files mean a complete conversion; written after this process
    started, so an ``overwrite`` run does not take the old one: torchrun starts all ranks together). A failed
    conversion ends rank 0, and torchrun ends the rest."""
    log(f"convert: waiting for rank 0 to write {output}")
    started = psutil.Process().create_time()
    while not all((output / name).is_file() and (output / name).stat().st_mtime >= started for name in CONVERSION_FILES):
        time.sleep(poll_seconds)


def _training_kwargs(recipe: TrainRecipe, has_eval: bool) -> dict:
    t = recipe.training
    kwargs = dict(
        output_dir=str(recipe.output),
        optim=t.optim,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy=("steps" if t.eval_steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_steps,
        eval_on_start=has_eval,  # the "before" figure every run should report
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        dataloader_num_workers=t.dataloader_num_workers,
        report_to=list(t.report_to) or "none",
        include_num_input_tokens_seen=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=recipe.ddp_backend or (_default_ddp_backend() if _distributed() else None),
        deepspeed=str(recipe.deepspeed) if recipe.deepspeed else None,
        # always given, by its transformers 5 name: TRL's configs default the deprecated alias to True
        activation_checkpointing=t.gradient_checkpointing,
        disable_tqdm=True,  # LogLineCallback prints one line per log; a progress bar would garble them
        **fsdp_arguments(recipe),
    )
    return kwargs


def _rank_zero() -> bool:
    """This process is rank 0 of a launch, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def _distributed() -> bool:
    """Launched by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _default_ddp_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _optimizer(model: nn.Module, recipe: TrainRecipe, args: TrainingArguments) -> torch.optim.Optimizer | None:
    """With a router learning rate, the optimizer ``training.optim`` names, built as Trainer builds it
    (class and settings from transformers) but with the routers in their own parameter group; otherwise
    None, and Trainer builds its own."""
    t = recipe.training
    if t.router_learning_rate is None:
        return None
    routers = set(router_parameters(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n not in routers], "lr": t.learning_rate, "weight_decay": t.weight_decay},
        {"params": [p for n, p in named if n in routers], "lr": t.router_learning_rate, "weight_decay": t.weight_decay},
    ]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)


def _trainer_args(recipe: TrainRecipe, has_eval: bool) -> TrainingArguments:
    """The stage's arguments: TrainingArguments (pt), or TRL's SFTConfig / DPOConfig over the same names.
    TRL's own MoE aux loss (transformers' all-layer version) is off: moeforge supplies the router losses."""
    kwargs = {**_training_kwargs(recipe, has_eval), **expert_parallel.trainer_arguments(recipe)}
    if recipe.stage == "pt":
        return TrainingArguments(**kwargs)
    if recipe.stage == "sft":
        from trl import SFTConfig

        return SFTConfig(
            **kwargs,
            max_length=recipe.data.max_length,
            completion_only_loss=recipe.data.completion_only_loss,
            packing=False,
            router_aux_loss_coef=0.0,
        )
    from trl import DPOConfig

    return DPOConfig(**kwargs, max_length=recipe.data.max_length, beta=recipe.training.beta, router_aux_loss_coef=0.0)


def _build_trainer(recipe, model, tokenizer, data, callbacks) -> Trainer:
    args = _trainer_args(recipe, data.eval is not None)
    optimizers = (_optimizer(model, recipe, args), None)
    if recipe.stage == "pt":
        train = pack_texts(data.train, tokenizer, recipe.data.max_length, split="train")
        evaluation = None if data.eval is None else pack_texts(data.eval, tokenizer, recipe.data.max_length, split="eval")
        return MoeTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation,
            data_collator=default_data_collator,
            processing_class=tokenizer,
            optimizers=optimizers,
            callbacks=callbacks,
        )
    shared: dict[str, Any] = {
        "train_dataset": data.train,
        "eval_dataset": data.eval,
        "processing_class": tokenizer,
        "optimizers": optimizers,
        "callbacks": callbacks,
    }
    if recipe.stage == "sft":
        return RouterAwareSFTTrainer(model=model, args=args, **shared)
    from trl import DPOConfig

    assert isinstance(args, DPOConfig)  # _trainer_args built it for stage dpo
    # TRL 1.16 would reload the reference from the policy's path (failing on moeforge models): hand it a copy.
    # An adapter model needs none: TRL runs the reference as the same model with the adapter disabled.
    reference = None if isinstance(model, PeftModel) else copy.deepcopy(model).eval().requires_grad_(False)
    return RouterAwareDPOTrainer(model=model, ref_model=reference, args=args, **shared)


def _record_router_coefficients(config, recipe: TrainRecipe, native_coef: float | None) -> None:
    """TRL writes its own aux coefficient (0: moeforge supplies the losses) into the model config. Put back
    what the saved model should carry: a moeforge model's forward uses the coefficients this run trained with;
    a native model keeps its own (transformers uses it only when asked for router logits)."""
    if is_moeforge_config(config):
        config.router_aux_loss_coef = recipe.router_losses.balance_coef
        config.router_z_loss_coef = recipe.router_losses.z_coef
        config.router_mi_loss_coef = recipe.router_losses.mi_coef
    elif native_coef is not None:
        config.router_aux_loss_coef = native_coef


def _source_provenance(model_source: str, gguf_file: str | None) -> dict:
    path = resolve_checkpoint(model_source, gguf_file=gguf_file) / "moeforge.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_final(trainer: Trainer, tokenizer, recipe: TrainRecipe, training_entry: dict) -> Path:
    """Write the trained model next to the checkpoints, atomically, with moeforge.json extended by this run."""
    final = recipe.output / FINAL_DIR
    if not trainer.is_world_process_zero():
        staging = staging_path(final)
        trainer.save_model(str(staging))  # a collective on sharded models; only rank 0 writes
        shutil.rmtree(staging, ignore_errors=True)  # save_pretrained makes the (empty) directory on every rank
        return final
    with staged_directory(final, overwrite=True) as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
        provenance = _source_provenance(recipe.model, recipe.gguf_file)
        provenance.setdefault("moeforge_version", version("moeforge"))
        provenance["training"] = [*provenance.get("training", []), training_entry]
        provenance["checksums"] = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        (tmp / "moeforge.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return final


def _add_moice(model: PreTrainedModel, recipe: TrainRecipe, log: Callable[[str], None]) -> None:
    """Install MoICE attention when the recipe asks for it (new routers, listed), and check that the
    ``moice`` preset has routers to train."""
    from moeforge.config.moice import ResolvedMoice
    from moeforge.modeling.moice import apply_moice, describe

    if recipe.moice is not None:
        names = apply_moice(model, recipe.moice, seed=recipe.training.seed)
        count = sum(model.get_parameter(name).numel() for name in names)
        log(
            f"{describe(ResolvedMoice.model_validate(model.config.moice))}; newly initialised: {len(names)} router tensors "
            f"({count:,} parameters), e.g. {names[0]}"
        )
    elif recipe.preset == "moice" and not getattr(model.config, "moice", None):
        raise MoeforgeError(
            f"preset: moice needs MoICE routers: add a 'moice:' section, or train a MoICE checkpoint ({recipe.model} has none)"
        )


def _add_adapter(model: nn.Module, recipe: TrainRecipe, log: Callable[[str], None]) -> nn.Module:
    """Wrap the frozen model with the recipe's adapters; the saved adapter records the resolved base
    directory, so ``moeforge chat OUTPUT/model`` and ``PeftModel.from_pretrained`` find the base again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from moeforge.adapters.build import apply_adapter

    spec = recipe.adapter
    if spec is None:
        raise MoeforgeError("adapter: the recipe has no adapter section")
    transformers.set_seed(recipe.training.seed)  # the adapter's init (router, A matrices) is part of the run
    model = apply_adapter(model, spec)
    config: Any = model.peft_config[model.active_adapter]  # moeforge's MoeLoraConfig or PEFT's LoraConfig
    config.base_model_name_or_path = str(resolve_checkpoint(recipe.model, gguf_file=recipe.gguf_file))
    if spec.method != "lora":  # the coefficients this run trains with travel with the adapter
        losses = _router_losses(recipe)
        config.router_aux_loss_coef, config.router_z_loss_coef = losses.balance_coef, losses.z_coef
    routed = "" if spec.method == "lora" else f", {spec.num_experts} experts top-{spec.top_k}" + (" + shared" if spec.shared_expert else "")
    wrapped = sum(isinstance(module, BaseTunerLayer) for module in model.modules())
    log(
        f"adapter: {spec.method}{routed}, rank {spec.rank}, alpha {spec.alpha:g}, dropout {spec.dropout:g} on {wrapped} "
        f"modules ({', '.join(spec.targets)})"
    )
    return model


def _router_losses(recipe: TrainRecipe) -> RouterLossConfig:
    """The adapter's saved balance / z coefficients, unless the recipe's ``router_losses`` sets them itself."""
    losses = recipe.router_losses
    if recipe.adapter is None or recipe.adapter.method == "lora":
        return losses
    own = {"balance_coef": recipe.adapter.balance_coef, "z_coef": recipe.adapter.z_coef}
    return losses.model_copy(update={k: v for k, v in own.items() if k not in losses.model_fields_set})


def _quantization(recipe: TrainRecipe) -> Bits | None:
    spec = recipe.adapter
    if spec is None:
        return None
    return "4bit" if spec.load_in_4bit else "8bit" if spec.load_in_8bit else None


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    values = [entry[key] for entry in history if key in entry]
    return float(values[-1]) if values else None


def train(recipe: TrainRecipe, *, log: Callable[[str], None] = logger.info) -> TrainResult:
    """Train as the recipe says (converting first when it has a ``convert`` section); raises MoeforgeError on
    bad input before any step runs. A run that fails before writing anything leaves no output directory."""
    start = time.perf_counter()
    _check_optim(recipe)
    deepspeed.check_config(recipe.deepspeed)
    expert_parallel.check_launch(recipe)
    check_fsdp(recipe)
    _prepare_output(recipe)
    try:
        return _train(recipe, log, start)
    except BaseException:
        with contextlib.suppress(OSError):  # only when empty: checkpoints of a failed run stay for resume
            recipe.output.rmdir()
        raise


def _train(recipe: TrainRecipe, log: Callable[[str], None], start: float) -> TrainResult:
    _convert_first(recipe, log)
    dtype = TORCH_DTYPES[recipe.dtype]
    loaded, tokenizer = load_model(
        recipe.model,
        dtype=dtype,
        gguf_file=recipe.gguf_file,
        quantization=_quantization(recipe),
        experts_backend=recipe.experts_backend,
        distributed_config=expert_parallel.distributed_config(recipe),
    )
    if tokenizer is None:
        raise MoeforgeError(f"model: {recipe.model} has no tokenizer files; training needs one to read the data")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _add_moice(loaded, recipe, log)
    model = _add_adapter(loaded, recipe, log) if recipe.adapter is not None else loaded
    data = build_datasets(recipe.data, recipe.stage)
    log(f"data: {len(data.train)} training rows" + (f", {len(data.eval)} eval rows" if data.eval is not None else ""))

    trainable, total = apply_freeze(model, recipe.frozen_groups, recipe.frozen_layers, keep_frozen=recipe.adapter is not None)
    frozen = [*recipe.frozen_groups, *([f"layers {recipe.freeze_layers}"] if recipe.frozen_layers else [])]
    log(
        f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"
        + (f", frozen: {', '.join(frozen)}" if frozen else "")
    )
    model.train()

    telemetry = TelemetryCallback(None, recipe.output, recipe.training.telemetry_steps)
    native_coef = getattr(model.config, "router_aux_loss_coef", None)
    callbacks = [telemetry, CompleteCheckpointMarker(), LogLineCallback(log)]
    trainer = _build_trainer(recipe, model, tokenizer, data, callbacks)
    expert_parallel.enable_sharded_checkpoints(trainer, recipe)
    trainer.remove_callback(PrinterCallback)  # its raw dicts, in place of LogLineCallback's lines
    setup_fsdp_trainer(trainer)
    _record_router_coefficients(model.config, recipe, native_coef)
    # attached after the trainer is built: DPO's reference model (a copy) must not report routing
    trained = trainer.model
    assert trained is not None  # the trainer was given the model
    handle = attach_router_losses(trained, _router_losses(recipe)) if find_routers(trained) else None
    telemetry.handle, telemetry.trainer = handle, trainer
    meter = RouterLossMeter(trained) if handle is not None else None
    assert isinstance(trainer, LossBreakdownMixin)  # every trainer _build_trainer makes
    trainer.router_loss_meter = meter
    if handle is not None and handle.balancer is not None:
        handle.balancer.hook_optimizer(trainer.create_optimizer())
    if recipe.deepspeed:
        deepspeed.register_zero3_leaves(trained)

    checkpoint = latest_complete_checkpoint(recipe.output) if recipe.resume else None
    if recipe.resume:
        log(f"resuming from {checkpoint}" if checkpoint else "resume: no complete checkpoint yet, starting from step 0")
    if checkpoint:
        deepspeed.check_resume(checkpoint, deepspeed=recipe.deepspeed is not None, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    history = trainer.state.log_history
    train_loss, eval_loss = _last(history, "train_loss"), _last(history, "eval_loss")
    entry = {
        "stage": recipe.stage,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "data": data.stats,
        "steps": trainer.state.global_step,
        "tokens": trainer.state.num_input_tokens_seen,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "runtime_seconds": round(time.perf_counter() - start, 1),
        "versions": {"moeforge": version("moeforge"), "torch": torch.__version__, "transformers": transformers.__version__},
    }
    final = _save_final(trainer, tokenizer, recipe, entry)
    plots = telemetry.write_plots(history) if trainer.is_world_process_zero() else []
    if handle is not None:
        handle.detach()
    if meter is not None:
        meter.detach()
    log(f"saved {final}; plots: {', '.join(str(p) for p in plots)}")
    return TrainResult(
        output=recipe.output,
        model_dir=final,
        steps=trainer.state.global_step,
        train_loss=train_loss,
        eval_loss=eval_loss,
        trainable_parameters=trainable,
        total_parameters=total,
        plots=plots,
        log_history=history,
    )
