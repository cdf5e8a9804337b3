"""Expert parallelism (``expert_parallel: {size: N}``, transformers' ``DistributedConfig``) on CPU processes (gloo).

* Forward (:mod:`tests.training.ep_forward` under torchrun): the EP-sharded model's logits equal the whole model's
  on every rank, each on a batch of its own, for Mixtral, Qwen2-MoE (shared expert) and moeforge's architecture;
  each rank holds ``num_experts / N`` experts; with every router forced to experts 0..top_k-1 the ranks holding
  the others receive no token at all and forward and backward still complete (4 ranks too: one expert each).
* Training: ``torchrun --nproc_per_node 2`` with ``expert_parallel: {size: 2}`` and 2 rows per rank trains what one
  process with 4 rows per step trains, as plain DDP does (tests/training/test_distributed.py explains why the LM
  loss splits exactly and why the balance loss is off). The experts run the same rows wherever they are; only
  the order of float sums changes (all-to-all regroups the rows, FSDP2 reduces the gradients), so losses agree to
  ~1e-7 relative and weights to ~1e-6. The EP run is killed after step 3 (:mod:`tests.training.killed_run`) and
  resumed from its step-2 checkpoint, so this also holds the resume to the uninterrupted run. The final
  ``model/`` is the single-process export: full expert tensors gathered on rank 0, the same names, config and
  provenance.
* A LoRA adapter on attention trains on the EP-sharded model as in one process.
* The skewed-routing entry (rank 1 never sends a token to experts 2 and 3, which live on rank 1) completes.
* The one-line refusals, before any load: no multi-process launch, sizes that do not divide, a dense model, an
  architecture without an EP plan, an adapter on the split experts, MoICE, DPO without an adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig

from moeforge.config.recipe import load_recipe
from moeforge.config.train_recipe import TrainRecipe
from moeforge.errors import MoeforgeError
from moeforge.io.safetensors_writer import sha256_file
from moeforge.training import train
from moeforge.training.checkpoints import MARKER
from tests.training.conftest import MOE, logged_losses, make_recipe, provenance, state_dict
from tests.training.launch import check, history, pt_recipe, run_module, torchrun, write_recipe

pytestmark = pytest.mark.timeout(900)  # several process starts on a 2-core machine

STEPS, SAVE_STEPS, KILL_AT = 4, 2, 3
GLOBAL_BATCH = 4
TELEMETRY_STEPS = 3  # not the last step (see test_distributed)
FORWARD_MODELS = ("mixtral", "qwen2_moe", "moeforge")
LORA = {"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4, "dropout": 0.0}
"""A plain LoRA on attention: replicated parameters beside the sharded model, which Trainer keeps in sync."""


@pytest.fixture(scope="module")
def forward(models, tmp_path_factory):
    """``forward(processes)``: every rank's report of :mod:`tests.training.ep_forward` (EP size = processes)."""
    cache: dict[int, list[dict]] = {}

    def run(processes: int) -> list[dict]:
        if processes not in cache:
            out = tmp_path_factory.mktemp(f"ep-forward-{processes}")
            names = FORWARD_MODELS if processes == 2 else ("mixtral",)
            check(run_module("tests.training.ep_forward", [str(out), str(processes), *(str(models[n]) for n in names)], out, processes))
            cache[processes] = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]
        return cache[processes]

    return run


@pytest.mark.parametrize("processes", [2, 4])
def test_sharded_logits_equal_the_whole_models(forward, processes: int) -> None:
    reports = forward(processes)
    for rank, report in enumerate(reports):
        assert report.keys() == set(FORWARD_MODELS if processes == 2 else ("mixtral",))
        for name, result in report.items():
            assert result["logits"] < 1e-6, (rank, name)
            assert result["starved_logits"] < 1e-6, (rank, name)


@pytest.mark.parametrize("processes", [2, 4])
def test_each_rank_holds_its_share_of_the_experts(forward, processes: int) -> None:
    for report in forward(processes):
        for name, result in report.items():
            shapes = result["experts"]
            assert len(shapes) == 2 * 3, name  # gate_up_proj and down_proj of 3 MoE layers
            for tensor, (whole, local) in shapes.items():
                assert whole[0] == MOE["num_experts"], tensor
                assert local == [MOE["num_experts"] // processes, *whole[1:]], tensor


@pytest.mark.parametrize("processes", [2, 4])
def test_ranks_whose_experts_get_no_token_complete_the_backward(forward, processes: int) -> None:
    """Routed to experts 0 and 1 only: their ranks' experts get gradients, the others' exactly zero."""
    per_rank = MOE["num_experts"] // processes
    for rank, report in enumerate(forward(processes)):
        for name, result in report.items():
            for local, largest in enumerate(result["starved_grads"]):
                if rank * per_rank + local < MOE["top_k"]:
                    assert largest > 0, (rank, name, local)
                else:
                    assert largest == 0, (rank, name, local)


def _write_recipe(path: Path, model: Path, output: Path, data: Path, per_device: int, save: bool = True, **extra) -> Path:
    schedule = {"lr_scheduler_type": "cosine", "warmup_ratio": 0.25}  # a schedule with state for resume to restore
    recipe = pt_recipe(
        model,
        output,
        data,
        per_device,
        steps=STEPS,
        save_steps=SAVE_STEPS if save else None,
        telemetry_steps=TELEMETRY_STEPS,
        training=schedule,
        **extra,
    )
    return write_recipe(path, {"router_losses": {"balance_coef": 0.0}, **recipe})


@pytest.fixture(scope="module")
def runs(models, data_files, tmp_path_factory) -> dict[str, Path]:
    """``{name: output}``: one process with 4 rows per step (``single``); 2 EP ranks with 2 rows each, killed at the
    end of step 3 and resumed from step 2's checkpoint (``ep``: one launch fewer than an uninterrupted run beside
    it), and under forced skewed routing (``skewed``); a LoRA adapter trained in one process and on 2 EP ranks
    (``lora-single``, ``lora``)."""
    root = tmp_path_factory.mktemp("ep-train")
    model, data = models["mixtral"], data_files["text"]
    single = _write_recipe(root / "single.yaml", model, root / "single", data, GLOBAL_BATCH)
    train(load_recipe(single, model=TrainRecipe), log=lambda _line: None)
    ep = {"expert_parallel": {"size": 2}}
    skewed = _write_recipe(root / "skewed.yaml", model, root / "skewed", data, GLOBAL_BATCH // 2, save=False, **ep)
    check(torchrun(skewed, root, module="tests.training.skewed_routing", timeout=300))
    killed = _write_recipe(root / "killed.yaml", model, root / "ep", data, GLOBAL_BATCH // 2, **ep)
    stopped = run_module("tests.training.killed_run", [str(KILL_AT), "train", str(killed)], root)
    # stopped after step 3: step 2's checkpoint complete, no final model (the CLI exits 130 on the interrupt)
    assert stopped.returncode != 0 and (root / "ep" / f"checkpoint-{SAVE_STEPS}" / MARKER).is_file()
    assert not (root / "ep" / "model").exists()
    check(torchrun(_write_recipe(root / "resumed.yaml", model, root / "ep", data, GLOBAL_BATCH // 2, resume=True, **ep), root))
    lora = {"adapter": LORA}
    adapter_single = _write_recipe(root / "lora-single.yaml", model, root / "lora-single", data, GLOBAL_BATCH, **lora)
    train(load_recipe(adapter_single, model=TrainRecipe), log=lambda _line: None)
    check(torchrun(_write_recipe(root / "lora.yaml", model, root / "lora", data, GLOBAL_BATCH // 2, **lora, **ep), root))
    names = ("single", "ep", "skewed", "lora-single", "lora")
    return {**{name: root / name for name in names}, "source": model}


def _history(output: Path) -> list[dict]:
    return history(output, STEPS)


def test_two_ep_ranks_log_the_same_losses_as_one_process(runs) -> None:
    """Every step, also the two after the resume: a resume that lost the optimizer's shards, the schedule's
    position or the data order would move them by far more than float noise."""
    losses_single, losses_ep = logged_losses(_history(runs["single"])), logged_losses(_history(runs["ep"]))
    assert losses_single.keys() == losses_ep.keys() and 1 in losses_single
    for step, loss in losses_single.items():
        assert losses_ep[step] == pytest.approx(loss, rel=1e-5), step
    entry_single, entry_ep = provenance(runs["single"] / "model")["training"][-1], provenance(runs["ep"] / "model")["training"][-1]
    assert entry_ep["steps"] == entry_single["steps"] == STEPS
    assert entry_ep["tokens"] == entry_single["tokens"] == STEPS * GLOBAL_BATCH * 32
    assert entry_ep["recipe"]["expert_parallel"] == {"size": 2}


def test_two_ep_ranks_train_the_same_weights_as_one_process(runs) -> None:
    a, b, before = state_dict(runs["single"] / "model"), state_dict(runs["ep"] / "model"), state_dict(runs["source"])
    assert a.keys() == b.keys()
    update_single = torch.cat([(a[k] - before[k]).flatten() for k in sorted(a)])
    update_ep = torch.cat([(b[k] - before[k]).flatten() for k in sorted(a)])
    assert float(update_single.abs().max()) > 1e-3  # it trained (≈ 2e-3 over the schedule)
    # Adam turns a float-noise sign flip of a near-zero gradient into a ±lr step: bound the whole update too
    assert float((update_ep - update_single).norm() / update_single.norm()) < 1e-4
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_the_final_model_is_the_single_process_export(runs) -> None:
    """Rank 0 writes the gathered model (full expert tensors under the export's names), its config and the
    provenance chain; no rank leaves a staging directory behind."""
    single, ep = runs["single"] / "model", runs["ep"] / "model"
    a, b = state_dict(single), state_dict(ep)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(".experts.3." in k for k in b)  # Mixtral's per-expert names, every expert
    assert json.loads((ep / "config.json").read_text()) == json.loads((single / "config.json").read_text())
    chain_single, chain_ep = provenance(single), provenance(ep)
    assert chain_ep.keys() == chain_single.keys()
    assert chain_ep["checksums"] == {p.name: sha256_file(p) for p in ep.glob("*.safetensors")}
    assert not list(runs["ep"].glob(".model.partial-*"))


def test_checkpoints_hold_the_gathered_model_and_every_ranks_shards(runs) -> None:
    """What the resume above read: the export-named model Trainer gathers (readable by any loader), and for the
    run itself every rank's model and optimizer shards, the schedule and every rank's RNG state."""
    checkpoint = runs["ep"] / f"checkpoint-{SAVE_STEPS}"
    assert state_dict(checkpoint).keys() == state_dict(runs["ep"] / "model").keys()
    assert len(list((checkpoint / "sharded_model").glob("*.safetensors"))) == 2
    assert sorted(p.name for p in (checkpoint / "sharded_optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert {"scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", MARKER} <= {p.name for p in checkpoint.iterdir()}


def test_an_adapter_trains_under_expert_parallelism_as_in_one_process(runs) -> None:
    """LoRA on attention of the EP-sharded model: the same losses and adapter weights as one process, saved as
    the same adapter directory."""
    single, ep = runs["lora-single"], runs["lora"]
    losses_single, losses_ep = logged_losses(_history(single)), logged_losses(_history(ep))
    assert losses_single.keys() == losses_ep.keys() and 1 in losses_single
    for step, loss in losses_single.items():
        assert losses_ep[step] == pytest.approx(loss, rel=1e-5), step
    a, b = state_dict(single / "model"), state_dict(ep / "model")
    assert a.keys() == b.keys() and all("lora_" in name for name in a)
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 5e-4  # B starts at 0: it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert (ep / "model" / "adapter_config.json").is_file() and not (ep / "model" / "model.safetensors").exists()


def test_skewed_routing_completes_under_expert_parallelism(runs) -> None:
    """Rank 1 routes only to experts 0 and 1 (on rank 0): experts 2 and 3, on rank 1, get rank 0's tokens only.
    The one routing report (rank 0's) counts both ranks' tokens."""
    skewed = runs["skewed"]
    assert provenance(skewed / "model")["training"][-1]["steps"] == STEPS
    (report,) = [json.loads(line) for line in (skewed / "routing.jsonl").read_text().splitlines()]
    (even,) = [json.loads(line) for line in (runs["single"] / "routing.jsonl").read_text().splitlines()]
    assert report["tokens"] == even["tokens"] == TELEMETRY_STEPS * GLOBAL_BATCH * 32
    for skewed_load, even_load in zip(report["load"], even["load"], strict=True):
        assert sum(skewed_load[2:]) < sum(even_load[2:])
    assert state_dict(skewed / "model").keys() == state_dict(runs["single"] / "model").keys()


def _launched(monkeypatch, world: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")


@pytest.mark.parametrize(
    ("world", "size", "kind", "extra", "message"),
    [
        (1, 2, "mixtral", {}, "expert_parallel: size 2 needs a multi-process launch: torchrun --nproc_per_node 2"),
        (3, 2, "mixtral", {}, "expert_parallel: size 2 does not divide the 3 processes launched"),
        (3, 3, "mixtral", {}, "expert_parallel: size 3 does not divide the 4 experts of a MoE layer"),
        (2, 2, "dense", {}, "is a dense model (llama): it has no experts to split"),
        (2, 2, "mixtral", {"adapter": {"targets": ["experts"]}}, "expert_parallel: adapter.targets: experts puts deltas on the experts"),
        (2, 2, "mixtral", {"moice": {"topk": 3}}, "expert_parallel: MoICE attention is not supported"),
        (2, 2, "mixtral", {"stage": "dpo"}, "expert_parallel: stage dpo needs a frozen copy of the policy"),
    ],
)
def test_bad_launches_and_models_are_refused_before_any_load(
    models, tmp_path: Path, monkeypatch, world: int, size: int, kind: str, extra: dict, message: str
) -> None:
    if world > 1:
        _launched(monkeypatch, world)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    output = tmp_path / "run"
    keys = dict(extra)
    recipe = make_recipe(keys.pop("stage", "pt"), models[kind], output, expert_parallel={"size": size}, **keys)
    with pytest.raises(MoeforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(recipe, log=lambda _line: None)
    assert not output.exists()


def test_an_architecture_without_an_ep_plan_is_refused(models, tmp_path: Path, monkeypatch) -> None:
    _launched(monkeypatch, 2)
    monkeypatch.setattr(MixtralConfig, "base_model_ep_plan", None)
    recipe = make_recipe("pt", models["mixtral"], tmp_path / "run", expert_parallel={"size": 2})
    with pytest.raises(MoeforgeError, match="transformers has no expert-parallel plan for mixtral"):
        train(recipe, log=lambda _line: None)
