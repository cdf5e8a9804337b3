"""``moeforge plan``: counts equal real models', estimates track what autograd really keeps, verdicts flip
where they should, and bad input is one line with exit code 2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from moeforge.adapters.build import apply_adapter
from moeforge.cli.main import main
from moeforge.config.adapter import AdapterSpec
from moeforge.config.recipe import ConvertRecipe
from moeforge.errors import MoeforgeError
from moeforge.io.loading import HUB_ID, cache_root
from moeforge.planning.counting import ModelSpec, count_parameters, model_shape
from moeforge.planning.memory import TrainingSetup, activation_bytes, estimate
from moeforge.planning.report import Row, plan_scenarios, parse_gpu_memory, verdict
from moeforge.planning.sources import Scenario, converted_config, scenarios
from moeforge.training.freeze import apply_freeze
from tests.helpers import build_tiny_llama, make_tiny_llama_config

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
ROUTED = {"num_experts": 4, "top_k": 1, "init": "copy"}


def _moe_config(directory: Path, tmp_path: Path, **moe) -> PretrainedConfig:
    """The config ``moeforge convert`` would write for the tiny model (the planner's own path to it)."""
    recipe = ConvertRecipe(source=str(directory), output=tmp_path / "out", moe=moe or ROUTED)
    return converted_config(recipe, "test")[1].config


def _numel(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward (parameters,
    which the weights column holds, left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.train()(input_ids=ids, labels=ids)
    return sum(seen.values())


def test_dense_counts_equal_the_real_model() -> None:
    config = make_tiny_llama_config()
    counts = count_parameters(ModelSpec(config))
    real = _numel(build_tiny_llama(config))
    assert counts.total == counts.trainable == counts.active == real
    assert counts.total_bytes == counts.trainable_bytes == 4 * real


def test_tied_embeddings_are_counted_once() -> None:
    config = make_tiny_llama_config(tie_word_embeddings=True)
    assert count_parameters(ModelSpec(config)).total == _numel(build_tiny_llama(config))


@pytest.mark.parametrize("moe", [ROUTED, {**ROUTED, "shared": {"num_experts": 1}}], ids=["mixtral", "qwen2_moe-shared"])
def test_upcycled_moe_is_bigger_but_as_active_as_dense(tiny_llama_dir: Path, tmp_path: Path, moe: dict) -> None:
    config = _moe_config(tiny_llama_dir, tmp_path, **moe)
    dense = make_tiny_llama_config()
    counts = count_parameters(ModelSpec(config))
    torch.manual_seed(0)
    assert counts.total == _numel(AutoModelForCausalLM.from_config(config))
    assert counts.total > count_parameters(ModelSpec(dense)).total
    # top-1 of copies: a token runs one full-width FFN, as in the dense model, plus each layer's router
    routers = dense.num_hidden_layers * (4 + bool(config.model_type == "qwen2_moe")) * dense.hidden_size
    assert counts.active == _numel(build_tiny_llama(dense)) + routers


def test_adapter_counts_equal_moeforges_adapter_builder() -> None:
    config = make_tiny_llama_config()
    for spec in (AdapterSpec(), AdapterSpec(method="lora", targets=["q_proj", "v_proj"]), AdapterSpec(shared_expert=True)):
        real = apply_adapter(build_tiny_llama(config), spec)
        counts = count_parameters(ModelSpec(config, adapter=spec))
        assert (counts.trainable, counts.total) == (_numel(real, trainable=True), _numel(real))
        routed = spec.method != "lora"  # a token runs 2 of 8 LoRA experts; plain LoRA runs whole
        assert (counts.active < counts.total) is routed


def test_freezing_counts_equal_apply_freeze() -> None:
    config = make_tiny_llama_config()
    real = build_tiny_llama(config)
    trainable, _ = apply_freeze(real, ("attention", "embeddings"), {0})
    counts = count_parameters(ModelSpec(config, frozen_groups=("attention", "embeddings"), frozen_layers=frozenset({0})))
    assert counts.trainable == trainable and counts.first_trained_layer == 1


def test_optimizer_and_gradient_bytes() -> None:
    counts = count_parameters(ModelSpec(make_tiny_llama_config()))
    shape = model_shape(make_tiny_llama_config())
    adamw = estimate(counts, shape, TrainingSetup(optimizer="adamw"))
    assert adamw.optimizer == 8 * counts.trainable and adamw.gradients == 4 * counts.trainable
    assert estimate(counts, shape, TrainingSetup(optimizer="adamw8bit")).optimizer == pytest.approx(2.03 * counts.trainable, rel=0.01)
    assert estimate(counts, shape, TrainingSetup(optimizer="sgd")).optimizer == 0


def test_quantized_base_is_smaller() -> None:
    config = make_tiny_llama_config(hidden_size=256, intermediate_size=512)
    counts = count_parameters(ModelSpec(config, "bfloat16", AdapterSpec()))
    shape = model_shape(config)
    weights = {q: estimate(counts, shape, TrainingSetup(dtype="bfloat16", adapter=True, quantization=q)).weights for q in (None, "8bit", "4bit")}
    assert weights["4bit"] < weights["8bit"] < weights[None]


def _compare(config: LlamaConfig | PretrainedConfig, spec: ModelSpec, dtype: str = "float32") -> float:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if spec.adapter is not None:
        model = apply_adapter(model, spec.adapter)
    apply_freeze(model, spec.frozen_groups, spec.frozen_layers, keep_frozen=spec.adapter is not None)
    ids = torch.randint(4, config.vocab_size, (2, 32))
    counts = count_parameters(spec)
    setup = TrainingSetup(batch_size=2, seq_len=32, dtype=dtype)
    return activation_bytes(model_shape(config), setup, counts.first_trained_layer, counts.adapter_parts) / _saved_bytes(model, ids)


def test_activation_estimate_tracks_saved_tensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    dense = make_tiny_llama_config(hidden_size=128, intermediate_size=256)
    moe = _moe_config(tiny_llama_dir, tmp_path, num_experts=4, top_k=2)
    cases = [
        (dense, ModelSpec(dense), "float32"),
        (dense, ModelSpec(dense, "bfloat16"), "bfloat16"),
        (dense, ModelSpec(dense, adapter=AdapterSpec()), "float32"),
        (dense, ModelSpec(dense, frozen_groups=("embeddings",), frozen_layers=frozenset({0, 1})), "float32"),
        (moe, ModelSpec(moe), "float32"),
        (moe, ModelSpec(moe, adapter=AdapterSpec(targets=["experts"])), "float32"),
    ]
    for config, spec, dtype in cases:
        assert 0.5 <= _compare(config, spec, dtype) <= 2.0, (config.model_type, spec.adapter, dtype)


def test_checkpointing_and_dpo_move_activations() -> None:
    config = make_tiny_llama_config()
    shape, setup = model_shape(config), TrainingSetup()
    plain = activation_bytes(shape, setup, 0)
    assert activation_bytes(shape, replace(setup, gradient_checkpointing=True), 0) < plain
    assert activation_bytes(shape, replace(setup, stage="dpo"), 0) == 2 * plain
    assert activation_bytes(shape, setup, None) < plain  # nothing below the head trains


def test_verdict_flips_at_the_total() -> None:
    config = make_tiny_llama_config()
    setup = TrainingSetup()
    scenario = Scenario("tiny", ModelSpec(config), setup, "test", primary=True)
    row = plan_scenarios("tiny", [scenario], None).primary
    assert isinstance(row, Row)
    total = row.memory.total
    assert verdict(row, total).startswith("fits")
    refused = verdict(row, total - 1)
    assert refused.startswith("does not fit") and "--gradient-checkpointing" in refused


def test_gpu_memory_sizes() -> None:
    assert parse_gpu_memory("24GB") == 24 * 10**9
    assert parse_gpu_memory("80GiB") == 80 * 2**30
    assert parse_gpu_memory("24000MB") == 24 * 10**9
    with pytest.raises(MoeforgeError, match="24XB"):
        parse_gpu_memory("24XB")


def test_cli_json_and_verdict(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tiny_llama_dir), "--json", "--batch-size", "2", "--seq-len", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["scenarios"]
    assert row["parameters"]["total"] == _numel(build_tiny_llama()) and row["verdict"] is None
    total = row["memory_bytes"]["total"]
    for size, fits in ((total, True), (total - 1, False)):
        assert main(["plan", str(tiny_llama_dir), "--json", "--batch-size", "2", "--seq-len", "16", "--gpu-memory", str(size)]) == 0
        assert json.loads(capsys.readouterr().out)["scenarios"][0]["fits"] is fits


def test_cli_table_for_a_convert_recipe(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "convert.yaml"
    recipe.write_text(yaml.safe_dump({"source": str(tiny_llama_dir), "output": str(tmp_path / "out"), "moe": ROUTED}))
    assert main(["plan", str(recipe), "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "dense base" in out and "MoE (mixtral)" in out and "fits (" in out and "meta device" in out


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["{missing}"], "does not exist"),
        (["{model}", "--gpu-memory", "24XB"], "'24XB' is not a memory size"),
        (["{model}", "--optimizer", "adam"], "--optimizer 'adam' is unknown"),
        (["{model}", "--dtype", "int3"], "--dtype 'int3' is unknown"),
        (["{model}", "--batch-size", "0"], "--batch-size 0"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], culprit: str
) -> None:
    argv = [a.format(missing=tmp_path / "nope", model=tiny_llama_dir) for a in args]
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge plan: error: ") and culprit in err and err.count("\n") == 1


def _would_download(source: str) -> bool:
    if source in ("default", "smollm2"):
        return not (cache_root() / "smollm2-135m-instruct" / "config.json").is_file()
    return bool(HUB_ID.match(source)) and not Path(source).exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.name for path in RECIPES])
def test_real_recipes_plan_from_configs(recipe: Path) -> None:
    data = yaml.safe_load(recipe.read_text())
    source = str(data.get("source") or data.get("model"))
    if _would_download(source):
        pytest.skip(f"{source} is not available offline")
    try:
        plan = plan_scenarios(str(recipe), scenarios(str(recipe), {}), parse_gpu_memory("24GB"))
    except MoeforgeError as err:  # a train recipe whose model a previous step writes
        assert not Path(source).exists() and source in str(err)
        return
    assert plan.primary.counts.trainable > 0 and plan.primary.memory.total > 0
