"""Recipe + source config → a per-layer conversion plan.

The plan is pure data, computed before any weight is read, so every impossible combination
(indivisible sizes, top_k > experts, a layer index past the model) is reported up front.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

from moeforge.config.recipe import AttentionMoESpec, ConvertRecipe, MoESpec, Placement
from moeforge.errors import MoeforgeError
from moeforge.families import has_llama_attention
from moeforge.modeling import MoeLayerSpec
from moeforge.modeling.configuration import AttentionMoeLayerSpec


@dataclass(frozen=True)
class LayerPlan:
    """How one dense FFN becomes an MoE block."""

    layer: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int
    num_shared_experts: int
    n_split: int
    """How many routed experts together hold the routed neurons once: 1 copy, E partition, G granular."""
    scale: float
    """Factor on each routed expert's down_proj (analytic, or the user's number)."""
    calibrate_scale: bool
    """Refine ``scale`` by least squares against the dense FFN on calibration text (approximate layers)."""
    router_init: str
    exact: bool
    """Whether this layer reproduces the dense FFN exactly (up to fp round-off)."""

    def spec(self, moe: MoESpec) -> MoeLayerSpec:
        routing = moe.routing
        return MoeLayerSpec(
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_intermediate_size=self.expert_intermediate_size,
            shared_intermediate_size=self.shared_intermediate_size,
            gate_type=routing.gate_type,
            gate_hidden_size=routing.gate_hidden_size,
            scoring=routing.scoring,
            normalize=routing.normalize,
        )


@dataclass(frozen=True)
class AttentionLayerPlan:
    """How one dense attention becomes an attention MoE: its heads in ``num_experts`` groups, ``num_shared``
    of them always on (which ones is decided at conversion time when ``shared_selection`` is importance)."""

    layer: int
    num_experts: int
    top_k: int
    num_shared: int
    shared_selection: str
    router_init: str
    router_init_std: float
    scale: float
    """Factor on the routed groups' weights (auto: top_k, or the user's number)."""
    exact: bool
    """top_k = routed groups, a zero router and scale = routed groups: every group gets weight 1."""

    @property
    def routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def ranks_groups(self) -> bool:
        """Whether the shared groups are chosen by their output on calibration text."""
        return self.num_shared > 0 and self.shared_selection == "importance"

    def spec(self) -> AttentionMoeLayerSpec:
        """The layer's spec as planned: the first ``num_shared`` groups shared (selection first); a conversion that
        ranks the groups replaces them (``dataclasses.replace``)."""
        return AttentionMoeLayerSpec(
            num_experts=self.num_experts, top_k=self.top_k, shared_experts=tuple(range(self.num_shared)), scale=self.scale
        )


@dataclass(frozen=True)
class ConversionPlan:
    recipe: ConvertRecipe
    num_layers: int
    ffn_sizes: list[int]
    """Each source layer's FFN neuron count (most families use one size; Gemma 4 doubles some layers')."""
    layers: list[LayerPlan | None] = field(default_factory=list)
    attention_layers: list[AttentionLayerPlan | None] = field(default_factory=list)
    """Per layer: its attention MoE, or None (the dense attention); all None without ``attention_moe:``."""

    @property
    def intermediate_size(self) -> int:
        """The dense FFN size of the layers that stay dense (the first layer's when none does)."""
        dense = [size for size, layer in zip(self.ffn_sizes, self.layers, strict=True) if layer is None]
        return (dense or self.ffn_sizes)[0]

    @property
    def moe(self) -> MoESpec:
        """The FFN MoE settings; the defaults under ``moe: null``, where no MoE layer reads them."""
        return self.recipe.moe or MoESpec()

    @property
    def moe_layers(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer is not None]

    @property
    def attention_moe_layers(self) -> list[AttentionLayerPlan]:
        return [layer for layer in self.attention_layers if layer is not None]

    @property
    def exact(self) -> bool:
        return all(layer.exact for layer in self.moe_layers) and all(layer.exact for layer in self.attention_moe_layers)

    @property
    def needs_activations(self) -> bool:
        """Whether expert construction uses the dense FFN's neuron activations on calibration text."""
        moe = self.moe
        return (moe.init == "partition" and moe.partition.method == "importance") or (
            moe.shared.num_experts > 0 and moe.shared.selection == "importance"
        )

    @property
    def needs_calibration(self) -> bool:
        """Whether the conversion itself (not only the fidelity report) runs the model on calibration text."""
        return (
            self.needs_activations
            or any(layer.router_init == "kmeans" or layer.calibrate_scale for layer in self.moe_layers)
            or any(layer.router_init == "kmeans" or layer.ranks_groups for layer in self.attention_moe_layers)
        )


def _parse_layer_key(key: str) -> range:
    start, _, end = str(key).partition("-")
    return range(int(start), int(end or start) + 1)


def select_moe_layers(placement: Placement, num_layers: int, key: str = "moe.placement") -> list[int]:
    """The layers ``placement`` (the recipe's ``key``) chooses."""
    if placement.layers != "all":
        bad = [i for i in placement.layers if not 0 <= i < num_layers]
        if bad:
            raise MoeforgeError(f"{key}.layers: layer {bad[0]} does not exist (the model has {num_layers} layers, 0-{num_layers - 1})")
        chosen = sorted(set(placement.layers))
    else:
        chosen = list(range(placement.moe_start_layer, num_layers, placement.moe_layer_freq))
    last_allowed = num_layers - placement.keep_last_dense
    chosen = [i for i in chosen if placement.keep_first_dense <= i < last_allowed]
    if not chosen:
        raise MoeforgeError(f"{key} selects no layer of the model's {num_layers}: loosen moe_start_layer / keep_*_dense / layers")
    return chosen


def experts_per_layer(moe: MoESpec, layers: list[int]) -> dict[int, int]:
    value = moe.num_experts
    if isinstance(value, int):
        return dict.fromkeys(layers, value)
    if isinstance(value, list):
        if len(value) != len(layers):
            raise MoeforgeError(
                f"moe.num_experts: the list has {len(value)} entries but {len(layers)} layers are MoE ({layers}); give one count per MoE layer"
            )
        return dict(zip(layers, value, strict=True))
    counts: dict[int, int] = {}
    for key, count in value.items():
        for layer in _parse_layer_key(key):
            counts[layer] = count
    missing = [i for i in layers if i not in counts]
    if missing:
        raise MoeforgeError(
            f"moe.num_experts: no expert count given for MoE layer {missing[0]}; cover every MoE layer with the mapping's ranges"
        )
    return {i: counts[i] for i in layers}


def _plan_layer(moe: MoESpec, layer: int, num_experts: int, intermediate: int) -> LayerPlan:
    where = f"layer {layer}"
    top_k = moe.top_k
    if top_k > num_experts:
        raise MoeforgeError(f"moe.top_k: {top_k} is larger than num_experts {num_experts} ({where})")
    shared = moe.shared
    routed_experts_for_default = num_experts if moe.init != "granular" else num_experts // moe.granularity
    if shared.num_experts:
        total_units = routed_experts_for_default + shared.num_experts
        if shared.intermediate_size is not None:
            shared_size = shared.intermediate_size
        else:  # an equal share per expert, rounded down to 8 neurons per shared expert (aligned GEMM rows)
            per_expert = intermediate // total_units
            shared_size = shared.num_experts * (per_expert - per_expert % 8 if per_expert >= 8 else per_expert)
        if shared.intermediate_size is None and shared_size == 0:  # the default share rounds to nothing
            raise MoeforgeError(
                f"moe.shared.num_experts: {shared.num_experts} shared next to {routed_experts_for_default} routed experts leaves "
                f"each fewer than one of the FFN's {intermediate} neurons ({where}); use fewer experts"
            )
        if shared_size % shared.num_experts:
            raise MoeforgeError(f"moe.shared.intermediate_size: {shared_size} is not divisible by shared.num_experts {shared.num_experts}")
        if not 0 < shared_size < intermediate:
            raise MoeforgeError(f"moe.shared.intermediate_size: {shared_size} must be between 1 and the FFN size {intermediate} - 1")
    else:
        if shared.intermediate_size:
            raise MoeforgeError("moe.shared.intermediate_size is set but shared.num_experts is 0: set num_experts too")
        shared_size = 0
    pool = intermediate - shared_size
    routing = moe.routing
    normalized = routing.normalize
    perturbed = moe.copy_.noise > 0 or moe.copy_.drop_ratio > 0

    if moe.init == "copy":
        n_split, expert_size = 1, pool
        router_init = "random" if routing.router_init == "auto" else routing.router_init
        # identical experts: any weights summing to 1 reproduce the FFN; so do k equal weights 1/E scaled by E/k
        exact = (normalized or router_init == "zeros") and not perturbed
    elif moe.init == "partition":
        if pool % num_experts:
            raise MoeforgeError(
                f"moe.num_experts: the {pool} routed neurons of {where} do not split evenly into {num_experts} experts; pick a divisor of {pool}"
            )
        n_split, expert_size = num_experts, pool // num_experts
        full = top_k == num_experts
        if full and routing.router_init not in ("auto", "zeros"):
            raise MoeforgeError(
                f"moe.routing.router_init: {routing.router_init} with partition and top_k = num_experts would weight the "
                "experts unequally and break the exact split; use auto (zeros) or lower top_k"
            )
        router_init = ("zeros" if full else "random") if routing.router_init == "auto" else routing.router_init
        exact = full
    else:  # granular
        granularity = moe.granularity
        if num_experts % granularity:
            raise MoeforgeError(
                f"moe.num_experts: {num_experts} ({where}) must be a multiple of granularity {granularity} (experts = copies x shards)"
            )
        if top_k % granularity:
            raise MoeforgeError(
                f"moe.top_k: {top_k} must be a multiple of granularity {granularity}, so whole copies are selected together"
            )
        if pool % granularity:
            raise MoeforgeError(f"moe.granularity: the {pool} routed neurons of {where} do not split evenly into {granularity} shards")
        n_split, expert_size = granularity, pool // granularity
        router_init = "virtual_groups" if routing.router_init == "auto" else routing.router_init
        exact = normalized and router_init == "virtual_groups" and not perturbed

    if isinstance(moe.scale, str):
        scale = float(n_split) if normalized else float(n_split) * num_experts / top_k
    else:
        scale, exact = float(moe.scale), False
    calibrate_scale = moe.scale == "auto" and not exact
    return LayerPlan(
        layer=layer,
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=expert_size,
        shared_intermediate_size=shared_size,
        num_shared_experts=shared.num_experts,
        n_split=n_split,
        scale=scale,
        calibrate_scale=calibrate_scale,
        router_init=router_init,
        exact=exact,
    )


def _plan_attention(spec: AttentionMoESpec, layer: int, num_heads: int, num_kv_heads: int) -> AttentionLayerPlan:
    groups = num_kv_heads if spec.num_experts == "kv_groups" else spec.num_experts
    routed = groups - spec.shared
    if routed < 1:  # only with kv_groups: a number of groups is checked against shared in the recipe
        raise MoeforgeError(f"attention_moe.shared: {spec.shared} shared of the {groups} groups leaves no routed group; share fewer")
    if spec.top_k > routed:
        raise MoeforgeError(f"attention_moe.top_k: {spec.top_k} is larger than the {routed} routed groups (layer {layer})")
    full = spec.top_k == routed
    router_init = ("zeros" if full else "random") if spec.router_init == "auto" else spec.router_init
    scale = float(spec.top_k) if spec.scale == "auto" else float(spec.scale)
    exact = full and router_init == "zeros" and scale == routed
    plan = AttentionLayerPlan(
        layer=layer,
        num_experts=groups,
        top_k=spec.top_k,
        num_shared=spec.shared,
        shared_selection=spec.shared_selection,
        router_init=router_init,
        router_init_std=spec.router_init_std,
        scale=scale,
        exact=exact,
    )
    problems = plan.spec().problems(num_heads, num_kv_heads)
    if problems:
        raise MoeforgeError(f"attention_moe.num_experts: {'; '.join(problems)} (layer {layer}, {num_heads} heads, {num_kv_heads} KV heads)")
    return plan


def attention_plan(spec: AttentionMoESpec | None, source_config: PretrainedConfig) -> list[AttentionLayerPlan | None]:
    """Each layer's attention MoE (None: dense attention) for the recipe's ``attention_moe:`` section."""
    num_layers = source_config.num_hidden_layers
    if spec is None:
        return [None] * num_layers
    if not has_llama_attention(source_config):
        raise MoeforgeError(
            f"attention_moe: {source_config.model_type} attention is not Llama's; attention MoE converts llama, mistral, "
            "qwen2, qwen3 and granite models (docs/families.md)"
        )
    heads = source_config.num_attention_heads
    kv_heads = getattr(source_config, "num_key_value_heads", None) or heads
    layers: list[AttentionLayerPlan | None] = [None] * num_layers
    for layer in select_moe_layers(spec.placement, num_layers, "attention_moe.placement"):
        layers[layer] = _plan_attention(spec, layer, heads, kv_heads)
    return layers


def build_plan(recipe: ConvertRecipe, source_config: PretrainedConfig, ffn_sizes: list[int]) -> ConversionPlan:
    """The plan for a source whose layers have ``ffn_sizes`` FFN neurons (read from the checkpoint's headers)."""
    num_layers = source_config.num_hidden_layers
    attention_layers = attention_plan(recipe.attention_moe, source_config)
    layers: list[LayerPlan | None] = [None] * num_layers
    if recipe.moe is not None:  # moe: null keeps every FFN dense
        moe_layer_ids = select_moe_layers(recipe.moe.placement, num_layers)
        counts = experts_per_layer(recipe.moe, moe_layer_ids)
        for layer in moe_layer_ids:
            layers[layer] = _plan_layer(recipe.moe, layer, counts[layer], ffn_sizes[layer])
    return ConversionPlan(recipe=recipe, num_layers=num_layers, ffn_sizes=list(ffn_sizes), layers=layers, attention_layers=attention_layers)
