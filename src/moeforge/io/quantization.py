"""4-/8-bit frozen bases through bitsandbytes, an optional CUDA-only extra: checked up front, so a machine
without it gets one line saying what is missing instead of an import error deep inside transformers."""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from moeforge.errors import MoeforgeError

Bits = Literal["4bit", "8bit"]


def require_bitsandbytes(key: str, purpose: str, instead: str) -> None:
    """One line naming the recipe ``key`` when bitsandbytes cannot run here (no CUDA GPU, or the extra missing),
    said before any model loads instead of an import or device error deep inside transformers."""
    if not torch.cuda.is_available():
        raise MoeforgeError(
            f"{key} {purpose} with bitsandbytes, which needs a CUDA GPU; this machine has none: {instead} "
            "or run on a CUDA machine with pip install 'moeforge[cuda]'"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MoeforgeError(f"{key} needs bitsandbytes: pip install 'moeforge[cuda]' (or pip install bitsandbytes)")


def quantization_config(bits: Bits, compute_dtype: torch.dtype = torch.bfloat16):
    """A transformers ``BitsAndBytesConfig`` for ``bits`` (NF4 with double quantisation for 4-bit, as QLoRA)."""
    require_bitsandbytes(f"load_in_{bits}", "quantises the base", f"drop load_in_{bits} (train the adapter on the full-precision base)")
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )
