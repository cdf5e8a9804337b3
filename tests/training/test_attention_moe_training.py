"""``moeforge train`` on an attention MoE checkpoint: the head routers are their own freezing role
(``attention_router``), train while the attention's projections stay frozen, and are logged as ``N.heads``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeforge.modeling import AttentionRouter, causal_lm_class, moeforge_config
from moeforge.training.runner import train
from tests.helpers import build_tiny_llama, make_tiny_llama_config, make_tiny_tokenizer
from tests.training.conftest import make_recipe, state_dict


def _attention_moe_checkpoint(path: Path) -> Path:
    """The tiny Llama with attention MoE (4 groups of one head, top-2) on layers 0 and 2, random routers."""
    dense = build_tiny_llama(make_tiny_llama_config(initializer_range=0.05))
    spec = {"num_experts": 4, "top_k": 2, "shared_experts": [], "scale": 4.0}
    config = moeforge_config(dense.config, None, attention_moe_layers=[spec, None, spec])
    model = causal_lm_class(config)(config)
    model.load_state_dict(dense.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, AttentionRouter)):
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 0.5)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_head_routers_train_while_attention_and_embeddings_stay_frozen(tmp_path: Path) -> None:
    source = _attention_moe_checkpoint(tmp_path / "source")
    recipe = make_recipe(
        "pt", source, tmp_path / "run", freeze=["attention", "embeddings"], training={"max_steps": 3, "learning_rate": 1e-2}
    )
    result = train(recipe, log=lambda _line: None)
    before, after = state_dict(source), state_dict(result.model_dir)
    assert before.keys() == after.keys()
    routers = [name for name in before if ".head_gate.router." in name]
    assert routers == ["model.layers.0.self_attn.head_gate.router.weight", "model.layers.2.self_attn.head_gate.router.weight"]
    for name, tensor in before.items():
        frozen = ".self_attn." in name and name not in routers or "embed_tokens" in name or "lm_head" in name
        assert torch.equal(after[name], tensor) == frozen, name
    config = json.loads((result.model_dir / "config.json").read_text())
    assert [entry and entry["top_k"] for entry in config["attention_moe_layers"]] == [2, None, 2]

    logged = [json.loads(line) for line in (recipe.output / "routing.jsonl").read_text().splitlines()]
    assert logged and logged[-1]["layers"] == ["0.heads", "2.heads"]
