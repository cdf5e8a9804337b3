"""Getting models in and out: checkpoint I/O, loading, the embedded default model, inspection."""

from __future__ import annotations

from moeforge.io.embedded import default_model_dir
from moeforge.io.inspection import inspect_checkpoint
from moeforge.io.loading import (
    DENSE_MODEL_TYPES,
    MOE_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    cache_root,
    check_supported,
    gguf_to_safetensors,
    load_model,
    load_tokenizer,
    read_config,
    resolve_checkpoint,
)
from moeforge.io.safetensors_reader import CheckpointReader
from moeforge.io.safetensors_writer import ShardedWriter

__all__ = [
    "DENSE_MODEL_TYPES",
    "MOE_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointReader",
    "ShardedWriter",
    "cache_root",
    "check_supported",
    "default_model_dir",
    "gguf_to_safetensors",
    "inspect_checkpoint",
    "load_model",
    "load_tokenizer",
    "read_config",
    "resolve_checkpoint",
]
