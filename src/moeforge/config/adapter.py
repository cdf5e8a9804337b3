"""The ``adapter:`` section of a training recipe: what to train on a frozen base instead of the whole model.

Names follow the MoE-adapter users' config (``num_experts``, ``expert_capacity`` = top-k, ``lora_rank``,
``lora_alpha``, ``lora_dropout``, ``load_in_8bit`` / ``load_in_4bit``) and MixLoRA's defaults (8 experts,
top-2, router init N(0, 0.02), balance coefficient 0.01).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

AdapterTarget = Literal["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj", "experts"]
FFN_TARGETS: tuple[AdapterTarget, ...] = ("gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS: tuple[AdapterTarget, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS_TARGET: AdapterTarget = "experts"
"""The routed experts of an MoE base: LoRA on each expert's fused weights (``gate_up_proj``, ``down_proj``)."""


class AdapterSpec(BaseModel):
    """``method``: ``moe_lora`` (a mixture of LoRA experts sharing each frozen FFN, MixLoRA-style),
    ``moe_bottleneck`` (a mixture of bottleneck adapters beside each FFN: ``up_e(SiLU(down_e x))``), or
    ``lora`` (plain PEFT LoRA). Attention projections and an MoE base's routed experts always get plain
    LoRA; the FFN projections of dense layers get the mixture."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    KEYS_DOC: ClassVar[str] = 'docs/adapters.md, section "The adapter: section"'

    method: Literal["moe_lora", "lora", "moe_bottleneck"] = "moe_lora"
    num_experts: Annotated[int, Field(ge=1, le=256)] = 8
    top_k: Annotated[int, Field(ge=1, validation_alias=AliasChoices("top_k", "expert_capacity"))] = 2
    rank: Annotated[int, Field(ge=1, validation_alias=AliasChoices("rank", "lora_rank"))] = 8
    alpha: Annotated[float, Field(gt=0, validation_alias=AliasChoices("alpha", "lora_alpha"))] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1, validation_alias=AliasChoices("dropout", "lora_dropout"))] = 0.05
    targets: list[AdapterTarget] = Field(default_factory=lambda: list(FFN_TARGETS))
    layers: list[int] | None = None
    """Decoder layers that get adapters (None: all)."""
    layer_experts: dict[int, Annotated[int, Field(ge=1, le=256)]] = Field(default_factory=dict)
    """Per-layer expert counts overriding ``num_experts``, e.g. ``{0: 2, 29: 16}``."""
    shared_expert: bool = False
    """An always-on LoRA delta every token gets on top of its routed experts' (mergeable: it joins each expert)."""
    router_init_std: Annotated[float, Field(ge=0)] = 0.02
    """Std of the N(0, std) router init (0: uniform routing at the start, ties broken by index)."""
    balance_coef: Annotated[float, Field(ge=0)] = 0.01
    """Switch balance-loss coefficient of the adapter's routers (saved in adapter_config.json)."""
    z_coef: Annotated[float, Field(ge=0)] = 0.0
    """Router z-loss coefficient (saved in adapter_config.json)."""
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    """Quantise the frozen base with bitsandbytes (needs CUDA and ``pip install moeforge[cuda]``)."""

    @model_validator(mode="after")
    def _check(self) -> AdapterSpec:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit exclude each other: pick one")
        if not self.targets:
            raise ValueError(
                "targets is empty: name at least one of gate_proj, up_proj, down_proj, q_proj, k_proj, v_proj, o_proj, experts"
            )
        if self.method != "lora":
            counts = [self.num_experts, *self.layer_experts.values()]
            if self.top_k > min(counts):
                raise ValueError(
                    f"top_k (expert_capacity) {self.top_k} exceeds the number of experts {min(counts)}: use top_k <= num_experts"
                )
            if self.method == "moe_lora" and not set(self.targets) & {*FFN_TARGETS, EXPERTS_TARGET}:
                raise ValueError("method moe_lora needs FFN targets (gate_proj, up_proj, down_proj): the experts live on the FFN")
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers: {self.layers} must be non-negative decoder layer indices")
        return self

    @property
    def ffn_targets(self) -> list[str]:
        return [t for t in self.targets if t in FFN_TARGETS]

    @property
    def attention_targets(self) -> list[str]:
        return [t for t in self.targets if t in ATTENTION_TARGETS]
