"""The convert recipe's ``attention_moe:`` section: defaults, aliases, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from moeforge.config.recipe import parse_recipe
from moeforge.errors import MoeforgeError


def _recipe(section):
    return parse_recipe({"source": "x", "output": "y", "attention_moe": section})


def test_absent_by_default_and_defaults_when_present() -> None:
    assert parse_recipe({"source": "x", "output": "y"}).attention_moe is None
    section = _recipe({}).attention_moe
    assert section is not None
    assert (section.num_experts, section.top_k, section.shared, section.shared_selection) == ("kv_groups", 2, 0, "importance")
    assert (section.router_init, section.scale, section.placement.layers) == ("auto", "auto", "all")


def test_expert_top_k_is_an_alias_and_numbers_are_kept() -> None:
    section = _recipe({"num_experts": 6, "expert_top_k": 3, "shared": 2, "scale": 1.5, "placement": {"layers": [1]}}).attention_moe
    assert section is not None
    assert (section.num_experts, section.top_k, section.shared, section.scale, section.placement.layers) == (6, 3, 2, 1.5, [1])


ERRORS = {
    "unknown key": ({"groups": 3}, "attention_moe.groups: unknown key"),
    "top_k zero": ({"top_k": 0}, "attention_moe.top_k: Input should be greater than or equal to 1"),
    "groups zero": ({"num_experts": 0}, "attention_moe: num_experts: 0 must be >= 1"),
    "groups word": ({"num_experts": "heads"}, "attention_moe.num_experts: Input should be a valid integer"),
    "all shared": ({"num_experts": 3, "shared": 3}, "attention_moe: shared: 3 must be below num_experts 3"),
    "top_k above routed": ({"num_experts": 4, "shared": 1, "top_k": 4}, "attention_moe: top_k: 4 is larger than the 3 routed groups"),
    "selection": ({"shared_selection": "random"}, "attention_moe.shared_selection: Input should be 'importance' or 'first'"),
    "router init": ({"router_init": "virtual_groups"}, "attention_moe.router_init: Input should be"),
    "std": ({"router_init_std": 0}, "attention_moe.router_init_std: Input should be greater than 0"),
    "scale": ({"scale": -1}, "attention_moe: scale: -1.0 must be > 0"),
    "placement": (
        {"placement": {"moe_layer_freq": 0}},
        "attention_moe.placement.moe_layer_freq: Input should be greater than or equal to 1",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_values_are_one_line_naming_the_key(case) -> None:
    section, message = ERRORS[case]
    with pytest.raises(MoeforgeError) as caught:
        _recipe(section)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"recipe: {message}")


def test_moe_null_needs_attention_moe() -> None:
    assert parse_recipe({"source": "x", "output": "y", "moe": None, "attention_moe": {}}).moe is None
    with pytest.raises(MoeforgeError) as caught:
        parse_recipe({"source": "x", "output": "y", "moe": None})
    assert str(caught.value) == (
        "recipe: attention_moe: required when moe is null (the FFNs stay dense: nothing else to convert); add it or give moe: settings"
    )
