"""MoE adapters as a PEFT method (``peft_type: MOE_LORA``): ``import moeforge`` and PEFT saves, loads and
switches them like LoRA (``get_peft_model``, ``PeftModel.from_pretrained(base, dir)``, ``save_pretrained``).

One adapter holds every part the recipe asked for, dispatched by the module it wraps:
a dense SwiGLU MLP gets the mixture (:class:`~moeforge.adapters.moe_lora.MoeLoraLayer`), an ``nn.Linear``
(attention projections) plain LoRA, and an MoE base's routed experts per-expert LoRA on their fused
weights (:mod:`moeforge.adapters.lora_layers`). ``target_modules`` lists the wrapped modules by full name.

Registration: PEFT 0.21's ``register_peft_method`` accepts only names that already are members of its
``PeftType`` enum and offers no way to add one. :func:`register` therefore adds the ``MOE_LORA`` member
to that enum (the one shim; it touches nothing else) and then registers through PEFT's own function, so
all of PEFT's mappings and save/load paths treat it as a first-class method.

Loading without moeforge: PEFT (``PeftModel.from_pretrained``, ``AutoPeftModel``, and transformers'
adapter one-liner) looks the saved ``peft_type`` up in its method table and, for a method it does not
know, fails with a bare ``KeyError`` that shows the value and nothing else; no field of
``adapter_config.json`` makes PEFT import a package first. So the saved value is
:data:`SAVED_PEFT_TYPE`, which says what to do, and :func:`register` maps it (and the plain ``MOE_LORA``
of adapters saved before) to :class:`MoeLoraConfig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

from moeforge.adapters.lora_layers import FusedExpertsLora, LoraLinear, fused_expert_parameters
from moeforge.adapters.moe_lora import LORA_TARGETS, AdapterLayer, MoeLoraLayer

PEFT_NAME = "moe_lora"
PREFIX = "moe_lora_"
# what adapter_config.json records: without moeforge, PEFT's error is `KeyError: '<this>'`
SAVED_PEFT_TYPE = "MOE_LORA (import moeforge before loading this adapter; pip install moeforge)"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class MoeLoraConfig(PeftConfig):
    """Settings of one MoE adapter (saved as ``adapter_config.json``)."""

    method: str = field(default="moe_lora", metadata={"help": "moe_lora | moe_bottleneck"})
    num_experts: int = 8
    layer_experts: dict[str, int] = field(default_factory=dict, metadata={"help": "per-layer expert counts, keyed by layer index"})
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05  # the same default as the recipe's AdapterSpec
    ffn_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    target_modules: list[str] | None = field(default=None, metadata={"help": "full names of the wrapped modules"})
    shared_expert: bool = False
    router_init_std: float = 0.02
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _peft_type()

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict, with ``peft_type`` as :data:`SAVED_PEFT_TYPE` so that the saved file explains itself."""
        return {**super().to_dict(), "peft_type": SAVED_PEFT_TYPE}

    def experts_in_layer(self, layer: int | None) -> int:
        return int(self.layer_experts.get(str(layer), self.num_experts))


def _peft_type() -> PeftType:
    """The ``MOE_LORA`` member :func:`register` adds to ``PeftType`` at runtime (type checkers know no such attribute)."""
    return PeftType[PEFT_NAME.upper()]


def _own_config(config: PeftConfig) -> MoeLoraConfig:
    """PEFT hands :class:`MoeLoraModel` the configs of its own ``peft_type`` only."""
    if not isinstance(config, MoeLoraConfig):
        raise TypeError(f"MoeLoraModel builds MOE_LORA adapters from a MoeLoraConfig, not a {type(config).__name__}")
    return config


def is_swiglu_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in LORA_TARGETS) and hasattr(module, "act_fn")


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


class MoeLoraModel(BaseTuner):
    """The tuner PEFT builds for a ``MOE_LORA`` adapter: wraps each module named in ``target_modules``."""

    prefix: str = PREFIX
    tuner_layer_cls = AdapterLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> MoeLoraConfig:
        config = _own_config(peft_config)
        if not config.target_modules:
            raise ValueError("MoeLoraConfig.target_modules is empty: build it with moeforge.adapters.build.adapter_config(model, spec)")
        return config

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        """(``parameter_name`` is PEFT's ``target_parameters``, which ``MOE_LORA`` does not use.)"""
        kwargs = self._layer_kwargs(_own_config(peft_config), target, current_key)
        if isinstance(target, (MoeLoraLayer, LoraLinear, FusedExpertsLora)):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = _new_module(target, adapter_name, kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version assumes a wrapped module has a ``weight`` (true for Linear, not for an MLP or a
        # routed-experts module); ours keeps their tensors where they are, so putting the module back is all
        if isinstance(new_module, self.tuner_layer_cls):
            super()._replace_module(parent, child_name, new_module, child)
        else:
            setattr(parent, child_name, new_module)

    @staticmethod
    def _layer_kwargs(config: MoeLoraConfig, target: nn.Module, key: str) -> dict:
        base = target.get_base_layer() if isinstance(target, (MoeLoraLayer, LoraLinear, FusedExpertsLora)) else target
        if is_swiglu_mlp(base):
            return dict(
                method=config.method,
                num_experts=config.experts_in_layer(layer_index(key)),
                top_k=config.top_k,
                rank=config.rank,
                alpha=config.alpha,
                dropout=config.dropout,
                targets=tuple(config.ffn_targets),
                shared_expert=config.shared_expert,
                router_init_std=config.router_init_std,
            )
        if isinstance(base, nn.Linear):
            return dict(rank=config.rank, alpha=config.alpha, dropout=config.dropout)
        if fused_expert_parameters(base):
            return dict(rank=config.rank, alpha=config.alpha)
        raise ValueError(f"{key} ({type(base).__name__}) is neither a SwiGLU MLP, a Linear nor a routed-experts module")


def _new_module(target: nn.Module, adapter_name: str, kwargs: dict) -> nn.Module:
    if is_swiglu_mlp(target):
        return MoeLoraLayer(target, adapter_name, **kwargs)
    if isinstance(target, nn.Linear):
        return LoraLinear(target, adapter_name, **kwargs)
    return FusedExpertsLora(target, adapter_name, **kwargs)


def _add_peft_type(name: str) -> None:
    """Add ``name`` to PEFT's ``PeftType`` str-enum (see the module docstring for why)."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)


def register() -> None:
    """Make ``MOE_LORA`` a PEFT method (idempotent; runs on ``import moeforge``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    _add_peft_type(PEFT_NAME.upper())
    if _peft_type() not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=PEFT_NAME, config_cls=MoeLoraConfig, model_cls=MoeLoraModel, prefix=PREFIX)
    # PEFT looks the saved string up in this table as it is, so it is a key of its own beside the member
    PEFT_TYPE_TO_CONFIG_MAPPING[SAVED_PEFT_TYPE] = MoeLoraConfig  # type: ignore[index]
