"""What is in a checkpoint, from its config and safetensors headers alone (no weights are loaded).

The numbers that matter for a Mixture-of-Experts model are its total parameters (memory) and its
active parameters per token (compute): every routed expert is stored, but only ``top_k`` of them run
for a token. Both come from tensor shapes in the headers, so inspecting a 100 GB model is instant.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from math import prod
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from moeforge.errors import MoeforgeError
from moeforge.families import LEGACY_MODEL_TYPES, MOEFORGE_MODEL_TYPE, NativeMoe, native_moe
from moeforge.io.loading import read_config, resolve_checkpoint
from moeforge.io.safetensors_reader import CheckpointReader

# A routed expert's tensor: ``...layers.<i>.(...).experts.<...>`` (per-expert or fused layouts);
# shared experts (``shared_expert(s)``) deliberately do not match: they run for every token.
_ROUTED_EXPERT = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?experts\.")


def _attr(config: PretrainedConfig, *names: str) -> Any:
    """First attribute among ``names`` that is set: configs spell the same thing differently."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _dense(index: int, intermediate_size: int | None) -> dict[str, Any]:
    return {
        "index": index,
        "kind": "dense",
        "intermediate_size": intermediate_size,
        "num_experts": None,
        "top_k": None,
        "expert_intermediate_size": None,
        "shared_intermediate_size": None,
        "gate_type": None,
        "scoring": None,
        "attention": None,
    }


def _moe(
    index: int,
    num_experts: int,
    top_k: int,
    expert_size: int,
    shared_size: int | None,
    gate: str,
    scoring: str | None,
) -> dict[str, Any]:
    return {
        "index": index,
        "kind": "moe",
        "intermediate_size": None,
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_intermediate_size": expert_size,
        "shared_intermediate_size": shared_size or None,
        "gate_type": gate,
        "scoring": scoring,
        "attention": None,
    }


def _moeforge_rows(config: PretrainedConfig) -> list[dict[str, Any]]:
    """moeforge's architecture states its plan directly: ``moe_layers[i]`` is None (dense) or the layer's MoE spec."""
    n = config.num_hidden_layers
    specs = list(getattr(config, "moe_layers", None) or [None] * n)
    if len(specs) != n:
        raise MoeforgeError(f"config moe_layers has {len(specs)} entries for {n} layers; fix the config")
    rows = []
    for i, spec in enumerate(specs):
        if spec is None:
            rows.append(_dense(i, config.intermediate_size))
            continue
        try:
            rows.append(
                _moe(
                    i,
                    spec["num_experts"],
                    spec["top_k"],
                    spec["expert_intermediate_size"],
                    spec.get("shared_intermediate_size"),
                    spec.get("gate_type", "linear"),
                    spec.get("scoring"),
                )
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise MoeforgeError(f"config moe_layers[{i}] is malformed (missing {err}); fix the config") from None
    attention = getattr(config, "attention_moe_layers", None) or [None] * n
    for row, entry in zip(rows, attention, strict=False):
        if entry is not None:  # head groups a router selects per token (the attention projections are all stored and run)
            row["attention"] = {key: entry.get(key) for key in ("num_experts", "top_k", "shared_experts")}
    return rows


def _native_rows(config: PretrainedConfig, native: NativeMoe) -> list[dict[str, Any]]:
    """A native MoE's layers from its config fields (:attr:`NativeMoe.fields`); dense layers where it has them."""

    def field(role: str) -> Any:
        return getattr(config, native.fields[role], None) if role in native.fields else None

    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    size = field("dense_size") or getattr(config, "intermediate_size", None)
    return [
        _moe(i, field("num_experts"), field("top_k"), field("expert_size"), field("shared_size"), "linear", "softmax_then_topk")
        if i not in dense and (i + 1) % step == 0
        else _dense(i, size)
        for i in range(config.num_hidden_layers)
    ]


def layer_plan(config: PretrainedConfig) -> list[dict[str, Any]]:
    """One row per decoder layer saying whether it is dense or MoE, and how its experts are shaped."""
    if config.model_type in (MOEFORGE_MODEL_TYPE, *LEGACY_MODEL_TYPES):
        return _moeforge_rows(config)
    native = native_moe(config.model_type)
    if native is not None:
        return _native_rows(config, native)
    return [_dense(i, config.intermediate_size) for i in range(config.num_hidden_layers)]


def _inactive_parameters(reader: CheckpointReader, layers: list[dict[str, Any]], hidden_size: int) -> int:
    """Parameters of routed experts a token does not use: (E - k) / E of each MoE layer's experts."""
    routed: Counter[int] = Counter()
    for name in reader.keys():
        match = _ROUTED_EXPERT.search(name)
        if match:
            routed[int(match.group(1))] += prod(reader.shape_of(name))
    inactive = 0
    for row in layers:
        if row["kind"] != "moe":
            continue
        experts, top_k = row["num_experts"], row["top_k"]
        # Unknown tensor naming: fall back to SwiGLU experts (gate, up and down projections, no bias).
        stored = routed[row["index"]] or experts * 3 * hidden_size * row["expert_intermediate_size"]
        inactive += stored * (experts - top_k) // experts
    return inactive


def _fidelity(directory: Path) -> Any:
    path = directory / "moeforge.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("fidelity")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise MoeforgeError(f"{path} is not a valid moeforge.json ({type(err).__name__}); fix or delete it") from None


def inspect_checkpoint(source: str | Path) -> dict[str, Any]:
    """Summarise a checkpoint: shape, parameter counts (total and active per token), per-layer MoE plan."""
    directory = resolve_checkpoint(source)
    config = read_config(directory)
    reader = CheckpointReader(directory)
    numel = {name: prod(reader.shape_of(name)) for name in reader.keys()}
    by_dtype: Counter[str] = Counter()
    for name, count in numel.items():
        by_dtype[str(reader.dtype_of(name)).removeprefix("torch.")] += count
    layers = layer_plan(config)
    total = sum(numel.values())
    architectures = getattr(config, "architectures", None) or []
    report: dict[str, Any] = {
        "path": str(directory),
        "model_type": config.model_type,
        "architecture": architectures[0] if architectures else None,
        "dtype": by_dtype.most_common(1)[0][0] if by_dtype else None,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": _attr(config, "num_key_value_heads", "num_attention_heads"),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "num_moe_layers": sum(row["kind"] == "moe" for row in layers),
        "num_attention_moe_layers": sum(row["attention"] is not None for row in layers),
        "total_parameters": total,
        "active_parameters": total - _inactive_parameters(reader, layers, config.hidden_size),
        "weights_format": reader.format,
        "size_on_disk_bytes": reader.total_bytes(),
        "layers": layers,
    }
    fidelity = _fidelity(directory)
    if fidelity is not None:
        report["fidelity"] = fidelity
    return report
