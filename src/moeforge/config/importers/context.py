"""What every translator knows besides the file's keys, and the translations more than one tool shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.config.importers.imported import ImportedRecipe
from moeforge.config.train_recipe import Schedule

MODEL_CONFIG_KEYS = frozenset(
    {
        "architectures", "attention_bias", "attention_dropout", "auto_map", "bos_token_id", "dtype", "eos_token_id",
        "head_dim", "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
        "mlp_bias", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id",
        "pretraining_tp", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta", "tie_word_embeddings",
        "torch_dtype", "transformers_version", "use_cache", "vocab_size",
    }
)  # fmt: skip
"""A model's own ``config.json`` fields, which Dense2MoE's and MoICE's files carry along (they are model
configs with extra keys): moeforge reads the architecture from the model itself."""

MODEL_KEYS = ("model_name_or_path", "_name_or_path", "model_path", "src_model_dir")
"""Where the tools name the model they start from."""


@dataclass(frozen=True)
class ImportContext:
    path: Path
    model: str | None = None
    """``--model``: the model the recipe starts from, over what the file says."""
    rope_theta: float | None = None
    """``--rope-theta``: the target model's RoPE base, when the file's model is not at hand."""

    def take_model(self, settings: dict[str, Any]) -> tuple[str | None, str]:
        """The model the recipe starts from and the comment saying where that came from (None: nowhere)."""
        named = {key: settings.pop(key) for key in MODEL_KEYS if key in settings}
        if self.model is not None:
            return self.model, "from --model"
        for key, value in named.items():
            if isinstance(value, str) and value:
                return value, f"from {key}"
        return None, ""

    def output(self, suffix: str) -> str:
        """A default output directory named after the imported file, for tools that took it on the command line."""
        return f"out/{self.path.stem}-{suffix}"


def take_schedule(settings: dict[str, Any], recipe: ImportedRecipe) -> None:
    """Keys named as in transformers' TrainingArguments (the tools passed them through) go to ``training:``."""
    for key in [key for key in settings if key in Schedule.model_fields]:
        recipe.put("train", f"training.{key}", settings.pop(key), f"from {key}")
    if settings.pop("fp16", None) is not None:
        recipe.drop(
            "fp16",
            "moeforge trains in float32 or bfloat16 (training.bf16: true, or dtype: bfloat16); fp16 is not offered",
        )
