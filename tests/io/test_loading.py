"""resolve_checkpoint / load_model on tiny offline checkpoints: every source kind and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import GPT2Config

from moeforge.errors import MoeforgeError
from moeforge.io import loading
from moeforge.io.loading import check_supported, load_model, read_config, resolve_checkpoint
from tests.helpers import build_tiny_llama, make_tiny_llama_config, save_tiny_llama, save_tiny_llama_gguf

IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 255]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_local_dir_loads_identical_model_and_tokenizer(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model(tiny_llama_dir)
    assert not model.training
    assert torch.equal(_logits(model), _logits(build_tiny_llama()))
    assert tokenizer is not None and tokenizer.chat_template
    assert tokenizer.eos_token_id == model.config.eos_token_id


def test_sharded_dir_loads(tmp_path: Path) -> None:
    directory = save_tiny_llama(tmp_path / "sharded", max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    model, _ = load_model(directory)
    assert torch.equal(_logits(model), _logits(build_tiny_llama()))


def test_legacy_bin_loads_and_bfloat16(tmp_path: Path) -> None:
    reference = build_tiny_llama()
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model, tokenizer = load_model(tmp_path)
    assert tokenizer is None  # no tokenizer files: a note, not an error
    assert torch.equal(_logits(model), _logits(reference))
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_gpt2_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(tmp_path)
    with pytest.raises(MoeforgeError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert message.startswith("model_type 'gpt2' (GPT2LMHeadModel) is not supported; moeforge supports: llama, mistral, qwen2, qwen3")
    assert "\n" not in message
    for family in ("gemma3_text", "granite", "smollm3", "olmo2", "phi3", "mixtral", "qwen3_moe", "granitemoeshared", "moeforge"):
        assert family in message
    with pytest.raises(MoeforgeError, match="model_type 'gpt2'"):
        check_supported(config)
    check_supported(make_tiny_llama_config())


def test_missing_path_and_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(MoeforgeError, match=r"nowhere does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(MoeforgeError, match=r"has no config.json: point to a Hugging Face model directory"):
        resolve_checkpoint(tmp_path)


def test_corrupted_shard_fails_before_transformers(tmp_path: Path) -> None:
    directory = save_tiny_llama(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MoeforgeError, match=rf"{shard.name} is truncated or corrupted; delete it and download it again"):
        load_model(directory)


def test_bad_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MoeforgeError, match="config.json is not readable JSON"):
        read_config(tmp_path)


def _no_hub(*args: object, **kwargs: object) -> None:
    raise AssertionError("a local path was looked up on the Hugging Face Hub")


@pytest.mark.parametrize("source", ["out/smollm2-dense2moe", "./out/smollm2-dense2moe", "./x/y", "out/a/b", "out/x/"])
def test_missing_local_paths_are_not_taken_for_hub_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str) -> None:
    """A path not written yet (a recipe's ``out/...`` output beside an existing ``out/``, or one no hub id can
    spell) is reported missing, in one line, without asking the hub."""
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    with pytest.raises(MoeforgeError) as err:
        load_model(source)
    message = str(err.value)
    assert message.startswith(f"{source} does not exist") and "\n" not in message
    assert ("not tried as a Hugging Face id since the folder out/ is here" in message) is (source == "out/smollm2-dense2moe")


def test_a_missing_path_that_may_be_a_hub_id_reports_both(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without a local ``out/``, ``out/smollm2-dense2moe`` may be a hub id: the hub is asked, and the one line
    says it is neither here nor reachable there."""
    asked: list[str] = []

    def offline(repo_id: str, **kwargs: object) -> str:
        asked.append(repo_id)
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache.\nmore detail")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MoeforgeError) as err:
        resolve_checkpoint("out/smollm2-dense2moe")
    assert asked == ["out/smollm2-dense2moe"]
    assert str(err.value) == (
        "out/smollm2-dense2moe does not exist locally, and as a Hugging Face id it is not cached and the hub is not "
        "reachable (offline): check the path (a recipe's output exists once that recipe has run) or the hub id"
    )


def test_hub_id_refused_by_the_hub_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refused(*args: object, **kwargs: object) -> str:
        raise OSError("401 Client Error: Repository Not Found\nmore detail")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(MoeforgeError) as err:
        resolve_checkpoint("some-org/some-model")
    assert str(err.value) == (
        "some-org/some-model does not exist locally, and as a Hugging Face id the hub did not provide it "
        "(OSError: 401 Client Error: Repository Not Found): check the path (a recipe's output exists once that "
        "recipe has run) or the hub id"
    )


def test_hub_id_without_network_really_fails_cleanly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real snapshot_download, offline: our message, not a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        MoeforgeError,
        match=r"^no-such-org/no-such-model does not exist locally, and as a Hugging Face id it is not cached and the hub is not reachable \(offline\)",
    ):
        resolve_checkpoint("no-such-org/no-such-model", cache_dir=tmp_path)


@pytest.mark.parametrize("repo_id", ["acme/tiny-llama", "Qwen/Qwen3-0.6B"])
def test_hub_id_happy_path_prefers_safetensors(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path, repo_id: str) -> None:
    calls: list[dict[str, object]] = []

    def fake(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tiny_llama_dir)

    monkeypatch.chdir(tiny_llama_dir.parent)  # a folder of its own, but none named like the hub org
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model, tokenizer = load_model(repo_id)
    assert torch.equal(_logits(model), _logits(build_tiny_llama()))
    assert tokenizer is not None
    assert len(calls) == 1 and calls[0]["repo_id"] == repo_id
    patterns = calls[0]["allow_patterns"]
    assert "config.json" in patterns and "model*.safetensors" in patterns
    assert not any(p.endswith(".bin") for p in patterns)


def test_hub_id_falls_back_to_bin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reference = build_tiny_llama()
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    calls: list[list[str]] = []

    def fake(repo_id: str, *, allow_patterns: list[str], **kwargs: object) -> str:
        calls.append(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_checkpoint("acme/old-model", revision="v1") == tmp_path
    assert len(calls) == 2 and "pytorch_model*.bin" in calls[1]


def test_gguf_file_is_converted_once_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "models" / "tiny.gguf"
    gguf_path.parent.mkdir()
    reference = save_tiny_llama_gguf(gguf_path)
    model, tokenizer = load_model(gguf_path)
    assert torch.equal(_logits(model), _logits(reference))
    assert tokenizer is not None and tokenizer.chat_template
    converted = resolve_checkpoint(gguf_path)
    assert converted.parent == tmp_path / "cache" / "gguf"
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    def no_reconversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", no_reconversion)
    assert resolve_checkpoint(gguf_path.parent, gguf_file="tiny.gguf") == converted


def test_bad_gguf_is_a_moeforge_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(MoeforgeError, match="could not read GGUF file .*bad.gguf"):
        resolve_checkpoint(bad)
    assert not list((tmp_path / "cache" / "gguf").iterdir())
    good = tmp_path / "good.gguf"
    save_tiny_llama_gguf(good)
    for cut in (100, good.stat().st_size // 2):
        bad.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(MoeforgeError, match="could not read GGUF file .*bad.gguf"):
            resolve_checkpoint(bad)
    with pytest.raises(MoeforgeError, match="missing.gguf does not exist"):
        resolve_checkpoint(tmp_path, gguf_file="missing.gguf")


def test_saved_configs_carry_what_transformers_4_reads(tmp_path: Path) -> None:
    from transformers import Gemma3TextConfig, Olmo3Config, Qwen3MoeConfig

    from moeforge.io.loading import save_config

    cases = {
        "qwen3_moe": (Qwen3MoeConfig(num_experts=4, hidden_size=64, num_attention_heads=4), {"num_experts": 4, "rope_theta": 10000.0}),
        "olmo3": (Olmo3Config(hidden_size=64, num_attention_heads=4), {"rope_theta": 500000.0}),  # one base for both layer types
        "gemma3": (Gemma3TextConfig(hidden_size=64, num_attention_heads=4), {}),  # two bases: no single rope_theta is true
    }
    for name, (config, expected) in cases.items():
        save_config(config, tmp_path / name)
        raw = json.loads((tmp_path / name / "config.json").read_text())
        assert {key: raw.get(key) for key in expected} == expected, name
        assert name != "gemma3" or "rope_theta" not in raw


def test_tokenizer_config_is_made_portable(tmp_path: Path) -> None:
    from moeforge.io.loading import portable_tokenizer_config

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "eos_token": "é"}))
    portable_tokenizer_config(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "é"}
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    portable_tokenizer_config(tmp_path)  # left for the tokenizer loader to report
    portable_tokenizer_config(tmp_path / "missing")
