"""Recipe ``adapter:`` section → a PEFT model: which modules get which kind of adapter.

Per decoder layer: a dense SwiGLU FFN gets the mixture (``moe_lora`` / ``moe_bottleneck``) or plain LoRA on
the chosen projections (``lora``); an MoE FFN's routed experts get per-expert LoRA on their fused weights
(target ``experts``), its router stays frozen; attention projections get plain LoRA. ``moe_lora`` and
``moe_bottleneck`` are moeforge's PEFT method (:mod:`moeforge.adapters.peft_method`), ``lora`` is PEFT's
own LoRA (``target_parameters`` for fused experts).
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from moeforge.adapters.lora_layers import fused_expert_parameters
from moeforge.adapters.peft_method import MoeLoraConfig, is_swiglu_mlp, layer_index
from moeforge.config.adapter import EXPERTS_TARGET, AdapterSpec
from moeforge.errors import MoeforgeError
from moeforge.io.adapter_dirs import is_adapter_dir


def _decoder_layers(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    layers = {}
    for name, module in model.named_modules():
        index = layer_index(name)
        if index is not None and name.endswith(f"layers.{index}"):
            layers[index] = (name, module)
    return layers


def _targets(model: nn.Module, spec: AdapterSpec) -> tuple[list[str], list[str], list[str]]:
    """``(ffn_modules, linear_modules, fused_expert_modules)`` by full name, for the layers the spec picks."""
    layers = _decoder_layers(model)
    if not layers:
        raise MoeforgeError(f"adapter: found no decoder layers (model.layers.N) in {type(model).__name__}")
    chosen = sorted(layers) if spec.layers is None else spec.layers
    missing = [i for i in [*chosen, *spec.layer_experts] if i not in layers]
    if missing:
        raise MoeforgeError(f"adapter.layers / layer_experts: {missing} not in this model's layers 0-{max(layers)}")
    ffn, linear, experts = [], [], []
    for index in chosen:
        prefix, layer = layers[index]
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear) and spec.ffn_targets:
            raise MoeforgeError(
                f"adapter.targets: {prefix}.mlp stores gate and up as one gate_up_proj (Phi-3, GLM-4); MoE adapters and "
                "FFN LoRA need separate gate/up/down projections: keep only attention targets (q_proj, ...) for this model"
            )
        if mlp is not None and is_swiglu_mlp(mlp) and spec.ffn_targets:
            if spec.method == "lora":
                linear += [f"{prefix}.mlp.{t}" for t in spec.ffn_targets]
            else:
                ffn.append(f"{prefix}.mlp")
        elif mlp is not None and EXPERTS_TARGET in spec.targets:
            routed = getattr(mlp, "experts", None)
            if routed is not None and fused_expert_parameters(routed):
                experts.append(f"{prefix}.mlp.experts")
        attention = getattr(layer, "self_attn", None)
        for target in spec.attention_targets:
            if attention is None or not isinstance(getattr(attention, target, None), nn.Linear):
                raise MoeforgeError(f"adapter.targets: {target} is not a Linear in {prefix}.self_attn; drop it from targets")
            linear.append(f"{prefix}.self_attn.{target}")
    if not (ffn or linear or experts):
        raise MoeforgeError(
            f"adapter.targets: {spec.targets} match nothing in this model (dense FFN: gate_proj/up_proj/down_proj; "
            "MoE FFN: experts; attention: q_proj/k_proj/v_proj/o_proj)"
        )
    return ffn, linear, experts


def adapter_config(model: nn.Module, spec: AdapterSpec) -> PeftConfig:
    """The PEFT config that puts ``spec``'s adapters on ``model``."""
    ffn, linear, experts = _targets(model, spec)
    if spec.method == "lora":
        return LoraConfig(
            r=spec.rank,
            # PEFT annotates lora_alpha as int but only divides by it (scaling = alpha / r): a float alpha works
            lora_alpha=spec.alpha,  # type: ignore[arg-type]
            lora_dropout=spec.dropout,
            task_type="CAUSAL_LM",
            target_modules=linear or None,
            target_parameters=[f"{name}.{p}" for name in experts for p in ("gate_up_proj", "down_proj")] or None,
        )
    return MoeLoraConfig(
        task_type="CAUSAL_LM",
        method=spec.method,
        num_experts=spec.num_experts,
        layer_experts={str(k): v for k, v in spec.layer_experts.items()},
        top_k=spec.top_k,
        rank=spec.rank,
        alpha=spec.alpha,
        dropout=spec.dropout,
        ffn_targets=spec.ffn_targets,
        target_modules=ffn + linear + experts,
        shared_expert=spec.shared_expert,
        router_init_std=spec.router_init_std,
        router_aux_loss_coef=spec.balance_coef,
        router_z_loss_coef=spec.z_coef,
    )


def apply_adapter(model: nn.Module, spec: AdapterSpec) -> PeftModel:
    """Wrap ``model`` with fresh adapters (zero deltas: it still computes the base model); only the adapter
    parameters require grad."""
    return get_peft_model(model, adapter_config(model, spec))


def load_adapter(base: nn.Module, adapter_dir: str | Path) -> PeftModel:
    """``PeftModel.from_pretrained`` with a one-line error for a directory that is not an adapter or does
    not fit ``base``."""
    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise MoeforgeError(f"adapter {adapter_dir}: no adapter_config.json; pass the directory `moeforge train` wrote (OUTPUT/model)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise MoeforgeError(f"adapter {adapter_dir}: adapter_model.safetensors is missing; the adapter was not saved completely")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoeforgeError(f"adapter {adapter_dir} does not fit this base model: {first}") from err
    return model.eval()
