"""``moeforge import-config``: each original tool's file becomes a recipe that loads and means the same;
every key says where it came from; a file it does not know is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import moeforge
from moeforge.cli.main import main

SEEDS = Path(__file__).parents[2] / "examples" / "seed-configs"  # the original tools' own files
DENSE2MOE = (SEEDS / "dense2moe-config.json").read_text(encoding="utf-8")
MOE_ADAPTER = json.loads((SEEDS / "moe-adapter-config.json").read_text())
LLAMA_MOE_V2 = (SEEDS / "llama-moe-v2-convert.sh").read_text(encoding="utf-8")
OFFICIAL_BASES = json.loads((SEEDS / "moice-config.json").read_text())["base_set"]


def _import(tmp_path: Path, name: str, text: str, *args: str) -> tuple[str, object]:
    source = tmp_path / name
    source.write_text(text, encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    assert main(["import-config", str(source), "-o", str(recipe), *args]) == 0
    return recipe.read_text(encoding="utf-8"), moeforge.load_recipe(recipe)


def test_dense2moe_config_becomes_a_convert_recipe(tmp_path: Path) -> None:
    text, recipe = _import(tmp_path, "config.json", DENSE2MOE)
    assert isinstance(recipe, moeforge.ConvertRecipe)
    assert recipe.source == "meta-llama/Llama-2-7b-hf" and recipe.moe.init == "copy"
    assert (recipe.moe.num_experts, recipe.moe.top_k, recipe.moe.routing.gate_type) == (8, 2, "mlp")
    assert (recipe.moe.placement.moe_start_layer, recipe.moe.placement.moe_layer_freq) == (16, 2)
    assert "  top_k: 2  # from expert_top_k\n" in text
    assert "#   router_losses.mi_coef: 0.01  # from aux_loss_type: mi, aux_loss_weight" in text  # the train half, pointed to
    assert "#   hidden_size: the model's own config.json fields" in text


def test_dense2moe_router_loss_becomes_a_train_recipe(tmp_path: Path) -> None:
    _, recipe = _import(tmp_path, "config.json", DENSE2MOE, "--kind", "train")
    assert isinstance(recipe, moeforge.TrainRecipe)
    assert (recipe.router_losses.mi_coef, recipe.router_losses.balance_coef) == (0.01, 0.0)
    _, switch = _import(tmp_path, "switch.json", DENSE2MOE.replace('"mi"', '"switch"'), "--kind", "train")
    assert (switch.router_losses.balance_coef, switch.router_losses.mi_coef) == (0.01, 0.0)


def test_moe_adapter_config_becomes_an_adapter_train_recipe(tmp_path: Path) -> None:
    text, recipe = _import(tmp_path, "config.json", json.dumps(MOE_ADAPTER))
    assert isinstance(recipe, moeforge.TrainRecipe) and recipe.stage == "sft"
    assert recipe.model == "meta-llama/Llama-4-Maverick-8B" and recipe.output == Path("output")
    adapter = recipe.adapter
    assert (adapter.method, adapter.num_experts, adapter.top_k, adapter.rank, adapter.alpha, adapter.dropout) == (
        "moe_lora",
        4,
        1,
        16,
        32.0,
        0.1,
    )
    assert adapter.load_in_8bit
    assert [s.path for s in recipe.data.train] == [Path("data/train.json")] and [s.path for s in recipe.data.eval] == [
        Path("data/validation.json")
    ]
    assert recipe.data.max_length == 512
    assert (recipe.training.learning_rate, recipe.training.gradient_accumulation_steps, recipe.training.num_train_epochs) == (2e-4, 16, 3)
    assert "  top_k: 1  # from expert_capacity (the top-k)\n" in text
    assert "#   fp16: moeforge trains in float32 or bfloat16" in text


@pytest.mark.parametrize(
    ("switches", "method", "dropped"),
    [
        ({"use_lora": False}, "moe_bottleneck", "lora_rank"),
        ({"use_moe": False}, "lora", "expert_capacity"),
        ({"use_moe": False, "use_lora": False}, None, "use_moe, use_lora"),
    ],
)
def test_moe_adapter_switches_choose_the_method(tmp_path: Path, switches, method, dropped) -> None:
    text, recipe = _import(tmp_path, "config.json", json.dumps({**MOE_ADAPTER, **switches}))
    assert (recipe.adapter.method if recipe.adapter else None) == method
    assert f"#   {dropped}: " in text


def test_llama_moe_v2_script_becomes_a_partition_recipe(tmp_path: Path) -> None:
    text, recipe = _import(tmp_path, "convert_mixtral_v2.sh", LLAMA_MOE_V2)
    assert recipe.source == "/models/Meta-Llama-3-8B-Instruct" and recipe.output == Path("/out/Top1-Scale4.0")
    moe = recipe.moe
    assert (moe.init, moe.partition.method, moe.num_experts, moe.top_k, moe.shared.num_experts, moe.scale) == (
        "partition",
        "importance",
        7,
        1,
        1,
        4.0,
    )
    assert (moe.placement.keep_first_dense, moe.placement.keep_last_dense) == (1, 1)
    assert "#   moe_implementation_type: modulelist: moeforge writes native" in text


def test_llama_moe_v2_python_variables(tmp_path: Path) -> None:
    script = 'if __name__ == "__main__":\n    num_experts = 8\n    top_k = 2\n    src_model_dir = "/m/llama"\n    tgt_model_dir_prefix = f"/o/split-Top{top_k}"\n    tgt_moe_types = ["modulelist"]\n    neuron_indices_file = ""\n    convert_safetensors(src_model_dir, num_experts=num_experts)\n'
    _, recipe = _import(tmp_path, "convert_llama_to_mixtral.py", script)
    assert (recipe.source, str(recipe.output), recipe.moe.num_experts, recipe.moe.top_k) == ("/m/llama", "/o/split-Top2", 8, 2)
    assert recipe.moe.partition.method == "random"


def _moice(tmp_path: Path, **extra) -> str:
    return json.dumps(
        {"base_set": OFFICIAL_BASES, "topk": 7, "expert_nums": 7, "router_aux_loss_coef": 0.3, "output_router_logits": True, **extra}
    )


def test_moice_base_set_is_rescaled_to_a_local_models_theta(tmp_path: Path) -> None:
    model = tmp_path / "smollm2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 100000.0}))
    text, recipe = _import(tmp_path, "moice.json", _moice(tmp_path, model_name_or_path=str(model)))
    assert recipe.moice.base_set == [b * 10 for b in OFFICIAL_BASES]
    assert (recipe.moice.topk, recipe.moice.router_aux_loss_coef, recipe.preset) == (7, 0.3, "moice")
    assert f"rescaled by 10 = rope_theta 100000 (read from {model / 'config.json'}) / 10000" in text
    assert recipe.moice.resolve(100000.0, 2).base_set[0] == 100000.0  # what training checks


def test_moice_rope_theta_flag_and_unknown_theta(tmp_path: Path) -> None:
    _, recipe = _import(tmp_path, "moice.json", _moice(tmp_path), "--rope-theta", "500000")
    assert recipe.moice.base_set == [b * 50 for b in OFFICIAL_BASES]
    text, kept = _import(tmp_path, "moice.json", _moice(tmp_path))
    assert kept.moice.base_set == OFFICIAL_BASES
    assert "kept: moice requires base_set[0] to equal the model's rope_theta; if it is not 10000, rerun with --rope-theta" in text


def test_moice_expert_count_must_match_the_bases(tmp_path: Path, capsys) -> None:
    source = tmp_path / "moice.json"
    source.write_text(_moice(tmp_path, expert_nums=5))
    assert main(["import-config", str(source)]) == 2
    assert (
        capsys.readouterr().err
        == f"moeforge import-config: error: {source}: expert_nums 5 but base_set has 7 bases; MoICE has one expert per base: make them agree\n"
    )


def test_printed_recipe_reads_back_as_written(tmp_path: Path, capsys) -> None:
    source = tmp_path / "config.json"
    source.write_text(DENSE2MOE, encoding="utf-8")
    assert main(["import-config", str(source)]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["moe"]["placement"] == {"moe_start_layer": 16, "moe_layer_freq": 2}
    assert moeforge.load_recipe(yaml.safe_load(printed)).moe.top_k == 2


def test_unknown_file_is_one_line_exit_2_and_nothing_written(tmp_path: Path, capsys) -> None:
    source, out = tmp_path / "other.json", tmp_path / "recipe.yaml"
    source.write_text('{"hidden_size": 64, "learning_rate": 1e-4}')
    assert main(["import-config", str(source), "-o", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"moeforge import-config: error: {source}: not a config import-config knows; it reads MoICE (base_set, topk, "
        "expert_nums); Dense2MoE (num_experts, expert_top_k, moe_start_layer, aux_loss_type); MoE-adapter config.json "
        "(use_moe, expert_capacity, lora_rank); LLaMA-MoE v2 conversion (num_experts, top_k, scale_factor) (see docs/migrating.md)\n"
    )
    assert list(tmp_path.iterdir()) == [source]


def test_a_recipe_the_file_cannot_make_is_refused(tmp_path: Path, capsys) -> None:
    source, out = tmp_path / "config.json", tmp_path / "recipe.yaml"
    source.write_text(json.dumps(MOE_ADAPTER))
    out.write_text("kept\n")
    assert main(["import-config", str(source), "-o", str(out), "--kind", "convert"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "becomes a train recipe, not a convert one: drop --kind convert" in err
    assert out.read_text() == "kept\n"


def test_a_translation_that_does_not_validate_names_file_and_key(tmp_path: Path, capsys) -> None:
    source = tmp_path / "config.json"
    source.write_text(DENSE2MOE.replace('"mlp"', '"conv"'), encoding="utf-8")
    assert main(["import-config", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        f"error: {source} (Dense2MoE MoE config) as a convert recipe: moe.routing.gate_type: Input should be 'linear', 'mlp' or 'gmm' (got 'conv')"
        in err
    )
