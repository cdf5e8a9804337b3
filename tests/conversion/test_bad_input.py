"""Bad recipes and impossible options: one line naming the key, nothing written."""

from __future__ import annotations

import pytest

from moeforge.cli.main import main
from moeforge.config.recipe import load_recipe
from moeforge.errors import FidelityError, MoeforgeError
from tests.conversion.conftest import run_convert

PLAN_ERRORS = {
    "top_k > experts": ({"num_experts": 4, "top_k": 5}, "moe.top_k: 5 is larger than num_experts 4"),
    "partition indivisible": ({"num_experts": 5, "top_k": 2, "init": "partition"}, "do not split evenly into 5 experts"),
    "granular top_k": (
        {"num_experts": 8, "top_k": 3, "init": "granular", "granularity": 2},
        "moe.top_k: 3 must be a multiple of granularity 2",
    ),
    "granular experts": ({"num_experts": 6, "top_k": 2, "init": "granular", "granularity": 4}, "must be a multiple of granularity 4"),
    "layer out of range": ({"placement": {"layers": [0, 7]}}, "moe.placement.layers: layer 7 does not exist"),
    "no layer left": ({"placement": {"keep_first_dense": 2, "keep_last_dense": 1}}, "selects no layer"),
    "list length": ({"num_experts": [4, 4]}, "the list has 2 entries but 3 layers are MoE"),
    "mapping gap": ({"num_experts": {"0-1": 4}}, "no expert count given for MoE layer 2"),
    "partition full router": (
        {"num_experts": 4, "top_k": 4, "init": "partition", "routing": {"router_init": "random"}},
        "moe.routing.router_init: random with partition",
    ),
    "shared too big": ({"shared": {"num_experts": 1, "intermediate_size": 96}}, "moe.shared.intermediate_size: 96 must be between"),
}


@pytest.mark.parametrize("case", sorted(PLAN_ERRORS))
def test_plan_errors_name_the_key(case, tiny_sources, tmp_path):
    moe, message = PLAN_ERRORS[case]
    with pytest.raises(MoeforgeError, match=message.replace("(", r"\(")):
        run_convert(tiny_sources["gqa"], tmp_path / "out", moe)
    assert not (tmp_path / "out").exists()


def test_native_export_that_cannot_hold_the_options_names_them(tiny_sources, tmp_path):
    with pytest.raises(MoeforgeError, match=r"export: mixtral cannot hold this conversion exactly: dense layers .*shared experts"):
        run_convert(tiny_sources["gqa"], tmp_path / "out", {"shared": {"num_experts": 1}, "placement": {"layers": [1]}}, export="mixtral")
    with pytest.raises(MoeforgeError, match="export: qwen2_moe cannot hold .*gate_type gmm"):
        run_convert(tiny_sources["gqa"], tmp_path / "out", {"routing": {"gate_type": "gmm"}}, export="qwen2_moe")


RECIPE_ERRORS = {
    "unknown key": ("source: x\noutput: y\nmoe:\n  num_expert: 4\n", "moe.num_expert: unknown key"),
    "bad value": ("source: x\noutput: y\nmoe:\n  init: clone\n", "moe.init: Input should be 'copy', 'partition' or 'granular'"),
    "negative": ("source: x\noutput: y\nmoe:\n  top_k: 0\n", "moe.top_k: Input should be greater than or equal to 1 (got 0)"),
    "missing": ("output: y\n", "source: required key is missing"),
    "yaml": ("source: [x\n", "not valid YAML"),
    "not mapping": ("- a\n- b\n", "the top level must be a mapping"),
    "virtual groups": (
        "source: x\noutput: y\nmoe:\n  routing:\n    router_init: virtual_groups\n",
        "virtual_groups only applies to init: granular",
    ),
    "size": ("source: x\noutput: y\nmax_shard_size: lots\n", "max_shard_size: 'lots' is not a size"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_ERRORS))
def test_recipe_errors(case, tmp_path):
    text, message = RECIPE_ERRORS[case]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(MoeforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path)


def test_dense2moe_aliases(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "source: x\noutput: y\nmoe:\n  num_experts: 8\n  expert_top_k: 1\n  placement: {moe_start_layer: 16, moe_layer_freq: 2}\n"
    )
    recipe = load_recipe(path)
    assert recipe.moe.top_k == 1 and recipe.moe.placement.moe_start_layer == 16


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("source: x\noutput: y\nmoe:\n  num_expert: 4\n")
    assert main(["convert", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "moe.num_expert: unknown key" in err
    assert main(["convert", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_flags_without_recipe(tiny_sources, tmp_path, capsys):
    out = tmp_path / "moe"
    code = main(["convert", "--source", str(tiny_sources["gqa"]), "--output", str(out), "--num-experts", "4", "--top-k", "1"])
    assert code == 0 and (out / "config.json").is_file()
    assert "exact: PASS" in capsys.readouterr().err
    assert main(["convert", "--source", str(tiny_sources["gqa"]), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_existing_output_is_kept_until_the_new_one_is_complete(tiny_sources, tmp_path):
    out = tmp_path / "moe"
    run_convert(tiny_sources["gqa"], out, {"num_experts": 4})
    with pytest.raises(MoeforgeError, match="already exists"):
        run_convert(tiny_sources["gqa"], out, {"num_experts": 4})
    from moeforge.config.recipe import parse_recipe
    from moeforge.conversion import convert

    recipe = parse_recipe({"source": str(tiny_sources["gqa"]), "output": str(out), "moe": {"num_experts": 2, "top_k": 1}})
    convert(recipe, overwrite=True, log=lambda _l: None)
    assert '"num_local_experts": 2' in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_failed_fidelity_leaves_nothing(tiny_sources, tmp_path, monkeypatch):
    monkeypatch.setattr("moeforge.conversion.pipeline.default_tolerance", lambda *_a: 0.0)
    import moeforge.conversion.pipeline as pipeline

    original = pipeline.build_experts

    def subtly_wrong(*args, **kwargs):
        tensors = original(*args, **kwargs)
        tensors["experts.down_proj"][0].mul_(1.01)
        return tensors

    monkeypatch.setattr(pipeline, "build_experts", subtly_wrong)
    with pytest.raises(FidelityError, match="should reproduce the dense model exactly"):
        run_convert(tiny_sources["gqa"], tmp_path / "moe", {"num_experts": 4})
    assert list(tmp_path.iterdir()) == []


def test_interrupt_mid_write_leaves_nothing(tiny_sources, tmp_path, monkeypatch):
    from moeforge.io.safetensors_writer import ShardedWriter

    calls = {"n": 0}
    original = ShardedWriter.add

    def interrupted(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_convert(tiny_sources["gqa"], tmp_path / "moe", {"num_experts": 4})
    assert list(tmp_path.iterdir()) == []
