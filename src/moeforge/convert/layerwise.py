"""Run a causal LM one decoder layer at a time, with weights handed in per layer.

The model skeleton lives on the meta device; a layer is materialised from the tensors given, run on
the whole calibration batch, and released. Memory is one layer plus the activations, whatever the
model size: this is what lets conversion calibrate and check fidelity while streaming shard by shard.
A layer's FFN can be swapped for another module (the converted MoE block) for one call.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig


class LayerwiseModel:
    def __init__(self, config: PretrainedConfig) -> None:
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        self.model.eval()
        self.rotary = type(self.model.model.rotary_emb)(config=config)
        window = getattr(config, "sliding_window", None)
        self.sliding_window = window if config.model_type in ("mistral", "mixtral") else None

    def _mask(self, length: int) -> torch.Tensor | None:
        """None (SDPA's own causal mask) unless a sliding window is shorter than the sequence."""
        if not self.sliding_window or length <= self.sliding_window:
            return None
        position = torch.arange(length)
        distance = position[:, None] - position[None, :]
        allowed = (distance >= 0) & (distance < self.sliding_window)
        return torch.zeros(length, length).masked_fill(~allowed, float("-inf"))[None, None]

    @torch.no_grad()
    def run_layer(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        hidden: torch.Tensor,
        *,
        mlp: nn.Module | None = None,
        capture_mlp_input: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run decoder layer ``index`` with ``tensors`` (names relative to ``model.layers.{index}.``; without
        ``mlp.*`` when ``mlp`` replaces the FFN). Returns the new hidden states and, if asked, the FFN input
        (the post-attention norm output)."""
        layer = self.model.model.layers[index]
        original_mlp = layer.mlp
        if mlp is not None:
            layer.mlp = mlp
            tensors = tensors | {f"mlp.{name}": value for name, value in mlp.state_dict().items()}
        layer.load_state_dict(tensors, strict=True, assign=True)
        captured: list[torch.Tensor] = []
        hook = layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) if capture_mlp_input else None
        try:
            positions = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
            output = layer(
                hidden,
                attention_mask=self._mask(hidden.shape[1]),
                position_ids=positions,
                position_embeddings=self.rotary(hidden, positions),
            )
        finally:
            if hook is not None:
                hook.remove()
            layer.mlp = original_mlp
            layer.to("meta")
        output = output[0] if isinstance(output, tuple) else output
        return output, (captured[0] if captured else None)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        norm = self.model.model.norm
        norm.load_state_dict({"weight": norm_weight}, assign=True)
        try:
            return torch.nn.functional.linear(norm(hidden), lm_head)
        finally:
            norm.to("meta")
