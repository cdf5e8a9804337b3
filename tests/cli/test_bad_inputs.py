"""Bad inputs across the commands: one line, exit code 2, checked before the long work, nothing left behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from moeforge.cli.main import main


def _edited(source: Path, target: Path, **changes: object) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        config[key] = value(config[key]) if callable(value) else value
    (target / "config.json").write_text(json.dumps(config))
    return target


def _one_line(capsys: pytest.CaptureFixture[str], command: str, *expected: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"moeforge {command}: error: "), err
    assert all(text in err[-1] for text in expected), err[-1]
    return err[-1]


BROKEN: dict[str, tuple[dict[str, Callable[[int], int] | str], tuple[str, ...]]] = {
    "ffn size": (
        {"intermediate_size": lambda n: n + 8},
        ("config.json disagrees with the weights at model.layers.0.mlp.down_proj.weight (weights (64, 96), config (64, 104))",),
    ),
    "layer count": ({"num_hidden_layers": lambda n: n + 1}, ("the weights lack model.layers.", "which config.json requires")),
    "activation": ({"hidden_act": "swishy"}, ("hidden_act 'swishy' is not an activation transformers knows",)),
}


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.parametrize("command", ["chat", "eval"])
def test_a_config_that_disagrees_with_its_weights(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    changes, expected = BROKEN[case]
    broken = _edited(tiny_llama_dir, tmp_path / "broken", **changes)
    args = {"chat": ["chat", str(broken), "--prompt", "hi"], "eval": ["eval", str(broken), "-o", str(tmp_path / "out")]}[command]
    assert main(args) == 2
    _one_line(capsys, command, *expected)
    assert not (tmp_path / "out").exists()


def test_convert_names_an_unknown_activation(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _edited(tiny_llama_dir, tmp_path / "broken", hidden_act="swishy")
    out = tmp_path / "moe"
    assert main(["convert", "--source", str(broken), "--output", str(out), "--num-experts", "2", "--top-k", "1"]) == 2
    _one_line(capsys, "convert", "hidden_act 'swishy'")
    assert not out.exists()


def test_eval_refuses_an_output_under_a_file_before_loading(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["eval", str(tiny_llama_dir), "-o", str(tmp_path / "file" / "eval")]) == 2
    _one_line(capsys, "eval", "which is a file")


def test_eval_checks_the_second_model_before_the_first_runs(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["eval", str(tiny_llama_dir), "--compare", str(tmp_path / "missing"), "-o", str(out)]) == 2
    _one_line(capsys, "eval", "missing")
    assert capsys.readouterr().out == "" and not out.exists()


def _train_recipe(tmp_path: Path, model: Path, **extra: object) -> Path:
    recipe = {
        "stage": "pt",
        "model": str(model),
        "output": str(tmp_path / "run"),
        "data": {"builtin": "pt-demo", "max_rows": 8, "max_length": 16},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": []},
        **extra,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_freeze_layers_beyond_the_model(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(_train_recipe(tmp_path, tiny_llama_dir, freeze_layers="0-40"))]) == 2
    _one_line(capsys, "train", "freeze_layers: layer", "is not in this model (layers 0-")
    assert not (tmp_path / "run").exists()  # a failed run leaves no empty output directory


def test_deepspeed_without_the_extra(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert main(["train", str(_train_recipe(tmp_path, tiny_llama_dir, deepspeed=str(config)))]) == 2
    _one_line(capsys, "train", "pip install 'moeforge[deepspeed]'")
    assert not (tmp_path / "run").exists()


def test_too_many_shared_experts_names_the_key_that_was_set(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "moe"
    args = [
        "convert",
        "--source",
        str(tiny_llama_dir),
        "--output",
        str(out),
        "--num-experts",
        "4",
        "--top-k",
        "1",
        "--shared-experts",
        "200",
    ]
    assert main(args) == 2
    _one_line(capsys, "convert", "moe.shared.num_experts: 200 shared next to 4 routed experts", "use fewer experts")
    assert not out.exists()
