"""The layer-at-a-time runner computes exactly what the family's own forward computes, for families whose
layers need more than hidden states (per-layer-type masks and RoPE, per-layer inputs, a shared-KV store,
linear-attention layers, multipliers, soft-capping), and keeps two streams apart."""

from __future__ import annotations

import pytest
import torch

from moeforge.conversion.layerwise import LAYERS_PREFIX, LayerInputs, LayerwiseModel
from moeforge.errors import MoeforgeError
from tests.families.tiny import build_family, token_ids


def _split(model) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    state = model.state_dict()
    outer = {name: tensor for name, tensor in state.items() if not name.startswith(LAYERS_PREFIX)}
    layers = []
    for index in range(model.config.num_hidden_layers):
        prefix = f"{LAYERS_PREFIX}{index}."
        layers.append({name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)})
    return outer, layers


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma4_text", "qwen3_5_text", "granite", "smollm3", "exaone4"])
def test_layer_by_layer_equals_the_family_forward(family):
    model = build_family(family)
    model.config.final_logit_softcapping = 30.0 if family.startswith("gemma") else getattr(model.config, "final_logit_softcapping", None)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    outer, layers = _split(model)
    runner = LayerwiseModel(model.config)
    stream = runner.layer_inputs(ids, outer)
    for index, tensors in enumerate(layers):
        stream.hidden, _ = runner.run_layer(index, tensors, stream)
    torch.testing.assert_close(runner.logits(ids, stream.hidden, outer), expected, rtol=0, atol=1e-5)
    assert all(p.device.type == "meta" for p in runner.model.parameters())  # nothing stays materialised


def test_forked_streams_own_their_shared_stores():
    store = {}
    calls = [((), {"shared": store, "mask": torch.ones(2)}), ((), {"shared": store, "mask": torch.ones(2)})]
    stream = LayerInputs(torch.zeros(1), calls)
    fork = stream.fork()
    fork.calls[0][1]["shared"]["k"] = 1
    assert store == {} and fork.calls[1][1]["shared"] == {"k": 1}  # its own store, shared by its layers
    assert fork.calls[0][1]["mask"] is calls[0][1]["mask"]  # read-only inputs are not copied


def test_a_missing_layer_tensor_is_named():
    model = build_family("llama")
    outer, layers = _split(model)
    runner = LayerwiseModel(model.config)
    stream = runner.layer_inputs(token_ids(), outer)
    del layers[0]["self_attn.k_proj.weight"]
    with pytest.raises(MoeforgeError, match="the checkpoint lacks model.layers.0.self_attn.k_proj.weight"):
        runner.run_layer(0, layers[0], stream)
    with pytest.raises(MoeforgeError, match="lacks model.norm.weight"):
        runner.layer_inputs(token_ids(), {k: v for k, v in outer.items() if k != "model.norm.weight"})


def test_the_input_embedding_holds_only_the_rows_of_the_tokens():
    """At Llama-3's vocabulary a whole fp32 table is 2.1 GB; the rows of the calibration tokens give the same
    embeddings (scaled ones included), and a token outside them fails instead of reading a wrong row."""
    model = build_family("gemma3_text")  # a scaled embedding with a padding index
    outer, _ = _split(model)
    runner = LayerwiseModel(model.config)
    ids = token_ids()
    embedding = model.get_input_embeddings()
    unused = next(token for token in range(embedding.num_embeddings) if token not in ids)
    with runner._outer(outer, runner.input_names, ids):
        assert runner.embedding.weight.shape[0] == len(torch.unique(ids))
        torch.testing.assert_close(runner.embedding(ids), embedding(ids), rtol=0, atol=0)
        with pytest.raises(IndexError):
            runner.embedding(torch.tensor([[unused]]))
    assert "forward" not in vars(runner.embedding) and runner.embedding.padding_idx == embedding.padding_idx
