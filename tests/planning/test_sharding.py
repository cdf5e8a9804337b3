"""``moeforge plan`` on several GPUs: what ZeRO / FSDP stages, offloading and expert parallelism leave on one
GPU, the largest layer the sharded engines gather, and the recipe keys and flags that choose them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from moeforge.cli.main import main
from moeforge.config.recipe import ConvertRecipe
from moeforge.errors import MoeforgeError
from moeforge.planning.counting import ModelSpec, count_parameters, model_shape
from moeforge.planning.memory import Sharding, TrainingSetup, estimate
from moeforge.planning.sources import converted_config, scenarios

ROUTED = {"num_experts": 4, "top_k": 2, "init": "copy"}


@pytest.fixture
def moe(tiny_llama_dir: Path, tmp_path: Path):
    """(config, counts, shape) of the tiny 4-expert MoE ``moeforge convert`` would write."""
    recipe = ConvertRecipe(source=str(tiny_llama_dir), output=tmp_path / "out", moe=ROUTED)
    config = converted_config(recipe, "test")[1].config
    return config, count_parameters(ModelSpec(config)), model_shape(config)


def _layer_bytes(model: torch.nn.Module, layer: int, experts_only: bool = False) -> int:
    prefix = f"model.layers.{layer}."
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if name.startswith(prefix) and (not experts_only or ".experts." in name)
    )


def test_the_gathered_layer_is_the_real_models_largest(moe) -> None:
    config, counts, _ = moe
    model = AutoModelForCausalLM.from_config(config)
    assert counts.layer_bytes == max(_layer_bytes(model, i) for i in range(config.num_hidden_layers))
    assert counts.layer_expert_bytes == _layer_bytes(model, 0, experts_only=True) > counts.layer_bytes // 2


def test_each_stage_splits_its_parts_over_the_gpus(moe) -> None:
    _, counts, shape = moe
    one = estimate(counts, shape, TrainingSetup())

    def on(**sharding) -> tuple[int, int, int, int]:
        m = estimate(counts, shape, TrainingSetup(sharding=Sharding(gpus=4, **sharding)))
        assert m.activations == one.activations  # each GPU runs its own batch
        return m.weights, m.gradients, m.optimizer, m.host

    assert on() == (one.weights, one.gradients, one.optimizer, 0)  # DDP: replicas
    assert on(stage=1) == (one.weights, one.gradients, one.optimizer // 4, 0)
    assert on(stage=2) == (one.weights, one.gradients // 4, one.optimizer // 4, 0)
    layer = counts.layer_bytes  # fp32, all trainable: gathered twice (running + prefetched), one gradient
    assert on(stage=3) == (one.weights // 4 + 2 * layer, one.gradients // 4 + layer, one.optimizer // 4, 0)
    offloaded = (one.weights // 4) + (one.gradients // 4) + (one.optimizer // 4)
    assert on(stage=3, offload=True) == (2 * layer, layer, 0, offloaded)
    assert on(stage=2, offload=True) == (one.weights, 0, 0, (one.gradients // 4) + (one.optimizer // 4))


def test_expert_parallelism_gathers_only_the_ranks_own_experts(moe) -> None:
    _, counts, shape = moe
    zero3 = estimate(counts, shape, TrainingSetup(sharding=Sharding(gpus=4, stage=3)))
    ep = estimate(counts, shape, TrainingSetup(sharding=Sharding(gpus=4, stage=3, expert_parallel=4)))
    gathered = counts.layer_bytes - counts.layer_expert_bytes + counts.layer_expert_bytes // 4
    assert zero3.weights - ep.weights == 2 * (counts.layer_bytes - gathered)
    assert ep.optimizer == zero3.optimizer and ep.total < zero3.total


def _train_recipe(tmp_path: Path, model: Path, **engine) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(
        yaml.safe_dump({"stage": "pt", "model": str(model), "output": str(tmp_path / "run"), "data": {"builtin": "pt-demo"}, **engine})
    )
    return path


def test_recipes_choose_the_sharding(tiny_llama_dir: Path, tmp_path: Path) -> None:
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "bf16": {"enabled": "auto"}}))
    cases = [
        ({"deepspeed": str(zero3)}, Sharding(stage=3, offload=True)),
        ({"fsdp": {"reshard_after_forward": False}}, Sharding(stage=2)),
        ({"fsdp": {"cpu_offload": True}}, Sharding(stage=3, offload=True)),
        ({}, Sharding()),
    ]
    for engine, expected in cases:
        (row,) = scenarios(str(_train_recipe(tmp_path, tiny_llama_dir, **engine)), {})
        assert row.setup.sharding == expected, engine
    (row,) = scenarios(str(_train_recipe(tmp_path, tiny_llama_dir, fsdp={})), {"sharding": {"gpus": 8}})
    assert row.setup.sharding == Sharding(gpus=8, stage=3)


def test_the_shipped_deepspeed_configs_are_read(tiny_llama_dir: Path, tmp_path: Path) -> None:
    configs = sorted((Path(__file__).parents[2] / "configs" / "deepspeed").glob("*.json"))
    assert [c.name for c in configs] == ["zero2.json", "zero3-offload.json", "zero3.json"]
    for config in configs:
        (row,) = scenarios(str(_train_recipe(tmp_path, tiny_llama_dir, deepspeed=str(config))), {})
        stage = json.loads(config.read_text())["zero_optimization"]["stage"]
        assert row.setup.sharding.stage == stage and row.setup.sharding.offload == ("offload" in config.name), config.name


def test_cli_flags_and_the_table(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "convert.yaml"
    recipe.write_text(yaml.safe_dump({"source": str(tiny_llama_dir), "output": str(tmp_path / "out"), "moe": ROUTED}))
    assert main(["plan", str(recipe), "--json", "--gpus", "4", "--expert-parallel", "2", "--offload"]) == 0
    dense, moe_row = json.loads(capsys.readouterr().out)["scenarios"]
    assert moe_row["setup"]["sharding"] == {"gpus": 4, "stage": 3, "offload": True, "expert_parallel": 2}
    assert dense["setup"]["sharding"]["expert_parallel"] == 1  # the dense base has no experts to split
    assert moe_row["memory_bytes"]["host"] > 0 and moe_row["memory_bytes"]["optimizer"] == 0
    assert main(["plan", str(recipe), "--gpus", "4", "--zero", "3", "--offload"]) == 0
    out = capsys.readouterr().out
    assert "per GPU of 4: ZeRO-3" in out and "host (offload)" in out


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--zero", "4"], "--zero 4: ZeRO stages are 0"),
        (["--gpus", "0"], "--gpus 0"),
        (["--gpus", "4", "--expert-parallel", "3"], "expert parallelism over 3 ranks needs a GPU count it divides, not 4"),
        (["--expert-parallel", "2"], "expert parallelism needs an MoE model"),
    ],
)
def test_bad_sharding_is_one_line_exit_2(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], culprit: str) -> None:
    assert main(["plan", str(tiny_llama_dir), *args]) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.count("\n") == 1


def test_experts_that_the_ep_size_does_not_divide(moe, tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = tmp_path / "convert.yaml"
    recipe.write_text(yaml.safe_dump({"source": str(tiny_llama_dir), "output": str(tmp_path / "out"), "moe": {**ROUTED, "num_experts": 6}}))
    with pytest.raises(MoeforgeError, match=r"over 4 ranks must divide every MoE layer's experts \(\[6\]\)"):
        from moeforge.planning.report import plan_scenarios

        plan_scenarios(str(recipe), scenarios(str(recipe), {"sharding": {"expert_parallel": 4}}), None)


def test_deepspeed_bf16_keeps_fp32_master_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """DeepSpeed casts the model to bf16 and keeps fp32 master weights and AdamW states: 2 + 2 + 12 bytes per
    trainable parameter (the ZeRO paper's mixed-precision Adam), not the 4 + 4 + 8 of fp32 training."""
    config = tmp_path / "zero2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    recipe = _train_recipe(tmp_path, tiny_llama_dir, deepspeed=str(config), training={"bf16": True})
    (row,) = scenarios(str(recipe), {})
    assert row.setup.master_weights and row.setup.dtype == "bfloat16" and not row.setup.mixed_precision
    counts = count_parameters(ModelSpec(row.model.config, row.setup.dtype))
    memory = estimate(counts, model_shape(row.model.config), row.setup)
    assert (memory.weights, memory.gradients, memory.optimizer) == (2 * counts.total, 2 * counts.trainable, 12 * counts.trainable)
