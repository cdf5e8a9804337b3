"""moeforge: dense LLaMA-family models into Mixture-of-Experts models.

Importing moeforge registers its architecture (``moeforge_llama``) with transformers' Auto classes, so
``import moeforge; AutoModelForCausalLM.from_pretrained(path)`` loads any checkpoint moeforge wrote,
without ``trust_remote_code``.
"""

from __future__ import annotations

from moeforge import modeling as _modeling  # noqa: F401  (registers the Auto classes)
from moeforge.errors import MoeforgeError

__version__ = "0.1.0"

__all__ = ["MoeforgeError", "__version__"]
