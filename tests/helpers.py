"""Tiny, offline test models shared by every test package.

Real checkpoints cannot be downloaded in tests, so these build a 3-layer LLaMA with a 256-token
character-level tokenizer (with a ChatML chat template) in well under a second. Everything that works
on a hub model (load, chat, convert, save) can be exercised on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 256
SPECIAL_TOKENS = ("<unk>", "<|im_start|>", "<|im_end|>", "<pad>")  # ids 0..3
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
"""The tiny models' shared shape and special token ids (those of :func:`make_tiny_tokenizer`), any family."""


def make_tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A LLaMA small enough to build and run instantly; token ids match :func:`make_tiny_tokenizer`."""
    values: dict[str, Any] = {**TINY_SHAPE, "tie_word_embeddings": False, **overrides}
    return LlamaConfig(**values)


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose 256 ids all decode, so random models' output is printable."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    chars += [chr(c) for c in range(0xA1, 0xA1 + TINY_VOCAB_SIZE - len(SPECIAL_TOKENS) - len(chars))]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llama(config: LlamaConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    """Random weights drawn from a fixed seed, so two builds are identical."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config or make_tiny_llama_config()).eval()


def save_tiny_llama(path: Path, config: LlamaConfig | None = None, seed: int = 0, max_shard_size: str | int | None = None) -> Path:
    """Save a tiny LLaMA (safetensors, optionally sharded) plus its tokenizer; return ``path``."""
    model = build_tiny_llama(config, seed)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    make_tiny_tokenizer().save_pretrained(path)
    return Path(path)


def mixed_dtype_tensors(n: int = 20) -> dict[str, torch.Tensor]:
    """Tensors of every dtype family a checkpoint holds, plus a scalar and an empty one: the edge cases
    of byte offsets and dtype codes that a safetensors round trip must survive."""
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]
    out = {}
    for i in range(n):
        dtype = dtypes[i % len(dtypes)]
        t = torch.randn(17, i + 3, generator=g)
        out[f"layer.{i}.weight"] = t > 0 if dtype == torch.bool else (t * 100).to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0, 4)
    return out


def _llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The q/k row order llama.cpp's converter writes (transformers undoes it when reading a GGUF)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def save_tiny_llama_gguf(path: Path, config: LlamaConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    """Write a tiny LLaMA as an fp32 GGUF file at ``path`` the way llama.cpp would; return the model.

    Its tokenizer is a byte-level vocabulary of exactly 256 tokens and no merges.
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model = build_tiny_llama(config, seed)
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(bytes_to_unicode().values())[: c.vocab_size])
    writer.add_token_types([1] * c.vocab_size)
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    state = model.state_dict()
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                weight = _llama_cpp_permute(weight, c.num_attention_heads)
            elif gg == "attn_k":
                weight = _llama_cpp_permute(weight, c.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def hand_switch_balance(router_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The router-loss tests' reference: per router call ``E · Σ_e f_e · P_e`` (``f_e``: share of decisions
    with ``e`` among their top-k, ``P_e``: mean softmax probability), averaged over the calls (layers)."""
    per_layer = []
    for logits, _, indices in router_outputs:
        experts = logits.shape[-1]
        logits, indices = logits.reshape(-1, experts), indices.reshape(-1)
        fraction = torch.zeros(experts).index_add_(0, indices, torch.ones(indices.numel())) / logits.shape[0]
        per_layer.append(experts * (fraction * torch.softmax(logits, -1).mean(0)).sum())
    return torch.stack(per_layer).mean()


def forward_with_router_losses(model, routers, config, tokens: torch.Tensor):
    """One training-mode forward of ``model`` on ``tokens`` (as labels too) with router losses attached:
    ``(output, handle.losses, each router call's (logits, weights, indices))``; hooks and handle removed."""
    from moeforge.routing.hooks import attach_router_losses

    captured: list = []
    hooks = [router.register_forward_hook(lambda _m, _a, out: captured.append(out)) for router in routers]
    handle = attach_router_losses(model, config)
    try:
        model.train()
        out = model(tokens, labels=tokens)
        return out, handle.losses, captured
    finally:
        for hook in hooks:
            hook.remove()
        handle.detach()


def moeforge_llama_config(moe_layers: list | None = None, **fields: Any):
    """moeforge's architecture over a Llama config of ``fields`` (router-loss settings such as
    ``router_aux_loss_coef`` are passed through to the moeforge config)."""
    from moeforge.modeling import moeforge_config

    settings = {key: fields.pop(key) for key in list(fields) if key.startswith("router_")}
    return moeforge_config(LlamaConfig(**fields), moe_layers, **settings)


def sharpen(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random weights of unit-ish scale everywhere (norms near 1), so routing is far from ties and uneven."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_scales"):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model
