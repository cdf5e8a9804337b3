"""Dense → MoE conversion (upcycling): plan, expert construction, router init, export, fidelity."""

from moeforge.convert.pipeline import ConversionResult, convert

__all__ = ["ConversionResult", "convert"]
