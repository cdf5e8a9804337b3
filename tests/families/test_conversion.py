"""Every family converts with every strategy exactly, into its native sibling where one holds the plan and
into moeforge's architecture (the family's own decoder) otherwise."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeforge  # noqa: F401  (registers moeforge's architecture)
from moeforge.config.moice import MoiceSpec
from moeforge.config.recipe import parse_recipe
from moeforge.conversion import ConversionResult, convert
from moeforge.errors import MoeforgeError
from moeforge.families import dense_family
from moeforge.modeling.moice import apply_moice
from tests.families.tiny import FAMILY_CONFIGS, build_family, save_family, token_ids

AUTO_TARGET = {
    "llama": "mixtral",
    "mistral": "mixtral",
    "qwen2": "qwen2_moe",
    "qwen3": "qwen3_moe",
    "qwen3_5_text": "qwen3_5_moe_text",
    "gemma3_text": "moeforge",
    "gemma4_text": "moeforge",
    "granite": "granitemoe",
    "smollm3": "moeforge",
    "olmo2": "flex_olmo",
    "olmo3": "moeforge",
    "glm4": "moeforge",
    "phi3": "moeforge",
    "ernie4_5": "ernie4_5_moe",
    "exaone4": "moeforge",
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "partition_k_eq_e": {"init": "partition", "num_experts": 4, "top_k": 4},
    "granular": {"init": "granular", "num_experts": 4, "granularity": 2, "top_k": 2},
    "shared_and_dense_layers": {"num_experts": 4, "top_k": 2, "shared": {"num_experts": 1}, "placement": {"moe_layer_freq": 2}},
    "pmoe_gmm_gate": {"num_experts": {"0-1": 2, "2-3": 4}, "top_k": 2, "routing": {"gate_type": "gmm"}},
}


def convert_tiny(source: Path, output: Path, moe: dict[str, Any], **top: Any) -> ConversionResult:
    recipe = parse_recipe({"source": str(source), "output": str(output), "moe": moe, "calibration": {"num_sequences": 2}} | top)
    return convert(recipe, log=lambda _line: None)


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_copy_upcycling_is_exact(family_sources, tmp_path, family):
    result = convert_tiny(family_sources[family], tmp_path / "moe", {"num_experts": 4, "top_k": 2})
    assert result.export == AUTO_TARGET[family]
    assert result.fidelity.passed and result.fidelity.max_abs_logit_diff <= 1e-4
    ids = token_ids()
    dense = logits(family_sources[family], ids)
    torch.testing.assert_close(logits(tmp_path / "moe", ids), dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_exact_strategies(family_sources, tmp_path, family, strategy):
    moe = STRATEGIES[strategy]
    if strategy == "pmoe_gmm_gate":  # a per-layer expert count for each of the family's layers
        layers = FAMILY_CONFIGS[family].get("num_hidden_layers", 3)
        moe = {**moe, "num_experts": {"0-1": 2, f"2-{layers - 1}": 4}}
    result = convert_tiny(family_sources[family], tmp_path / "moe", moe)
    assert result.plan.exact and result.fidelity.passed
    ids = token_ids()
    torch.testing.assert_close(logits(tmp_path / "moe", ids), logits(family_sources[family], ids), atol=1e-4, rtol=0)
    if strategy == "pmoe_gmm_gate":
        assert result.export == "moeforge"


def test_a_native_that_cannot_hold_the_source_names_the_reason(family_sources, tmp_path):
    with pytest.raises(MoeforgeError, match="export: mixtral cannot hold this conversion exactly: Mixtral has no decoder like GLM-4's"):
        convert_tiny(family_sources["glm4"], tmp_path / "a", {"num_experts": 4}, export="mixtral")
    with pytest.raises(MoeforgeError, match="export: flex_olmo cannot hold .*dense layers.* for this source: flex_olmo, moeforge"):
        convert_tiny(family_sources["olmo2"], tmp_path / "b", {"num_experts": 4, "placement": {"layers": [1]}}, export="flex_olmo")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_qwen3_with_mixed_layer_types_goes_to_moeforge(tmp_path):
    """qwen3_moe windows every layer or none: a Qwen3 with sliding and full layers keeps its own decoder."""
    source = save_family(tmp_path / "src", "qwen3", use_sliding_window=True, sliding_window=12, max_window_layers=1)
    assert len(set(AutoModelForCausalLM.from_pretrained(source).config.layer_types)) == 2
    with pytest.raises(MoeforgeError, match="both sliding and full attention layers"):
        convert_tiny(source, tmp_path / "native", {"num_experts": 4}, export="qwen3_moe")
    result = convert_tiny(source, tmp_path / "moe", {"num_experts": 4})
    assert result.export == "moeforge"
    ids = token_ids()
    torch.testing.assert_close(logits(tmp_path / "moe", ids), logits(source, ids), atol=1e-4, rtol=0)


def test_multimodal_checkpoint_is_refused_with_its_text_family(tmp_path):
    from transformers import Gemma3Config

    Gemma3Config(
        text_config=FAMILY_CONFIGS["gemma3_text"] | {"hidden_size": 64}, architectures=["Gemma3ForConditionalGeneration"]
    ).save_pretrained(tmp_path / "mm")
    with pytest.raises(
        MoeforgeError,
        match=r"'gemma3' \(Gemma3ForConditionalGeneration\) is a multimodal model; moeforge works on text decoders: use a gemma3_text checkpoint",
    ):
        convert_tiny(tmp_path / "mm", tmp_path / "out", {"num_experts": 4})


MOICE_FAMILIES = [family for family in FAMILY_CONFIGS if dense_family(family).llama_attention]


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_moice_where_the_attention_allows_it(family):
    """Identical RoPE bases give the original model for any router, where MoICE applies; elsewhere a clear refusal."""
    model = build_family(family)
    if family not in MOICE_FAMILIES:
        with pytest.raises(MoeforgeError, match=f"moice: {family} attention is not Llama-style"):
            apply_moice(model, MoiceSpec())
        return
    spec = MoiceSpec(base_set=[_theta(model.config)] * 3, topk=2)
    mixed = copy.deepcopy(model)
    apply_moice(mixed, spec, seed=0)
    with torch.no_grad():
        for name, parameter in mixed.named_parameters():
            if "moice_router" in name:
                parameter.normal_(0, 3.0)
        ids = token_ids()
        torch.testing.assert_close(mixed.eval()(ids).logits, model(ids).logits, atol=2e-5, rtol=0)


def _theta(config) -> float:
    return float(config.rope_parameters["rope_theta"])


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "qwen3_5_text", "granite"])
def test_approximate_strategies_fit_on_the_family(family_sources, tmp_path, family):
    """Importance partition, k-means routers on the router's real input and the least-squares scale read the
    family's own FFN (fused or not, its activation): the fitted model is closer to the dense one than the
    analytic scale alone, and nothing claims exactness."""
    moe = {
        "init": "partition",
        "num_experts": 4,
        "top_k": 2,
        "partition": {"method": "importance"},
        "routing": {"router_init": "kmeans"},
        "shared": {"num_experts": 1, "selection": "importance"},
    }
    fitted = convert_tiny(family_sources[family], tmp_path / "fitted", moe, calibration={"num_sequences": 4, "sequence_length": 32})
    analytic = convert_tiny(
        family_sources[family], tmp_path / "analytic", {**moe, "scale": "analytic"}, calibration={"num_sequences": 4, "sequence_length": 32}
    )
    assert not fitted.plan.exact and not fitted.fidelity.exact_expected
    assert fitted.fidelity.mean_abs_logit_diff < analytic.fidelity.mean_abs_logit_diff
