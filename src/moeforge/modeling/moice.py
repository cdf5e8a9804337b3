"""MoICE attention: every head mixes attention computed with several RoPE bases, weighted by a router.

Semantics follow the official release (Lin et al., NeurIPS 2024): the router reads the query rotated with
the native base, ``logits = W2(SiLU(W1 q) ⊙ W3 q)``, takes an fp32 softmax, keeps the top-k bases by logit
and renormalises; attention is computed once per base (queries and keys rotated with that base, values
shared) and the per-base outputs are summed with the weights. Projections, MLP and the KV cache are
shared: the cache holds the keys un-rotated, once, and each step rotates them per base.

What differs from the official code, on purpose: it runs on any device through transformers' attention
interface (SDPA, eager, flash when installed) instead of requiring flash-attn; positions are per row
(the official code applies row 0's positions to the whole batch, which breaks left-padded batched
generation); and it is installed on a loaded model (:func:`apply_moice`) rather than by replacing
transformers' ``modeling_llama.py``, so it works for Llama, Mistral and Qwen2-family attention, dense or
MoE, and composes with moeforge's FFN experts and attention MoE: over an attention MoE layer it takes over the
head gate and weights each head's mixture of bases with it (every head is computed: no group is skipped).

Positions of cached keys are recorded on the cache object (per layer), because a cache stores tensors
only and un-rotated keys must be rotated at their own positions on every later step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from moeforge.config.moice import MoiceSpec, ResolvedMoice
from moeforge.errors import MoeforgeError
from moeforge.families import has_llama_attention
from moeforge.io.extensions import register_config_extension
from moeforge.io.safetensors_reader import CheckpointReader
from moeforge.modeling.attention_moe import HeadGroupGate

ROUTER_NAME = "moice_router"
_POSITIONS_ATTR = "_moeforge_moice_positions"  # {layer_idx: [B, tokens seen]} on a transformers Cache
_UNSUPPORTED_ROPE = ("dynamic", "longrope")  # position-dependent inv_freq: one fixed set per base does not exist


class MoiceRouter(nn.Module):
    """Per-token, per-head choice among ``num_experts`` RoPE bases.

    Follows moeforge's router contract (``top_k``, ``num_experts``, forward -> ``(logits, weights,
    indices)``) so the router-loss hooks, telemetry and freezing treat it like an FFN router; each token
    makes ``decisions_per_token`` (= query heads) decisions, and its balance loss has its own coefficient
    (``balance_coef``) since MoICE's 0.3 is not an FFN router's."""

    def __init__(self, head_dim: int, num_bases: int, top_k: int, num_heads: int, per_head: bool, balance_coef: float):
        super().__init__()
        self.num_experts, self.top_k = num_bases, top_k
        self.decisions_per_token, self.balance_coef, self.per_head = num_heads, balance_coef, per_head
        lead = (num_heads,) if per_head else ()
        self.w1 = nn.Parameter(torch.empty(*lead, num_bases, head_dim))
        self.w3 = nn.Parameter(torch.empty(*lead, num_bases, head_dim))
        self.w2 = nn.Parameter(torch.empty(*lead, num_bases, num_bases))

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x [B, H, T, d] -> [B, H, T, n]`` with one weight for all heads or one per head."""
        return torch.einsum("bhtd,hnd->bhtn", x, weight) if self.per_head else x @ weight.transpose(-1, -2)

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``query [B, H, T, d]`` -> fp32 ``logits [B, T, H, N]``, renormalised top-k ``weights`` and ``indices``."""
        x = query.to(self.w1.dtype)
        hidden = F.silu(self._project(x, self.w1)) * self._project(x, self.w3)
        logits = self._project(hidden, self.w2).transpose(1, 2).float()
        probs = torch.softmax(logits, dim=-1)
        indices = logits.topk(self.top_k, dim=-1).indices
        weights = probs.gather(-1, indices)
        return logits, weights / weights.sum(-1, keepdim=True), indices


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freqs: torch.Tensor, scaling: float) -> torch.Tensor:
    """Rotate ``x [B, H, T, d]`` at ``positions [B, T]`` with every base: ``[N, B, H, T, d]``. The same
    elementwise arithmetic as transformers' rotary embedding + ``apply_rotary_pos_emb``, so base 0
    reproduces the original model bit for bit."""
    freqs = positions[None, ..., None].float() * inv_freqs.float()[:, None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(x.dtype).unsqueeze(2)
    sin = (emb.sin() * scaling).to(x.dtype).unsqueeze(2)
    return (x * cos) + (_rotate_half(x) * sin)


def _heads_by_base(x: torch.Tensor) -> torch.Tensor:
    """``[N, B, H, T, d] -> [B, N·H, T, d]``: one attention call over all bases. Heads are ordered (base,
    head), so query head ``j·H + h`` meets key head ``j·H_kv + h // groups``: grouped-query attention pairs
    them exactly as within one base."""
    n, b, h, t, d = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(b, n * h, t, d)


class MoiceAttention(nn.Module):
    """Takes over one attention module's projections (same parameter names, so checkpoints keep their
    keys) and adds ``moice_router``. Works for Llama, Mistral, Qwen2 and Qwen3 attention (q/k norms)."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module  # only where the family has q/k norms (Qwen3)
    k_norm: nn.Module
    inv_freqs: torch.Tensor
    moice_router: MoiceRouter
    head_gate: HeadGroupGate  # only over an attention MoE layer, whose head gate this takes over

    def __init__(self, attention: Any, settings: ResolvedMoice, inv_freqs: torch.Tensor, rope_scaling: float):
        super().__init__()
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.attention_dropout = attention.attention_dropout
        self.is_causal = True
        self.sliding_window = getattr(attention, "sliding_window", getattr(attention.config, "sliding_window", None))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "head_gate"):
            if hasattr(attention, name):
                setattr(self, name, getattr(attention, name))
        self.num_heads = attention.config.num_attention_heads
        self.router_input = settings.router_input
        self.rope_scaling = rope_scaling
        self.register_buffer("inv_freqs", inv_freqs, persistent=False)
        weight = attention.q_proj.weight
        self.moice_router = MoiceRouter(
            self.head_dim,
            settings.num_bases,
            settings.topk,
            self.num_heads,
            settings.router_scope == "per_head",
            settings.router_aux_loss_coef,
        ).to(device=weight.device, dtype=weight.dtype)

    def _positions(self, kwargs: dict, cache, batch: int, length: int, device: torch.device) -> torch.Tensor:
        positions = kwargs.get("position_ids")
        if positions is None:
            start = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            positions = torch.arange(start, start + length, device=device)[None]
        return positions.to(device).expand(batch, length)

    def _key_positions(self, cache, queries: torch.Tensor, keys: int) -> torch.Tensor:
        """Positions of the ``keys`` cached keys the cache returned: the recorded history plus this step's
        (a cache filled elsewhere is taken to start at 0; a static cache's unused slots get 0, masked)."""
        record: dict[int, torch.Tensor] = cache.__dict__.setdefault(_POSITIONS_ATTR, {})
        seen = cache.get_seq_length(self.layer_idx) - queries.shape[1]  # after update: tokens before this step
        past = record.get(self.layer_idx)
        if past is None or past.shape != (queries.shape[0], seen):
            past = torch.arange(seen, device=queries.device)[None].expand(queries.shape[0], seen)
        history = torch.cat([past, queries], dim=1)
        record[self.layer_idx] = history
        if keys <= history.shape[1]:
            return history[:, history.shape[1] - keys :]
        return F.pad(history, (0, keys - history.shape[1]))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        input_shape = hidden_states.shape[:-1]
        batch, length = input_shape
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        positions = self._positions(kwargs, cache, batch, length, hidden_states.device)
        if cache is not None:  # keys are cached un-rotated, once for every base
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
            key_positions = self._key_positions(cache, positions, key.shape[-2])
        else:
            key_positions = positions

        queries = _rope(query, positions, self.inv_freqs, self.rope_scaling)  # [N, B, H, T, d]
        router_query = queries[0] if self.router_input == "query_base0" else queries.mean(0)
        _, weights, indices = self.moice_router(router_query)
        bases = self.inv_freqs.shape[0]
        mix = torch.zeros(*indices.shape[:-1], bases, dtype=weights.dtype, device=weights.device)
        mix = mix.scatter(-1, indices, weights)  # [B, T, H, N], zero outside the top-k
        used = self.inv_freqs
        if self.moice_router.top_k < bases:  # a base no token chose needs no attention
            chosen = torch.bincount(indices.reshape(-1), minlength=bases).nonzero().flatten()
            if len(chosen) < bases:
                queries, used, mix = queries[chosen], used[chosen], mix[..., chosen]
        keys = _rope(key, key_positions, used, self.rope_scaling)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if self.sliding_window is not None else {}
        values = value.repeat(1, len(used), 1, 1) if len(used) > 1 else value
        out, _ = attention(
            self,
            _heads_by_base(queries),
            _heads_by_base(keys),
            values,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )  # [B, T, n·H, d]
        out = out.view(batch, length, len(used), self.num_heads, self.head_dim)
        output = (out * mix.transpose(2, 3).unsqueeze(-1).to(out.dtype)).sum(2)  # [B, T, H, d]
        if hasattr(self, "head_gate"):  # attention MoE's per-head weights, on the mixture of bases
            output = output * self.head_gate(hidden_states).unsqueeze(-1).to(output.dtype)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), None


def _decoder(model: nn.Module) -> Any:
    """The module holding ``layers`` and ``rotary_emb`` (``model.model`` of a causal LM)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "rotary_emb"):
            return module
    raise MoeforgeError(f"{type(model).__name__} has no decoder with rotary embeddings; MoICE needs a RoPE model")


def _native_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise MoeforgeError(f"{config.model_type}: config has no rope_theta; MoICE needs RoPE attention")
    return float(theta)


def _inv_freqs(decoder: Any, bases: list[float]) -> tuple[torch.Tensor, float]:
    """One inverse-frequency row per base, computed as the model's own rotary embedding would with that θ
    (so Llama-3-style scaled RoPE stays scaled); row 0 is the model's own buffer."""
    rotary = decoder.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _UNSUPPORTED_ROPE:
        raise MoeforgeError(f"MoICE does not support rope_type {rope_type!r} (its frequencies change with length)")
    init = rotary.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
    rows = [rotary.inv_freq.detach().float().cpu()]
    for base in bases[1:]:
        config = copy.deepcopy(rotary.config)
        config.rope_parameters = {**config.rope_parameters, "rope_theta": base}
        rows.append(init(config)[0].float().cpu())
    return torch.stack(rows).to(rotary.inv_freq.device), float(rotary.attention_scaling)


def install_moice(model: PreTrainedModel, settings: ResolvedMoice) -> list[str]:
    """Replace the attention of ``settings.layers`` by :class:`MoiceAttention` (router weights left
    uninitialised) and record the settings in ``model.config.moice``. Returns the router parameter names."""
    decoder = _decoder(model)
    inv_freqs, scaling = _inv_freqs(decoder, settings.base_set)
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    names = []
    for index in settings.layers:
        layer = decoder.layers[index]
        layer.self_attn = MoiceAttention(layer.self_attn, settings, inv_freqs.clone(), scaling)
        names += [f"{prefix}.layers.{index}.self_attn.{ROUTER_NAME}.{n}" for n, _ in layer.self_attn.moice_router.named_parameters()]
    model.config.moice = settings.model_dump()
    return names


def apply_moice(model: PreTrainedModel, spec: MoiceSpec, *, seed: int | None = None) -> list[str]:
    """Give a loaded model MoICE attention with freshly initialised routers (N(0, std), the official init:
    an untrained MoICE is a near-uniform mixture of bases, not the original model). Returns the new
    parameter names, for the load report."""
    if getattr(model.config, "moice", None):
        raise MoeforgeError("this model already has MoICE attention; drop the moice: section to keep training its routers")
    if not has_llama_attention(model.config):
        kind = getattr(model.config, "base_model_type", None) or model.config.model_type
        raise MoeforgeError(
            f"moice: {kind} attention is not Llama-style with one RoPE; MoICE works on llama, mistral, qwen2, qwen3 and "
            "granite models, dense or MoE (docs/families.md)"
        )
    decoder = _decoder(model)
    settings = spec.resolve(_native_theta(model.config), len(decoder.layers))
    names = install_moice(model, settings)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for module in model.modules():
        if isinstance(module, MoiceRouter):
            with torch.no_grad():
                for weight in (module.w1, module.w2, module.w3):
                    weight.copy_(torch.randn(weight.shape, generator=generator) * settings.router_init_std)
    return names


def describe(settings: ResolvedMoice) -> str:
    bases = ", ".join(f"{b:g}" for b in settings.base_set)
    return (
        f"MoICE on {len(settings.layers)} layers: bases [{bases}], top-{settings.topk}, "
        f"{settings.router_scope} routers reading {settings.router_input}, balance coef {settings.router_aux_loss_coef:g}"
    )


def restore_moice(model: PreTrainedModel, entry: object, reader: CheckpointReader, directory: Path) -> None:
    """Give a loaded model whose ``config.json`` has ``moice`` its MoICE attention and router weights back
    (the plain architecture has no routers and would drop them). Registered with the I/O layer's loader."""
    try:
        settings = ResolvedMoice.model_validate(entry)
    except ValidationError as err:
        raise MoeforgeError(f"{directory}/config.json: invalid 'moice' entry ({err.errors()[0]['msg']}); re-save the model") from None
    names = install_moice(model, settings)
    missing = [name for name in names if name not in reader]
    if missing:
        raise MoeforgeError(
            f"{directory}: config.json has 'moice' but the weights lack {missing[0]}"
            + (f" and {len(missing) - 1} more router tensors" if len(missing) > 1 else "")
            + "; the checkpoint is incomplete: re-save it, or remove 'moice' from config.json for the plain model"
        )
    with torch.no_grad():
        for name in names:
            parameter = model.get_parameter(name)
            parameter.copy_(reader.get(name).to(parameter.dtype))


register_config_extension("moice", restore_moice)
