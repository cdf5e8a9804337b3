"""The text ``moeforge eval`` prints: a perplexity line, the routing table, and a side-by-side
comparison of two models (how base vs upcycled vs trained checkpoints are compared)."""

from __future__ import annotations

from moeforge.eval.perplexity import PerplexityResult
from moeforge.routing import RoutingStats

DENSE_NOTE = "dense model: no routers"


def has_routers(stats: RoutingStats) -> bool:
    return bool(stats.load)


def routing_text(stats: RoutingStats) -> str:
    return stats.summary_table() if has_routers(stats) else DENSE_NOTE


def result_line(result: PerplexityResult) -> str:
    return f"perplexity {result.perplexity:.4f}  (nll {result.nll:.4f} nats/token, {result.tokens} tokens)"


def comparison_lines(name: str, result: PerplexityResult, other_name: str, other: PerplexityResult) -> list[str]:
    """Both models in one table, then the change from the first to the second."""
    width = max(len(name), len(other_name), len("Δ (second − first)"))
    delta = other.perplexity - result.perplexity
    lines = [
        f"{'model':<{width}}  {'perplexity':>12}  {'nll':>8}  {'tokens':>8}",
        *(f"{label:<{width}}  {r.perplexity:>12.4f}  {r.nll:>8.4f}  {r.tokens:>8}" for label, r in ((name, result), (other_name, other))),
        f"{'Δ (second − first)':<{width}}  {delta:>+12.4f}  {other.nll - result.nll:>+8.4f}  ({delta / result.perplexity:+.2%} perplexity)",
    ]
    if other.tokens != result.tokens:
        lines.append(
            f"note: {result.tokens} vs {other.tokens} scored tokens: the tokenizers differ, so these are "
            "perplexities per token of different tokenizations"
        )
    return lines
