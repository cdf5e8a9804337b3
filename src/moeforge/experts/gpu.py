"""Optional fused GPU kernels: used only when installed and on CUDA, probed once.

sonic-moe (the fastest published MoE training kernel, Hopper+) is reached through transformers' own
``sonicmoe`` experts function, which loads it from the ``kernels`` hub; moeforge adds no copy of it. On a
machine without CUDA or without the packages the probe says no and ``auto`` keeps the portable path.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache


@cache
def sonicmoe_forward() -> Callable | None:
    """transformers' sonic-moe experts forward, or None when the kernel cannot load here."""
    try:
        from transformers.integrations.sonicmoe import is_sonicmoe_loadable, sonicmoe_experts_forward
    except ImportError:
        return None
    return sonicmoe_experts_forward if is_sonicmoe_loadable() else None
