"""``python -m tests.training.skewed_routing train RECIPE``: ``moeforge train`` with forced, skewed routing.

On rank 1 every router may pick only experts ``0 .. top_k-1``: the other experts of every MoE layer (FFN
experts or MoE-LoRA adapter experts) never receive a token from that rank, while rank 0 routes freely. This is
the situation in which ZeRO-3 or FSDP hang when ranks disagree on which parameters a step gathers. A global
forward hook rewrites each router's output (the ``(logits, weights, indices)`` contract of
:mod:`moeforge.routing.detection`); it runs before the routers' own hooks, so the router losses see the forced
routing too.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn


def _force(module: nn.Module, _inputs: object, output: object) -> object:
    top_k, num_experts = getattr(module, "top_k", None), getattr(module, "num_experts", None)
    if not (isinstance(top_k, int) and isinstance(num_experts, int) and isinstance(output, tuple) and len(output) == 3):
        return None
    logits = output[0]
    allowed = torch.arange(num_experts, device=logits.device) < top_k
    masked = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    top, indices = torch.topk(masked.float().softmax(-1), top_k, dim=-1)
    return masked, (top / top.sum(-1, keepdim=True)).to(output[1].dtype), indices


def main() -> int:
    if os.environ.get("RANK") == "1":
        nn.modules.module.register_module_forward_hook(_force)
    from moeforge.cli.main import main as moeforge_main

    return moeforge_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
