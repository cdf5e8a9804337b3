"""The conversion recipe: YAML in, a validated, typed object out.

Every field is checked before any weight is read: unknown keys and impossible values are rejected
with a message that names the key (``moe.top_k: 9 is larger than num_experts 8``). Keys users know
from Dense2MoE (``expert_top_k``, ``moe_start_layer``, ``moe_layer_freq``, ``gate_type``) and Mixtral
(``num_experts_per_tok``) are accepted as aliases.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, overload

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from moeforge.config.errors import describe
from moeforge.config.seed import Seed
from moeforge.errors import MoeforgeError

ExpertCount = int | list[int] | dict[str, int]
ExportTarget = Literal[
    "auto",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_5_moe_text",
    "granitemoe",
    "granitemoeshared",
    "flex_olmo",
    "ernie4_5_moe",
    "moeforge",
]
"""``auto``, a native transformers MoE architecture (:mod:`moeforge.families.natives`) or moeforge's own.

Spelled out so type checkers see the choices; tests/config/test_export_target.py keeps it equal to
``("auto", *NATIVE_MODEL_TYPES, MOEFORGE_MODEL_TYPE)``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CopyInit(_Strict):
    """Sparse upcycling options: every expert starts as the dense FFN."""

    noise: Annotated[float, Field(ge=0.0)] = 0.0
    """Gaussian noise added to each expert, relative to each matrix's std (breaks symmetry; not exact)."""
    drop_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Drop-Upcycling: fraction of each expert's neurons re-initialised from N(mean, std) of the dense matrix."""


class PartitionInit(_Strict):
    """LLaMA-MoE neuron split: the FFN's intermediate neurons are divided among the experts."""

    method: Literal["random", "kmeans", "importance"] = "random"


class SharedExperts(_Strict):
    """Always-on experts carved out of the dense FFN (the "residual MoE")."""

    num_experts: Annotated[int, Field(ge=0)] = 0
    intermediate_size: Annotated[int, Field(ge=0)] | None = None
    """Total neurons for all shared experts; default: num_experts/(num_experts + routed) of the FFN."""
    selection: Literal["importance", "first", "random"] = "importance"
    """Which neurons go to the shared experts: the most active on calibration text, the first ones, or random."""


class Placement(_Strict):
    """Which decoder layers get an MoE block. The rest keep their dense FFN."""

    layers: Literal["all"] | list[int] = "all"
    moe_start_layer: Annotated[int, Field(ge=0)] = 0
    moe_layer_freq: Annotated[int, Field(ge=1)] = 1
    keep_first_dense: Annotated[int, Field(ge=0)] = 0
    keep_last_dense: Annotated[int, Field(ge=0)] = 0


class Routing(_Strict):
    scoring: Literal["softmax_then_topk", "topk_then_softmax"] = "softmax_then_topk"
    normalize: bool = True
    """Renormalise the top-k softmax probabilities to sum to 1 (softmax_then_topk; topk_then_softmax always
    does and refuses false): whether a token's routing weights sum to 1."""
    gate_type: Literal["linear", "mlp", "gmm"] = "linear"
    gate_hidden_size: Annotated[int, Field(ge=1)] = 256
    router_init: Literal["auto", "random", "kmeans", "virtual_groups", "zeros"] = "auto"
    router_init_std: Annotated[float, Field(gt=0.0)] = 0.02

    @model_validator(mode="after")
    def _check(self) -> Routing:
        if self.scoring == "topk_then_softmax" and not self.normalize:
            raise ValueError("normalize: false has no meaning with scoring topk_then_softmax (its weights always sum to 1)")
        if self.router_init == "kmeans" and self.gate_type == "mlp":
            raise ValueError("router_init: kmeans needs gate_type linear or gmm (an mlp gate has no per-expert centroid)")
        return self


class MoESpec(_Strict):
    num_experts: ExpertCount = 8
    """Experts per MoE layer: an int, a list (one per MoE layer), or a mapping like {"0-11": 4, "12-29": 8} (PMoE)."""
    top_k: Annotated[int, Field(ge=1, validation_alias=AliasChoices("top_k", "expert_top_k", "num_experts_per_tok"))] = 2
    init: Literal["copy", "partition", "granular"] = "copy"
    copy_: CopyInit = Field(default_factory=CopyInit, alias="copy")
    partition: PartitionInit = Field(default_factory=PartitionInit)
    granularity: Annotated[int, Field(ge=1)] = 1
    """granular: each dense copy is split into this many shards (experts = copies × granularity)."""
    shared: SharedExperts = Field(default_factory=SharedExperts)
    placement: Placement = Field(default_factory=Placement)
    routing: Routing = Field(default_factory=Routing)
    scale: float | Literal["auto", "analytic"] = "auto"
    """Factor on each routed expert's down_proj. analytic: the value that makes the expected MoE output equal
    the dense FFN (exact where the strategy allows); auto: analytic for exact layers, and for approximate ones
    the least-squares factor that best matches the dense FFN on calibration text; or a number."""

    @field_validator("num_experts")
    @classmethod
    def _positive(cls, value: ExpertCount) -> ExpertCount:
        counts = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for count in counts:
            if count < 1:
                raise ValueError(f"every expert count must be >= 1, got {count}")
        if isinstance(value, dict):
            for key in value:
                if not re.fullmatch(r"\d+(-\d+)?", str(key)):
                    raise ValueError(f"layer key {key!r} must be a layer index like '3' or a range like '0-11'")
        return value

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.init != "granular" and self.granularity != 1:
            raise ValueError("granularity is only used with init: granular")
        if self.init == "granular" and self.granularity < 2:
            raise ValueError("init: granular needs granularity >= 2 (1 is plain copy upcycling)")
        if self.routing.router_init == "virtual_groups" and self.init != "granular":
            raise ValueError("routing.router_init: virtual_groups only applies to init: granular")
        return self


class AttentionMoESpec(_Strict):
    """Attention MoE: each chosen layer's query heads split into groups (each with the KV heads it reads) that
    a per-token router selects; the dense projections are kept, only a router is added."""

    num_experts: int | Literal["kv_groups"] = "kv_groups"
    """Head groups per layer, routed and shared: kv_groups (one per KV head) or a number."""
    top_k: Annotated[int, Field(ge=1, validation_alias=AliasChoices("top_k", "expert_top_k"))] = 2
    shared: Annotated[int, Field(ge=0)] = 0
    """Always-on groups (weight 1): the residual attention expert."""
    shared_selection: Literal["importance", "first"] = "importance"
    """importance: the groups with the largest output through o_proj on calibration text; first: groups 0.."""
    router_init: Literal["auto", "zeros", "random", "kmeans"] = "auto"
    """auto: zeros when top_k = routed groups (exact), else random; kmeans: centroids of the attention input."""
    router_init_std: Annotated[float, Field(gt=0.0)] = 0.02
    scale: float | Literal["auto"] = "auto"
    """Factor on the routed groups' renormalised weights. auto: top_k, so a selected group keeps about its dense
    weight (= the routed groups at top_k = all: exact with a zero router); or a number. (A least-squares factor
    fitted on calibration text, as ``moe.scale: auto`` does for FFNs, came out near 4 on SmolLM2 at top-2 of 3
    and raised perplexity to 14303 against 219 at top_k: attention errors compound across layers.)"""
    placement: Placement = Field(default_factory=Placement)

    @model_validator(mode="after")
    def _check(self) -> AttentionMoESpec:
        if not isinstance(self.scale, str) and self.scale <= 0:
            raise ValueError(f"scale: {self.scale} must be > 0 (or auto)")
        if isinstance(self.num_experts, int):
            if self.num_experts < 1:
                raise ValueError(f"num_experts: {self.num_experts} must be >= 1 (or kv_groups)")
            if self.shared >= self.num_experts:
                raise ValueError(f"shared: {self.shared} must be below num_experts {self.num_experts} (at least one routed group)")
            if self.top_k > self.num_experts - self.shared:
                raise ValueError(f"top_k: {self.top_k} is larger than the {self.num_experts - self.shared} routed groups")
        return self


class Calibration(_Strict):
    file: Path | None = None
    """Plain-text file of calibration text; default: a built-in sample shipped with moeforge."""
    num_sequences: Annotated[int, Field(ge=1)] = 8
    sequence_length: Annotated[int, Field(ge=8)] = 128


class Fidelity(_Strict):
    check: bool = True
    tolerance: Annotated[float, Field(gt=0.0)] | None = None
    """Max |Δlogit| allowed for exact conversions; default scales with the logits' magnitude (fp32 round-off)."""


class ConvertRecipe(_Strict):
    """Everything ``moeforge convert`` needs, validated."""

    KEYS_DOC: ClassVar[str] = 'README.md, section "Recipe reference"'

    source: str
    """Local HF directory, hub id, path to a .gguf file, or "default" (the embedded SmolLM2-135M-Instruct)."""
    gguf_file: str | None = None
    output: Path
    export: ExportTarget = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_size: str = "2GB"
    seed: Seed = 0
    moe: MoESpec | None = Field(default_factory=MoESpec)
    """FFN MoE; null keeps every FFN dense (with ``attention_moe:``, which then is the whole conversion)."""
    attention_moe: AttentionMoESpec | None = Field(default=None, validate_default=True)
    """Attention MoE layers (head groups chosen per token); none by default."""
    calibration: Calibration = Field(default_factory=Calibration)
    fidelity: Fidelity = Field(default_factory=Fidelity)

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value

    @field_validator("attention_moe")
    @classmethod
    def _something_to_convert(cls, value: AttentionMoESpec | None, info: ValidationInfo) -> AttentionMoESpec | None:
        if value is None and "moe" in info.data and info.data["moe"] is None:  # (moe absent from data: already invalid)
            raise ValueError("required when moe is null (the FFNs stay dense: nothing else to convert); add it or give moe: settings")
        return value

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB' → 2_000_000_000, '512MiB' → 536_870_912 (the conventions of transformers' max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size like '2GB' or '500MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


NEWLINE = b"\n"
INT64 = 2**63
"""Integers a recipe may hold: anything larger overflows torch and numpy mid-run instead of failing here."""


def _out_of_range(data: Any, path: str = "") -> Iterator[str]:
    """The dotted keys of integers beyond 64 bits, anywhere in ``data``."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _out_of_range(value, f"{path}{key}.")
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _out_of_range(value, f"{path}{index}.")
    elif isinstance(data, int) and not -INT64 <= data < INT64:
        yield f"{path.rstrip('.')}: {data} is out of range (at most {INT64 - 1})"


Recipe = TypeVar("Recipe", bound=BaseModel)


@overload
def parse_recipe(data: dict[str, Any], *, origin: str = "recipe") -> ConvertRecipe: ...
@overload
def parse_recipe(data: dict[str, Any], *, origin: str = "recipe", model: type[Recipe]) -> Recipe: ...
def parse_recipe(data: dict[str, Any], *, origin: str = "recipe", model: type[BaseModel] = ConvertRecipe) -> BaseModel:
    """Validate a mapping into ``model`` (a convert recipe by default); its problems, all of them, become one
    line of a MoeforgeError (see :func:`moeforge.config.errors.describe`)."""
    huge = list(_out_of_range(data))
    if huge:
        raise MoeforgeError(f"{origin}: {'; '.join(huge)}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise MoeforgeError(f"{origin}: {describe(error, model)}") from None


@overload
def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> ConvertRecipe: ...
@overload
def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None, *, model: type[Recipe]) -> Recipe: ...
def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None, *, model: type[BaseModel] = ConvertRecipe) -> BaseModel:
    """Read a YAML recipe; ``overrides`` (dotted keys, e.g. from CLI flags) replace values in it."""
    path = Path(path)
    if not path.is_file():
        raise MoeforgeError(f"recipe {path} does not exist: pass the path of a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise MoeforgeError(
            f"recipe {path}: not UTF-8 text (byte {error.object[error.start]:#04x} on line "
            f"{error.object.count(NEWLINE, 0, error.start) + 1}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MoeforgeError(f"recipe {path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise MoeforgeError(f"recipe {path}: the top level must be a mapping of keys like 'source:' and 'moe:'")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return parse_recipe(data, origin=f"recipe {path}", model=model)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """set_dotted(d, 'moe.routing.top_k', 2) creates the intermediate mappings as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise MoeforgeError(f"recipe key {key!r} must be a mapping to set {dotted}")
    node[leaf] = value
