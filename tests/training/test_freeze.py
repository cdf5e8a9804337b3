"""Freezing by role: what a recipe freezes comes out of training bit-identical, what it trains moves.

Roles are read here from the saved tensor names, independently of moeforge's module-tree rules: routers
are ``...gate.weight`` of an MoE block (``mlp`` for moeforge_llama, ``block_sparse_moe`` in Mixtral's
saved layout), experts anything under ``experts``, attention ``self_attn``, embeddings ``embed_tokens`` and
``lm_head``, and the RMSNorm weights ``norms``. Each run is 2 pt steps at lr 1e-3 (constant), enough for
Adam to move every trainable tensor; the input and ``<output>/model`` state dicts are compared.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from moeforge.errors import MoeforgeError
from moeforge.training import train
from tests.training.conftest import make_recipe, state_dict

ROLES = ("router", "experts", "attention", "embeddings", "norms")


def role_of(name: str) -> str:
    if re.search(r"\.(mlp|block_sparse_moe)\.gate\.weight$", name):
        return "router"
    if ".experts." in name:
        return "experts"
    if ".self_attn." in name:
        return "attention"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if name.endswith("norm.weight"):
        return "norms"
    raise AssertionError(f"unclassified tensor {name}")


def changed_roles(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    """(roles with every tensor changed, roles with every tensor bit-identical); a role in neither fails."""
    assert before.keys() == after.keys()
    moved: dict[str, list[bool]] = {}
    for name, tensor in before.items():
        moved.setdefault(role_of(name), []).append(not torch.equal(tensor, after[name]))
    assert set(moved) == set(ROLES), moved.keys()
    mixed = {role for role, flags in moved.items() if any(flags) and not all(flags)}
    assert not mixed, f"roles partly trained: {mixed}"
    return {r for r, f in moved.items() if all(f)}, {r for r, f in moved.items() if not any(f)}


# recipe keys -> the roles that must stay bit-identical (everything else must train)
FREEZES = {
    "attention+embeddings": ({"freeze": ["attention", "embeddings"]}, {"attention", "embeddings"}),
    "router_only": ({"preset": "router_only"}, {"experts", "attention", "embeddings"}),
    "experts_only": ({"preset": "experts_only"}, {"router", "attention", "embeddings"}),
    "freeze_gate": ({"freeze_gate": True}, {"router"}),
    "all_but_new": ({"freeze": ["all_but_new"]}, {"experts", "attention", "embeddings", "norms"}),
}
KINDS = ("moeforge", "mixtral")
PRESETS = ("router_only", "experts_only")


@pytest.fixture(scope="module")
def freeze_runs(models, data_files, tmp_path_factory):
    """Every freeze setting on both MoE kinds, 2 steps each: (result, log lines, recipe)."""
    root = tmp_path_factory.mktemp("freeze")
    data = {"train": [str(data_files["text"])], "max_length": 32}
    runs = {}
    for kind in KINDS:
        for name, (keys, _) in FREEZES.items():
            recipe = make_recipe("pt", models[kind], root / f"{kind}-{name}", data, **keys)
            lines: list[str] = []
            runs[kind, name] = (train(recipe, log=lines.append), lines, recipe)
    return runs


@pytest.mark.parametrize("name", list(FREEZES))
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_groups_stay_bit_identical_and_the_rest_trains(freeze_runs, models, kind: str, name: str) -> None:
    result, lines, _ = freeze_runs[kind, name]
    frozen_roles = FREEZES[name][1]
    before, after = state_dict(models[kind]), state_dict(result.model_dir)
    trained, frozen = changed_roles(before, after)
    assert frozen_roles <= frozen, f"{name}: frozen roles that changed: {frozen_roles - frozen}"
    # whether a preset trains the norms is test_presets_train_only_what_they_name's business
    must_train = set(ROLES) - frozen_roles - ({"norms"} if name in PRESETS else set())
    assert must_train <= trained, f"{name}: trainable roles that did not change: {must_train - trained}"

    # the reported counts are those of the tensors that trained (both saved layouts hold the same numbers)
    assert result.total_parameters == sum(t.numel() for t in before.values())
    assert result.trainable_parameters == sum(t.numel() for n, t in before.items() if role_of(n) in trained)
    count_lines = [line for line in lines if line.startswith("trainable parameters:")]
    assert len(count_lines) == 1
    assert f"{result.trainable_parameters:,} / {result.total_parameters:,}" in count_lines[0]
    assert f"{100 * result.trainable_parameters / result.total_parameters:.2f}%" in count_lines[0]


@pytest.mark.parametrize("preset", ["router_only", "experts_only"])
def test_presets_train_only_what_they_name(freeze_runs, models, preset: str) -> None:
    result, _, _ = freeze_runs["moeforge", preset]
    trained, frozen = changed_roles(state_dict(models["moeforge"]), state_dict(result.model_dir))
    assert trained == {"router" if preset == "router_only" else "experts"}
    assert "norms" in frozen


def test_counts_line_is_logged_by_default(models, data_files, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recipe = make_recipe(
        "pt",
        models["moeforge"],
        tmp_path / "out",
        {"train": [str(data_files["text"])], "max_length": 32},
        freeze=["attention"],
        training={"max_steps": 1},
    )
    caplog.set_level(logging.INFO, logger="moeforge")
    result = train(recipe)
    line = next(line for line in caplog.messages if line.startswith("trainable parameters:"))
    assert f"{result.trainable_parameters:,} / {result.total_parameters:,}" in line
    assert line.endswith("frozen: attention")
    assert 0 < result.trainable_parameters < result.total_parameters


@pytest.mark.parametrize(
    ("kind", "keys", "names"),
    [
        ("moeforge", {"freeze": ["all_but_new", "router"]}, ["all_but_new", "router"]),
        ("mixtral", {"freeze": ["all_but_new"], "freeze_gate": True}, ["all_but_new", "router"]),
        ("dense", {"freeze": ["all_but_new"]}, ["all_but_new", "router"]),  # a dense model has no new parameter
    ],
    ids=["all_but_new+router", "all_but_new+freeze_gate", "all_but_new-on-dense"],
)
def test_freezing_everything_is_an_error_naming_the_groups(models, data_files, tmp_path: Path, kind, keys, names) -> None:
    recipe = make_recipe("pt", models[kind], tmp_path / "out", {"train": [str(data_files["text"])], "max_length": 32}, **keys)
    with pytest.raises(MoeforgeError) as error:
        train(recipe, log=lambda _line: None)
    message = str(error.value)
    assert message.startswith("freeze:")
    for name in names:
        assert name in message
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_router_learning_rate_is_a_separate_param_group(models, data_files, tmp_path: Path, kind: str) -> None:
    """lr 1e-9 for everything but the routers, 1e-2 for them: only the routers move measurably."""
    recipe = make_recipe(
        "pt",
        models[kind],
        tmp_path / "out",
        {"train": [str(data_files["text"])], "max_length": 32},
        training={"max_steps": 2, "learning_rate": 1e-9, "router_learning_rate": 1e-2},
    )
    result = train(recipe, log=lambda _line: None)
    before, after = state_dict(models[kind]), state_dict(result.model_dir)
    moved = {role: 0.0 for role in ROLES}
    for name, tensor in before.items():
        role = role_of(name)
        moved[role] = max(moved[role], float((after[name] - tensor).abs().max()))
    assert moved["router"] > 5e-3, moved  # Adam's first steps move each weight by ≈ lr
    for role in ("experts", "attention", "embeddings", "norms"):
        assert moved[role] < 1e-7, moved
