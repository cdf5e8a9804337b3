"""Mistral and Qwen2 sources: attention biases and sliding windows decide which export holds them."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from moeforge.errors import MoeforgeError
from tests.conversion.conftest import dense_logits, load_logits, run_convert
from tests.helpers import make_tiny_tokenizer

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)


def _save(model_cls, config, path):
    torch.manual_seed(2)
    model = model_cls(config).eval()
    with torch.no_grad():  # random q/k/v biases, so a dropped bias shows
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_source(tmp_path_factory):
    return _save(Qwen2ForCausalLM, Qwen2Config(**COMMON), tmp_path_factory.mktemp("qwen2") / "src")


@pytest.fixture(scope="module")
def mistral_source(tmp_path_factory):
    return _save(MistralForCausalLM, MistralConfig(**COMMON, sliding_window=16), tmp_path_factory.mktemp("mistral") / "src")


@pytest.mark.parametrize(("export", "moe"), [("auto", {}), ("moeforge", {"shared": {"num_experts": 1}})])
def test_qwen2_source_keeps_its_qkv_biases(qwen2_source, input_ids, tmp_path, export, moe):
    result = run_convert(qwen2_source, tmp_path / "moe", {"num_experts": 4, "top_k": 2, **moe}, export=export)
    assert result.export == ("qwen2_moe" if export == "auto" else "moeforge")  # Mixtral has no attention bias
    torch.testing.assert_close(load_logits(tmp_path / "moe", input_ids), dense_logits(qwen2_source, input_ids), atol=1e-5, rtol=1e-5)


def test_qwen2_source_cannot_be_mixtral(qwen2_source, tmp_path):
    with pytest.raises(MoeforgeError, match="Mixtral has no decoder like Qwen2 / Qwen2.5's"):
        run_convert(qwen2_source, tmp_path / "moe", {"num_experts": 4}, export="mixtral")


def test_mistral_sliding_window_goes_to_mixtral(mistral_source, tmp_path):
    ids = torch.randint(4, 256, (1, 40), generator=torch.Generator().manual_seed(0))  # longer than the window
    result = run_convert(mistral_source, tmp_path / "moe", {"num_experts": 4, "top_k": 2})
    assert result.export == "mixtral"
    # the in-pipeline dense reference honours the window (calibration sequences are 128 > 16 tokens)
    from moeforge.config.recipe import Calibration
    from moeforge.data.calibration import calibration_ids
    from moeforge.io.loading import load_tokenizer

    calib, _ = calibration_ids(Calibration(), load_tokenizer(mistral_source), 256, torch.Generator().manual_seed(0))
    targets = calib[:, 1:].reshape(-1)
    logits = dense_logits(mistral_source, calib)[:, :-1].reshape(-1, 256)
    assert torch.exp(torch.nn.functional.cross_entropy(logits, targets)).item() == pytest.approx(result.fidelity.perplexity_dense, rel=1e-4)
    torch.testing.assert_close(load_logits(tmp_path / "moe", ids), dense_logits(mistral_source, ids), atol=1e-5, rtol=1e-5)
    # Mixtral has no shared experts: moeforge's architecture keeps Mistral's own (windowed) attention
    shared = run_convert(mistral_source, tmp_path / "moe2", {"num_experts": 4, "shared": {"num_experts": 1}})
    assert shared.export == "moeforge"
    torch.testing.assert_close(load_logits(tmp_path / "moe2", ids), dense_logits(mistral_source, ids), atol=1e-5, rtol=1e-5)
