"""Native exports are what their architecture's own transformers code computes: each one, loaded by a fresh
interpreter that never imports moeforge (with transformers' default experts backend), reproduces the dense
source's logits. And the conventions that keep them loadable by engines: an untied head where llama.cpp
needs one, a shared-expert gate that is 0.5 without being 0, expert FFNs padded to 8 neurons, a top-level
``rope_theta`` and a tokenizer class transformers 4.5x reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from moeforge.conversion.export import _half_gate
from moeforge.families import native_moe
from tests.families.test_conversion import convert_tiny, logits
from tests.families.tiny import save_family, token_ids

PAIRS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-mixtral": ("llama", "mixtral", {}),
    "llama-granitemoe": ("llama", "granitemoe", {}),
    "llama-granitemoeshared": ("llama", "granitemoeshared", {"shared": {"num_experts": 1}}),
    "llama-qwen2_moe": ("llama", "qwen2_moe", {"shared": {"num_experts": 1}, "placement": {"moe_layer_freq": 2}}),
    "llama-qwen2_moe-no-renorm": ("llama", "qwen2_moe", {"routing": {"normalize": False, "router_init": "zeros"}}),
    "mistral-mixtral": ("mistral", "mixtral", {}),
    "qwen2-qwen2_moe": ("qwen2", "qwen2_moe", {}),
    "qwen3-qwen3_moe": ("qwen3", "qwen3_moe", {"placement": {"layers": [0, 2]}}),
    "qwen3_5-qwen3_5_moe": ("qwen3_5_text", "qwen3_5_moe_text", {"shared": {"num_experts": 1}}),
    "granite-granitemoe": ("granite", "granitemoe", {}),
    "granite-granitemoeshared": ("granite", "granitemoeshared", {"shared": {"num_experts": 1}}),
    "olmo2-flex_olmo": ("olmo2", "flex_olmo", {}),
    "ernie4_5-ernie4_5_moe": ("ernie4_5", "ernie4_5_moe", {}),
    "llama-mixtral-padded": ("llama-100", "mixtral", {"init": "partition", "num_experts": 4, "top_k": 4}),
}
_PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
directories, ids_path, out_path = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
ids, results = torch.load(ids_path), {}
for directory in directories:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        results[directory] = (f"{type(model).__module__}.{type(model).__name__}", model(ids).logits)
assert not any(name.startswith("moeforge") for name in sys.modules), "moeforge was imported"
torch.save(results, out_path)
"""


@pytest.fixture(scope="module")
def exports(family_sources, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """``{pair: (dense source, native export)}``, every pair converted with its target named explicitly."""
    root = tmp_path_factory.mktemp("natives")
    sources = {**family_sources, "llama-100": save_family(root / "llama-100", "llama", intermediate_size=100)}
    out = {}
    for name, (family, target, moe) in PAIRS.items():
        result = convert_tiny(sources[family], root / name, {"num_experts": 4, "top_k": 2, **moe}, export=target)
        assert result.export == target and result.plan.exact
        out[name] = (sources[family], root / name)
    return out


@pytest.fixture(scope="module")
def plain_logits(exports, tmp_path_factory) -> dict[str, tuple[str, torch.Tensor]]:
    """Every export loaded by one fresh interpreter with plain transformers."""
    root = tmp_path_factory.mktemp("plain")
    torch.save(token_ids(), root / "ids.pt")
    directories = [str(export) for _, export in exports.values()]
    subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, ",".join(directories), str(root / "ids.pt"), str(root / "out.pt")],
        check=True,
        capture_output=True,
        text=True,
    )
    results = torch.load(root / "out.pt")
    return {name: results[str(export)] for name, (_, export) in exports.items()}


@pytest.mark.parametrize("pair", PAIRS)
def test_plain_transformers_reproduces_the_dense_model(exports, plain_logits, pair):
    source, _ = exports[pair]
    loaded_class, got = plain_logits[pair]
    assert loaded_class.startswith("transformers.models.") and loaded_class.endswith(native_moe(PAIRS[pair][1]).architecture)
    torch.testing.assert_close(got, logits(source, token_ids()), atol=1e-4, rtol=0)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def test_qwen2_moe_export_is_llama_cpp_shaped(exports):
    _, export = exports["llama-qwen2_moe"]
    config, tensors = json.loads((export / "config.json").read_text()), _tensors(export)
    assert config["tie_word_embeddings"] is False and "lm_head.weight" in tensors  # llama.cpp requires output.weight
    gate = tensors["model.layers.0.mlp.shared_expert_gate.weight"]
    assert torch.all(gate != 0) and torch.equal(gate.abs(), torch.full_like(gate, 1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_gate_is_exactly_one_half(dtype):
    """sigmoid(g·x) = 0.5 exactly for activations of any realistic size, in the gate's own dtype."""
    gate = _half_gate(512, dtype)
    x = (torch.randn(1000, 512, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    z = torch.nn.functional.linear(x, gate)
    assert torch.all(z != 0) or dtype == torch.float16
    assert torch.equal(torch.sigmoid(z), torch.full_like(z, 0.5))


def test_odd_expert_sizes_are_padded_to_eight(exports):
    _, export = exports["llama-mixtral-padded"]
    config, tensors = json.loads((export / "config.json").read_text()), _tensors(export)
    assert config["intermediate_size"] == 32  # 100 neurons / 4 experts = 25, padded with 7 zero neurons
    w1 = tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert w1.shape == (32, 64) and torch.all(w1[25:] == 0) and torch.any(w1[:25] != 0)


def test_config_and_tokenizer_read_by_transformers_4(exports):
    _, export = exports["llama-mixtral"]
    config = json.loads((export / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    tokenizer = json.loads((export / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("pair", ["llama-mixtral", "llama-granitemoeshared", "llama-qwen2_moe", "ernie4_5-ernie4_5_moe"])
def test_provenance_names_what_conversion_created(exports, pair):
    """``newly_initialized`` lists exactly the router (and the target's shared gate or selection bias) of each MoE layer."""
    _, export = exports[pair]
    keys = native_moe(PAIRS[pair][1]).keys
    info = json.loads((export / "moeforge.json").read_text())
    moe_layers = [i for i, layer in enumerate(info["layers"]) if layer is not None]
    tensors = _tensors(export)
    expected = sorted(
        f"model.layers.{i}.{name}"
        for i in moe_layers
        for name in (keys.router, keys.shared_gate, keys.score_bias)
        if name and f"model.layers.{i}.{name}" in tensors
    )
    assert info["newly_initialized"] == expected and any(keys.router in name for name in expected)
