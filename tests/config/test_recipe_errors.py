"""A bad recipe is reported whole, on one line: every problem, a did-you-mean for unknown keys, the doc
that lists the keys; bytes that are not UTF-8 and integers no run could use are named, not tracebacks."""

from __future__ import annotations

import pytest

from moeforge.config.recipe import load_recipe, parse_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError

CONVERT_DOC = '(the keys are listed in README.md, section "Recipe reference")'


def _error(data, **kwargs) -> str:
    with pytest.raises(MoeforgeError) as caught:
        parse_recipe(data, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_one_problem_is_one_line_with_a_guess_and_the_doc() -> None:
    message = _error({"source": "x", "output": "y", "moe": {"num_expert": 4}})
    assert message == f"recipe: moe.num_expert: unknown key, did you mean moe.num_experts? {CONVERT_DOC}"


def test_every_problem_is_reported_at_once() -> None:
    message = _error({"output": "y", "top_k": 2, "moe": {"init": "clone", "copy": {"nois": 0.1}}})
    assert message == (
        "recipe: 4 problems: source: required key is missing; "
        "moe.init: Input should be 'copy', 'partition' or 'granular' (got 'clone'); "
        "moe.copy.nois: unknown key, did you mean moe.copy.noise?; "
        f"top_k: unknown key, did you mean moe.top_k or attention_moe.top_k? {CONVERT_DOC}"
    )


@pytest.mark.parametrize(
    ("data", "guess"),
    [
        ({"seed_": 1}, "seed_: unknown key, did you mean seed?"),  # a typo at its own level
        (
            {"expert_top_k": 1},
            "expert_top_k: unknown key, did you mean moe.top_k or attention_moe.top_k?",
        ),  # an alias of other sections' keys
        ({"moe": {"seed": 1}}, "moe.seed: unknown key, did you mean seed?"),  # a key one level too deep
        ({"moe": {"gate_type": "mlp"}}, "moe.gate_type: unknown key, did you mean moe.routing.gate_type?"),
        ({"moe": {"moe_start_layr": 4}}, "moe.moe_start_layr: unknown key, did you mean moe.placement.moe_start_layer?"),
        ({"moe": {"xyzzy": 1}}, "moe.xyzzy: unknown key (the keys"),  # nothing close: no guess
    ],
)
def test_did_you_mean_looks_at_this_level_and_across_sections(data, guess) -> None:
    assert guess in _error({"source": "x", "output": "y", **data})


def test_train_recipe_keys_point_to_their_section_docs() -> None:
    base = {"stage": "pt", "model": "m", "output": "o", "data": {"builtin": "pt-demo"}}
    message = _error({**base, "training": {"learnig_rate": 1e-3}, "adapter": {"lora_rnk": 4}}, model=TrainRecipe)
    assert message == (
        "recipe: 2 problems: adapter.lora_rnk: unknown key, did you mean adapter.rank?; "
        "training.learnig_rate: unknown key, did you mean training.learning_rate? "
        '(the keys are listed in docs/adapters.md, section "The adapter: section" and README.md, section "Training")'
    )
    assert "did you mean data.train.0.path?" in _error({**base, "data": {"train": [{"paht": "a.jsonl"}]}}, model=TrainRecipe)


def test_a_union_reports_its_branches_under_one_key() -> None:
    message = _error({"source": "x", "output": "y", "moe": {"placement": {"layers": "some"}}})
    assert message == "recipe: moe.placement.layers: Input should be 'all' or a valid list (got 'some')"


@pytest.mark.parametrize(
    ("data", "model", "message"),
    [
        ({"source": "x", "output": "y", "seed": 99999999999999999999}, None, "seed: 99999999999999999999 is out of range"),
        ({"source": "x", "output": "y", "seed": 2**32}, None, "seed: Input should be less than 4294967296 (got 4294967296)"),
        ({"source": "x", "output": "y", "moe": {"num_experts": [4, 2**70]}}, None, f"moe.num_experts.1: {2**70} is out of range"),
        (
            {"stage": "pt", "model": "m", "output": "o", "data": {"builtin": "pt-demo"}, "training": {"seed": -1}},
            TrainRecipe,
            "training.seed: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            {"stage": "pt", "model": "m", "output": "o", "data": {"builtin": "pt-demo", "mix_seed": 2**40}},
            TrainRecipe,
            "data.mix_seed: Input should be less than 4294967296",
        ),
    ],
)
def test_integers_out_of_range_are_named(data, model, message) -> None:
    assert message in _error(data, **({"model": model} if model else {}))


def test_a_recipe_that_is_not_utf8_is_named(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes("source: x\noutput: y\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(MoeforgeError) as caught:
        load_recipe(path)
    assert str(caught.value) == f"recipe {path}: not UTF-8 text (byte 0xe9 on line 3); save it as UTF-8"


def test_an_out_of_range_seed_in_a_file_names_file_and_key(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("source: x\noutput: y\nseed: 99999999999999999999\n")
    with pytest.raises(
        MoeforgeError, match=rf"^recipe {path}: seed: 99999999999999999999 is out of range \(at most 9223372036854775807\)$"
    ):
        load_recipe(path)
