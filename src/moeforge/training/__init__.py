"""Training (pt / sft / dpo) on transformers' Trainer and TRL, with MoE-aware losses, freezing and telemetry."""

from moeforge.training.runner import TrainResult, train

__all__ = ["TrainResult", "train"]
