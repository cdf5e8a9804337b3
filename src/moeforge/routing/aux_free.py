"""DeepSeek-V3's aux-loss-free load balancing (arXiv 2408.15664) for moeforge routers.

Each router carries a per-expert bias added to its logits for choosing the experts only (the weights stay
the unbiased probabilities, see :func:`moeforge.modeling.routers.route`). After every optimizer step the
bias of an overloaded expert goes down by γ and that of an underloaded one up by γ, using the loads seen
since the previous step. Balance is reached without a loss term, so no gradient competes with the LM loss.

The bias is updated in an fp32 master copy: in a bf16 model the buffer is bf16, whose spacing (2⁻⁷ near 1)
would swallow γ = 1e-3 steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moeforge.errors import MoeforgeError

if TYPE_CHECKING:
    from moeforge.routing.hooks import RouterLossHandle


class AuxFreeBalancer:
    """``step()`` after each optimizer step (or :meth:`hook_optimizer` once); enabling it on a model marks
    its config ``router_aux_free`` so the bias is saved and loaded with the weights."""

    def __init__(self, handle: RouterLossHandle, rate: float) -> None:
        # moeforge's routers (moeforge.modeling.routers.TopKRouter) are the ones that can carry a selection bias
        foreign = [r for r in handle.routers if not callable(getattr(r.module, "enable_expert_bias", None))]
        if foreign or not handle.routers:
            culprit = f" ({foreign[0].name} is a {type(foreign[0].module).__name__})" if foreign else ""
            raise MoeforgeError(f"aux_free needs moeforge routers{culprit}; convert with export: moeforge")
        self.rate = rate
        self.routers: list[Any] = [r.module for r in handle.routers]  # moeforge's TopKRouter (modeling is above routing)
        for router in self.routers:
            router.enable_expert_bias()
        config = getattr(handle.model, "config", None)
        if config is not None:
            config.router_aux_free = True
        self.bias = [router.expert_bias.detach().float().clone() for router in self.routers]
        self._loads = handle.add_accumulator()

    @torch.no_grad()
    def step(self) -> None:
        """``bias_e += rate · sign(mean_load − load_e)`` per layer, from the loads since the last step.
        A layer that saw no token keeps its bias (sign(0) = 0 for every expert). Under data parallelism the
        loads of every rank are summed first, so all ranks apply the same update (the global batch's). A bias
        that no longer matches the master copy was loaded since (Trainer restores a checkpoint after the
        balancer exists): the master starts again from it rather than writing the stale value back."""
        stats = self._loads.pop().all_reduce()
        for router, bias, load in zip(self.routers, self.bias, stats.load, strict=True):
            if not torch.equal(bias.to(router.expert_bias), router.expert_bias):  # replaced since (a resumed checkpoint)
                bias.copy_(router.expert_bias.float())
            load = load.double().to(bias.device)
            bias += self.rate * torch.sign(load.mean() - load).float()
            router.expert_bias.copy_(bias)

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Run :meth:`step` after every ``optimizer.step()`` (with gradient accumulation, once per
        accumulated batch, the loads covering all of its micro-batches)."""
        return optimizer.register_step_post_hook(lambda *_: self.step())
