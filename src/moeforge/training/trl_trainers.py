"""transformers' Trainer and TRL's SFT / DPO trainers, with exact resume, moeforge's router loss added to
the loss TRL computes, and every logged loss split into the LM loss and the router losses.

Both compute their loss from the model's log-probs (SFT's fused LM head, DPO's preference loss) rather
than from ``output.loss``, so the router aux loss that moeforge puts on the output
(``output.router_aux_loss``) would be dropped. TRL's own MoE aux (transformers' all-layer version) is
switched off with ``router_aux_loss_coef=0.0`` in their configs; this mixin adds ours instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import Trainer
from trl import DPOTrainer, SFTTrainer

from moeforge.io.loading import from_pretrained
from moeforge.training.telemetry import RouterLossMeter


class RouterAuxLossMixin:
    """Adds the router aux loss of every forward run inside ``compute_loss`` to the loss it returns.

    Weighting follows the LM loss: when ``num_items_in_batch`` is known (SFT), it is passed to the model so
    the aux is scaled by this micro-batch's share of the accumulated batch's label tokens, and, like
    the LM loss, it is multiplied by the process count that DDP's gradient averaging divides out. Without
    it (DPO, a per-micro-batch mean that Trainer divides by the accumulation steps), the plain aux is added."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        captured: list[torch.Tensor] = []

        def capture(_module, _args, output):
            aux = getattr(output, "router_aux_loss", None)
            if aux is not None and aux.requires_grad:
                captured.append(aux)

        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        hook = self.model.register_forward_hook(capture)
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            hook.remove()
        if not captured:
            return result
        aux = torch.stack([a.to(captured[0].device) for a in captured]).sum()
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            aux = aux * self.accelerator.num_processes
        if return_outputs:
            loss, outputs = result
            return loss + aux.to(loss.device), outputs
        return result + aux.to(result.device)


class ExactResumeMixin:
    """Resume loads the checkpoint through ``from_pretrained``. Native MoE checkpoints are written in the
    per-expert layout (what engines read) while the live model holds fused experts; Trainer's own resume
    loads the files with ``strict=False`` and silently keeps the old routers and experts. An adapter model's
    checkpoint holds only the adapter, which Trainer's own resume loads through PEFT; an FSDP checkpoint holds
    the live model's own (sharded) state dict, which Trainer's own resume loads exactly."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model or self.model
        if isinstance(model, PeftModel) or getattr(self, "is_fsdp_enabled", False):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = from_pretrained(Path(resume_from_checkpoint), model_class=type(model), dtype=next(model.parameters()).dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)


class LossBreakdownMixin:
    """Puts ``lm_loss`` and ``router/*`` (:meth:`RouterLossMeter.breakdown`) into every log that carries the
    training ``loss``, before ``Trainer.log`` records it: so they land in ``log_history`` and reach every
    reporting callback (TensorBoard, W&B, the console line) in the same entry as the loss they explain. A
    callback's ``on_log`` could not do this: the history entry is copied before callbacks run."""

    router_loss_meter: RouterLossMeter | None = None  # set by the runner when the model has router losses

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.router_loss_meter is not None and "loss" in logs:
            logs.update(self.router_loss_meter.breakdown(logs["loss"]))
        super().log(logs, start_time)  # type: ignore[misc]


class MoeTrainer(LossBreakdownMixin, ExactResumeMixin, Trainer):
    pass


class RouterAwareSFTTrainer(LossBreakdownMixin, ExactResumeMixin, RouterAuxLossMixin, SFTTrainer):
    pass


class RouterAwareDPOTrainer(LossBreakdownMixin, ExactResumeMixin, RouterAuxLossMixin, DPOTrainer):
    pass
