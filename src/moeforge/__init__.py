"""moeforge: dense decoder language models into Mixture-of-Experts models.

Importing moeforge registers its architecture (``model_type: moeforge``, over any supported family) with transformers' Auto classes, so
``import moeforge; AutoModelForCausalLM.from_pretrained(path)`` loads any checkpoint moeforge wrote,
without ``trust_remote_code``. It also registers the ``MOE_LORA`` PEFT method, so
``import moeforge; PeftModel.from_pretrained(base, adapter_dir)`` loads a MoE adapter. And it adds its experts
backends to transformers' experts interface (``experts_implementation="moeforge_auto"``, ...).
"""

from __future__ import annotations

from importlib.metadata import version

from moeforge import adapters as _adapters  # noqa: F401  (registers the MOE_LORA PEFT method)
from moeforge import experts as _experts
from moeforge import modeling as _modeling  # noqa: F401  (registers the Auto classes)
from moeforge.errors import MoeforgeError

__version__ = version("moeforge")

_experts.register()

__all__ = ["MoeforgeError", "__version__"]
