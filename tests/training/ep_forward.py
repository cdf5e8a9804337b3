"""``python -m torch.distributed.run --nproc_per_node N -m tests.training.ep_forward OUT EP_SIZE MODEL...``: each
rank loads every MODEL twice, whole and expert-parallel (transformers' ``DistributedConfig(fsdp_size=N,
ep_size=EP_SIZE)``, what ``expert_parallel: {size: EP_SIZE}`` loads), runs a batch of its own through both (the
ranks' batches differ, so the all-to-all really moves tokens between ranks) and writes to ``OUT/rank{R}.json``:

* ``logits``: the largest difference between the two models' logits;
* ``starved_logits`` and ``starved_grads``: the same with every router forced to experts ``0 .. top_k-1`` on every
  rank (:func:`tests.training.skewed_routing._force`), so the ranks that hold the other experts receive no token
  at all (the all-to-all's zero-count case, backward included), and the largest gradient of each expert this
  rank holds;
* ``experts``: each expert tensor's global and local (this rank's) shape.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import moeforge  # noqa: F401  (registers moeforge's architecture)
from tests.training.skewed_routing import _force


def _batch(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    return torch.randint(4, 250, (2, 16), generator=generator)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    return output.logits.detach()


def _expert_grads(model: nn.Module) -> list[float]:
    """The largest gradient entry of each expert this rank holds (its local expert tensors' rows), all layers."""
    largest: list[float] = []
    for name, parameter in model.named_parameters():
        if ".experts." in name:
            assert parameter.grad is not None, name  # the backward reached every expert tensor, token or not
            grad = parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
            rows = grad.reshape(grad.shape[0], -1).abs().amax(dim=1).tolist()
            largest = [max(a, b) for a, b in zip(largest, rows, strict=True)] if largest else rows
    return largest


def _check(path: str, ep_size: int, rank: int, world: int) -> dict:
    ids = _batch(rank)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sharded = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(fsdp_size=world, ep_size=ep_size)
    )
    result: dict = {"logits": float((_logits(whole, ids) - _logits(sharded, ids)).abs().max())}
    result["experts"] = {
        name: [list(p.shape), list(p.to_local().shape) if isinstance(p, DTensor) else list(p.shape)]
        for name, p in sharded.named_parameters()
        if ".experts." in name
    }
    whole.zero_grad()
    sharded.zero_grad()
    handle = nn.modules.module.register_module_forward_hook(_force)
    try:
        result["starved_logits"] = float((_logits(whole, ids) - _logits(sharded, ids)).abs().max())
    finally:
        handle.remove()
    result["starved_grads"] = _expert_grads(sharded)
    return result


def main() -> int:
    out, ep_size, *models = sys.argv[1:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    results = {Path(path).name: _check(path, int(ep_size), rank, world) for path in models}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
