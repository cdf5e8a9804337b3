"""The dense decoder families moeforge converts, one declaration each.

``siblings`` lists the native transformers MoE architectures whose decoder is the family's own, so they
hold a conversion exactly (when the recipe's MoE options allow: :mod:`moeforge.families.natives`), most
portable first, with the condition a source must meet and what the target's config needs from it. A
family without one exports as moeforge's own architecture, which keeps the family's decoder and swaps
only the FFNs (:mod:`moeforge.modeling`). Why each missing pairing is impossible: docs/families.md.
"""

from __future__ import annotations

from moeforge.families.spec import DenseFamily, Ffn, Sibling


def _no_attention_bias(config) -> list[str]:
    return ["attention biases (q/k/v/o)"] if getattr(config, "attention_bias", False) else []


def _no_sliding_window(config) -> list[str]:
    return ["sliding-window attention (windowed differently there)"] if getattr(config, "use_sliding_window", False) else []


def _one_layer_type(config) -> list[str]:
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    return ["both sliding and full attention layers (one window for every layer there)"] if len(kinds) > 1 else []


def _window_of_all_layers(config) -> dict:
    sliding = set(config.layer_types or ["full_attention"]) == {"sliding_attention"}
    return {"use_sliding_window": sliding, "sliding_window": config.sliding_window if sliding else None}


def _no_biases(config) -> list[str]:
    return ["biases (use_bias: true)"] if getattr(config, "use_bias", False) else []


def _granite_as_llama(config) -> dict:
    """Granite with unit multipliers and Llama's attention scale is Llama."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0, "attention_multiplier": head_dim**-0.5}


_FUSED = Ffn(fused_gate_up=True)
_LLAMA_SIBLINGS = (  # llama.cpp runs the first three as exported; Qwen2-MoE only with dense layers, which llama.cpp cannot
    Sibling("mixtral", _no_attention_bias),
    Sibling("granitemoe", carry=_granite_as_llama),
    Sibling("granitemoeshared", carry=_granite_as_llama),
    Sibling("qwen2_moe", _no_attention_bias, lambda _config: {"qkv_bias": False}),
)

DENSE_FAMILIES: tuple[DenseFamily, ...] = (
    DenseFamily("llama", "Llama", "the reference decoder", siblings=_LLAMA_SIBLINGS, llama_attention=True),
    DenseFamily("mistral", "Mistral", "sliding-window attention", siblings=(Sibling("mixtral"),), llama_attention=True),
    DenseFamily(
        "qwen2",
        "Qwen2 / Qwen2.5",
        "q/k/v biases",
        siblings=(Sibling("qwen2_moe", _no_sliding_window, lambda _config: {"qkv_bias": True}),),
        llama_attention=True,
    ),
    DenseFamily(
        "qwen3",
        "Qwen3",
        "per-head q/k RMSNorm",
        siblings=(Sibling("qwen3_moe", _one_layer_type, _window_of_all_layers),),
        llama_attention=True,
    ),
    DenseFamily(
        "qwen3_5_text",
        "Qwen3.5 (text)",
        "hybrid layers: gated delta-net linear attention and gated full attention",
        siblings=(Sibling("qwen3_5_moe_text"),),
    ),
    DenseFamily(
        "gemma3_text",
        "Gemma 3 (text)",
        "sandwich norms, (1+w) RMSNorm, scaled embeddings, sliding/global layers with their own RoPE, GeLU-tanh",
        activation_field="hidden_activation",
    ),
    DenseFamily(
        "gemma4_text",
        "Gemma 4 (text)",
        "sandwich norms, sliding/global layers, per-layer inputs, KV sharing, double-wide FFNs on shared-KV layers",
        activation_field="hidden_activation",
    ),
    DenseFamily(
        "granite",
        "Granite 3",
        "embedding / residual / attention / logit multipliers",
        siblings=(Sibling("granitemoe"), Sibling("granitemoeshared")),
        llama_attention=True,
    ),
    DenseFamily("smollm3", "SmolLM3", "no RoPE on every 4th layer"),
    DenseFamily("olmo2", "OLMo 2", "post-norms after attention and FFN, q/k RMSNorm over all heads", siblings=(Sibling("flex_olmo"),)),
    DenseFamily("olmo3", "OLMo 3", "OLMo 2's norms, sliding/global layers"),
    DenseFamily("glm4", "GLM-4", "fused gate_up, post-attention and post-FFN norms, interleaved partial RoPE", ffn=_FUSED),
    DenseFamily("phi3", "Phi-3 / Phi-4", "fused gate_up and qkv projections", ffn=_FUSED),
    DenseFamily("ernie4_5", "ERNIE 4.5", "interleaved RoPE", siblings=(Sibling("ernie4_5_moe", _no_biases),)),
    DenseFamily("exaone4", "EXAONE 4", "post-norms, q/k RMSNorm, sliding layers and global layers without RoPE"),
)
