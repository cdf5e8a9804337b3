"""``moeforge inspect``, ``chat`` and ``fetch-default`` through the real command-line entry point."""

from __future__ import annotations

import builtins
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from moeforge.cli import chat_cmd
from moeforge.cli.inspect_cmd import layer_groups
from moeforge.cli.main import main
from moeforge.io.loading import load_model
from tests.helpers import make_tiny_tokenizer


def test_inspect_table(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "llama (LlamaForCausalLM)" in out
    assert "layers 0-2" in out and "dense ffn 96" in out


def test_inspect_json(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_llama_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "llama" and len(report["layers"]) == 3


def test_inspect_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge inspect: error: ") and "nope does not exist" in err
    assert err.count("\n") == 1


def test_layer_groups_collapse_identical_runs() -> None:
    dense = {"kind": "dense", "intermediate_size": 96}
    moe = {
        "kind": "moe",
        "num_experts": 8,
        "top_k": 2,
        "expert_intermediate_size": 48,
        "shared_intermediate_size": None,
        "gate_type": "linear",
        "scoring": None,
    }
    groups = layer_groups([dense, moe, moe, moe, dense])
    assert groups == [
        ("layer 0", "dense ffn 96"),
        ("layers 1-3", "moe 8 experts top-2, expert ffn 48, linear gate"),
        ("layer 4", "dense ffn 96"),
    ]


def test_chat_once_is_greedy_and_deterministic(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model(tiny_llama_dir)
    messages = [{"role": "user", "content": "hello"}]
    first = chat_cmd.chat_once(model, tokenizer, messages, 12, 0.0, None)
    assert first and first == chat_cmd.chat_once(model, tokenizer, messages, 12, 0.0, None)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    manual = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert first == tokenizer.decode(manual[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    torch.manual_seed(1)
    sampled = chat_cmd.chat_once(model, tokenizer, messages, 12, 1.5, 0.9)
    torch.manual_seed(1)
    assert sampled == chat_cmd.chat_once(model, tokenizer, messages, 12, 1.5, 0.9)


def test_chat_prompt_streams_the_reply(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer = load_model(tiny_llama_dir)
    expected = chat_cmd.chat_once(
        model, tokenizer, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], 10, 0.0, None
    )
    capsys.readouterr()
    assert main(["chat", str(tiny_llama_dir), "--prompt", "hi", "--system", "be brief", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_reads_piped_stdin(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[dict[str, str]]] = []
    monkeypatch.setattr(chat_cmd, "chat_once", lambda model, tok, messages, *a, **k: seen.append(messages) or "ok")
    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\nline two\n"))
    assert main(["chat", str(tiny_llama_dir)]) == 0
    assert seen == [[{"role": "user", "content": "line one\nline two\n"}]]


def test_chat_interactive_keeps_history_and_resets(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict[str, str]]] = []

    def fake_chat_once(model: object, tok: object, messages: list[dict[str, str]], *a: object, **k: object) -> str:
        seen.append([dict(m) for m in messages])
        return f"reply {len(seen)}"

    lines = iter(["first", "second", "/reset", "third", "/exit", "never read"])
    monkeypatch.setattr(chat_cmd, "chat_once", fake_chat_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert main(["chat", str(tiny_llama_dir), "--system", "sys"]) == 0
    system = {"role": "system", "content": "sys"}
    assert seen == [
        [system, {"role": "user", "content": "first"}],
        [
            system,
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "reply 1"},
            {"role": "user", "content": "second"},
        ],
        [system, {"role": "user", "content": "third"}],
    ]
    assert next(lines) == "never read"


def test_chat_interactive_eof_quits(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", eof)
    assert main(["chat", str(tiny_llama_dir)]) == 0


def test_chat_without_template_uses_plain_text(tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tiny_llama_dir / "chat_template.jinja").unlink()
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tiny_llama_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="moeforge"):
        assert main(["chat", str(tiny_llama_dir), "--prompt", "abc", "--max-new-tokens", "3"]) == 0
    assert "no chat template" in caplog.text
    model, tokenizer = load_model(tiny_llama_dir)
    assert not tokenizer.chat_template
    assert chat_cmd.build_inputs(tokenizer, [{"role": "user", "content": "abc"}])["input_ids"].shape[1] == 3


def test_chat_errors_exit_2(tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", str(tiny_llama_dir), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "--temperature -1.0 must be 0 (greedy) or positive" in capsys.readouterr().err
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tiny_llama_dir / name).unlink()
    assert main(["chat", str(tiny_llama_dir), "--prompt", "x"]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err


def test_tiny_tokenizer_round_trips() -> None:
    tokenizer = make_tiny_tokenizer()
    assert len(tokenizer) == 256
    assert tokenizer.decode(tokenizer("Hi there!\n")["input_ids"]) == "Hi there!\n"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> tuple[object, object]:
    return load_model(smollm2_dir)


@pytest.mark.smollm2
def test_smollm2_answers(smollm2: tuple[object, object]) -> None:
    model, tokenizer = smollm2
    reply = chat_cmd.chat_once(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}], 20, 0.0, None)
    assert "Paris" in reply


@pytest.mark.smollm2
def test_smollm2_inspect_and_fetch(smollm2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch-default"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert main(["inspect", "default", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tie_word_embeddings"] is True
    assert 134_000_000 < report["total_parameters"] == report["active_parameters"] < 135_000_000
