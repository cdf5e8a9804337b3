"""Build one layer's expert tensors from its dense FFN (copy, partition or granular; shared experts).

Output tensors use the fused layout of transformers 5 (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
and moeforge's key names; :mod:`moeforge.conversion.export` renames them for the target architecture.
"""

from __future__ import annotations

import torch

from moeforge.config.recipe import MoESpec
from moeforge.conversion.neurons import select_shared, split_neurons
from moeforge.conversion.plan import LayerPlan


def _perturb(weight: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    if noise == 0:
        return weight
    return weight + noise * weight.std() * torch.randn(weight.shape, generator=generator)


def _drop_upcycle(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-Upcycling: re-draw a fraction of this expert's neurons from N(mean, std) of each dense matrix."""
    if ratio == 0:
        return gate, up, down
    count = round(ratio * gate.shape[0])
    picked = torch.randperm(gate.shape[0], generator=generator)[:count]
    gate, up, down = gate.clone(), up.clone(), down.clone()

    def redraw(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return matrix.mean() + matrix.std() * torch.randn(shape, generator=generator)

    gate[picked] = redraw(gate, (count, gate.shape[1]))
    up[picked] = redraw(up, (count, up.shape[1]))
    down[:, picked] = redraw(down, (down.shape[0], count))
    return gate, up, down


def build_experts(
    plan: LayerPlan,
    moe: MoESpec,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activations: torch.Tensor | None,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Dense ``gate_proj/up_proj [I, H]``, ``down_proj [H, I]`` → ``{"experts.gate_up_proj", "experts.down_proj",
    and "shared_expert.{gate,up,down}_proj.weight" when shared}``, in the dense tensors' dtype.

    Experts are gathered straight into preallocated fused tensors (one pass over the output bytes, no fp32
    copies); only perturbed experts (noise, Drop-Upcycling) go through fp32. Unperturbed copies are built
    once and repeated (:func:`_repeat`). ``activations [T, I]`` feed importance-based choices."""
    intermediate, hidden = gate_proj.shape
    tensors: dict[str, torch.Tensor] = {}
    if plan.shared_intermediate_size:
        shared_ids, pool = select_shared(
            moe.shared.selection, intermediate, plan.shared_intermediate_size, activations=activations, generator=generator
        )
        tensors["shared_expert.gate_proj.weight"] = gate_proj[shared_ids]
        tensors["shared_expert.up_proj.weight"] = up_proj[shared_ids]
        tensors["shared_expert.down_proj.weight"] = down_proj[:, shared_ids]
    else:
        pool = torch.arange(intermediate)

    perturbed = moe.init != "partition" and (moe.copy_.noise > 0 or moe.copy_.drop_ratio > 0)
    if moe.init == "partition":
        groups = split_neurons(moe.partition.method, pool, plan.num_experts, up_proj=up_proj, activations=activations, generator=generator)
    else:  # copy, granular: every copy holds the whole pool, granular splits each copy into shards
        groups = split_neurons("contiguous", pool, plan.n_split, up_proj=up_proj, activations=None, generator=generator)
        if perturbed:  # each copy draws its own noise: all of them exist
            groups = groups * (plan.num_experts // plan.n_split)

    size = plan.expert_intermediate_size
    gate_up = torch.empty(len(groups), 2 * size, hidden, dtype=gate_proj.dtype)
    down = torch.empty(len(groups), hidden, size, dtype=down_proj.dtype)
    for e, ids in enumerate(groups):
        if perturbed:
            gate_e, up_e, down_e = (w.float() for w in (gate_proj[ids], up_proj[ids], down_proj[:, ids]))
            gate_e, up_e, down_e = (_perturb(w, moe.copy_.noise, generator) for w in (gate_e, up_e, down_e))
            gate_e, up_e, down_e = _drop_upcycle(gate_e, up_e, down_e, moe.copy_.drop_ratio, generator)
            gate_up[e, :size], gate_up[e, size:], down[e] = gate_e, up_e, down_e
        else:
            torch.index_select(gate_proj, 0, ids, out=gate_up[e, :size])
            torch.index_select(up_proj, 0, ids, out=gate_up[e, size:])
            torch.index_select(down_proj, 1, ids, out=down[e])
    if plan.scale != 1.0:
        down.mul_(plan.scale)
    tensors["experts.gate_up_proj"] = _repeat(gate_up, plan.num_experts)
    tensors["experts.down_proj"] = _repeat(down, plan.num_experts)
    return tensors


def _repeat(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The distinct experts of one copy repeated to ``num_experts``. One expert repeated is a view (stride 0
    over experts): copy-upcycling an 8B layer into 8 experts then holds one expert's 352 MB, not 2.8 GB, and
    the writer and the experts' forward read it expert by expert. Several (granular shards) are tiled."""
    copies = num_experts // experts.shape[0]
    if copies == 1:
        return experts
    if experts.shape[0] == 1:
        return experts.expand(num_experts, *experts.shape[1:])
    return experts.repeat(copies, 1, 1)


def scale_experts(down_proj: torch.Tensor, factor: float) -> None:
    """Multiply every expert's ``down_proj`` in place, also when the experts are one repeated view."""
    (down_proj[:1] if down_proj.stride(0) == 0 else down_proj).mul_(factor)
