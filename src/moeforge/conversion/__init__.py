"""Dense → MoE conversion (upcycling): plan, expert construction, router init, export, fidelity."""

from moeforge.conversion.pipeline import ConversionResult, convert

__all__ = ["ConversionResult", "convert"]
