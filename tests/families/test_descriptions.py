"""The family descriptions agree with transformers: every name they declare exists where they say."""

from __future__ import annotations

import dataclasses

import pytest
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moeforge.families import DENSE_FAMILIES, NATIVE_MOES, dense_family, native_moe
from tests.families.tiny import FAMILY_CONFIGS, build_family


def test_every_family_has_a_tiny_test_model():
    assert set(FAMILY_CONFIGS) == {family.model_type for family in DENSE_FAMILIES}


@pytest.mark.parametrize("family", DENSE_FAMILIES, ids=lambda f: f.model_type)
def test_dense_family_names_exist(family):
    model = build_family(family.model_type)
    assert family.activation(model.config) in transformers.activations.ACT2FN
    state = model.state_dict()
    for index in range(model.config.num_hidden_layers):
        for name in family.ffn.weight_names():
            assert f"model.layers.{index}.{name}" in state
    for sibling in family.siblings:
        assert native_moe(sibling.target) is not None, sibling.target


@pytest.mark.parametrize("native", NATIVE_MOES, ids=lambda n: n.model_type)
def test_native_config_fields_exist(native):
    config_class = getattr(transformers, native.config_class)
    assert CONFIG_MAPPING[native.model_type] is config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    declared = [*native.fields.values(), *native.constants, *([native.norm_flag] if native.norm_flag else [])]
    assert set(declared) <= fields, set(declared) - fields
    if native.dense_layers:
        assert "mlp_only_layers" in fields
    assert any(native.model_type in [s.target for s in family.siblings] for family in DENSE_FAMILIES)


def test_unknown_family():
    assert dense_family("gpt2") is None and native_moe("gpt2") is None
