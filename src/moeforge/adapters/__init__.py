"""MoE adapters: mixtures of small LoRA experts trained on a frozen base, saved as a PEFT method.

Importing this package registers the ``MOE_LORA`` PEFT method (see :mod:`moeforge.adapters.peft_method`)
and PEFT as the adapter loader of :func:`moeforge.io.loading.load_model` (``adapter=``, adapter directories).
"""

import warnings

from moeforge.adapters.build import load_adapter
from moeforge.adapters.peft_method import MoeLoraConfig, MoeLoraModel, register
from moeforge.io.extensions import register_adapter_loader

register()
register_adapter_loader(load_adapter)
# PEFT 0.21 still calls this deprecated transformers 5 API on every adapter load / training start
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__all__ = ["MoeLoraConfig", "MoeLoraModel", "register"]
