"""Every CLI option with choices offers exactly what the typed config (or the library) accepts."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Literal

import pytest

from moeforge.cli.choices import field_choices, literal_values
from moeforge.cli.main import build_parser
from moeforge.config.data import DataSource
from moeforge.config.experts import EXPERTS_BACKENDS
from moeforge.config.importers.imported import Kind
from moeforge.config.recipe import ConvertRecipe, MoESpec, PartitionInit, Routing
from moeforge.config.train_recipe import TrainRecipe
from moeforge.data.formats import STAGES
from moeforge.eval.inputs import EvalStage
from moeforge.eval.probes import PROBE_KINDS
from moeforge.io.embedded import EMBEDDED_ALIASES

EXPECTED = {
    ("convert", "--init"): field_choices(MoESpec, "init"),
    ("convert", "--partition-method"): field_choices(PartitionInit, "method"),
    ("convert", "--gate-type"): field_choices(Routing, "gate_type"),
    ("convert", "--router-init"): field_choices(Routing, "router_init"),
    ("convert", "--export"): field_choices(ConvertRecipe, "export"),
    ("convert", "--dtype"): field_choices(ConvertRecipe, "dtype"),
    ("train", "--stage"): field_choices(TrainRecipe, "stage"),
    ("train", "--preset"): field_choices(TrainRecipe, "preset"),
    ("eval", "--stage"): literal_values(EvalStage),
    ("eval", "--dtype"): field_choices(TrainRecipe, "dtype"),
    ("eval", "--experts-backend"): list(EXPERTS_BACKENDS),
    ("eval", "--probe"): list(PROBE_KINDS),
    ("data check", "--stage"): list(STAGES),
    ("data check", "--format"): field_choices(DataSource, "format"),
    ("data convert", "--stage"): list(STAGES),
    ("data convert", "--format"): field_choices(DataSource, "format"),
    ("chat", "--dtype"): field_choices(TrainRecipe, "dtype"),
    ("chat", "--experts-backend"): list(EXPERTS_BACKENDS),
    ("merge", "--dtype"): field_choices(TrainRecipe, "dtype"),
    ("fetch-default", "name"): list(EMBEDDED_ALIASES),
    ("import-config", "--kind"): literal_values(Kind),
}


def _options_with_choices(parser: argparse.ArgumentParser, command: str = "") -> Iterator[tuple[tuple[str, str], list]]:
    """``((command, option), choices)`` for every option of every (nested) subcommand that has choices."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _options_with_choices(subparser, f"{command} {name}".strip())
        elif action.choices is not None:
            yield (command, action.option_strings[0] if action.option_strings else action.dest), list(action.choices)


def test_every_option_offers_what_the_config_accepts() -> None:
    found = dict(_options_with_choices(build_parser()))
    assert found == EXPECTED


def test_the_recipe_values_reach_the_flags() -> None:
    """The values that once drifted: train's moice preset and convert's auto dtype."""
    found = dict(_options_with_choices(build_parser()))
    assert found["train", "--preset"] == ["router_only", "experts_only", "moice"]
    assert found["train", "--stage"] == ["pt", "sft", "dpo"]
    assert found["convert", "--dtype"] == ["auto", "float32", "bfloat16", "float16"]
    assert found["chat", "--dtype"] == ["float32", "bfloat16"]
    assert found["eval", "--probe"] == ["kv", "mdqa"]


def test_train_accepts_the_moice_preset() -> None:
    args = build_parser().parse_args(["train", "recipe.yaml", "--preset", "moice"])
    assert args.preset == "moice"


def test_a_value_outside_the_recipe_type_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "recipe.yaml", "--preset", "everything"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --preset: invalid choice: 'everything' (choose from " in err
    assert all(preset in err for preset in ("router_only", "experts_only", "moice"))


@pytest.mark.parametrize(
    ("annotation", "values"),
    [
        (Literal["a", "b"], ["a", "b"]),
        (Literal["a", "b"] | None, ["a", "b"]),
        (list[Literal["a", "b"]], ["a", "b"]),
        (Literal["a"] | Literal["b"], ["a", "b"]),
    ],
)
def test_literal_values(annotation: object, values: list[str]) -> None:
    assert literal_values(annotation) == values


@pytest.mark.parametrize("annotation", [str, float | Literal["auto"], list[int]])
def test_a_type_without_a_closed_set_of_values_is_a_programming_error(annotation: object) -> None:
    with pytest.raises(TypeError, match="is not a Literal"):
        literal_values(annotation)
