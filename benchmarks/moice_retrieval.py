"""MoICE on SmolLM2, transfer protocol: routers trained on generic text, then probed on long-context retrieval.

The question: does MoICE's query-dependent routing among RoPE bases, trained the way the paper trains it
(briefly, on generic text, loss on every token; Lin et al. 2024, arXiv 2406.19598), make a model use the
middle of a long context better — better than the original model, and better than controls with the same
training that cannot route by query? Nothing is trained on the probe task.

Models (every trained arm: same data, steps, batch, lr, AdamW with no weight decay, constant lr):

  original          SmolLM2-135M-Instruct as shipped (the embedded Q4_1 GGUF, dequantised to fp32)
  moice-untrained   MoICE attention (bases θ·[1, 1.75, 1.8, 1.9, 2.0, 2.25, 2.5], top-7, one router per layer
                    reading each head's query: 28,350 parameters), routers at their N(0, 0.02) init, which is
                    already a near-uniform mixture (an "equal weights" control would be the same model)
  moice-trained-sS  the same, routers trained (everything else frozen), seed S = router init + data order
  static-mixture-sS the same attention, but each layer's router replaced by learned logits per head over the
                    bases that ignore the query (:class:`StaticMixture`, 30·9·7 = 1,890 parameters, zero =
                    uniform init): a static mixture is all a query-blind weighting can learn, so it has
                    fewer parameters by construction; seed S = data order
  adapter-sS        a parameter-matched non-positional control: rank-1 LoRA on every layer's attention output
                    projection (34,560 parameters, B = 0 init), seed S = A's init + data order

Training data: the built-in ``pt-demo`` text (moeforge.data), every 10th document held out, packed to
``--block``-token blocks; next-token loss on all tokens. The logged LM loss excludes the router balance loss,
which is logged apart: at top-k = N (MoICE's released recipe) it is constant with zero gradient.

Why lr 1e-2 (MoICE's recipe: 1e-4 constant, a few steps): a pilot at lr 1e-3, 8 steps of 256 tokens left
every mixture uniform to four decimals (largest base weight 0.1434 trained, 0.1433 untrained, 1/7 = 0.1429).
Adam moves a weight by at most about lr per step, and a MoICE router's logits are products of three
N(0, 0.02) weight matrices, so at lr <= 1e-3 and the step count two CPU cores afford the "trained" routers
are the untrained ones and the run could not test routing at all. At 1e-2 (16 steps) they move (see the
mixture table the report prints); the static mixture, whose logits move by at most ~lr per step, moves far
less — read its comparison with that in mind.

Probes (moeforge.eval.probes, teacher-forced, batch 1 — padded batches take a slower attention path for the
7-base attention): key-value retrieval (``--kv-pairs``, held-out seed ``--eval-seed``) and an MDQA-style
probe over a generated JSONL of made-up facts (``--mdqa-docs`` short documents, gold document moving), at
``--positions`` positions, ``--samples`` prompts per position; the same prompts for every model. Also the
held-out loss of ``--ppl-blocks`` pt-demo blocks.

Reported: per position, answer log-prob and exact match with bootstrap 95% CIs (trained arms pooled over
seeds: the per-prompt mean over seeds, resampled over prompts; plus the SD across seeds of the per-seed means
and of the max−min position gap); paired per-prompt differences (moice-trained − static-mixture, − untrained,
− original; static-mixture, untrained and adapter − original), per seed and pooled; held-out perplexity; how far
each trained mixture is from uniform; the wall time of every unit (the cost of MoICE's 7-base attention
against the original model on the same prompts).

Resumable: each training unit writes ``<results>/moice_retrieval_runs/train_<model>.json`` (its loss log; the
trained weights go to ``--cache``, and a unit whose weights are gone is retrained), each evaluation unit
``eval_<model>.json`` (per-prompt scores); a rerun skips finished units, ``--report`` rebuilds
``moice_retrieval.{json,md}`` and one ``moice_retrieval_<probe>.png`` per probe from them. ``--models`` picks units, so phases can run one at a time.

    # the README run (2 shared CPU cores; one phase per command, so other jobs can interleave; the units' own
    # times add up to ~47 min: 8 min of training, 40 of probing, about 2 s per MoICE prompt of 600 tokens):
    python benchmarks/moice_retrieval.py --phase train --models moice-trained,static-mixture,adapter   # 8 min
    python benchmarks/moice_retrieval.py --phase eval --models original,moice-untrained,adapter \\
        --kv-pairs 48,96 --mdqa-docs 48                                                                 # 10 min
    python benchmarks/moice_retrieval.py --phase eval --models moice-trained --kv-pairs 48,96 --mdqa-docs 48   # 14 min
    python benchmarks/moice_retrieval.py --phase eval --models static-mixture --kv-pairs 48,96 --mdqa-docs 48  # 15 min
    python benchmarks/moice_retrieval.py --report                                                      # 5 s
    # a longer context (--kv-pairs 48,96,192) adds its probe to the same units; more prompts per position
    # (--samples 20) changes the units' settings, so it needs its own --results-dir.
    # a smoke run (a minute or two):
    python benchmarks/moice_retrieval.py --results-dir /tmp/moice-smoke --steps 1 --block 64 --seeds 1 \\
        --kv-pairs 6 --mdqa-docs 6 --samples 1 --ppl-blocks 1
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _runs import paired_gap, score_blocks
from torch import nn

from moeforge.config.moice import MoiceSpec
from moeforge.config.router_losses import RouterLossConfig
from moeforge.data.builtin import builtin_records
from moeforge.data.packing import pack_texts
from moeforge.eval.plots import plot_position_curve
from moeforge.eval.probes import (
    KVProbe,
    MDQAProbe,
    PositionScore,
    ProbeResult,
    bootstrap_ci,
    run_probe,
    spread_positions,
)
from moeforge.io.loading import load_model
from moeforge.modeling.moice import MoiceAttention, MoiceRouter, apply_moice
from moeforge.routing.hooks import attach_router_losses

NAME = "moice_retrieval"
RESULTS = Path(__file__).parent / "results"
HELD_OUT_EVERY = 10  # pt-demo document i is held out when i % 10 == 9
ARMS = ("original", "moice-untrained", "moice-trained", "static-mixture", "adapter")
TRAINED = ("moice-trained", "static-mixture", "adapter")
TRAINABLE = {"moice-trained": "moice_router", "static-mixture": "moice_router", "adapter": "lora_"}
Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ models


class StaticMixture(nn.Module):
    """A query-blind stand-in for :class:`MoiceRouter`: learned logits per head over the bases, the same for
    every token and query. Same contract (``(logits, weights, indices)``, ``top_k``, ``num_experts``), so
    :class:`MoiceAttention` mixes its bases with it and moeforge's router losses see it like MoICE's router;
    zero logits = the uniform mixture an untrained MoICE router starts near."""

    def __init__(self, router: MoiceRouter) -> None:
        super().__init__()
        self.num_experts, self.top_k = router.num_experts, router.top_k
        self.decisions_per_token, self.balance_coef = router.decisions_per_token, router.balance_coef
        self.logits = nn.Parameter(torch.zeros(router.decisions_per_token, router.num_experts, device=router.w1.device))

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``query [B, H, T, d]`` (read for its shape only) -> fp32 ``logits [B, T, H, N]``, top-k weights, indices."""
        batch, heads, tokens, _ = query.shape
        logits = self.logits.float().expand(batch, tokens, heads, self.num_experts)
        indices = logits.topk(self.top_k, dim=-1).indices
        weights = torch.softmax(logits, dim=-1).gather(-1, indices)
        return logits, weights / weights.sum(-1, keepdim=True), indices


class LowRankOutput(nn.Module):
    """``o_proj(x) + B(A x)``, rank 1, B zero-initialised: starts as the original model and cannot see positions."""

    def __init__(self, linear: nn.Linear, generator: torch.Generator, rank: int = 1) -> None:
        super().__init__()
        self.linear = linear
        self.lora_a = nn.Parameter(torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.lora_a.T) @ self.lora_b.T


def arm_of(model: str) -> str:
    """``moice-trained-s1`` -> ``moice-trained``."""
    return model.rsplit("-s", 1)[0] if model.rsplit("-s", 1)[-1].isdigit() else model


def seed_of(model: str) -> int:
    return int(model.rsplit("-s", 1)[1]) if arm_of(model) in TRAINED else 0


def build(original: nn.Module, model: str) -> nn.Module:
    """A fresh copy of ``original`` with ``model``'s architecture and initial weights (untrained)."""
    arm, seed = arm_of(model), seed_of(model)
    built = copy.deepcopy(original)
    if arm in ("moice-untrained", "moice-trained", "static-mixture"):
        apply_moice(built, MoiceSpec(), seed=seed)
    if arm == "static-mixture":
        for attention in (m for m in built.modules() if isinstance(m, MoiceAttention)):
            attention.moice_router = StaticMixture(attention.moice_router)
    if arm == "adapter":
        generator = torch.Generator().manual_seed(seed)
        for layer in built.model.layers:
            layer.self_attn.o_proj = LowRankOutput(layer.self_attn.o_proj, generator)
    return built.eval()


# -------------------------------------------------------------------------------------------------- data


def text_blocks(tokenizer, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) blocks of ``block`` tokens from pt-demo, split by document before packing."""
    from datasets import Dataset

    documents = builtin_records("pt-demo")
    splits = (
        [d for i, d in enumerate(documents) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1],
        [d for i, d in enumerate(documents) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1],
    )
    packed = [pack_texts(Dataset.from_list(rows), tokenizer, block)["input_ids"] for rows in splits]
    return torch.tensor(packed[0], dtype=torch.long), torch.tensor(packed[1], dtype=torch.long)


# made-up facts for the MDQA-style probe: nothing a model could know, so only the documents answer
_SYLLABLES = "ka lo mi ru te va no shi be da fu go ri ze po ta ne mu si xo la vi qu ren dor".split()
_RELATIONS = ("home town", "favourite colour", "pet's name", "lucky number", "middle name", "oldest friend")


def _word(rng: np.random.Generator, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES, size=parts)).capitalize()


def write_mdqa(path: Path, documents: int, rows: int, seed: int) -> Path:
    """A JSONL of ``rows`` MDQA rows (question, answer, gold, distractors), deterministic from ``seed``:
    each document is one made-up fact "The <relation> of <name> is <value>.", the question asks one
    relation of one person, and the distractors give other people's facts (some with the same relation). The
    answer is the gold sentence without its full stop: after MDQAProbe's "Answer:" SmolLM2 answers in that
    sentence, not with the bare value, so the bare value would score a continuation greedy decoding never takes."""
    lines = []
    for row in range(rows):
        rng = np.random.default_rng([seed, row])
        names: list[str] = []
        while len(names) < documents:
            name = f"{_word(rng, 2)} {_word(rng, 3)}"
            if name not in names:
                names.append(name)
        facts = [(name, str(rng.choice(_RELATIONS)), _word(rng, 2)) for name in names]
        name, relation, value = facts[0]
        lines.append(
            json.dumps(
                {
                    "question": f"What is the {relation} of {name}?",
                    "answer": f"The {relation} of {name} is {value}",
                    "gold": f"The {relation} of {name} is {value}.",
                    "distractors": [f"The {r} of {n} is {v}." for n, r, v in facts[1:]],
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def probes(args: argparse.Namespace) -> dict[str, KVProbe | MDQAProbe]:
    """The probe specs of this run, by name; the MDQA file is regenerated (deterministically) beside the units."""
    specs: dict[str, KVProbe | MDQAProbe] = {}
    for pairs in args.kv_pairs:
        specs[f"kv{pairs}"] = KVProbe(
            pairs=pairs, positions=spread_positions(pairs, args.positions), samples=args.samples, seed=args.eval_seed
        )
    for documents in args.mdqa_docs:
        path = write_mdqa(args.runs / f"mdqa{documents}.jsonl", documents, args.samples, args.eval_seed)
        specs[f"mdqa{documents}"] = MDQAProbe(path, positions=spread_positions(documents, args.positions), samples=args.samples)
    return specs


# ------------------------------------------------------------------------------------------------- units


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "batch": args.batch, "block": args.block, "lr": args.lr}


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every probe of an evaluation unit shares; the probes themselves (--kv-pairs, --mdqa-docs) are not
    in it, so a later run with another probe adds that probe's scores to the finished units."""
    return {
        "positions": args.positions,
        "samples": args.samples,
        "eval_seed": args.eval_seed,
        "ppl_blocks": args.ppl_blocks,
        "block": args.block,
    }


def read_unit(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A finished unit's JSON, None when absent; one written under other settings is an error, not a skip."""
    if not path.exists():
        return None
    unit = json.loads(path.read_text())
    if unit["settings"] != settings:
        raise SystemExit(f"{path} was written with {unit['settings']}, not {settings}: use another --results-dir")
    return unit


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written beside and renamed, so an interrupted run leaves no half unit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    partial.replace(path)


def train(model: nn.Module, name: str, blocks: torch.Tensor, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """AdamW (constant lr, no weight decay) on the arm's new parameters only; batches of packed blocks in the
    seed's order. The balance loss is attached to the MoICE-attention arms as the moice preset does, and
    logged apart from the LM loss."""
    arm, seed = arm_of(name), seed_of(name)
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(TRAINABLE[arm] in parameter_name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    handle = attach_router_losses(model, RouterLossConfig()) if TRAINABLE[arm] == "moice_router" else None
    if args.steps * args.batch > len(blocks):
        raise SystemExit(f"{args.steps} steps x {args.batch} blocks exceed the {len(blocks)} training blocks")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    model.train()
    history, start = [], time.perf_counter()
    for step in range(args.steps):
        ids = blocks[order[step * args.batch : (step + 1) * args.batch]]
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        aux = getattr(out, "router_aux_loss", None)
        entry = {"step": step + 1, "lm_loss": out.loss.item() - (aux.item() if aux is not None else 0.0)}
        if handle is not None:
            entry["attention_balance"] = handle.losses["attention_balance"].item()
        history.append(entry | {"seconds": round(time.perf_counter() - start, 1)})
        log(f"  {name} step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "step"))
    if handle is not None:
        handle.detach()
    model.eval()
    return {"trainable_parameters": sum(p.numel() for p in params), "history": history, "seconds": history[-1]["seconds"]}


def trained_model(original: nn.Module, name: str, blocks: torch.Tensor, args: argparse.Namespace, log: Log) -> nn.Module:
    """``name`` with its trained weights: from the cache, or trained now (and its unit written)."""
    model = build(original, name)
    if arm_of(name) not in TRAINED:
        return model
    unit_path, weights = args.runs / f"train_{name}.json", args.cache / f"{name}.pt"
    unit = read_unit(unit_path, train_settings(args))
    if unit is not None and weights.exists():
        model.load_state_dict(torch.load(weights), strict=False)
        return model
    log(f"training {name}" + (" (its weights were not in the cache)" if unit is not None else ""))
    result = train(model, name, blocks, args, log)
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in model.state_dict().items() if TRAINABLE[arm_of(name)] in k}, weights)
    write_json(unit_path, {"settings": train_settings(args), "model": name} | result)
    return model


def scored_blocks(model: nn.Module, blocks: torch.Tensor) -> tuple[list[float], dict[str, float] | None]:
    """Held-out block losses and, for MoICE attention, how far its mixtures are from uniform on those blocks:
    the largest base weight (uniform = 1/N) and the entropy over log N (uniform = 1), each averaged over tokens,
    heads and layers, and the largest layer average of the former. Without these a trained router that did not
    move would look like a router that moved and did not help."""
    routers = [m for m in model.modules() if isinstance(m, MoiceRouter | StaticMixture)]
    largest: list[float] = []
    entropy: list[float] = []

    def record(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        weights = output[1].float()  # [B, T, H, k], k = N here: the full mixture
        largest.append(weights.max(-1).values.mean().item())
        entropy.append((-(weights * weights.clamp_min(1e-12).log()).sum(-1)).mean().item() / math.log(weights.shape[-1]))

    handles = [router.register_forward_hook(record) for router in routers]
    try:
        losses = score_blocks(model, blocks, batch=1)
    finally:
        for handle in handles:
            handle.remove()
    if not routers:
        return losses, None
    by_layer = np.asarray(largest).reshape(len(blocks), len(routers)).mean(0)
    return losses, {
        "max_weight": float(np.mean(largest)),
        "max_weight_top_layer": float(by_layer.max()),
        "entropy": float(np.mean(entropy)),
    }


def evaluate(model: nn.Module, name: str, tokenizer, held_out: torch.Tensor, args: argparse.Namespace, log: Log) -> None:
    settings = eval_settings(args)
    path = args.runs / f"eval_{name}.json"
    unit = read_unit(path, settings) or {"settings": settings, "model": name, "probes": {}}
    missing = {probe: spec for probe, spec in probes(args).items() if probe not in unit["probes"]}
    if not missing and "heldout_block_losses" in unit:
        return
    log(f"evaluating {name}: {', '.join(missing) or 'held-out text'}")
    for probe_name, spec in missing.items():
        start = time.perf_counter()
        result = run_probe(model, tokenizer, spec, batch_size=1)
        seconds = time.perf_counter() - start
        unit["probes"][probe_name] = result.to_dict() | {"seconds": round(seconds, 1)}
        log(f"  {probe_name}: {seconds:.0f} s, mean log-prob {statistics.fmean(p.logprob for p in result.positions):.3f}")
        write_json(path, unit)  # one probe at a time: an interrupted run keeps the probes already scored
    if "heldout_block_losses" not in unit:
        start = time.perf_counter()
        unit["heldout_block_losses"], unit["mixture"] = scored_blocks(model, held_out[: args.ppl_blocks])
        unit["ppl_seconds"] = round(time.perf_counter() - start, 1)
        write_json(path, unit)


# ------------------------------------------------------------------------------------------------ report


def _pooled(units: list[dict[str, Any]], probe: str) -> tuple[list[PositionScore], list[list[dict[str, Any]]], list[float]]:
    """Per position, the per-prompt means over seeds as a PositionScore (its CI resamples prompts); also the
    per-seed position summaries and each seed's max−min log-prob gap."""
    per_seed = [unit["probes"][probe]["positions"] for unit in units]
    pooled = []
    for i, position in enumerate(per_seed[0]):
        logprobs = np.mean([seed[i]["logprobs"] for seed in per_seed], axis=0)
        exact = np.mean([seed[i]["exact"] for seed in per_seed], axis=0)
        pooled.append(PositionScore.from_scores(position["position"], logprobs.tolist(), exact.tolist()))
    gaps = [max(p["logprob"] for p in seed) - min(p["logprob"] for p in seed) for seed in per_seed]
    return pooled, per_seed, gaps


def spec_of(result: dict[str, Any]) -> KVProbe | MDQAProbe:
    """The probe spec a ``ProbeResult.to_dict()`` was made from (for plotting saved results)."""
    spec = result["spec"] | {"positions": tuple(result["spec"]["positions"])}
    return KVProbe(**spec) if result["probe"] == KVProbe.kind else MDQAProbe(**spec | {"path": Path(spec["path"])})


def _prompt_scores(unit: dict[str, Any], probe: str, key: str) -> np.ndarray:
    """Every prompt's score (all positions, in a fixed order), so two models pair prompt by prompt."""
    return np.concatenate([np.asarray(p[key], dtype=float) for p in unit["probes"][probe]["positions"]])


def _diff_cell(values: np.ndarray, digits: int) -> str:
    low, high = bootstrap_ci(values.tolist())
    return f"{values.mean():+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Aggregate JSON, markdown and plot from the unit files."""
    evals = {p.name[len("eval_") : -len(".json")]: json.loads(p.read_text()) for p in sorted(args.runs.glob("eval_*.json"))}
    trains = {p.name[len("train_") : -len(".json")]: json.loads(p.read_text()) for p in sorted(args.runs.glob("train_*.json"))}
    if "original" not in evals:
        raise SystemExit(f"no eval_original.json in {args.runs}: run --phase eval --models original first")
    arms = {arm: sorted(m for m in evals if arm_of(m) == arm) for arm in ARMS}
    arms = {arm: models for arm, models in arms.items() if models}
    probe_names = list(evals["original"]["probes"])
    out: dict[str, Any] = {"settings": evals["original"]["settings"], "arms": {}, "paired": {}, "training": {}}
    for name, unit in trains.items():
        history = unit["history"]
        balance = [h["attention_balance"] for h in history if "attention_balance" in h]
        out["training"][name] = {
            "trainable_parameters": unit["trainable_parameters"],
            "settings": unit["settings"],
            "lm_loss_first": history[0]["lm_loss"],
            "lm_loss_last": history[-1]["lm_loss"],
            "lm_loss_curve": [h["lm_loss"] for h in history],
            "attention_balance": [min(balance), max(balance)] if balance else None,
            "seconds": unit["seconds"],
        }
    plots: dict[str, dict[str, ProbeResult]] = {probe: {} for probe in probe_names}
    base_losses = evals["original"]["heldout_block_losses"]
    for arm, models in arms.items():
        units = [evals[m] for m in models]
        entry: dict[str, Any] = {"models": models, "probes": {}}
        for probe in probe_names:
            if any(probe not in u["probes"] for u in units):
                continue  # not scored for every seed of this arm yet
            pooled, per_seed, gaps = _pooled(units, probe)
            first = units[0]["probes"][probe]
            plots[probe][f"{arm} (x{len(models)})" if len(models) > 1 else arm] = ProbeResult(
                spec_of(first), first["description"], first["slots"], tuple(first["prompt_tokens"]), tuple(pooled)
            )
            entry["probes"][probe] = {
                "positions": [
                    {
                        "position": p.position,
                        "logprob": p.logprob,
                        "logprob_ci": list(p.logprob_ci),
                        "exact_match": p.exact_match,
                        "exact_match_ci": list(p.exact_match_ci),
                        "logprob_seed_sd": statistics.stdev(s[i]["logprob"] for s in per_seed) if len(models) > 1 else None,
                        "exact_match_seed_sd": statistics.stdev(s[i]["exact_match"] for s in per_seed) if len(models) > 1 else None,
                    }
                    for i, p in enumerate(pooled)
                ],
                "logprob_gap_per_seed": gaps,
                "prompt_tokens": first["prompt_tokens"],
                "seconds_per_prompt": statistics.fmean(u["probes"][probe]["seconds"] for u in units)
                / sum(p["n"] for p in first["positions"]),
            }
        ppl = [math.exp(statistics.fmean(u["heldout_block_losses"])) for u in units]
        deltas = [paired_gap(base_losses, u["heldout_block_losses"]) for u in units]
        entry["perplexity"] = {"per_seed": ppl, "delta_loss_vs_original": deltas}
        entry["mixture"] = [u["mixture"] for u in units]
        out["arms"][arm] = entry
    for a, b in (
        ("moice-trained", "static-mixture"),
        ("moice-trained", "moice-untrained"),
        ("moice-trained", "original"),
        ("static-mixture", "original"),
        ("moice-untrained", "original"),
        ("adapter", "original"),
    ):
        if a not in arms or b not in arms:
            continue
        rows = {}
        for probe in probe_names:
            if probe not in out["arms"][a]["probes"] or probe not in out["arms"][b]["probes"]:
                continue
            # seed S pairs with seed S (same data order); a single-model arm pairs with every seed
            pairs = list(zip(arms[a], arms[b] if len(arms[b]) == len(arms[a]) else arms[b] * len(arms[a]), strict=True))
            by_seed = {
                key: [_prompt_scores(evals[x], probe, key) - _prompt_scores(evals[y], probe, key) for x, y in pairs]
                for key in ("logprobs", "exact")
            }
            rows[probe] = {
                "pairs": [f"{x} - {y}" for x, y in pairs],
                "logprob_per_seed": [float(d.mean()) for d in by_seed["logprobs"]],
                "exact_per_seed": [float(d.mean()) for d in by_seed["exact"]],
                "cells": {
                    key: [_diff_cell(d, 3 if key == "logprobs" else 2) for d in diffs]
                    + ([_diff_cell(np.mean(diffs, axis=0), 3 if key == "logprobs" else 2)] if len(diffs) > 1 else [])
                    for key, diffs in by_seed.items()
                },
            }
        out["paired"][f"{a} - {b}"] = rows
    for probe, results in plots.items():
        plot_position_curve(
            results, args.results_dir / f"{NAME}_{probe}.png", title=f"SmolLM2-135M: {probe} by position (pooled over seeds)"
        )
    return out


def markdown(data: dict[str, Any], args: argparse.Namespace) -> str:
    s = data["settings"]
    lines = [
        "# MoICE on SmolLM2-135M-Instruct: routers trained on generic text, probed on long-context retrieval",
        "",
        "SmolLM2-135M-Instruct is the embedded Q4_1 GGUF dequantised to fp32; CPU, 2 cores shared with other jobs. "
        "Reproduce: the commands in the docstring of `benchmarks/moice_retrieval.py`, then "
        "`python benchmarks/moice_retrieval.py --report`.",
        "",
    ]
    train_units = data["training"]
    if train_units:
        t = next(iter(train_units.values()))["settings"]
        lines += [
            f"Training (every trained arm alike): pt-demo text (held-out documents excluded), {t['steps']} steps × "
            f"{t['batch']} blocks of {t['block']} tokens, next-token loss on all tokens, AdamW lr {t['lr']:g} constant, "
            "only the arm's new parameters train.",
            "",
            "| model | trainable params | LM loss, first → last step (one block each: noisy; the held-out table measures) "
            "| attention balance loss (min, max) | s |",
            "|---|---|---|---|---|",
        ]
        for name, u in train_units.items():
            balance = "—" if u["attention_balance"] is None else f"{u['attention_balance'][0]:.4f}, {u['attention_balance'][1]:.4f}"
            lines.append(
                f"| {name} | {u['trainable_parameters']:,} | {u['lm_loss_first']:.3f} → {u['lm_loss_last']:.3f} | {balance} | {u['seconds']} |"
            )
        lines += ["", "The balance loss is constant at top-k = N (zero gradient); it is logged, never mixed into the LM loss column.", ""]
    for probe, first in data["arms"]["original"]["probes"].items():
        positions = [p["position"] for p in first["positions"]]
        lines += [
            f"## {probe}: {s['samples']} prompts per position, ~{first['prompt_tokens'][1]} tokens, eval seed {s['eval_seed']}",
            "",
            "Answer log-prob, mean [95% bootstrap CI over prompts]; trained arms pooled over seeds (per-prompt mean over "
            "seeds), ± the SD across seeds of the per-seed means; gap = max − min over positions (per seed: mean ± SD).",
            "",
            "| model | " + " | ".join(f"pos {p}" for p in positions) + " | gap |",
            "|---|" + "---|" * (len(positions) + 1),
        ]
        scored = {arm: entry for arm, entry in data["arms"].items() if probe in entry["probes"]}
        for arm, entry in scored.items():
            e = entry["probes"][probe]
            cells = [
                f"{p['logprob']:.2f} [{p['logprob_ci'][0]:.2f}, {p['logprob_ci'][1]:.2f}]"
                + (f" ±{p['logprob_seed_sd']:.2f}" if p["logprob_seed_sd"] is not None else "")
                for p in e["positions"]
            ]
            gaps = e["logprob_gap_per_seed"]
            gap = f"{statistics.fmean(gaps):.2f} ± {statistics.stdev(gaps):.2f}" if len(gaps) > 1 else f"{gaps[0]:.2f}"
            lines.append(f"| {arm} (x{len(entry['models'])}) | " + " | ".join(cells) + f" | {gap} |")
        lines += ["", "Exact match, mean [95% CI] (pooled as above):", "", "| model | " + " | ".join(f"pos {p}" for p in positions) + " |"]
        lines.append("|---|" + "---|" * len(positions))
        for arm, entry in scored.items():
            e = entry["probes"][probe]["positions"]
            lines.append(
                f"| {arm} | "
                + " | ".join(
                    f"{p['exact_match']:.2f} [{p['exact_match_ci'][0]:.2f}, {p['exact_match_ci'][1]:.2f}]"
                    + (f" ±{p['exact_match_seed_sd']:.2f}" if p["exact_match_seed_sd"] is not None else "")
                    for p in e
                )
                + " |"
            )
        lines += [
            "",
            "Paired per-prompt differences over all positions, mean [95% CI]; per seed, then pooled (the per-prompt "
            "difference averaged over seeds):",
            "",
            "| comparison | Δ log-prob | Δ exact match |",
            "|---|---|---|",
        ]
        for comparison, rows in data["paired"].items():
            if probe not in rows:
                continue
            row = rows[probe]
            labels = row["pairs"] + (["pooled over seeds"] if len(row["pairs"]) > 1 else [])
            for label, lp, em in zip(labels, row["cells"]["logprobs"], row["cells"]["exact"], strict=True):
                lines.append(f"| {comparison}: {label} | {lp} | {em} |")
        lines.append("")
    lines += [
        f"## Held-out text ({s['ppl_blocks']} pt-demo blocks of {s['block']} tokens, documents never trained on)",
        "",
        "| model | perplexity (per seed) | Δ loss vs original, nats (± SE over blocks), per seed |",
        "|---|---|---|",
    ]
    for arm, entry in data["arms"].items():
        p = entry["perplexity"]
        lines.append(
            f"| {arm} | {', '.join(f'{v:.3f}' for v in p['per_seed'])} | "
            + ", ".join(f"{m:+.4f} ± {se:.4f}" for m, se in p["delta_loss_vs_original"])
            + " |"
        )
    lines += [
        "",
        "How far the mixtures are from uniform on those blocks (averaged over tokens, heads and layers; per seed): "
        "largest base weight (uniform = 1/7 = 0.143), the same for the layer where it is largest, entropy / log 7 "
        "(uniform = 1):",
        "",
        "| model | max weight | max weight, top layer | entropy / log N |",
        "|---|---|---|---|",
    ]
    for arm, entry in data["arms"].items():
        mixtures = [m for m in entry["mixture"] if m is not None]
        if mixtures:
            lines.append(
                f"| {arm} | "
                + " | ".join(", ".join(f"{m[key]:.4f}" for m in mixtures) for key in ("max_weight", "max_weight_top_layer", "entropy"))
                + " |"
            )
    lines += [
        "",
        "## Cost (the same prompts, batch 1, fp32, 2 shared cores)",
        "",
        "| model | " + " | ".join(f"{p} s/prompt" for p in data["arms"]["original"]["probes"]) + " |",
    ]
    lines.append("|---|" + "---|" * len(data["arms"]["original"]["probes"]))
    for arm, entry in data["arms"].items():
        cells = [
            f"{entry['probes'][p]['seconds_per_prompt']:.2f}" if p in entry["probes"] else "-" for p in data["arms"]["original"]["probes"]
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main


def expand(models: list[str], seeds: int) -> list[str]:
    """Arm names to unit names: a trained arm becomes one model per seed."""
    out = []
    for model in models:
        if model not in ARMS:
            raise SystemExit(f"--models: {model!r} is not one of {', '.join(ARMS)}")
        out += [f"{model}-s{seed}" for seed in range(seeds)] if model in TRAINED else [model]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=("train", "eval"), help="train (or load) the models; eval also trains what is missing")
    parser.add_argument("--models", default=",".join(ARMS), help=f"comma-separated arms ({', '.join(ARMS)})")
    parser.add_argument("--report", action="store_true", help="rebuild moice_retrieval.{json,md,png} from the unit files")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per trained arm (router init / A init + data order)")
    parser.add_argument("--adapter-seeds", type=int, default=1, help="seeds for the adapter arm (budget)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="blocks per step")
    parser.add_argument("--block", type=int, default=512, help="tokens per training / held-out block")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--kv-pairs", type=lambda v: [int(x) for x in v.split(",") if x], default=[48])
    parser.add_argument("--mdqa-docs", type=lambda v: [int(x) for x in v.split(",") if x], default=[])
    parser.add_argument("--positions", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10, help="prompts per position")
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--ppl-blocks", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/moeforge-moice-retrieval"), help="trained weights")
    args = parser.parse_args()
    args.runs = args.results_dir / f"{NAME}_runs"
    args.runs.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    if args.phase:
        original, tokenizer = load_model("default")
        train_blocks, held_out = text_blocks(tokenizer, args.block)
        for model in expand(args.models.split(","), args.seeds):
            if arm_of(model) == "adapter" and seed_of(model) >= args.adapter_seeds:
                continue
            start = time.perf_counter()
            built = trained_model(original, model, train_blocks, args, log)
            if args.phase == "eval":
                evaluate(built, model, tokenizer, held_out, args, log)
            log(f"{model}: {time.perf_counter() - start:.0f} s")
    if args.report:
        data = report(args)
        write_json(args.results_dir / f"{NAME}.json", data)
        text = markdown(data, args)
        (args.results_dir / f"{NAME}.md").write_text(text)
        log(text)


if __name__ == "__main__":
    main()
