"""``moeforge train RECIPE.yaml [flags]``: exit 0 and a model on success; exit 2 and one line naming the
culprit (a recipe key, a data file, a model without tokenizer) on bad input, with no traceback."""

from __future__ import annotations

from pathlib import Path

import yaml

from moeforge.cli.main import main
from tests.helpers import build_tiny_llama
from tests.training.conftest import provenance


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _recipe(model: Path, output: Path, data: Path, stage: str = "pt", **extra) -> dict:
    return {
        "stage": stage,
        "model": str(model),
        "output": str(output),
        "data": {"train": [str(data)], "max_length": 32},
        "training": {"max_steps": 50, "per_device_train_batch_size": 2, "logging_steps": 1, "telemetry_steps": 1},
        **extra,
    }


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert errors[0].startswith("moeforge train: error: ")
    return errors[0]


def test_train_runs_and_flags_override_the_recipe(models, data_files, tmp_path: Path, capsys) -> None:
    recipe = _write(tmp_path / "r.yaml", _recipe(models["moeforge"], tmp_path / "out", data_files["text"]))
    assert main(["train", str(recipe), "--max-steps", "2", "--learning-rate", "0.001"]) == 0
    model = tmp_path / "out" / "model"
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    entry = provenance(model)["training"][-1]
    assert entry["steps"] == 2
    assert entry["recipe"]["training"]["max_steps"] == 2
    assert entry["recipe"]["training"]["learning_rate"] == 0.001
    err = capsys.readouterr().err
    assert "trainable parameters:" in err and f"saved {model}" in err

    # the same output again: refused without --resume / --overwrite, accepted with --overwrite
    assert main(["train", str(recipe), "--max-steps", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "resume" in line and "overwrite" in line
    assert main(["train", str(recipe), "--max-steps", "1", "--overwrite"]) == 0
    assert provenance(model)["training"][-1]["steps"] == 1


def test_unknown_recipe_key_is_exit_2_naming_the_key(models, data_files, tmp_path: Path, capsys) -> None:
    bad = _recipe(models["dense"], tmp_path / "out", data_files["text"])
    bad["training"]["learnig_rate"] = 1e-3
    assert main(["train", str(_write(tmp_path / "r.yaml", bad))]) == 2
    err = capsys.readouterr().err
    assert err.strip() == _one_error_line(err)
    assert "training.learnig_rate" in err and "unknown key" in err
    assert not (tmp_path / "out").exists()


def test_missing_data_file_is_exit_2_naming_the_file(models, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere" / "train.jsonl"
    recipe = _write(tmp_path / "r.yaml", _recipe(models["dense"], tmp_path / "out", missing))
    assert main(["train", str(recipe)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "out" / "model").exists()


def test_sft_on_a_model_without_tokenizer_is_exit_2(data_files, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare"
    build_tiny_llama().save_pretrained(bare)  # weights and config only
    assert not list(bare.glob("tokenizer*"))
    recipe = _write(tmp_path / "r.yaml", _recipe(bare, tmp_path / "out", data_files["prompt_completion"], stage="sft"))
    assert main(["train", str(recipe)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bare) in line and "tokenizer" in line


def test_missing_recipe_and_bad_yaml_are_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in _one_error_line(capsys.readouterr().err)
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage: pt\nmodel: [unclosed\n")
    assert main(["train", str(broken)]) == 2
    assert "not valid YAML" in _one_error_line(capsys.readouterr().err)


def test_wrong_stage_for_the_data_is_exit_2(models, data_files, tmp_path: Path, capsys) -> None:
    recipe = _write(tmp_path / "r.yaml", _recipe(models["dense"], tmp_path / "out", data_files["preference"], stage="sft"))
    assert main(["train", str(recipe)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(data_files["preference"]) in line and "dpo" in line and "sft" in line
    assert not (tmp_path / "out" / "model").exists()
