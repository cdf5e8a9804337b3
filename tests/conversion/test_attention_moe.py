"""Converting dense attention into attention MoE (``attention_moe:``): exact at top_k = all groups with a zero
router, approximate below, composable with FFN MoE; its router init and shared-group choice; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moeforge.cli.inspect_cmd import describe_layer
from moeforge.config.recipe import Calibration, parse_recipe
from moeforge.conversion import convert
from moeforge.data.calibration import calibration_ids
from moeforge.errors import MoeforgeError
from moeforge.io.inspection import inspect_checkpoint
from moeforge.io.loading import load_tokenizer
from tests.conversion.conftest import dense_logits, load_logits, run_convert
from tests.families.tiny import save_family
from tests.helpers import build_tiny_llama, make_tiny_llama_config, make_tiny_tokenizer, save_tiny_llama

HEADS = {
    # name: (query heads, KV heads, hidden size)
    "gqa_4_2": (4, 2, 64),
    "mqa_6_1": (6, 1, 48),
    "odd_6_3": (6, 3, 48),
    "mha_4_4": (4, 4, 64),
}
ROUTER = "model.layers.{}.self_attn.head_gate.router.weight"
FFN_MOE = {"num_experts": 4, "top_k": 2}


@pytest.fixture(scope="module")
def head_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attention_sources")
    return {
        name: save_tiny_llama(
            root / name,
            make_tiny_llama_config(initializer_range=0.2, num_attention_heads=q, num_key_value_heads=kv, hidden_size=hidden),
            seed=1,
        )
        for name, (q, kv, hidden) in HEADS.items()
    }


def _saved(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """The converted checkpoint's config, provenance and tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in path.glob("*.safetensors"):
        tensors |= load_file(shard)
    return json.loads((path / "config.json").read_text()), json.loads((path / "moeforge.json").read_text()), tensors


EXACT = {
    # name: (attention_moe section, moe section); top_k = every routed group, router and scale auto
    "kv_groups": ({"top_k": 9}, FFN_MOE),  # top_k clipped below per variant
    "one_group_per_head": ({"num_experts": "heads", "top_k": 99}, FFN_MOE),
    "shared_first": ({"shared": 1, "shared_selection": "first", "top_k": 99}, FFN_MOE),
    "shared_importance": ({"shared": 1, "top_k": 99}, FFN_MOE),
    "ffn_kmeans_after_attention": ({"top_k": 99}, {**FFN_MOE, "routing": {"router_init": "kmeans"}}),
    "some_layers_ffn_dense_elsewhere": ({"top_k": 99, "placement": {"layers": [0, 2]}}, {**FFN_MOE, "placement": {"layers": [1]}}),
}


def _resolved(section: dict, variant: str) -> dict:
    """The section with ``heads`` and an oversized top_k made concrete for this head layout (all routed groups)."""
    heads, kv_heads, _ = HEADS[variant]
    groups = heads if section.get("num_experts") == "heads" else kv_heads
    section = {**section, **({"num_experts": groups} if section.get("num_experts") == "heads" else {})}
    return {**section, "top_k": groups - section.get("shared", 0)}


@pytest.mark.parametrize(
    ("case", "variant"),
    # multi-query attention has one KV group: nothing left to route once it is shared
    [(case, variant) for case in sorted(EXACT) for variant in sorted(HEADS) if not (variant == "mqa_6_1" and "shared" in EXACT[case][0])],
)
def test_top_k_all_reproduces_the_dense_logits(case, variant, head_sources, input_ids, tmp_path):
    section, moe = EXACT[case]
    section = _resolved(section, variant)
    source = head_sources[variant]
    result = run_convert(source, tmp_path / "moe", moe, attention_moe=section)
    assert result.export == "moeforge" and result.plan.exact
    assert result.fidelity.exact_expected and result.fidelity.passed and result.fidelity.top1_agreement == 1.0
    reference = dense_logits(source, input_ids)
    assert reference.abs().max() > 1.0  # the check is not vacuous
    torch.testing.assert_close(load_logits(tmp_path / "moe", input_ids), reference, atol=1e-5, rtol=1e-5)
    config, provenance, tensors = _saved(tmp_path / "moe")
    chosen = [i for i, plan in enumerate(result.plan.attention_layers) if plan is not None]
    assert [i for i, entry in enumerate(config["attention_moe_layers"]) if entry] == chosen
    for index in chosen:
        entry, info = config["attention_moe_layers"][index], provenance["attention_layers"][index]
        assert entry["top_k"] == section["top_k"] and entry["scale"] == section["top_k"]
        assert info["router_init"] == "zeros" and info["exact"] and info["shared_experts"] == entry["shared_experts"]
        assert ROUTER.format(index) in provenance["newly_initialized"]
        assert torch.count_nonzero(tensors[ROUTER.format(index)]) == 0
    rows = inspect_checkpoint(tmp_path / "moe")["layers"]
    assert [index for index, row in enumerate(rows) if "attention moe" in describe_layer(row)] == chosen


def test_top_k_below_all_is_approximate_and_the_checkpoint_computes_what_was_reported(head_sources, tmp_path):
    source = head_sources["mqa_6_1"]
    result = run_convert(source, tmp_path / "moe", FFN_MOE, attention_moe={"num_experts": 3, "top_k": 2}, seed=3)
    assert not result.plan.exact and not result.fidelity.exact_expected and result.fidelity.passed
    assert result.fidelity.max_abs_logit_diff > 1e-3
    assert {plan.router_init for plan in result.plan.attention_moe_layers} == {"random"}
    ids, _ = calibration_ids(Calibration(), load_tokenizer(source), 256, torch.Generator().manual_seed(3))
    ids = ids[-(result.fidelity.tokens // ids.shape[1]) :]  # nothing was fitted: the report used every sequence
    import moeforge  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.exp(loss).item() == pytest.approx(result.fidelity.perplexity_moe, rel=1e-4)


@pytest.mark.parametrize("method", ["zeros", "random", "kmeans"])
def test_router_init_shape_and_determinism(method, head_sources, tmp_path):
    source = head_sources["odd_6_3"]  # 3 groups, one shared: routers over 2 groups of a 48-wide input
    section = {"top_k": 1, "shared": 1, "router_init": method}
    routers = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_convert(source, tmp_path / name, FFN_MOE, attention_moe=section, seed=seed)
        routers.append(_saved(tmp_path / name)[2][ROUTER.format(1)])
    assert routers[0].shape == (2, 48)
    assert torch.equal(routers[0], routers[1])
    if method == "zeros":
        assert torch.count_nonzero(routers[0]) == 0 and torch.equal(routers[0], routers[2])
    else:
        assert torch.count_nonzero(routers[0]) == routers[0].numel() and not torch.equal(routers[0], routers[2])


def test_shared_importance_picks_the_group_with_the_largest_output(tmp_path, input_ids):
    config = make_tiny_llama_config(initializer_range=0.2, num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    model = build_tiny_llama(config, seed=1)
    with torch.no_grad():  # group 2 = heads 4-5 = o_proj columns 32-47, made the loudest in every layer
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:] *= 20
    model.save_pretrained(tmp_path / "src")
    make_tiny_tokenizer().save_pretrained(tmp_path / "src")
    importance = run_convert(tmp_path / "src", tmp_path / "imp", FFN_MOE, attention_moe={"shared": 1, "top_k": 2})
    assert all(layer["shared_experts"] == [2] for layer in _saved(tmp_path / "imp")[1]["attention_layers"])
    assert _saved(tmp_path / "imp")[0]["attention_moe_layers"][0]["shared_experts"] == [2]
    assert importance.fidelity.passed
    torch.testing.assert_close(load_logits(tmp_path / "imp", input_ids), dense_logits(tmp_path / "src", input_ids), atol=1e-4, rtol=1e-5)
    run_convert(tmp_path / "src", tmp_path / "first", FFN_MOE, attention_moe={"shared": 1, "shared_selection": "first", "top_k": 2})
    assert all(layer["shared_experts"] == [0] for layer in _saved(tmp_path / "first")[1]["attention_layers"])


PLAN_ERRORS = {
    # name: (source variant, attention_moe section, top-level keys, message)
    "groups do not divide heads": (
        "gqa_4_2",
        {"num_experts": 3, "top_k": 1},
        {},
        "attention_moe.num_experts: num_experts 3 does not divide the 4 query heads",
    ),
    "groups split a KV group": ("odd_6_3", {"num_experts": 2, "top_k": 1}, {}, "attention_moe.num_experts: groups of 3 heads would split"),
    "top_k above routed": ("gqa_4_2", {"top_k": 3}, {}, "attention_moe.top_k: 3 is larger than the 2 routed groups"),
    "all groups shared": (
        "gqa_4_2",
        {"shared": 2, "top_k": 1},
        {},
        "attention_moe.shared: 2 shared of the 2 groups leaves no routed group",
    ),
    "missing layer": ("gqa_4_2", {"placement": {"layers": [5]}}, {}, "attention_moe.placement.layers: layer 5 does not exist"),
    "no layer": ("gqa_4_2", {"placement": {"keep_last_dense": 3}}, {}, "attention_moe.placement selects no layer"),
    "native export": ("gqa_4_2", {}, {"export": "mixtral"}, "export: mixtral cannot hold this conversion exactly: attention MoE"),
}


@pytest.mark.parametrize("case", sorted(PLAN_ERRORS))
def test_impossible_attention_moe_is_one_line_naming_the_key(case, head_sources, tmp_path):
    variant, section, top, message = PLAN_ERRORS[case]
    with pytest.raises(MoeforgeError, match=message) as caught:
        run_convert(head_sources[variant], tmp_path / "out", FFN_MOE, attention_moe=section, **top)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_family_without_llama_attention_is_refused(tmp_path):
    source = save_family(tmp_path / "gemma", "gemma3_text")
    with pytest.raises(MoeforgeError, match=r"attention_moe: gemma3_text attention is not Llama's") as caught:
        run_convert(source, tmp_path / "out", FFN_MOE, attention_moe={})
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_attention_moe_alone_keeps_the_ffns_dense(head_sources, input_ids, tmp_path):
    source = head_sources["gqa_4_2"]
    recipe = parse_recipe({"source": str(source), "output": str(tmp_path / "moe"), "moe": None, "attention_moe": {"top_k": 2}})
    result = convert(recipe, log=lambda _line: None)
    assert result.export == "moeforge" and not result.plan.moe_layers and result.plan.exact and result.fidelity.passed
    torch.testing.assert_close(load_logits(tmp_path / "moe", input_ids), dense_logits(source, input_ids), atol=1e-5, rtol=1e-5)
    config, _, tensors = _saved(tmp_path / "moe")
    assert config["moe_layers"] == [None] * 3 and all(config["attention_moe_layers"])
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # the dense FFN as it was


def test_without_fidelity_check_the_attention_is_rewritten_while_streaming(head_sources, input_ids, tmp_path):
    source = head_sources["odd_6_3"]
    result = run_convert(source, tmp_path / "moe", FFN_MOE, attention_moe={"top_k": 3}, fidelity={"check": False})
    assert result.fidelity is None and result.plan.exact
    torch.testing.assert_close(load_logits(tmp_path / "moe", input_ids), dense_logits(source, input_ids), atol=1e-5, rtol=1e-5)


def test_auto_scale_is_top_k(head_sources, tmp_path):
    """A selected group keeps about its dense weight: its renormalised weight times top_k."""
    run_convert(head_sources["odd_6_3"], tmp_path / "moe", FFN_MOE, attention_moe={"top_k": 2}, seed=0)
    config, provenance, _ = _saved(tmp_path / "moe")
    assert [layer["scale"] for layer in config["attention_moe_layers"]] == [2.0] * 3
    assert [layer["scale"] for layer in provenance["attention_layers"]] == [2.0] * 3
