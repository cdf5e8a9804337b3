"""Dense2MoE in one command: a training recipe that converts first (``convert:`` inline, or ``model:`` naming a
convert recipe), trains the converted model, chains the provenance, and on ``resume`` reuses the conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moeforge.config.recipe import ConvertRecipe, load_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import FidelityError, MoeforgeError
from moeforge.training import runner, train
from tests.training.conftest import MOE, make_recipe, provenance


def _convert(dense: Path, **extra: object) -> dict[str, object]:
    return {"source": str(dense), "export": "mixtral", "moe": MOE, **extra}


@pytest.fixture(scope="module")
def converted_run(models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str], int]:
    """One inline-convert pt run of 2 steps, then the same recipe resumed to 3 steps: (output, each run's log,
    the conversion's moeforge.json mtime after the first run)."""
    out = tmp_path_factory.mktemp("dense2moe") / "run"
    first: list[str] = []
    resumed: list[str] = []
    train(make_recipe("pt", None, out, convert=_convert(models["dense"])), log=first.append)
    written = (out / "converted" / "moeforge.json").stat().st_mtime_ns
    train(make_recipe("pt", None, out, convert=_convert(models["dense"]), resume=True, training={"max_steps": 3}), log=resumed.append)
    return out, first, resumed, written


def test_inline_convert_writes_into_the_run_and_trains_the_moe(converted_run, models) -> None:
    out, first, _, _ = converted_run
    converted = out / "converted"
    assert first[0] == f"convert: converting {models['dense']} into {converted} before training"
    assert any(line.startswith("fidelity on ") for line in first) and any("exact: PASS" in line for line in first)
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert json.loads((converted / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_trained_provenance_chains_to_the_conversion(converted_run, models) -> None:
    out, _, _, _ = converted_run
    conversion, trained = provenance(out / "converted"), provenance(out / "model")
    for key in ("source", "export", "layers", "fidelity", "newly_initialized"):
        assert trained[key] == conversion[key], key
    assert conversion["source"]["resolved"] == str(models["dense"])
    assert [entry["steps"] for entry in trained["training"]] == [3]  # the resumed run rewrote model/
    recipe = trained["training"][0]["recipe"]
    assert recipe["model"] == str(out / "converted") and recipe["convert"]["output"] == str(out / "converted")
    assert recipe["convert"]["moe"]["num_experts"] == MOE["num_experts"]


def test_resume_reuses_the_complete_conversion(converted_run) -> None:
    out, _, resumed, written = converted_run
    assert resumed[0] == f"convert: reusing the conversion in {out / 'converted'} (resume)"
    assert not any(line.startswith(("convert: converting", "fidelity on ")) for line in resumed)
    assert (out / "converted" / "moeforge.json").stat().st_mtime_ns == written


def test_a_failed_exact_check_trains_nothing(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tolerance 1e-30 is below fp32 round-off: the copy conversion cannot pass, so no model may load."""

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded after a failed conversion")

    monkeypatch.setattr(runner, "load_model", no_load)
    recipe = make_recipe("pt", None, tmp_path / "out", convert=_convert(models["dense"], fidelity={"tolerance": 1e-30}))
    with pytest.raises(FidelityError) as err:
        train(recipe, log=lambda _line: None)
    message = str(err.value)
    assert message.startswith("convert: the conversion should reproduce the dense model exactly but max |Δlogit| is ")
    assert message.endswith("(tolerance 1.00e-30); nothing was written. Please report this with your recipe")
    assert not (tmp_path / "out").exists()  # nothing trained, and no empty output directory left


def test_an_existing_conversion_elsewhere_needs_resume_or_overwrite(models, tmp_path: Path) -> None:
    elsewhere = tmp_path / "moe"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    recipe = make_recipe("pt", None, tmp_path / "out", convert=_convert(models["dense"], output=str(elsewhere)))
    with pytest.raises(MoeforgeError) as err:
        train(recipe, log=lambda _line: None)
    assert str(err.value) == f"convert.output {elsewhere} holds no complete conversion: remove it, or set overwrite: true to convert again"
    (elsewhere / "moeforge.json").write_text("{}")
    with pytest.raises(MoeforgeError) as err:
        train(recipe, log=lambda _line: None)
    assert (
        str(err.value)
        == f"convert.output {elsewhere} holds a conversion: set resume: true to train on it, or set overwrite: true to convert again"
    )


def test_conversion_errors_are_prefixed_with_the_section(models, tmp_path: Path) -> None:
    """Errors only the conversion can find (they need the source's config) still say which step raised them."""
    recipe = make_recipe("pt", None, tmp_path / "out", convert=_convert(models["dense"], moe={"num_experts": 2, "top_k": 3}))
    with pytest.raises(MoeforgeError) as err:
        train(recipe, log=lambda _line: None)
    assert str(err.value).startswith("convert: moe.top_k: 3 is larger than num_experts 2")


def _write(path: Path, data: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_model_may_name_a_convert_recipe(models, tmp_path: Path) -> None:
    conversion = _write(tmp_path / "convert.yaml", {**_convert(models["dense"]), "output": str(tmp_path / "moe")})
    train_yaml = _write(
        tmp_path / "train.yaml", {"stage": "pt", "model": str(conversion), "output": str(tmp_path / "run"), "data": {"builtin": "pt-demo"}}
    )
    recipe = load_recipe(train_yaml, model=TrainRecipe)
    assert recipe.convert == load_recipe(conversion) and recipe.model == str(tmp_path / "moe")


def test_inline_section_defaults_its_output_into_the_run(tmp_path: Path) -> None:
    recipe = make_recipe("pt", None, tmp_path / "run", convert={"source": "default"})
    assert isinstance(recipe.convert, ConvertRecipe)
    assert recipe.convert.output == tmp_path / "run" / "converted" and recipe.model == str(tmp_path / "run" / "converted")
    same = make_recipe("pt", tmp_path / "run" / "converted", tmp_path / "run", convert={"source": "default"})
    assert same.model == recipe.model


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"convert": {"source": "default", "moe": {"top_k": 0}}}, "convert.moe.top_k: Input should be greater than or equal to 1"),
        ({"convert": {"source": "default", "moee": {}}}, "convert.moee: unknown key"),
        ({"model": "other", "convert": {"source": "default"}}, "model: other is not convert.output RUN/converted: leave model out"),
        ({}, "model: required key is missing; name the model to train, or add a convert: section that makes it"),
        ({"gguf_file": "x.gguf", "convert": {"source": "default"}}, "gguf_file: the converted model is safetensors; a GGUF source"),
    ],
    ids=["convert-key", "convert-unknown", "model-differs", "no-model", "gguf"],
)
def test_bad_convert_sections_name_the_key(tmp_path: Path, extra: dict, expected: str) -> None:
    with pytest.raises(MoeforgeError) as err:
        make_recipe("pt", extra.pop("model", None), tmp_path / "run", **extra)
    message = str(err.value)
    assert expected.replace("RUN", str(tmp_path / "run")) in message and "\n" not in message


def test_model_naming_a_train_recipe_or_a_missing_file_is_one_line(tmp_path: Path) -> None:
    other = _write(tmp_path / "other.yaml", {"stage": "sft", "model": "default"})
    with pytest.raises(MoeforgeError) as err:
        make_recipe("pt", other, tmp_path / "run")
    assert str(err.value) == f"model: {other} is a training recipe; name the model it trains, or a convert recipe (keys source:, moe:)"
    with pytest.raises(MoeforgeError) as err:
        make_recipe("pt", tmp_path / "missing.yaml", tmp_path / "run")
    assert (
        str(err.value) == f"model: {tmp_path / 'missing.yaml'} does not exist: name a model, or an existing convert recipe (see recipes/)"
    )
    conversion = _write(tmp_path / "convert.yaml", {"source": "default", "output": str(tmp_path / "moe")})
    with pytest.raises(MoeforgeError) as err:
        make_recipe("pt", conversion, tmp_path / "run", convert={"source": "default"})
    assert f"model: {conversion} is a convert recipe and the recipe has a convert: section too; keep one" in str(err.value)
