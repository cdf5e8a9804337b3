"""moeforge's architecture over Llama: structure, initialisation, save/load through the Auto classes, generation,
the upcycling identity (identical experts == the dense model), experts backends, and training gradients."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

import moeforge  # noqa: F401  (registers moeforge's architecture with the Auto classes)
from moeforge.modeling import (
    GMMRouter,
    LinearRouter,
    MoeforgeForCausalLM,
    MoeforgeSharedExperts,
    MoeforgeSparseMoeBlock,
    MoeLayerSpec,
    architecture,
    moeforge_config,
)
from tests.helpers import moeforge_llama_config, sharpen

LLAMA = architecture("llama")

BASE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
SPEC1 = MoeLayerSpec(4, 2, 48)
SPEC2 = MoeLayerSpec(6, 1, 32, shared_intermediate_size=16, gate_type="gmm")
MOE_LAYERS = [None, SPEC1.to_dict(), SPEC2.to_dict()]


def make_config(**overrides: Any):
    values = {**BASE, "moe_layers": MOE_LAYERS}
    values.update(overrides)
    return moeforge_llama_config(values.pop("moe_layers"), **values)


def build(config=None, seed: int = 0):
    torch.manual_seed(seed)
    return MoeforgeForCausalLM(config or make_config()).eval()


def input_ids(batch: int = 2, length: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- structure


def test_layers_get_the_block_their_spec_asks_for() -> None:
    model = build()
    layers = model.model.layers
    assert type(layers[0].mlp) is LlamaMLP
    for idx, spec in ((1, SPEC1), (2, SPEC2)):
        block = layers[idx].mlp
        assert isinstance(block, MoeforgeSparseMoeBlock)
        assert block.spec == spec == model.config.layer_spec(idx)
        assert block.gate.num_experts == spec.num_experts and block.gate.top_k == spec.top_k
        assert block.experts.num_experts == spec.num_experts
        assert block.experts.intermediate_dim == spec.expert_intermediate_size
    assert model.config.layer_spec(0) is None
    assert type(layers[1].mlp.gate) is LinearRouter and layers[1].mlp.shared_expert is None
    assert type(layers[2].mlp.gate) is GMMRouter
    assert isinstance(layers[2].mlp.shared_expert, MoeforgeSharedExperts)
    assert layers[2].mlp.shared_expert.intermediate_size == 16


def test_parameter_names_and_shapes() -> None:
    shapes = {n: tuple(p.shape) for n, p in build().named_parameters()}
    expected = {
        "model.layers.0.mlp.gate_proj.weight": (96, 64),
        "model.layers.0.mlp.down_proj.weight": (64, 96),
        "model.layers.1.mlp.gate.weight": (4, 64),
        "model.layers.1.mlp.experts.gate_up_proj": (4, 96, 64),
        "model.layers.1.mlp.experts.down_proj": (4, 64, 48),
        "model.layers.2.mlp.gate.means": (6, 64),
        "model.layers.2.mlp.gate.log_scales": (6, 64),
        "model.layers.2.mlp.experts.gate_up_proj": (6, 64, 64),
        "model.layers.2.mlp.experts.down_proj": (6, 64, 32),
        "model.layers.2.mlp.shared_expert.gate_proj.weight": (16, 64),
        "model.layers.2.mlp.shared_expert.up_proj.weight": (16, 64),
        "model.layers.2.mlp.shared_expert.down_proj.weight": (64, 16),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    moe_names = {n for n in shapes if n.startswith(("model.layers.1.mlp.", "model.layers.2.mlp."))}
    assert moe_names == {n for n in expected if not n.startswith("model.layers.0.")}
    assert not any(n.startswith("model.layers.1.mlp.gate_proj") for n in shapes)


def test_config_without_moe_layers_is_plain_llama() -> None:
    config = moeforge_llama_config(**BASE)
    assert config.moe_layers == [None, None, None]
    model = build(config)
    assert all(type(layer.mlp) is LlamaMLP for layer in model.model.layers)


@pytest.mark.parametrize("moe_layers", [[None, None], [None, None, None, SPEC1.to_dict()], []])
def test_moe_layers_length_must_match_num_hidden_layers(moe_layers: list) -> None:
    with pytest.raises(ValueError, match="moe_layers"):
        make_config(moe_layers=moe_layers)


# --------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("gate1", ["linear", "mlp"])
def test_all_parameters_are_initialised(gate1: str) -> None:
    """Nothing is left as torch.empty garbage: weights have std ≈ initializer_range (a non-default value, so a
    torch default init would be caught too), norms are ones, GMM gates start at N(0, 1) means / unit scales."""
    std = 0.05
    spec1 = MoeLayerSpec(4, 2, 48, gate_type=gate1, gate_hidden_size=40).to_dict()
    model = build(make_config(initializer_range=std, moe_layers=[None, spec1, SPEC2.to_dict()]))
    seen = set()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("log_scales"):
            assert torch.all(p == 0), name
        elif name.endswith("gate.means"):
            assert 0.8 < p.std().item() < 1.2 and abs(p.mean().item()) < 0.2, name
        elif p.ndim == 1:
            assert torch.all(p == 1.0), name
        else:
            assert 0.85 * std < p.std().item() < 1.15 * std, (name, p.std().item())
            assert abs(p.mean().item()) < 0.2 * std, name
        seen.add(name)
    router = {"linear": ["weight"], "mlp": ["fc1.weight", "fc2.weight"]}[gate1]
    assert {f"model.layers.1.mlp.gate.{n}" for n in router} <= seen


def test_from_config_gives_the_moeforge_class() -> None:
    model = AutoModelForCausalLM.from_config(make_config())
    assert type(model) is LLAMA.causal_lm_class
    assert type(model).__name__ == "MoeforgeLlamaForCausalLM"
    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(model.model.layers[1].mlp, MoeforgeSparseMoeBlock)


def test_forward_shows_the_familys_parameters() -> None:
    """Trainer keeps the dataset columns, and generate passes the kwargs, that the forward's signature names."""
    assert inspect.signature(build().forward) == inspect.signature(LlamaForCausalLM(LlamaConfig(**BASE)).forward)


# --------------------------------------------------------------------------------------------- save / load


def test_config_round_trip_keeps_moe_layers(tmp_path: Path) -> None:
    config = make_config()
    assert LLAMA.config_class.from_dict(config.to_dict()).moe_layers == MOE_LAYERS
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert (raw["model_type"], raw["base_model_type"]) == ("moeforge", "llama")
    assert raw["moe_layers"] == MOE_LAYERS
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is LLAMA.config_class and isinstance(loaded, LlamaConfig)
    assert loaded.moe_layers == MOE_LAYERS
    assert [loaded.layer_spec(i) for i in range(3)] == [None, SPEC1, SPEC2]


def test_save_pretrained_then_auto_from_pretrained_is_identical(tmp_path: Path) -> None:
    model = build()
    sharpen(model)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path, safe_serialization=True)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LLAMA.causal_lm_class
    assert loaded.config.moe_layers == MOE_LAYERS
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name
    # Equal weights, but not bit-equal logits: the loaded experts are memory-mapped at addresses that are only
    # 8-byte aligned, and CPU grouped_mm then sums in another order (differences ~1e-7).
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- generation


def test_generate_with_cache_equals_greedy_without_cache() -> None:
    model = build()
    sharpen(model)
    ids = input_ids(length=5)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        manual = ids
        for _ in range(8):  # greedy, full recomputation each step
            next_token = model(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, next_token], dim=-1)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, manual)
    assert len(set(cached[:, 5:].flatten().tolist())) > 1  # not a degenerate constant continuation


# --------------------------------------------------------------------------------------------- upcycling identity


def _upcycle_from(dense: LlamaForCausalLM, moe_layers: list, shared: int = 0):
    """A moeforge model holding ``dense``'s weights, each MoE layer's dense FFN split into a shared expert (its
    first ``shared`` intermediate units) and identical routed experts (the remaining units). Routers stay
    random."""
    config = moeforge_config(dense.config, moe_layers)
    moe = build(config, seed=7)
    sharpen(moe, seed=8)  # random routers, and no weight that the copy below misses can pass unnoticed
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    moe_idx = [i for i, s in enumerate(moe_layers) if s is not None]
    assert {k.split(".mlp.")[0] for k in unexpected} == {f"model.layers.{i}" for i in moe_idx}
    assert all(".mlp." in k for k in missing)
    with torch.no_grad():
        for i in moe_idx:
            mlp, block = dense.model.layers[i].mlp, moe.model.layers[i].mlp
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            if shared:
                block.shared_expert.gate_proj.weight.copy_(gate[:shared])
                block.shared_expert.up_proj.weight.copy_(up[:shared])
                block.shared_expert.down_proj.weight.copy_(down[:, :shared])
            block.experts.gate_up_proj.copy_(torch.cat([gate[shared:], up[shared:]], dim=0).expand_as(block.experts.gate_up_proj))
            block.experts.down_proj.copy_(down[:, shared:].expand_as(block.experts.down_proj))
    return moe


UPCYCLE_CASES = [
    pytest.param(
        [MoeLayerSpec(4, 2, 96).to_dict(), None, MoeLayerSpec(3, 3, 96, gate_type="gmm").to_dict()],
        0,
        id="linear-k2+gmm-k3",
    ),
    pytest.param(
        [
            None,
            MoeLayerSpec(5, 1, 96, gate_type="mlp", gate_hidden_size=16).to_dict(),
            MoeLayerSpec(4, 2, 96, scoring="topk_then_softmax").to_dict(),
        ],
        0,
        id="mlp-k1+topk_then_softmax",
    ),
    pytest.param(
        [MoeLayerSpec(4, 2, 64, shared_intermediate_size=32).to_dict()] * 2
        + [MoeLayerSpec(6, 3, 64, shared_intermediate_size=32, gate_type="gmm").to_dict()],
        32,
        id="shared-split",
    ),
]


@pytest.mark.parametrize(("moe_layers", "shared"), UPCYCLE_CASES)
@pytest.mark.parametrize("impl", ["default", "eager", "batched_mm"])
def test_identical_experts_reproduce_the_dense_model(moe_layers: list, shared: int, impl: str) -> None:
    """The core upcycling identity: renormalised top-k over identical experts (plus the shared part of the
    split FFN) is exactly the dense FFN, whatever the router says."""
    dense_config = LlamaConfig(**BASE)
    torch.manual_seed(3)
    dense = LlamaForCausalLM(dense_config).eval()
    sharpen(dense, seed=4)
    moe = _upcycle_from(dense, moe_layers, shared)
    if impl != "default":
        moe.set_experts_implementation(impl)
    ids = input_ids(batch=3, length=9)
    with torch.no_grad():
        expected = dense(ids).logits
        got = moe(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_identity_needs_renormalised_weights() -> None:
    """Sanity check of the identity test: with unnormalised top-k the same construction is NOT the dense model."""
    torch.manual_seed(3)
    dense = LlamaForCausalLM(LlamaConfig(**BASE)).eval()
    sharpen(dense, seed=4)
    moe = _upcycle_from(dense, [None, MoeLayerSpec(4, 2, 96, normalize=False).to_dict(), None])
    ids = input_ids()
    with torch.no_grad():
        assert not torch.allclose(moe(ids).logits, dense(ids).logits, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------- backends


def test_default_experts_implementation_matches_eager() -> None:
    model = build()
    sharpen(model)
    experts = model.model.layers[1].mlp.experts
    default = model.config._experts_implementation
    assert default not in (None, "eager")  # otherwise this test compares eager with itself
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
        model.set_experts_implementation("eager")
        assert experts.config._experts_implementation == "eager"
        eager = model(ids).logits
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5)


def test_block_output_shape_and_token_independence() -> None:
    model = build()
    sharpen(model)
    for block in (model.model.layers[1].mlp, model.model.layers[2].mlp):
        x = torch.randn(2, 5, 64)
        with torch.no_grad():
            out = block(x)
            assert out.shape == x.shape and out.dtype == x.dtype
            # each token is routed on its own: a sub-batch gives the same rows
            torch.testing.assert_close(block(x[1:, 2:]), out[1:, 2:], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(block(x.reshape(10, 64)), out.reshape(10, 64), rtol=1e-6, atol=1e-6)


def test_shared_expert_is_added_to_routed_output() -> None:
    model = build()
    sharpen(model)
    block = model.model.layers[2].mlp
    x = torch.randn(6, 64)
    with torch.no_grad():
        _, weights, indices = block.gate(x)
        routed = block.experts(x, indices, weights)
        torch.testing.assert_close(block(x), routed + block.shared_expert(x), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- training


def test_training_step_reaches_every_router_and_expert() -> None:
    spec2 = MoeLayerSpec(6, 2, 32, shared_intermediate_size=16, gate_type="gmm").to_dict()
    spec0 = MoeLayerSpec(3, 2, 32, gate_type="mlp", gate_hidden_size=16).to_dict()
    model = build(make_config(moe_layers=[spec0, SPEC1.to_dict(), spec2]))
    sharpen(model)
    model.train()
    ids = input_ids(batch=4, length=12)
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    checked = 0
    for name, p in model.named_parameters():
        if ".mlp.gate." in name or ".mlp.experts." in name or ".mlp.shared_expert." in name:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name  # top-k ≥ 2: routers learn through the weights
            checked += 1
    assert checked == 2 + 3 + 2 + 2 + 3 + 2  # mlp gate + experts, linear gate + experts, gmm + experts + shared


def test_top1_router_gets_gradient_only_when_unnormalised() -> None:
    """A renormalised top-1 weight is identically 1, so its router has no gradient signal; Switch-style
    unnormalised top-1 keeps one."""
    grads = {}
    for normalize in (True, False):
        spec = MoeLayerSpec(4, 1, 32, normalize=normalize).to_dict()
        model = build(make_config(moe_layers=[None, spec, None]))
        sharpen(model)
        ids = input_ids()
        model(ids, labels=ids).loss.backward()
        assert model.model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0
        grads[normalize] = model.model.layers[1].mlp.gate.weight.grad
    assert grads[True] is not None and grads[False] is not None
    assert grads[True].abs().max() < 1e-6
    assert grads[False].abs().max() > 1e-4


def test_bf16_forward_runs_routing_in_fp32_and_matches_fp32() -> None:
    model = build()
    sharpen(model)
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)
        block = low.model.layers[2].mlp
        x = torch.randn(5, 64, dtype=torch.bfloat16)
        router_logits, weights, _ = block.gate(x)
        assert router_logits.dtype == torch.float32 and weights.dtype == torch.float32
        assert block(x).dtype == torch.bfloat16
        got = low(ids).logits.float()
    # bf16 noise may flip a few near-tied routing decisions; most of the logits must agree closely
    close = torch.isclose(got, ref, rtol=0.1, atol=0.1).float().mean()
    assert close > 0.9
    assert low.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_experts_backend_does_not_depend_on_what_was_loaded_before() -> None:
    """transformers caches "can this class set its experts implementation" per class; building a Llama first
    must not leak Llama's cached False into moeforge's Llama (which would silently force eager experts).
    A fresh interpreter, since the cache lives on the classes."""
    import subprocess
    import sys

    code = (
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from moeforge.modeling import MoeforgeForCausalLM, MoeLayerSpec, moeforge_config\n"
        "small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)\n"
        "LlamaForCausalLM(LlamaConfig(**small))\n"
        "moe = MoeforgeForCausalLM(moeforge_config(LlamaConfig(**small), [MoeLayerSpec(2, 1, 16).to_dict()]))\n"
        "print(moe.config._experts_implementation)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    assert out not in ("None", "eager")


def test_checkpoints_of_moeforge_0_1_still_load(tmp_path: Path) -> None:
    """moeforge 0.1 wrote ``model_type: moeforge_llama``: such a checkpoint loads as moeforge's Llama, unchanged."""
    model = build()
    sharpen(model)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("base_model_type")
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "moeforge_llama"}))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LLAMA.causal_lm_class and loaded.config.base_model_type == "llama"
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_config_of_an_unknown_family_is_refused(tmp_path: Path) -> None:
    make_config().save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "base_model_type": "gpt2"}))
    with pytest.raises(ValueError, match="base_model_type 'gpt2' is not a model family moeforge knows"):
        AutoConfig.from_pretrained(tmp_path)


def test_config_pickles_into_a_process_that_never_built_the_family(tmp_path: Path) -> None:
    """Classes are built per family at run time; they are still importable by name, so a pickled config loads
    in a fresh interpreter (as data loaders and launchers that pickle objects need)."""
    import pickle
    import subprocess
    import sys

    (tmp_path / "config.pkl").write_bytes(pickle.dumps(make_config()))
    code = f"import pickle; c = pickle.load(open({str(tmp_path / 'config.pkl')!r}, 'rb')); print(type(c).__name__, c.base_model_type, len(c.moe_layers))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["MoeforgeLlamaConfig", "llama", "3"]
