"""``moeforge plan``: counts equal real models', estimates track what autograd really keeps, verdicts flip
where they should, and bad input is one line with exit code 2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3Config

from moeforge.adapters.build import apply_adapter
from moeforge.cli.main import main
from moeforge.config.adapter import AdapterSpec
from moeforge.config.recipe import ConvertRecipe
from moeforge.errors import MoeforgeError
from moeforge.planning.counting import ModelSpec, count_parameters, model_shape
from moeforge.planning.memory import FfnShape, TrainingSetup, activation_bytes, estimate
from moeforge.planning.report import Row, parse_gpu_memory, plan_scenarios, verdict
from moeforge.planning.sources import Scenario, converted_config, scenarios
from moeforge.training.freeze import apply_freeze
from moeforge.training.runner import FINAL_DIR
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
    weights = {
        q: estimate(counts, shape, TrainingSetup(dtype="bfloat16", adapter=True, quantization=q)).weights for q in (None, "8bit", "4bit")
    }
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


def test_a_train_recipe_that_converts_first_plans_the_converted_moe(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Inline ``convert:`` or ``model: convert.yaml``: nothing is written yet, the plan is of the MoE it will train."""
    conversion = {"source": str(tiny_llama_dir), "output": str(tmp_path / "moe"), "moe": ROUTED}
    (tmp_path / "convert.yaml").write_text(yaml.safe_dump(conversion))
    common = {"stage": "pt", "output": str(tmp_path / "run"), "data": {"builtin": "pt-demo"}}
    for name, form in (("inline", {"convert": conversion}), ("file", {"model": str(tmp_path / "convert.yaml")})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**common, **form}))
        (row,) = scenarios(str(tmp_path / f"{name}.yaml"), {})
        assert row.model.config.model_type == "mixtral" and row.primary
        assert list(model_shape(row.model.config).ffn) == [FfnShape(96, ROUTED["num_experts"], ROUTED["top_k"])] * 3
        assert not (tmp_path / "moe").exists()


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


def _recipe(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


WRITTEN_BY = {f"{data['output']}/{FINAL_DIR}" if "stage" in data else data["output"]: path for path in RECIPES for data in [_recipe(path)]}
"""The model path each recipe writes (a convert recipe its ``output``, a train recipe ``output/model``) -> that recipe."""


def _convert_recipe_of(model: str) -> Path | None:
    """The convert recipe whose MoE ``model`` is, through the train recipes that train it whole (their
    output has their input's architecture); None for a model no recipe writes."""
    writer = WRITTEN_BY.get(model)
    if writer is None:
        return None
    data = _recipe(writer)
    if "stage" not in data:
        return writer
    assert "adapter" not in data and "moice" not in data, f"{writer.name} changes the architecture: plan its output from a built model"
    return _convert_recipe_of(data["model"])


def _base_model(path: Path) -> str:
    """The model a recipe starts from, all the way back to a model no recipe writes."""
    data = _recipe(path)
    if "stage" not in data:
        return data["source"]
    if "convert" in data:
        return data["convert"]["source"]
    writer = _convert_recipe_of(data["model"])
    return _recipe(writer)["source"] if writer else data["model"]


def _recipe_param(path: Path) -> Any:
    """A recipe case, marked with the embedded model it plans from (its config comes out of the cached model)."""
    marks = {"default": [pytest.mark.smollm2], "gemma3": [pytest.mark.gemma3]}.get(_base_model(path), [])
    return pytest.param(path, id=path.name, marks=marks)


CONVERT_RECIPES = [_recipe_param(path) for path in RECIPES if "stage" not in _recipe(path)]
TRAIN_RECIPES = [_recipe_param(path) for path in RECIPES if "stage" in _recipe(path)]

HUB_STAND_INS = {
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": (
        LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            architectures=["LlamaForCausalLM"],
        ),
        1_100_048_384,
    ),
    "meta-llama/Llama-2-7b-hf": (
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            architectures=["LlamaForCausalLM"],
        ),
        6_738_415_616,
    ),
    "meta-llama/Meta-Llama-3-8B": (
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128_256,
            rope_theta=500_000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=128_000,
            eos_token_id=128_001,
            architectures=["LlamaForCausalLM"],
        ),
        8_030_261_248,
    ),
    "Qwen/Qwen3-0.6B": (
        Qwen3Config(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151_936,
            max_position_embeddings=40_960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=151_643,
            eos_token_id=151_645,
            architectures=["Qwen3ForCausalLM"],
        ),
        596_049_920,  # the model card's 0.6B, 0.44B of them outside the (tied) embeddings
    ),
}
"""The hub models recipes convert, as the architecture fields of their config.json (the planner reads nothing
else), with each model's published parameter count: a stand-in that counts the same is the same architecture."""

DENSE_LAYOUTS = {
    "default": [FfnShape(1536)] * 30,  # SmolLM2-135M
    "gemma3": [FfnShape(2048)] * 18,  # Gemma 3 270M
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": [FfnShape(5632)] * 22,
    "Qwen/Qwen3-0.6B": [FfnShape(3072)] * 28,
    "meta-llama/Llama-2-7b-hf": [FfnShape(11008)] * 32,
    "meta-llama/Meta-Llama-3-8B": [FfnShape(14336)] * 32,
}
MOE_LAYOUTS = {
    "demo.yaml": ("mixtral", [FfnShape(1536, 8, 2)] * 30),  # 8 copies of the FFN, top-2
    "attention-moe.yaml": ("moeforge", [FfnShape(1536, 8, 2)] * 30),  # the demo's FFNs; attention MoE adds only routers
    # MoE from layer 16 on, every second layer; qwen2_moe always builds a shared expert (1 wide, zero)
    "dense2moe-placement.yaml": ("qwen2_moe", [FfnShape(1536, 8, 2, 1) if i >= 16 and i % 2 == 0 else FfnShape(1536) for i in range(30)]),
    "gemma3-moe.yaml": ("moeforge", [FfnShape(2048, 4, 2)] * 18),
    "granular.yaml": ("mixtral", [FfnShape(768, 8, 4)] * 30),  # granularity 2: experts half as wide
    "llama-moe-partition.yaml": ("mixtral", [FfnShape(704, 8, 2)] * 22),  # the FFN split 8 ways
    "pmoe.yaml": ("moeforge", [FfnShape(1536, 4, 2)] * 15 + [FfnShape(1536, 8, 2)] * 15),  # per-layer expert counts
    "qwen3-moe.yaml": ("qwen3_moe", [FfnShape(3072, 8, 2)] * 28),
    # the inline convert section of a train recipe: 4 copies from layer 16, every second layer
    "train-dense2moe-one-command.yaml": (
        "qwen2_moe",
        [FfnShape(1536, 4, 2, 1) if i >= 16 and i % 2 == 0 else FfnShape(1536) for i in range(30)],
    ),
    "llama-moe-v2-64e-top8.yaml": ("mixtral", [FfnShape(224, 64, 8)] * 32),  # Llama-3-8B's FFN split 64 ways
    # Dense2MoE on 8 GPUs: 8 copies from layer 16, every second layer (qwen2_moe: placement needs mlp_only_layers)
    "train-dense2moe-zero3.yaml": (
        "qwen2_moe",
        [FfnShape(11008, 8, 2, 1) if i >= 16 and i % 2 == 0 else FfnShape(11008) for i in range(32)],
    ),
    "residual-1-plus-7.yaml": ("granitemoeshared", [FfnShape(1344, 7, 1, 192)] * 30),  # 7 routed eighths + 1 shared
}
"""What each convert recipe asks for, per decoder layer: the MoE the planner must have planned."""


@pytest.fixture
def stand_in_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An offline hub that serves the stand-ins' config.json and nothing else (the planner needs no weights)."""
    for repo_id, (config, _) in HUB_STAND_INS.items():
        config.save_pretrained(tmp_path / "hub" / repo_id)

    def config_json(repo_id: str, filename: str, **kwargs: object) -> str:
        if repo_id not in HUB_STAND_INS or filename != "config.json":
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached and the hub is offline")
        return str(tmp_path / "hub" / repo_id / filename)

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("planning downloaded a model, not just its config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", config_json)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_weights)
    (tmp_path / "configs").symlink_to(Path(__file__).parents[2] / "configs")  # the DeepSpeed configs recipes name
    monkeypatch.chdir(tmp_path)  # where no recipe has run: no out/, runs/ or demo-out/


@pytest.mark.usefixtures("stand_in_hub")
@pytest.mark.parametrize("recipe", CONVERT_RECIPES)
def test_convert_recipes_plan_the_moe_they_ask_for(recipe: Path) -> None:
    source = _recipe(recipe)["source"]
    plan = plan_scenarios(str(recipe), scenarios(str(recipe), {}), None)
    dense, moe = plan.rows
    model_type, layout = MOE_LAYOUTS[recipe.name]
    assert (dense.scenario.name, moe.scenario.name) == ("dense base", f"MoE ({model_type})") and moe is plan.primary
    assert list(dense.shape.ffn) == DENSE_LAYOUTS[source] and list(moe.shape.ffn) == layout
    assert dense.counts.total == dense.counts.trainable == dense.counts.active
    if source in HUB_STAND_INS:
        assert dense.counts.total == HUB_STAND_INS[source][1]
    # the MoE holds more than the dense model (its routers at least), a token runs only top-k of its experts
    assert moe.counts.total == moe.counts.trainable > dense.counts.total and moe.counts.active < moe.counts.total
    # weights and optimizer state grow with the parameters (activations need not: split experts run narrower)
    for part in ("weights", "optimizer"):
        assert getattr(moe.memory, part) / getattr(dense.memory, part) == pytest.approx(moe.counts.total / dense.counts.total)


@pytest.mark.usefixtures("stand_in_hub")
@pytest.mark.parametrize("recipe", TRAIN_RECIPES)
def test_train_recipes_plan_their_own_run(recipe: Path) -> None:
    data = _recipe(recipe)
    inline = "convert" in data  # converts first: plans the MoE its convert section writes
    writer = None if inline else _convert_recipe_of(data["model"])
    if not inline and data["model"] in WRITTEN_BY:  # not written yet: one line that names it and says how to plan anyway
        with pytest.raises(MoeforgeError) as err:
            scenarios(str(recipe), {})
        message = str(err.value)
        assert message.startswith(f"model: {data['model']} does not exist") and "\n" not in message
        assert message.endswith("if a convert recipe writes this model, plan with that recipe as the model override")
    plan = plan_scenarios(str(recipe), scenarios(str(recipe), {}, str(writer) if writer else None), None)
    row = plan.primary
    setup = row.scenario.setup
    assert row.scenario.name.startswith(f"recipe: {data['stage']}")
    assert (setup.stage, setup.batch_size, setup.seq_len) == (
        data["stage"],
        data["training"]["per_device_train_batch_size"],
        data["data"]["max_length"],
    )
    model_type, layout = (
        MOE_LAYOUTS[recipe.name] if inline else MOE_LAYOUTS[writer.name] if writer else ("llama", DENSE_LAYOUTS[data["model"]])
    )
    assert (row.scenario.model.config.model_type, list(row.shape.ffn)) == (model_type, layout)
    if not {"adapter", "moice", "preset", "freeze", "freeze_layers", "freeze_gate"} & data.keys():
        assert plan.rows == [row] and row.counts.trainable == row.counts.total
        return
    full, own = plan.rows
    assert own is row and full.scenario.name == "full fine-tune (for comparison)"
    assert full.counts.trainable == full.counts.total > row.counts.trainable > 0
    if "adapter" in data or data.get("preset") == "moice":  # adds modules and trains those alone
        assert row.counts.trainable == row.counts.total - full.counts.total
    else:  # trains part of the same model
        assert row.counts.total == full.counts.total


@pytest.mark.usefixtures("stand_in_hub")
def test_cli_takes_a_missing_local_path_for_no_hub_id(capsys: pytest.CaptureFixture[str]) -> None:
    """``out/x`` beside an existing ``out/`` is a recipe's output not written yet: said so, the hub not asked;
    a hub id still plans from the hub's config.json."""
    Path("out").mkdir()
    assert main(["plan", "out/smollm2-dense2moe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge plan: error: out/smollm2-dense2moe does not exist (a local path, not tried as a Hugging Face id")
    assert err.count("\n") == 1
    assert main(["plan", "Qwen/Qwen3-0.6B", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["scenarios"]
    assert row["parameters"]["total"] == HUB_STAND_INS["Qwen/Qwen3-0.6B"][1]
