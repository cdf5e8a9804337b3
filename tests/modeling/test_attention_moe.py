"""Attention MoE (head groups chosen per token): the dense identity at full top-k for every head layout and
Llama-style family, the cache and batched generation, the skipped-groups path against a masked dense
reference, the other families' own attention gated at o_proj's input (against the same reference; gradient
checkpointing, copies, pickling; MoICE refused), gradients, the checkpoint round trip, composition with FFN MoE and with MoICE on the same layers,
config validation, and the router contract (labels, freezing roles, balance loss, aux-free bias)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeforge.config.router_losses import RouterLossConfig
from moeforge.errors import MoeforgeError
from moeforge.families import softmax_attention_layers
from moeforge.modeling import AttentionMoeLayerSpec, AttentionRouter, HeadGroupGate, MoeforgeAttentionMoE, causal_lm_class, moeforge_config
from moeforge.modeling import llama_attention as llama_attention_module
from moeforge.modeling.moice import MoiceAttention
from moeforge.routing.aux_free import AuxFreeBalancer
from moeforge.routing.detection import find_routers
from moeforge.routing.hooks import attach_router_losses
from moeforge.training.freeze import apply_freeze, parameter_roles
from tests.families.tiny import build_family, token_ids
from tests.helpers import build_tiny_llama, make_tiny_llama_config, sharpen

THETA = 10000.0  # the tiny Llama's RoPE base
pytestmark = pytest.mark.filterwarnings("ignore:router layers .* the balance loss is constant")  # full top-k, on purpose

# (query heads, KV heads, groups): GQA by KV group, finer (one head per group) and coarser (two KV heads per
# group), MQA, MHA, and an odd count
LAYOUTS = [
    pytest.param(4, 2, 2, id="gqa"),
    pytest.param(4, 2, 4, id="gqa-finer"),
    pytest.param(8, 4, 2, id="gqa-coarser"),
    pytest.param(6, 1, 3, id="mqa"),
    pytest.param(4, 4, 2, id="mha"),
    pytest.param(6, 3, 3, id="odd"),
]


def _dense(heads: int = 4, kv_heads: int = 2, **overrides) -> torch.nn.Module:
    config = make_tiny_llama_config(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=48, **overrides)
    return sharpen(build_tiny_llama(config)).eval()


def _spec(groups: int, top_k: int | None = None, shared: tuple[int, ...] = (), scale: float | None = None) -> dict:
    routed = groups - len(shared)
    return {"num_experts": groups, "top_k": top_k or routed, "shared_experts": list(shared), "scale": float(scale or routed)}


def _attention_moe(dense: torch.nn.Module, specs: list, moe_layers: list | None = None, router_std: float = 0.0, **settings):
    """moeforge's architecture over ``dense``'s weights with ``specs`` per layer (a dict for every layer, or a
    list); routers zero (``router_std`` 0) or random. Only the head routers (and experts) are new weights."""
    layers = dense.config.num_hidden_layers
    specs = specs if isinstance(specs, list) else [specs] * layers
    config = moeforge_config(dense.config, moe_layers, attention_moe_layers=specs, **settings)
    model = causal_lm_class(config)(config)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert all(".head_gate.router." in name or ".mlp." in name for name in missing) and all(".mlp." in n for n in unexpected)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, AttentionRouter)):
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * router_std)
    return model.eval()


def _tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


# ---------------------------------------------------------------------------------------- the dense identity


@pytest.mark.parametrize(("heads", "kv_heads", "groups"), LAYOUTS)
def test_full_top_k_with_a_zero_router_is_the_dense_model(heads, kv_heads, groups):
    dense = _dense(heads, kv_heads)
    model = _attention_moe(dense, _spec(groups))
    tokens = _tokens()
    torch.testing.assert_close(_logits(model, tokens), _logits(dense, tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("heads", "kv_heads", "groups", "shared"), [(4, 2, 4, (1,)), (6, 3, 3, (0, 2)), (6, 1, 3, (2,))])
def test_shared_groups_plus_all_routed_is_the_dense_model(heads, kv_heads, groups, shared):
    dense = _dense(heads, kv_heads)
    model = _attention_moe(dense, _spec(groups, shared=shared))
    tokens = _tokens()
    torch.testing.assert_close(_logits(model, tokens), _logits(dense, tokens), rtol=0, atol=1e-6)


def test_below_full_top_k_is_not_the_dense_model():
    """The identity test's sanity check: with fewer groups selected the output does change."""
    dense = _dense()
    model = _attention_moe(dense, _spec(4, top_k=2), router_std=1.0)
    tokens = _tokens()
    assert (_logits(model, tokens) - _logits(dense, tokens)).abs().max() > 1e-3


def test_gate_weights_per_head():
    """1 for a shared group, scale · renormalised top-k weight for a selected routed group, 0 otherwise."""
    spec = AttentionMoeLayerSpec(num_experts=4, top_k=2, shared_experts=(3,), scale=3.0)
    gate = HeadGroupGate(hidden_size=8, num_heads=8, spec=spec)
    torch.nn.init.normal_(gate.router.weight)
    hidden = torch.randn(2, 5, 8)
    gates = gate(hidden)
    logits = hidden.reshape(-1, 8) @ gate.router.weight.T
    top = torch.softmax(logits, -1).topk(2, -1)
    expected = torch.zeros(10, 4).scatter(-1, top.indices, 3.0 * top.values / top.values.sum(-1, keepdim=True))
    expected[:, 3] = 1.0
    assert gates.shape == (2, 5, 8)
    torch.testing.assert_close(gates.reshape(10, 8), expected.repeat_interleave(2, dim=1))


# ------------------------------------------------------------------------------------ cache and generation


@pytest.mark.parametrize(("heads", "kv_heads", "groups", "shared"), [(4, 2, 2, ()), (4, 2, 4, (0,)), (6, 1, 3, ()), (4, 4, 2, ())])
def test_incremental_decoding_equals_the_full_forward(heads, kv_heads, groups, shared):
    model = _attention_moe(_dense(heads, kv_heads), _spec(groups, top_k=1, shared=shared), router_std=1.0)
    tokens = _tokens(length=12)
    with torch.no_grad():
        full = model(tokens).logits
        prefix = model(tokens[:, :7], use_cache=True)
        cache, steps = prefix.past_key_values, [prefix.logits]
        for i in range(7, 12):
            out = model(tokens[:, i : i + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_left_padded_batched_generation_matches_rows_alone():
    model = _attention_moe(_dense(), _spec(4, top_k=1), router_std=1.0)
    short, long = _tokens(1, 5, seed=1), _tokens(1, 9, seed=2)
    pad = 3
    batch = torch.cat([torch.cat([torch.full((1, 4), pad), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    alone = [model.generate(row, max_new_tokens=6, do_sample=False, pad_token_id=pad) for row in (short, long)]
    assert torch.equal(together[0, 4:], alone[0][0])
    assert torch.equal(together[1], alone[1][0])
    assert len(set(together[1, 9:].tolist())) > 1  # not a degenerate constant continuation


# ------------------------------------------------------------------------------ the skipped-groups path


def _masked_dense_reference(dense: torch.nn.Module, model: torch.nn.Module) -> list:
    """Hooks making ``dense`` compute every head and multiply each head's output (the input of ``o_proj``) by
    the gate ``model``'s head gate gives it: attention MoE by definition, without skipping anything."""
    hooks, inputs = [], {}
    for index, layer in enumerate(dense.model.layers):
        gate = getattr(getattr(model.model.layers[index], "self_attn", None), "head_gate", None)
        if gate is None:  # a layer without attention MoE (or without attention: Qwen3.5's linear layers)
            continue

        def remember(_module, _args, kwargs, index=index):
            inputs[index] = kwargs["hidden_states"]

        def mask(_module, args, index=index, gate=gate):
            (heads,) = args
            weights = gate(inputs[index]).repeat_interleave(heads.shape[-1] // gate.head_column.numel(), dim=-1)
            return (heads * weights.to(heads.dtype),)

        hooks.append(layer.self_attn.register_forward_pre_hook(remember, with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(mask))
    return hooks


class _HeadCountSpy:
    """Stands in for transformers' attention registry: records the query head count of every call."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.heads: list[int] = []

    def get_interface(self, name: str, default):
        real = self.registry.get_interface(name, default)

        def attention(module, query, *args, **kwargs):
            self.heads.append(query.shape[1])
            return real(module, query, *args, **kwargs)

        return attention


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(("heads", "kv_heads", "groups"), [(4, 2, 4), (4, 2, 2), (8, 4, 2), (6, 3, 3), (4, 4, 2)])
def test_one_token_decoding_attends_only_over_the_selected_groups(heads, kv_heads, groups, implementation, monkeypatch):
    dense = _dense(heads, kv_heads)
    model = _attention_moe(dense, _spec(groups, top_k=1), router_std=1.0)
    for each in (dense, model):
        each.set_attn_implementation(implementation)
    tokens = _tokens(batch=1, length=10, seed=3)
    hooks = _masked_dense_reference(dense, model)
    with torch.no_grad():
        expected = dense(tokens).logits
        prefix = model(tokens[:, :9], use_cache=True)
        spy = _HeadCountSpy(llama_attention_module.ALL_ATTENTION_FUNCTIONS)
        monkeypatch.setattr(llama_attention_module, "ALL_ATTENTION_FUNCTIONS", spy)
        step = model(tokens[:, 9:], cache=prefix.past_key_values, use_cache=True).logits
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(prefix.logits, expected[:, :9], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[:, -1], expected[:, -1], rtol=0, atol=1e-5)
    # the selected group's query heads, widened to every query head of the KV heads it reads (so MQA, one KV
    # head, cannot skip anything)
    computed = max(heads // groups, heads // kv_heads)
    assert spy.heads == [computed] * dense.config.num_hidden_layers
    assert computed < heads


def test_kv_heads_that_are_not_consecutive_are_gathered_by_index(monkeypatch):
    """Groups 0 and 2 of 4 (one per KV head), forced by the routers' selection bias: the attention runs on
    those two KV heads' query heads, taken by index (consecutive ones are a slice), and equals the masked dense
    layer in prefill and in one-token decoding."""
    dense = _dense(heads=8, kv_heads=4)
    model = _attention_moe(dense, _spec(4, top_k=2), router_std=1.0)
    for router in (m for m in model.modules() if isinstance(m, AttentionRouter)):
        router.enable_expert_bias()
        router.expert_bias.copy_(torch.tensor([100.0, -100.0, 100.0, -100.0]))
    tokens = _tokens(batch=1, length=10, seed=4)
    hooks = _masked_dense_reference(dense, model)
    spy = _HeadCountSpy(llama_attention_module.ALL_ATTENTION_FUNCTIONS)
    monkeypatch.setattr(llama_attention_module, "ALL_ATTENTION_FUNCTIONS", spy)
    with torch.no_grad():
        expected = dense(tokens).logits
        prefix = model(tokens[:, :9], use_cache=True)
        step = model(tokens[:, 9:], cache=prefix.past_key_values, use_cache=True).logits
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(prefix.logits, expected[:, :9], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[:, -1], expected[:, -1], rtol=0, atol=1e-5)
    assert spy.heads == [4] * (2 * dense.config.num_hidden_layers)  # 2 of 4 KV heads x 2 query heads, both passes
    gate = model.model.layers[0].self_attn
    chosen = gate._computed_kv_heads(gate.head_gate(torch.randn(1, 3, dense.config.hidden_size)))
    assert isinstance(chosen, torch.Tensor) and chosen.tolist() == [0, 2]


# -------------------------------------------------------------------------------------------- gradients


def _lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """The plain LM loss (no router losses: those would give routers a gradient of their own)."""
    logits = model(tokens).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_routers_and_projections_get_gradients_below_full_top_k():
    model = _attention_moe(_dense(), _spec(4, top_k=2), router_std=1.0).train()
    _lm_loss(model, _tokens()).backward()
    for name, parameter in model.named_parameters():
        if ".self_attn." in name:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name


def test_top_1_router_gets_no_lm_gradient():
    """Like an FFN router: at top_k = 1 the renormalised weight is 1 whatever the logits, so only the
    router losses train the choice (the projections still learn)."""
    model = _attention_moe(_dense(), _spec(4, top_k=1), router_std=1.0).train()
    _lm_loss(model, _tokens()).backward()
    for name, parameter in model.named_parameters():
        if ".head_gate." in name:
            assert parameter.grad is None or parameter.grad.abs().max() < 1e-7, name  # w / w: round-off only
        elif ".q_proj." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------ checkpoints


def test_save_and_auto_from_pretrained_round_trip(tmp_path: Path):
    model = _attention_moe(_dense(), [_spec(4, top_k=2), None, _spec(2, top_k=1)], router_std=1.0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    saved = (tmp_path / "config.json").read_text()
    assert '"attention_moe_layers"' in saved and (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.attention_moe_layers == model.config.attention_moe_layers
    assert isinstance(loaded.model.layers[0].self_attn, MoeforgeAttentionMoE)
    assert not isinstance(loaded.model.layers[1].self_attn, MoeforgeAttentionMoE)
    tokens = _tokens()
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))

    low = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert low.model.layers[0].self_attn.head_gate.router.weight.dtype == torch.bfloat16
    got = _logits(low, tokens).float()
    assert torch.isfinite(got).all()
    assert (got.argmax(-1) == _logits(model, tokens).argmax(-1)).float().mean() > 0.9


# --------------------------------------------------------------------------------- composition with FFN MoE


def _copy_experts(dense: torch.nn.Module, model: torch.nn.Module, layers: list[int]) -> None:
    """Every expert of ``layers`` a copy of the dense FFN: renormalised top-k over them is the dense FFN."""
    with torch.no_grad():
        for index in layers:
            mlp, block = dense.model.layers[index].mlp, model.model.layers[index].mlp
            block.experts.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).expand_as(block.experts.gate_up_proj))
            block.experts.down_proj.copy_(mlp.down_proj.weight.expand_as(block.experts.down_proj))


@pytest.mark.parametrize("ffn_layers", [[0, 1, 2], [1]], ids=["same-layers", "different-layers"])
def test_ffn_moe_and_attention_moe_compose_exactly(ffn_layers):
    dense = _dense()
    ffn = {"num_experts": 3, "top_k": 2, "expert_intermediate_size": dense.config.intermediate_size}
    moe_layers = [ffn if i in ffn_layers else None for i in range(3)]
    attention = [_spec(4), _spec(2), None] if ffn_layers == [1] else _spec(2)
    model = _attention_moe(dense, attention, moe_layers)
    _copy_experts(dense, model, ffn_layers)
    tokens = _tokens()
    torch.testing.assert_close(_logits(model, tokens), _logits(dense, tokens), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ families


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "granite"])
def test_llama_style_families_are_exact_at_full_top_k(family):
    dense = build_family(family)
    specs = [_spec(2), _spec(4, shared=(0,)), None]
    config = moeforge_config(dense.config, None, attention_moe_layers=specs)
    model = causal_lm_class(config)(config)
    missing, _ = model.load_state_dict(dense.state_dict(), strict=False)
    assert all(".head_gate." in name for name in missing)
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, AttentionRouter)):
            router.weight.zero_()
    tokens = token_ids()  # longer than Mistral's window
    torch.testing.assert_close(_logits(model.eval(), tokens), _logits(dense, tokens), rtol=1e-6, atol=1e-5)


def _head_gated(family: str, router_std: float = 1.0):
    """The tiny ``family`` model and its attention MoE (4 one-head groups, top-2) on every softmax-attention layer."""
    dense = build_family(family)
    attention = softmax_attention_layers(dense.config)
    specs = [_spec(4, top_k=2) if index in attention else None for index in range(dense.config.num_hidden_layers)]
    return dense, _attention_moe(dense, specs, router_std=router_std)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_text", "phi3", "qwen3_5_text", "olmo2"])
def test_other_families_keep_their_attention_and_gate_heads_at_o_proj(family):
    """The family's own attention module and forward (a subclass of its class), whose o_proj input is multiplied
    by the head gates: the dense model with that multiplication done by hand computes the same logits."""
    dense, model = _head_gated(family)
    for index in softmax_attention_layers(dense.config):
        attention = model.model.layers[index].self_attn
        assert isinstance(attention, type(dense.model.layers[index].self_attn)) and not isinstance(attention, MoeforgeAttentionMoE)
    hooks = _masked_dense_reference(dense, model)
    tokens = token_ids(length=20)
    expected = _logits(dense, tokens)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=0, atol=1e-5)
    assert (expected - _logits(dense, tokens)).abs().max() > 1e-3  # the gates matter


def test_head_gated_attention_survives_checkpointing_copies_and_pickling(tmp_path: Path):
    """Nothing is left on the module between calls: gradient checkpointing (which reruns the forward) gives the
    same gradients, a deep copy (a DPO reference model) and a model unpickled in a fresh interpreter (which has
    not built the head-gated class yet) the same logits."""
    import pickle
    import subprocess
    import sys

    _, model = _head_gated("gemma3_text")
    tokens = token_ids(length=20)
    expected = _logits(model, tokens)
    assert all(isinstance(module.o_proj, torch.nn.Linear) for module in model.modules() if hasattr(module, "head_gate"))
    assert torch.equal(_logits(copy.deepcopy(model), tokens), expected)

    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    torch.save(tokens, tmp_path / "tokens.pt")
    model_file, tokens_file, logits_file = (str(tmp_path / name) for name in ("model.pkl", "tokens.pt", "logits.pt"))
    code = f"import pickle, torch; m = pickle.load(open({model_file!r}, 'rb')); torch.save(m(torch.load({tokens_file!r})).logits.detach(), {logits_file!r})"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)

    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        _lm_loss(model, tokens).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if ".head_gate." in name})
    assert grads[0] and all(torch.allclose(grads[0][name], grads[1][name], atol=1e-7) for name in grads[0])


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_lora_on_o_proj_sees_the_gated_heads(family):
    """A LoRA adapter on ``o_proj`` gets the same (gated) input as the projection it adapts, in both kinds of
    attention MoE: merged into ``o_proj`` it computes what it computed as an adapter."""
    from peft import LoraConfig, get_peft_model

    _, model = _head_gated(family)
    tokens = token_ids(length=20)
    plain = _logits(model, tokens)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    unmerged = _logits(adapted, tokens)
    assert (unmerged - plain).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(_logits(adapted.merge_and_unload(), tokens), unmerged, rtol=1e-5, atol=1e-4)


def test_an_attention_without_a_linear_o_proj_over_its_heads_is_refused():
    from moeforge.modeling.attention_moe import with_head_gate

    attention = build_family("gemma3_text").model.layers[0].self_attn
    attention.o_proj = torch.nn.Identity()
    with pytest.raises(MoeforgeError, match=r"^attention_moe: Gemma3Attention.o_proj is not a linear map of 4 heads' outputs"):
        with_head_gate(attention, AttentionMoeLayerSpec(num_experts=2, top_k=1))


def test_moice_is_refused_on_a_family_without_llama_attention():
    from moeforge.config.moice import MoiceSpec
    from moeforge.modeling.moice import apply_moice

    _, model = _head_gated("gemma3_text")
    with pytest.raises(MoeforgeError, match=r"^moice: gemma3_text attention is not Llama-style") as raised:
        apply_moice(model, MoiceSpec(), seed=0)
    assert "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"num_experts": 3, "top_k": 1}, "num_experts 3 does not divide the 4 query heads"),
        ({"num_experts": 4, "top_k": 1}, "groups of 3 heads would split the 4 query heads of a KV head unevenly"),
        ({"num_experts": 2, "top_k": 1, "shared_experts": [2]}, r"shared_experts \[2\] must be distinct groups 0-1"),
        ({"num_experts": 2, "top_k": 1, "shared_experts": [0, 0]}, r"shared_experts \[0, 0\] must be distinct"),
        ({"num_experts": 2, "top_k": 2, "shared_experts": [0]}, "top_k 2 must be between 1 and the 1 routed groups"),
        ({"num_experts": 2, "top_k": 0}, "top_k 0 must be between 1 and the 2 routed groups"),
    ],
)
def test_bad_layer_specs_are_refused_naming_the_layer(spec, message):
    heads, kv = (12, 3) if "unevenly" in message else (4, 2)
    dense_config = make_tiny_llama_config(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=48)
    with pytest.raises(ValueError, match=rf"attention_moe_layers\[1\]: .*{message}"):
        moeforge_config(dense_config, None, attention_moe_layers=[None, spec, None])


def test_a_layer_without_softmax_attention_is_refused():
    dense_config = build_family("qwen3_5_text").config  # layers 0 and 2: linear attention
    with pytest.raises(ValueError, match=r"attention_moe_layers\[2\]: the layer has linear attention, no attention heads to group"):
        moeforge_config(dense_config, None, attention_moe_layers=[None, _spec(2), _spec(2), None])


# ------------------------------------------------------------------------------- MoICE on the same layers


def _with_moice(model, **spec):
    from moeforge.config.moice import MoiceSpec
    from moeforge.modeling.moice import apply_moice

    model = copy.deepcopy(model)
    apply_moice(model, MoiceSpec(**spec), seed=0)
    return model.eval()


def test_moice_with_only_the_native_base_is_the_attention_moe_model():
    """MoICE over attention MoE takes over the head gate (same parameter, same name) and gates its mixture
    of bases with it: with the native base alone the mixture is the attention, so nothing changes."""
    model = _attention_moe(_dense(), [_spec(4, top_k=2, shared=(0,)), _spec(2, top_k=1), None], router_std=1.0)
    moice = _with_moice(model, base_set=[THETA])
    attention = moice.model.layers[0].self_attn
    assert isinstance(attention, MoiceAttention) and isinstance(attention.head_gate, HeadGroupGate)
    assert "model.layers.0.self_attn.head_gate.router.weight" in dict(moice.named_parameters())
    tokens = _tokens()
    torch.testing.assert_close(_logits(moice, tokens), _logits(model, tokens), rtol=0, atol=1e-6)


def test_moice_over_attention_moe_applies_the_head_gate():
    """With several bases the head gate still weights the heads: the reference is the same MoICE (same seeded
    routers) over the dense model, its ``o_proj`` input multiplied by hand by the same head gates."""
    model = _attention_moe(_dense(), _spec(4, top_k=2), router_std=1.0)
    moice = _with_moice(model, topk=2)
    plain = _with_moice(_dense(), topk=2)  # the same MoICE routers (seeded) without head gates
    hooks = _masked_dense_reference(plain, moice)
    tokens = _tokens()
    expected = _logits(plain, tokens)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(_logits(moice, tokens), expected, rtol=0, atol=1e-5)
    assert (expected - _logits(plain, tokens)).abs().max() > 1e-3  # the gate matters


def test_moice_over_attention_moe_round_trip_restores_both(tmp_path: Path):
    from moeforge.io.loading import load_model

    model = _attention_moe(_dense(), _spec(4, top_k=2), router_std=1.0, router_aux_free=True)
    moice = _with_moice(model, topk=2)
    with torch.no_grad():
        moice.model.layers[1].self_attn.head_gate.router.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.25]))
    moice.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    attention = loaded.model.layers[1].self_attn
    assert isinstance(attention, MoiceAttention) and isinstance(attention.head_gate, HeadGroupGate)
    assert torch.equal(attention.head_gate.router.expert_bias, torch.tensor([0.5, -0.5, 0.0, 0.25]))
    tokens = _tokens()
    assert torch.equal(_logits(loaded, tokens), _logits(moice, tokens))


# -------------------------------------------------------------- the router contract: labels, freezing, losses


def _ffn_and_heads(router_std: float = 1.0, **settings):
    """FFN MoE (3 experts, top-1) on layers 1-2, attention MoE (4 groups, top-1) on layers 0-1."""
    dense = _dense()
    ffn = {"num_experts": 3, "top_k": 1, "expert_intermediate_size": 32}
    return _attention_moe(dense, [_spec(4, top_k=1), _spec(4, top_k=1), None], [None, ffn, ffn], router_std=router_std, **settings)


def test_head_routers_are_found_and_labelled_apart_from_moice_and_ffn_routers():
    model = _with_moice(_ffn_and_heads(), topk=2, layers=[1])
    labels = {ref.label: ref for ref in find_routers(model)}
    assert list(labels) == ["0.heads", "1.heads", "1.attn", "1", "2"]
    assert labels["1.heads"].module is model.model.layers[1].self_attn.head_gate.router
    assert (labels["1.heads"].num_experts, labels["1.heads"].top_k, labels["1.heads"].per_token) == (4, 1, 1)
    assert labels["1.heads"].balance_coef is None  # the recipe's router losses, like an FFN router


@pytest.mark.parametrize(
    ("groups", "trained"),
    [
        (["attention_router"], {"experts", "attention", "embeddings", "norms", "router", "dense_layers"}),
        (["attention"], {"experts", "attention_router", "embeddings", "norms", "router", "dense_layers"}),
        (["all_but_new"], {"attention_router", "router"}),
    ],
)
def test_freeze_roles_of_head_routers(groups, trained):
    model = _ffn_and_heads()
    roles = parameter_roles(model)
    assert roles["model.layers.0.self_attn.head_gate.router.weight"] == "attention_router"
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "attention"
    apply_freeze(model, groups)
    assert {roles[name] for name, p in model.named_parameters() if p.requires_grad} == trained


def _hand_balance(calls: list, mask: torch.Tensor) -> torch.Tensor:
    """``E · Σ_e f_e · P_e`` per router call over the real tokens, averaged over the calls (layers)."""
    per_layer = []
    for logits, _, indices in calls:
        real, chosen = logits.reshape(-1, logits.shape[-1])[mask], indices.reshape(-1, indices.shape[-1])[mask]
        experts = real.shape[-1]
        share = torch.nn.functional.one_hot(chosen, experts).sum(1).float().mean(0)
        per_layer.append(experts * (share * real.softmax(-1).mean(0)).sum())
    return torch.stack(per_layer).mean()


def _balance(model, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(the handle's balance loss, the hand-computed one)`` of one training forward."""
    calls: list = []
    routers = [ref.module for ref in find_routers(model)]
    hooks = [router.register_forward_hook(lambda _m, _a, out: calls.append(out)) for router in routers]
    handle = attach_router_losses(model, RouterLossConfig(balance_coef=1.0))
    model.train()
    model(tokens, attention_mask=mask, labels=tokens)
    for hook in hooks:
        hook.remove()
    handle.detach()
    return handle.losses["balance"], _hand_balance(calls, mask.reshape(-1).bool())


def test_balance_loss_averages_head_and_ffn_routers_per_layer_over_real_tokens():
    model = _ffn_and_heads()
    tokens = _tokens(batch=2, length=10)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # left padding: not routing
    balance, expected = _balance(model, tokens, mask)
    torch.testing.assert_close(balance, expected)
    padded_as_real, _ = _balance(model, tokens, torch.ones_like(tokens))
    assert (padded_as_real - balance).abs() > 1e-4

    router = model.model.layers[0].self_attn.head_gate.router
    skew = torch.tensor([100.0, 0.0, 0.0, 0.0])
    router.logits = lambda hidden: torch.nn.functional.linear(hidden, router.weight) + skew  # group 0 for every token
    skewed, expected = _balance(model, tokens, mask)
    torch.testing.assert_close(skewed, expected)
    assert skewed > balance + 0.5  # layer 0's term is now E · 1 · 1 = 4


def test_aux_free_gives_head_routers_a_bias_that_save_and_load_keep(tmp_path: Path):
    model = _ffn_and_heads()
    balancer = AuxFreeBalancer(attach_router_losses(model, RouterLossConfig()), rate=0.1)
    assert len(balancer.routers) == 4 and model.config.router_aux_free
    model.train()
    model(_tokens())
    balancer.step()
    bias = model.model.layers[0].self_attn.head_gate.router.expert_bias
    assert bias.abs().sum() > 0  # the top-1 load of 24 tokens over 4 groups is uneven
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.layers[0].self_attn.head_gate.router.expert_bias, bias)
    tokens = _tokens(seed=1)
    assert torch.equal(_logits(loaded, tokens), _logits(model.eval(), tokens))
