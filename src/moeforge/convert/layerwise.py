"""Run a causal LM one decoder layer at a time, with weights handed in per layer.

The model skeleton lives on the meta device; a layer is materialised from the tensors given, run on
the whole calibration batch, and released. Memory is one layer plus the activations, whatever the
model size: this is what lets conversion calibrate and check fidelity while streaming shard by shard.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig


class LayerwiseModel:
    def __init__(self, config: PretrainedConfig) -> None:
        import moeforge.modeling  # noqa: F401  (registers moeforge_llama)

        with torch.device("meta"):
            # eager experts: transformers' grouped_mm rejects expert sizes whose rows are not 16-byte multiples
            self.model = AutoModelForCausalLM.from_config(
                config, attn_implementation="sdpa", experts_implementation="eager", dtype=torch.float32
            )
        self.model.eval()
        rotary_cls = type(self.model.model.rotary_emb)
        self.rotary = rotary_cls(config=config)

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        positions = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
        return self.rotary(hidden, positions), positions

    @torch.no_grad()
    def run_layer(
        self, index: int, tensors: dict[str, torch.Tensor], hidden: torch.Tensor, capture_mlp_input: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run decoder layer ``index`` with ``tensors`` (names relative to ``model.layers.{index}.``).
        Returns the new hidden states and, if asked, the FFN input (the post-attention norm output)."""
        layer = self.model.model.layers[index]
        layer.load_state_dict(tensors, strict=True, assign=True)
        captured: list[torch.Tensor] = []
        hook = layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) if capture_mlp_input else None
        try:
            position_embeddings, positions = self.position_embeddings(hidden)
            output = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
        finally:
            if hook is not None:
                hook.remove()
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
