"""moeforge: dense decoder language models into Mixture-of-Experts models.

Importing moeforge registers its architecture (``model_type: moeforge``, over any supported family) with transformers' Auto classes, so
``import moeforge; AutoModelForCausalLM.from_pretrained(path)`` loads any checkpoint moeforge wrote,
without ``trust_remote_code``. It also registers the ``MOE_LORA`` PEFT method, so
``import moeforge; PeftModel.from_pretrained(base, adapter_dir)`` loads a MoE adapter. And it adds its experts
backends to transformers' experts interface (``experts_implementation="moeforge_auto"``, ...).

Progress and notes go to the ``moeforge`` logger (a child per module, ``logging.getLogger(__name__)``) and
stay silent until the application configures logging; the ``moeforge`` command shows them on stderr.
"""

from __future__ import annotations

import logging
from importlib.metadata import version

from moeforge import adapters as _adapters  # noqa: F401  (registers the MOE_LORA PEFT method)
from moeforge import experts as _experts
from moeforge import modeling as _modeling  # noqa: F401  (registers the Auto classes)
from moeforge.errors import MoeforgeError

__version__ = version("moeforge")

_experts.register()
# a library stays quiet unless its user configures logging (Python's last-resort handler would print warnings)
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["MoeforgeError", "__version__"]
