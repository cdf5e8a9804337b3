"""What the user typed → the scenarios to plan: a config per model and the training setup around it.

Only configs are read. A model directory gives its ``config.json``; a ``.gguf`` file its metadata; a hub
id just its ``config.json``; a convert recipe the config of the MoE it would write (the same plan and
export code ``moeforge convert`` runs, so the planned model is the converted one); a train recipe its
model (the MoE its ``convert`` section writes, when it converts first) plus its stage, adapter, freezing,
quantisation, batch, length and dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from transformers import AutoConfig, PretrainedConfig

from moeforge.config.data import DataSpec
from moeforge.config.recipe import ConvertRecipe, load_recipe
from moeforge.config.train_recipe import RECIPE_SUFFIXES, Schedule, TrainRecipe
from moeforge.conversion.export import build_config, resolve_export
from moeforge.conversion.plan import build_plan
from moeforge.errors import MoeforgeError
from moeforge.families import source_family
from moeforge.io.loading import check_supported, is_hub_id, not_on_hub, read_config, resolve_checkpoint
from moeforge.planning.counting import ModelSpec
from moeforge.planning.memory import Sharding, TrainingSetup
from moeforge.training import deepspeed


@dataclass(frozen=True)
class ModelConfig:
    config: PretrainedConfig
    origin: str
    """Where the config came from, in words (shown as the figures' source)."""
    directory: Path | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    model: ModelSpec
    setup: TrainingSetup
    origin: str
    primary: bool = False
    """The run the verdict is about (the MoE of a convert recipe, a train recipe's own setup)."""


def default_setup() -> TrainingSetup:
    """A plain ``moeforge train`` run: the train recipe's own defaults (batch, length, dtype), full fine-tuning."""
    return TrainingSetup(
        batch_size=Schedule.model_fields["per_device_train_batch_size"].default,
        seq_len=DataSpec.model_fields["max_length"].default,
        dtype=TrainRecipe.model_fields["dtype"].default,
        mixed_precision=Schedule.model_fields["bf16"].default,
        gradient_checkpointing=Schedule.model_fields["gradient_checkpointing"].default,
    )


def _gguf_config(path: Path) -> ModelConfig:
    """A GGUF's config from its metadata alone (converting it to safetensors would read every weight)."""
    if not path.is_file():
        raise MoeforgeError(f"{path} does not exist: pass an existing .gguf file")
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, TypeError) as err:
        raise MoeforgeError(
            f"could not read the metadata of GGUF file {path} ({type(err).__name__}): check that it is a complete GGUF"
        ) from None
    check_supported(config)
    return ModelConfig(config, f"GGUF metadata of {path}")


def _hub_config(repo_id: str) -> ModelConfig:
    """Only ``config.json`` of a hub model (resolve_checkpoint would download the weights too)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        directory = Path(hf_hub_download(repo_id, "config.json")).parent
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise not_on_hub(repo_id, err) from None
    return ModelConfig(read_config(directory), f"config.json of {repo_id} (hub)", directory)


def model_config(source: str, gguf_file: str | None = None) -> ModelConfig:
    """The config of what a recipe's ``source`` / ``model`` names (a convert recipe: the MoE it would write)."""
    path = Path(source).expanduser()
    if path.suffix in RECIPE_SUFFIXES:
        return converted_config(load_recipe(path), str(path))[1]
    if path.suffix == ".gguf" or (gguf_file and path.is_dir()):
        return _gguf_config(path / gguf_file if gguf_file else path)
    if not gguf_file and is_hub_id(source):
        return _hub_config(source)
    directory = resolve_checkpoint(source, gguf_file=gguf_file)
    return ModelConfig(read_config(directory), f"config.json of {directory}", directory)


def converted_config(recipe: ConvertRecipe, origin: str) -> tuple[ModelConfig, ModelConfig]:
    """``(dense source, planned MoE)`` configs of a convert recipe, from moeforge's own conversion plan."""
    source = model_config(recipe.source, recipe.gguf_file)
    source_family(source.config, recipe.source)
    plan = build_plan(recipe, source.config, [source.config.intermediate_size] * source.config.num_hidden_layers)
    target = resolve_export(recipe.export, plan, source.config)
    moe = build_config(target, plan, source.config)
    return source, ModelConfig(moe, f"convert plan of {origin} ({target}) over {source.origin}")


def _provenance_source(directory: Path | None) -> ModelConfig | None:
    """The dense model a moeforge-converted checkpoint came from, if its provenance names one still on disk."""
    record = directory / "moeforge.json" if directory else None
    if record is None or not record.is_file():
        return None
    try:
        resolved = Path(json.loads(record.read_text())["source"]["resolved"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (
        ModelConfig(read_config(resolved), f"config.json of {resolved} (source in moeforge.json)")
        if (resolved / "config.json").is_file()
        else None
    )


def _recipe_type(path: Path) -> type[ConvertRecipe] | type[TrainRecipe]:
    """Train recipes have a ``stage``; anything else is read as a convert recipe (whose loader reports errors)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ConvertRecipe
    return TrainRecipe if isinstance(data, dict) and "stage" in data else ConvertRecipe


def deepspeed_sharding(path: Path) -> Sharding:
    """The ZeRO stage and offloading a DeepSpeed JSON config asks for (``"auto"`` and absent keys: DeepSpeed's
    defaults, stage 0 and no offload)."""
    zero = deepspeed.read_config(path).get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    offloaded = any((zero.get(key) or {}).get("device", "none") in ("cpu", "nvme") for key in ("offload_param", "offload_optimizer"))
    return Sharding(stage=stage if stage in (0, 1, 2, 3) else 0, offload=offloaded)


def recipe_sharding(recipe: TrainRecipe) -> Sharding:
    """How the recipe's engine splits a run (the GPU count comes from the launch: ``--gpus``)."""
    if recipe.deepspeed is not None:
        return deepspeed_sharding(recipe.deepspeed)
    if recipe.fsdp is not None:
        return Sharding(stage=3 if recipe.fsdp.reshard_after_forward else 2, offload=recipe.fsdp.cpu_offload)
    if recipe.expert_parallel is not None:
        return Sharding(expert_parallel=recipe.expert_parallel.size)  # with_overrides adds what EP implies
    return Sharding()


def with_overrides(setup: TrainingSetup, overrides: dict) -> TrainingSetup:
    """``setup`` with the CLI's overrides; ``sharding`` overrides are merged field by field."""
    overrides = dict(overrides)
    sharding = replace(setup.sharding, **overrides.pop("sharding", {}))
    if sharding.expert_parallel > 1:  # transformers' EP fully shards the rest of the model over all ranks
        sharding = replace(sharding, stage=3, gpus=sharding.expert_parallel if sharding.gpus == 1 else sharding.gpus)
        if sharding.gpus % sharding.expert_parallel:
            raise MoeforgeError(
                f"expert parallelism over {sharding.expert_parallel} ranks needs a GPU count it divides, not {sharding.gpus}"
            )
    return replace(setup, **overrides, sharding=sharding)


def _without_experts(setup: TrainingSetup) -> TrainingSetup:
    """A dense comparison row: the same GPUs and stage, without expert parallelism (it has no experts)."""
    return replace(setup, sharding=replace(setup.sharding, expert_parallel=1))


def _train_setup(recipe: TrainRecipe) -> TrainingSetup:
    """The recipe's run. Under DeepSpeed with bf16 (``training.bf16`` or bf16 weights) DeepSpeed casts the
    model to bf16 and its optimizer keeps fp32 master weights, whatever dtype the weights were loaded in."""
    adapter = recipe.adapter
    deepspeed_bf16 = recipe.deepspeed is not None and (recipe.training.bf16 or recipe.dtype == "bfloat16")
    setup = TrainingSetup(
        stage=recipe.stage,
        batch_size=recipe.training.per_device_train_batch_size,
        seq_len=recipe.data.max_length,
        dtype=recipe.dtype,
        mixed_precision=recipe.training.bf16,
        gradient_checkpointing=recipe.training.gradient_checkpointing,
        quantization="4bit" if adapter and adapter.load_in_4bit else "8bit" if adapter and adapter.load_in_8bit else None,
        adapter=adapter is not None,
        sharding=recipe_sharding(recipe),
    )
    return replace(setup, dtype="bfloat16", mixed_precision=False, master_weights=True) if deepspeed_bf16 else setup


def _train_name(recipe: TrainRecipe) -> str:
    parts: list[str] = [recipe.stage]
    if recipe.adapter is not None:
        spec = recipe.adapter
        routed = "" if spec.method == "lora" else f" {spec.num_experts}x top-{spec.top_k}"
        parts.append(f"adapter {spec.method}{routed} r{spec.rank}")
    if recipe.moice is not None:
        parts.append("MoICE routers")
    frozen = [*recipe.frozen_groups, *([f"layers {recipe.freeze_layers}"] if recipe.frozen_layers else [])]
    parts.append(f"frozen {', '.join(frozen)}" if frozen else "" if recipe.adapter else "full")
    return ", ".join(part for part in parts if part)


def _train_scenarios(recipe: TrainRecipe, model: ModelConfig, setup: TrainingSetup) -> list[Scenario]:
    """The recipe's own run, after a plain full fine-tune of the same model when the recipe trains less."""
    own = ModelSpec(model.config, setup.dtype, recipe.adapter, recipe.moice, recipe.frozen_groups, frozenset(recipe.frozen_layers))
    primary = Scenario(f"recipe: {_train_name(recipe)}", own, setup, model.origin, primary=True)
    if recipe.adapter is None and recipe.moice is None and not recipe.frozen_groups and not recipe.frozen_layers:
        return [primary]
    reference = replace(setup, quantization=None, adapter=False)
    return [Scenario("full fine-tune (for comparison)", ModelSpec(model.config, setup.dtype), reference, model.origin), primary]


def scenarios(target: str, setup_overrides: dict, model_override: str | None = None) -> list[Scenario]:
    """Every scenario worth a row for ``target`` (a model or a recipe), with the CLI's overrides applied."""
    path = Path(target).expanduser()
    if path.suffix in RECIPE_SUFFIXES:
        kind = _recipe_type(path)
        recipe = load_recipe(path, model=kind)
        if isinstance(recipe, TrainRecipe):
            if recipe.convert is not None and not model_override:  # converts first: plan the MoE it will train
                model = converted_config(recipe.convert, f"{path} (convert)")[1]
            else:
                try:
                    model = model_config(model_override or recipe.model, None if model_override else recipe.gguf_file)
                except MoeforgeError as err:
                    raise MoeforgeError(
                        f"model: {err}; if a convert recipe writes this model, plan with that recipe as the model override"
                    ) from None
            setup = with_overrides(_train_setup(recipe), setup_overrides)
            return _train_scenarios(recipe, model, setup)
        if model_override:
            raise MoeforgeError(f"a model override applies to train recipes only; {path} is a convert recipe (its source is the model)")
        dense, moe = converted_config(recipe, str(path))
        setup = with_overrides(default_setup(), setup_overrides)
        return [
            Scenario("dense base", ModelSpec(dense.config, setup.dtype), _without_experts(setup), dense.origin),
            Scenario(f"MoE ({moe.config.model_type})", ModelSpec(moe.config, setup.dtype), setup, moe.origin, primary=True),
        ]
    if model_override:
        raise MoeforgeError(f"a model override applies to train recipes only; {target} is a model (plan it directly)")
    model = model_config(target)
    setup = with_overrides(default_setup(), setup_overrides)
    own = Scenario(f"{model.config.model_type}, full fine-tune", ModelSpec(model.config, setup.dtype), setup, model.origin, primary=True)
    base = _provenance_source(model.directory)
    return [Scenario("dense base", ModelSpec(base.config, setup.dtype), _without_experts(setup), base.origin), own] if base else [own]
