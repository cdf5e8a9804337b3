"""moeforge's own architecture: a dense family's own decoder with MoE blocks in chosen layers.

Nothing of the family is re-implemented: for family ``F`` (Llama, Gemma 3, SmolLM3, ...) the model is a
subclass of transformers' ``F`` causal LM whose configured layers get a :class:`MoeforgeSparseMoeBlock` in
place of their FFN. Attention, RoPE variants, norms (sandwich, post, q/k), multipliers, soft-capping,
linear-attention layers, caching and generation are ``F``'s own code, so a moeforge model whose experts
copy the dense FFN computes exactly what the dense model does.

The classes are built once per family (:func:`architecture`) and registered with transformers' Auto
classes, so ``import moeforge; AutoModelForCausalLM.from_pretrained(dir)`` loads any moeforge checkpoint,
never with ``trust_remote_code``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
from transformers.utils import ModelOutput

from moeforge.config.router_losses import RouterLossConfig
from moeforge.families import DENSE_FAMILIES, known_dense_family
from moeforge.modeling.attention_moe import HeadGroupGate, install_attention_moe
from moeforge.modeling.configuration import config_class
from moeforge.modeling.moe_block import MoeforgeExperts, MoeforgeSparseMoeBlock
from moeforge.modeling.routers import GMMRouter, LinearRouter, MLPRouter, TopKRouter
from moeforge.routing.hooks import attach_router_losses, attached_router_losses


def install_moe_blocks(decoder: nn.Module, config: PretrainedConfig) -> None:
    """Replace the FFN of every layer of ``decoder`` (the module holding ``layers``) that ``config.moe_layers`` makes
    MoE, and the attention of those ``config.attention_moe_layers`` makes attention MoE."""
    module = known_dense_family(config.base_model_type).ffn.module
    for index, layer in enumerate(cast(nn.ModuleList, decoder.layers)):
        spec = config.layer_spec(index)
        if spec is not None:
            setattr(layer, module, MoeforgeSparseMoeBlock(config, spec))
    install_attention_moe(decoder, config)


# The mixins below are placed before a family's transformers classes in the MRO; the type checker is told so.
if TYPE_CHECKING:
    _FamilyModel = PreTrainedModel
else:
    _FamilyModel = object


class _MoeforgePreTrained(_FamilyModel):
    """What every moeforge model class adds to its family's classes (placed first in the MRO)."""

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Unless told otherwise, run moeforge's ``auto`` experts backend (registered by ``import moeforge``),
        not transformers' default ``grouped_mm``: it adds the few-token path and the fallbacks."""
        from moeforge.config.experts import DEFAULT_BACKEND, EXPERTS_BACKENDS

        return super().get_correct_experts_implementation(requested_experts or EXPERTS_BACKENDS[DEFAULT_BACKEND])

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """Our experts dispatch through ``@use_experts_implementation``. The base class finds that out by
        reading the module source of the family and caching the answer on the class; the family's dense
        code has no experts, so it would answer ``False`` and silently force eager experts."""
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoeforgeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LinearRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, GMMRouter):
            init.normal_(module.means, mean=0.0, std=1.0)
            init.zeros_(module.log_scales)
        elif isinstance(module, MLPRouter):
            pass  # its nn.Linear children are initialised by the base class
        if isinstance(module, TopKRouter) and module.expert_bias is not None:
            init.zeros_(module.expert_bias)
        if isinstance(module, HeadGroupGate):
            module.reset_index()


class _MoeforgeModel(_MoeforgePreTrained):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)  # the family's decoder, dense FFNs everywhere
        install_moe_blocks(self, config)
        self.post_init()


class _MoeforgeForCausalLM(_MoeforgePreTrained):
    """The family's causal LM with MoE blocks, whose ``forward`` adds the router losses to the loss in training
    mode, with the config's ``router_*_loss_coef``: ``AutoModelForCausalLM.from_pretrained(dir)`` trains with them
    in any loop, with no moeforge training code. ``moeforge.routing.attach_router_losses(model, ...)`` replaces
    the coefficients (a recipe's). The contract (what is collected, the kwargs read, accumulation scaling):
    :mod:`moeforge.routing.hooks`."""

    calls_router_losses = True  # forward runs the loss handle itself: attach_router_losses hooks only the routers
    model: nn.Module  # the family's decoder, made moeforge's below

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        # The family's causal LM built its decoder as the family's class; make it moeforge's subclass of that
        # class (same state, plus the weight init that knows experts and routers, which transformers runs per
        # sub-model), then give it its MoE blocks.
        self.model.__class__ = architecture(config.base_model_type).model_class
        install_moe_blocks(self.model, config)
        self.post_init()
        attach_router_losses(
            self,
            RouterLossConfig(
                balance_coef=config.router_aux_loss_coef, z_coef=config.router_z_loss_coef, mi_coef=config.router_mi_loss_coef
            ),
        )

    def forward(self, *args: Any, **kwargs: Any) -> ModelOutput | tuple:
        """The family's forward (its arguments, its signature as :func:`architecture` shows it), then the router
        losses of that forward: on ``output.router_losses``, and in training mode added to ``output.loss``."""
        router_losses = attached_router_losses(self)
        if router_losses is None:  # none, or one that hooks this model's call or a wrapper's around it
            return super().forward(*args, **kwargs)
        router_losses.begin(kwargs)
        output = super().forward(*args, **kwargs)
        return router_losses.finish(output, training=self.training)


def _with_signature(forward: Callable[..., Any], signature_of: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` showing ``signature_of``'s signature: Trainer reads a model's forward parameters to choose the
    dataset columns it keeps, ``generate`` the kwargs it passes, so a per-family class must show its family's."""

    @functools.wraps(forward)
    def shown(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    shown.__signature__ = inspect.signature(signature_of)  # type: ignore[attr-defined]  # what inspect.signature reads
    return shown


@dataclass(frozen=True)
class Architecture:
    """moeforge's classes over one family, registered with ``AutoConfig``-produced configs of that family."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    causal_lm_class: type[PreTrainedModel]


@functools.cache
def architecture(base_model_type: str) -> Architecture:
    """Build (once) and register moeforge's config and model classes over family ``base_model_type``."""
    config = config_class(base_model_type)
    family_config = CONFIG_MAPPING[base_model_type]
    classes: list[type[PreTrainedModel]] = []
    for mixin, mapping in ((_MoeforgeModel, MODEL_MAPPING), (_MoeforgeForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING)):
        base: type[PreTrainedModel] = mapping[family_config]  # type: ignore[assignment]  # the mapping's stubs say tuple
        namespace: dict[str, Any] = {"__module__": __name__, "__doc__": mixin.__doc__ or base.__doc__, "config_class": config}
        if mixin is _MoeforgeForCausalLM:
            namespace["forward"] = _with_signature(mixin.forward, base.forward)
        classes.append(type(f"Moeforge{base.__name__}", (mixin, base), namespace))
    AutoModel.register(config, classes[0], exist_ok=True)
    AutoModelForCausalLM.register(config, classes[1], exist_ok=True)
    for cls in (config, *classes):  # importable by name, so models and configs pickle like any other
        globals()[cls.__name__] = cls
    return Architecture(config, *classes)


def __getattr__(name: str) -> type:
    """A class of moeforge's architecture by name (``MoeforgeGemma3ForCausalLM``): built on first use, as when
    an object is unpickled in a process that has not built it yet."""
    if name.startswith("Moeforge"):
        for family in DENSE_FAMILIES:
            family_config = CONFIG_MAPPING[family.model_type]
            names = [f"Moeforge{family_config.__name__}"] + [
                f"Moeforge{mapping[family_config].__name__}"  # type: ignore[attr-defined]  # a class; the stubs say tuple
                for mapping in (MODEL_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING)
            ]
            if name in names:
                architecture(family.model_type)
                return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """moeforge's causal-LM class for a moeforge ``config`` (any family)."""
    return architecture(config.base_model_type).causal_lm_class


class MoeforgeForCausalLM:
    """``MoeforgeForCausalLM(config)`` builds the moeforge causal LM of ``config``'s family (as the Auto classes do)."""

    def __new__(cls, config: PretrainedConfig) -> PreTrainedModel:  # type: ignore[misc]  # a factory, like the Auto classes
        return causal_lm_class(config)(config)
