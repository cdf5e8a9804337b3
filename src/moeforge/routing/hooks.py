"""Router losses inside the model's forward, so every training loop gets them: HF Trainer, TRL, or a user's own.

What is collected: forward hooks on the routers (:func:`find_routers`, the ``(logits, weights, indices)``
contract) record each call's logits and selected experts between the start and the end of the model's
forward; they feed the routing statistics (:meth:`RouterLossHandle.pop_stats`) and the losses. Router calls
outside a forward (gradient-checkpointing recomputation during backward) are ignored.

The batch is read from the forward's keyword arguments, which is how Trainer, TRL and ``generate`` pass it:
``attention_mask`` (padding does not count as routing), ``labels``/``shift_labels`` (the label tokens) and
``num_items_in_batch``; positional arguments are not read.

The loss: ``aux = balance_coef·balance + z_coef·z + mi_coef·mi``, each per layer over the real tokens and
averaged over layers (:mod:`moeforge.routing.losses`); routers with a coefficient of their own (MoICE's
attention routers) add their balance loss, averaged over their layers, times that coefficient. In training
mode only (``model.train()``) aux is added to ``output.loss`` when the output has one (labels given; for a
``return_dict=False`` tuple, its first element): like dropout it is a training-time regulariser, and an
evaluation loss stays the plain LM loss, comparable across models and with perplexity. Every forward also
sets ``output.router_losses`` (the unscaled ``balance``, ``z``, ``mi`` and ``aux``, detached, for logging;
also the handle's ``losses``) and ``output.router_aux_loss`` (the scaled aux with its graph, None in eval
mode): a trainer that recomputes the LM loss itself, like TRL's fused-head SFT path, adds that instead.

Gradient accumulation and data parallelism: when Trainer passes ``num_items_in_batch``, the micro-batch's
aux is scaled by ``label tokens / num_items_in_batch``, exactly as the LM loss of that micro-batch is
``sum / num_items_in_batch`` (see :meth:`BatchContext.loss_weight`), so the micro-batches add up to the
token-weighted mean over the accumulated batch.

Where the forward starts and ends, a :class:`RouterLossHandle`'s two steps :meth:`~RouterLossHandle.begin`
(with the call's kwargs) and :meth:`~RouterLossHandle.finish` (with its output):

- moeforge's architecture (:mod:`moeforge.modeling.modeling`) calls them in its own ``forward``, which its
  class declares with ``calls_router_losses = True``; it attaches a handle with its config's
  ``router_*_loss_coef`` at construction, so ``from_pretrained`` trains with them.
- Any other model (transformers' Mixtral, Qwen2-MoE, Qwen3-MoE; a PEFT or other wrapper around a moeforge
  model; a moeforge model whose ``forward`` was replaced on the instance when the handle was attached, as
  TRL's fused LM head does), and every :func:`observe_routers`, gets a forward pre-hook calling ``begin``
  and a forward hook calling ``finish`` on the model. A native model's ``config.output_router_logits`` is
  switched off while attached, so transformers does not add its own balance loss, computed over all
  layers at once, on top.

A model holds one loss handle (:func:`attach_router_losses` replaces the one attached to it or inside it,
detaching restores it), and the handle keeps no graph between forwards, so the model stays deep-copyable
(a DPO reference model computes its own losses).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from moeforge.config.router_losses import RouterLossConfig
from moeforge.errors import MoeforgeError
from moeforge.routing.accumulator import RoutingAccumulator
from moeforge.routing.aux_free import AuxFreeBalancer
from moeforge.routing.batch import BatchContext
from moeforge.routing.detection import RouterRef, find_routers, split_router_output
from moeforge.routing.losses import (
    expert_counts,
    layer_balance,
    layer_entropy,
    layer_mean,
    layer_mi,
    layer_z,
    token_weights,
)
from moeforge.routing.stats import RoutingStats

_HANDLE_ATTR = "_moeforge_router_losses"  # the loss handle attached to a model (at most one)

__all__ = ["RouterLossHandle", "attach_router_losses", "attached_router_losses", "find_routers", "observe_routers"]


class RouterLossHandle:
    """Router losses (or, with ``config=None``, statistics only) of one model: hooks on its routers, and on
    the model itself unless ``hooks_model=False`` (its forward calls :meth:`begin` and :meth:`finish`). After
    each forward ``losses`` holds that forward's unscaled components; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        routers: list[RouterRef],
        config: RouterLossConfig | None,
        replaced: tuple[RouterLossHandle, ...] = (),
        hooks_model: bool = True,
    ) -> None:
        self.model = model
        self.routers = routers
        self.config = config
        self.losses: dict[str, torch.Tensor] = {}
        self.balancer: AuxFreeBalancer | None = None
        self.measure_grad_norm = False  # set for a forward to log the attention-router balance gradient norm
        self.constant_balance: list[RouterRef] = []  # routers whose balance loss cannot train: said at the first training forward
        self.hooks_model = hooks_model  # else the model's own forward calls begin and finish
        self._replaced = replaced  # loss handles this one displaced (already removed): re-attached on detach
        self._batch: BatchContext | None = None  # set only while the model's forward runs
        self._calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._accumulators: list[RoutingAccumulator] = []
        self._stats = self.add_accumulator()
        self._hooks = [router.module.register_forward_hook(partial(self._after_router, i)) for i, router in enumerate(routers)]
        if hooks_model:
            self._hooks += [
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                model.register_forward_hook(self._after_forward, with_kwargs=True),
            ]
        model_config = getattr(model, "config", None)
        self._native_router_logits = getattr(model_config, "output_router_logits", None) if config is not None else None
        if model_config is not None and self._native_router_logits is not None:
            model_config.output_router_logits = False

    def add_accumulator(self) -> RoutingAccumulator:
        """A further, independent statistics window fed by every forward (its owner pops it)."""
        accumulator = RoutingAccumulator([r.label for r in self.routers], [r.num_experts for r in self.routers])
        self._accumulators.append(accumulator)
        return accumulator

    def pop_stats(self) -> RoutingStats:
        """Routing statistics since the last call (or since attaching), then reset."""
        return self._stats.pop()

    def detach(self) -> None:
        """Remove every hook and undo the config change; a loss handle that replaced another restores it."""
        self._remove()
        for old in self._replaced:
            attach_router_losses(old.model, old.config)._replaced = old._replaced

    def _remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        model_config = getattr(self.model, "config", None)
        if model_config is not None and self._native_router_logits is not None:
            model_config.output_router_logits = self._native_router_logits
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]

    # ------------------------------------------------------------------------------- the two steps

    def begin(self, kwargs: dict[str, Any]) -> None:
        """Before the model's forward: read the batch from the call's keyword arguments and collect the router
        calls from now until :meth:`finish`."""
        if self.config is not None and kwargs.get("output_router_logits"):
            warnings.warn(
                "output_router_logits=True: transformers adds its own (all-layer) balance loss to output.loss on top "
                "of moeforge's router losses; leave it off (with TRL: router_aux_loss_coef=0.0)",
                stacklevel=2,
            )
        self._batch = BatchContext.from_kwargs(kwargs)
        self._calls = []

    def finish(self, output: Any, training: bool) -> Any:
        """After the model's forward: compute the router losses of the calls collected since :meth:`begin`, put
        them on ``output`` and, when ``training``, add the weighted aux to its loss. Returns the output (a new
        tuple for a ``return_dict=False`` one)."""
        batch, calls = self._batch, self._calls
        self._batch, self._calls = None, []
        if batch is None or not calls:
            return output
        masks = [self._mask(batch, self.routers[index], logits) for index, logits, _ in calls]
        balances = [self._record(call, mask) for call, mask in zip(calls, masks, strict=True)]
        if self.config is None:
            return output
        if training and self.constant_balance:
            _warn_constant_balance(self.constant_balance)
            self.constant_balance = []
        # FFN routers use the recipe's coefficients; a router with its own (MoICE attention) is averaged
        # over its layers separately and weighted by that coefficient
        ffn = [i for i, (index, _, _) in enumerate(calls) if self.routers[index].balance_coef is None]
        own = [(i, coef) for i, (index, _, _) in enumerate(calls) if (coef := self.routers[index].balance_coef) is not None]
        zero = balances[0].new_zeros(())
        aux, self.losses = zero, {}
        if ffn:
            grad = torch.is_grad_enabled()
            with torch.set_grad_enabled(grad and self.config.z_coef > 0):
                z = layer_mean([layer_z(calls[i][1], masks[i]) for i in ffn])
            with torch.set_grad_enabled(grad and self.config.mi_coef > 0):
                mi = layer_mean([layer_mi(calls[i][1], masks[i]) for i in ffn])
            balance = layer_mean([balances[i] for i in ffn])
            aux = self.config.balance_coef * balance + self.config.z_coef * z + self.config.mi_coef * mi
            self.losses.update(balance=balance.detach(), z=z.detach(), mi=mi.detach())
        if own:
            own_aux = layer_mean([coef * balances[i] for i, coef in own])
            aux = aux + own_aux
            self.losses["attention_balance"] = layer_mean([balances[i] for i, _ in own]).detach()
            if self.measure_grad_norm and training:
                self.losses["attention_balance_grad_norm"] = self._grad_norm(own_aux, [calls[i][0] for i, _ in own])
        self.losses["aux"] = aux.detach()
        weighted = aux * batch.loss_weight() if training else None
        return _add_to_output(output, weighted, self.losses, has_labels=batch.label_tokens is not None)

    # ------------------------------------------------------------------------------------------ hooks

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.begin(kwargs)

    def _after_router(self, index: int, module: nn.Module, args: tuple, output: object) -> None:
        # a bound method in a partial, not a closure: deepcopy of the model (a DPO reference model) then
        # gives the copy's routers hooks into the copy's handle, where a closure would stay with the original
        if self._batch is not None:
            logits, indices = split_router_output(self.routers[index], output)
            self._calls.append((index, logits, indices))

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        return self.finish(output, module.training)

    def _grad_norm(self, loss: torch.Tensor, routers: list[int]) -> torch.Tensor:
        """Norm of ``loss``'s gradient on those routers' trainable weights (0 when it has none, as at
        top_k = num_experts): shows whether the balance loss can move the routers at all."""
        params = [p for i in dict.fromkeys(routers) for p in self.routers[i].module.parameters() if p.requires_grad]
        if not params or not loss.requires_grad:
            return loss.new_zeros(())
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + loss.new_zeros(())).detach()

    @staticmethod
    def _mask(batch: BatchContext, router: RouterRef, logits: torch.Tensor) -> torch.Tensor | None:
        """The call's ``[rows]`` padding mask: one entry per token, repeated for each decision it makes."""
        mask = batch.token_mask(logits.shape[0] // router.per_token)
        return mask if mask is None or router.per_token == 1 else mask.repeat_interleave(router.per_token)

    def _record(self, call: tuple[int, torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """Feed one router call's statistics to the accumulators; return its balance loss (with a graph
        when a non-zero coefficient will use it)."""
        index, logits, indices = call
        router = self.routers[index]
        coef = router.balance_coef if router.balance_coef is not None else (self.config.balance_coef if self.config else 0)
        needs_grad = self.config is not None and coef > 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            balance = layer_balance(logits, router.top_k, mask, indices)
        with torch.no_grad():
            weights = token_weights(mask, logits)
            counts, tokens = expert_counts(indices, router.num_experts, weights), weights.sum()
            entropy = layer_entropy(logits, mask)
        for accumulator in self._accumulators:
            accumulator.add(index, counts, tokens, entropy, balance.detach())
        return balance


def _add_to_output(output: Any, aux: torch.Tensor | None, losses: dict[str, torch.Tensor], has_labels: bool) -> Any:
    """Attach the components to a ``ModelOutput`` and add ``aux`` (if any) to its LM loss, or to the loss
    that a ``return_dict=False`` tuple holds first when labels were given."""
    if hasattr(output, "loss"):
        output.router_losses = losses
        output.router_aux_loss = aux
        if aux is not None and output.loss is not None:
            output.loss = output.loss + aux.to(output.loss.device)
        return output
    loss_first = isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].ndim == 0
    if aux is not None and has_labels and loss_first:
        return (output[0] + aux.to(output[0].device), *output[1:])
    return output


def _warn_constant_balance(routers: list[RouterRef]) -> None:
    """Said when such a model first trains (not when it loads: a chat or an evaluation has nothing to fix)."""
    labels = [r.label for r in routers]
    shown = ", ".join(labels) if len(labels) <= 6 else f"{', '.join(labels[:3])}, ... ({len(labels)} in all)"
    moice = " (MoICE's released recipe: topk = len(base_set))" if any(r.per_token > 1 for r in routers) else ""
    warnings.warn(
        f"router layers {shown}: the balance loss is constant (= E) with zero gradient at "
        f"top_k = num_experts{moice}; lower top_k for it to balance",
        stacklevel=3,
    )


def attach_router_losses(model: nn.Module, config: RouterLossConfig | None = None) -> RouterLossHandle:
    """Add router losses to ``model``'s forward (a causal LM: its output's ``loss``), returning the handle.

    Works on any model whose routers follow the ``(logits, weights, indices)`` contract (moeforge's
    architecture, transformers' Mixtral, Qwen2-MoE, Qwen3-MoE). It replaces any loss handle attached to the
    model or inside it (a moeforge model's own, when ``model`` is that model or a PEFT or other wrapper
    holding it) until the new one is detached. With ``config.aux_free`` the handle gets ``handle.balancer``,
    an :class:`AuxFreeBalancer` to step after each optimizer step."""
    config = config or RouterLossConfig()
    routers = find_routers(model)
    constant = [r for r in routers if r.top_k == r.num_experts and (config.balance_coef if r.balance_coef is None else r.balance_coef) > 0]
    replaced = tuple(m.__dict__[_HANDLE_ATTR] for m in model.modules() if _HANDLE_ATTR in m.__dict__)
    for old in replaced:
        old._remove()
    # The class's attribute, not the model's (a PEFT wrapper forwards unknown attributes to the model it wraps);
    # a forward replaced on the instance (TRL's fused LM head, which runs the decoder itself) skips the class's.
    calls = getattr(type(model), "calls_router_losses", False) and "forward" not in model.__dict__
    handle = RouterLossHandle(model, routers, config, replaced, hooks_model=not calls)
    handle.constant_balance = constant
    model.__dict__[_HANDLE_ATTR] = handle
    if config.aux_free:
        try:
            handle.balancer = AuxFreeBalancer(handle, config.aux_free_rate)
        except MoeforgeError:
            handle.detach()  # leave the model as it was
            raise
    return handle


def attached_router_losses(model: nn.Module) -> RouterLossHandle | None:
    """The loss handle that ``model``'s own forward runs: the one attached to the model itself, unless that one
    hooks the model's call instead, or attaching to a module around the model (a PEFT wrapper) replaced it."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    return None if handle is None or handle.hooks_model else handle


@contextmanager
def observe_routers(model: nn.Module) -> Iterator[RouterLossHandle]:
    """Routing statistics only (no loss, nothing changed on the model), e.g. for evaluation:
    ``with observe_routers(model) as h: ...; stats = h.pop_stats()``. A dense model yields empty stats."""
    handle = RouterLossHandle(model, find_routers(model), config=None)
    try:
        yield handle
    finally:
        handle.detach()
