"""MoICE on SmolLM2: does router-only training flatten the key-value retrieval position curve, against controls?

One run, same prompts for every model:

  original        SmolLM2-135M-Instruct as shipped
  moice-untrained MoICE attention (bases θ·[1, 1.75, 1.8, 1.9, 2.0, 2.25, 2.5], top-7), routers at their N(0, 0.02) init
  moice-equal     the same with every router weight zero: a fixed, equal mixture of the 7 bases
  moice-trained   routers trained (everything else frozen) on generated retrieval prompts
  adapter         a parameter-matched, non-positional control trained the same way: a rank-1 LoRA on every
                  layer's attention output projection (1,152 parameters per layer vs MoICE's 945)

Training prompts come from one seed, evaluation prompts from another (held out), the queried pair at
5 positions among 24. Reported per position: exact match and answer log-prob with bootstrap 95% CIs, the
max−min position gap, plain-text perplexity on the built-in text, and the cost of MoICE's forward and
decode against the original model in the same run. Writes ``benchmarks/results/moice_retrieval.{json,md,png}``.

    python benchmarks/moice_retrieval.py                      # the README table (~45 min on 2 CPU cores)
    python benchmarks/moice_retrieval.py --steps 20 --samples 10  # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from moeforge.config.moice import MoiceSpec
from moeforge.config.router_losses import RouterLossConfig
from moeforge.data.calibration import builtin_text
from moeforge.eval.perplexity import perplexity
from moeforge.eval.plots import plot_position_curve
from moeforge.eval.probes import KVProbe, ProbeResult, format_table, run_probe
from moeforge.io.loading import load_model
from moeforge.modeling.moice import MoiceRouter, apply_moice
from moeforge.routing.hooks import attach_router_losses

RESULTS = Path(__file__).parent / "results"


class LowRankOutput(nn.Module):
    """``o_proj(x) + B(A x)``, rank 1, B zero-initialised: starts as the original model and cannot see positions."""

    def __init__(self, linear: nn.Linear, rank: int = 1) -> None:
        super().__init__()
        self.linear = linear
        self.lora_a = nn.Parameter(torch.randn(rank, linear.in_features) / linear.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.lora_a.T) @ self.lora_b.T


def _with_adapter(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.self_attn.o_proj = LowRankOutput(layer.self_attn.o_proj)
    return model


def _with_moice(model: nn.Module, seed: int, equal: bool = False) -> nn.Module:
    model = copy.deepcopy(model)
    apply_moice(model, MoiceSpec(), seed=seed)
    if equal:
        with torch.no_grad():
            for router in (m for m in model.modules() if isinstance(m, MoiceRouter)):
                for weight in (router.w1, router.w2, router.w3):
                    weight.zero_()
    return model


def _training_batches(tokenizer, probe: KVProbe, batch: int):
    """(input_ids, labels) batches; loss on the answer tokens only, right-padded."""
    examples = []
    for item in probe.prompts().items:
        prompt = item.prompt(tokenizer, probe.chat_template)
        ids = tokenizer(prompt + item.target)["input_ids"]
        context = tokenizer(prompt)["input_ids"]
        start = next((i for i, (a, b) in enumerate(zip(ids, context, strict=False)) if a != b), len(context))
        examples.append((ids, start))
    generator = torch.Generator().manual_seed(probe.seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for first in range(0, len(order) - batch + 1, batch):
        chosen = [examples[i] for i in order[first : first + batch]]
        length = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((batch, length), pad)
        labels = torch.full((batch, length), -100)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for row, (ids, start) in enumerate(chosen):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, start : len(ids)] = torch.tensor(ids[start:])
            mask[row, : len(ids)] = 1
        yield input_ids, labels, mask


def _train(model: nn.Module, trainable: str, tokenizer, args, log) -> dict:
    """AdamW on the parameters whose name contains ``trainable`` only; same data and schedule for every model."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable in name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    handle = attach_router_losses(model, RouterLossConfig()) if trainable == "moice_router" else None
    probe = KVProbe(
        pairs=args.pairs, positions=tuple(range(args.pairs)), samples=args.steps * args.batch // args.pairs + 1, seed=args.train_seed
    )
    model.train()
    losses, start = [], time.perf_counter()
    for step, (ids, labels, mask) in enumerate(_training_batches(tokenizer, probe, args.batch)):
        if step == args.steps:
            break
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            log(f"  {trainable} step {step + 1}: loss {statistics.mean(losses[-10:]):.4f}")
    model.eval()
    if handle is not None:
        handle.detach()
    return {
        "trainable_parameters": sum(p.numel() for p in params),
        "steps": len(losses),
        "first_loss": losses[0],
        "last10_loss": statistics.mean(losses[-10:]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _cost(original: nn.Module, moice: nn.Module, tokenizer, args) -> dict:
    """Median forward time on one evaluation prompt and greedy decode time, MoICE over original."""
    prompt = KVProbe(pairs=args.pairs, samples=1, seed=args.eval_seed).prompts().items[0]
    ids = tokenizer(prompt.prompt(tokenizer, False), return_tensors="pt")["input_ids"]

    def timed(fn) -> float:
        times = []
        for _ in range(args.cost_repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    out = {"prompt_tokens": ids.shape[1], "decode_tokens": args.decode_tokens}
    with torch.no_grad():
        for name, model in (("original", original), ("moice", moice)):
            model(ids)  # warm-up
            out[f"{name}_forward_s"] = timed(lambda m=model: m(ids))
            out[f"{name}_decode_s"] = timed(
                lambda m=model: m.generate(ids, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False)
            )
    out["forward_ratio"] = out["moice_forward_s"] / out["original_forward_s"]
    out["decode_ratio"] = out["moice_decode_s"] / out["original_decode_s"]
    return out


def _markdown(results: dict[str, ProbeResult], report: dict) -> str:
    positions = [p.position for p in next(iter(results.values())).positions]
    lines = [
        "# MoICE key-value retrieval on SmolLM2-135M-Instruct",
        "",
        f"`python benchmarks/moice_retrieval.py {report['args_line']}` — {report['eval_prompts']} held-out prompts "
        f"({report['args']['samples']} per position, {report['args']['pairs']} pairs, ~{report['prompt_tokens']} tokens), "
        f"training {report['args']['steps']} steps × {report['args']['batch']} prompts, lr {report['args']['lr']:g}.",
        "",
        "Answer log-prob (mean, 95% CI) by position of the queried pair:",
        "",
        "| model | " + " | ".join(f"pos {p}" for p in positions) + " | gap | EM mean | EM gap | ppl |",
        "|---|" + "---|" * (len(positions) + 4),
    ]
    for name, result in results.items():
        cells = [f"{p.logprob:.2f} [{p.logprob_ci[0]:.2f}, {p.logprob_ci[1]:.2f}]" for p in result.positions]
        em = statistics.mean(p.exact_match for p in result.positions)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {result.logprob_gap:.2f} | {em:.3f} | {result.exact_match_gap:.3f} "
            f"| {report['perplexity'][name]:.3f} |"
        )
    lines += [
        "",
        "Exact match by position:",
        "",
        "| model | " + " | ".join(f"pos {p}" for p in positions) + " |",
        "|---|" + "---|" * len(positions),
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{p.exact_match:.2f} [{p.exact_match_ci[0]:.2f}, {p.exact_match_ci[1]:.2f}]" for p in result.positions)
            + " |"
        )
    cost = report["cost"]
    lines += [
        "",
        "Training: "
        + "; ".join(
            f"{k}: {v['trainable_parameters']:,} params, loss {v['first_loss']:.3f} → {v['last10_loss']:.3f} (last 10), {v['seconds']} s"
            for k, v in report["training"].items()
        ),
        "",
        f"Cost ({cost['prompt_tokens']}-token prompt, batch 1, fp32, {torch.get_num_threads()} threads): forward "
        f"{cost['moice_forward_s'] * 1000:.0f} ms vs {cost['original_forward_s'] * 1000:.0f} ms = **{cost['forward_ratio']:.2f}×**; "
        f"greedy decode of {cost['decode_tokens']} tokens {cost['moice_decode_s']:.2f} s vs {cost['original_decode_s']:.2f} s = "
        f"**{cost['decode_ratio']:.2f}×**.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps (router-only / adapter-only)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--samples", type=int, default=60, help="held-out prompts per position (5 positions)")
    parser.add_argument("--train-seed", type=int, default=1)
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--cost-repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--ppl-batches", type=int, default=4)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    def log(line: str) -> None:
        print(line, flush=True)

    torch.manual_seed(0)
    original, tokenizer = load_model("default")
    models = {
        "original": original,
        "moice-untrained": _with_moice(original, seed=0),
        "moice-equal": _with_moice(original, seed=0, equal=True),
        "moice-trained": _with_moice(original, seed=0),
        "adapter": _with_adapter(original),
    }
    training = {}
    for name, trainable in (("moice-trained", "moice_router"), ("adapter", "lora_")):
        log(f"training {name}")
        training[name] = _train(models[name], trainable, tokenizer, args, log)

    probe = KVProbe(pairs=args.pairs, samples=args.samples, seed=args.eval_seed)
    results, ppl = {}, {}
    for name, model in models.items():
        log(f"evaluating {name}")
        results[name] = run_probe(model, tokenizer, probe, batch_size=8)
        ppl[name] = perplexity(
            model, tokenizer, texts=[builtin_text()], max_length=256, batch_size=4, max_batches=args.ppl_batches
        ).perplexity
    log(format_table(results))
    cost = _cost(original, models["moice-trained"], tokenizer, args)
    first = next(iter(results.values()))
    report = {
        "args": vars(args) | {"output": str(args.output)},
        "args_line": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"),
        "eval_prompts": sum(p.n for p in first.positions),
        "prompt_tokens": first.prompt_tokens[1],
        "training": training,
        "perplexity": ppl,
        "cost": cost,
        "results": {name: result.to_dict() for name, result in results.items()},
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "moice_retrieval.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "moice_retrieval.md").write_text(_markdown(results, report))
    plot_position_curve(results, args.output / "moice_retrieval.png", title="SmolLM2-135M: key-value retrieval by position")
    log((args.output / "moice_retrieval.md").read_text())


if __name__ == "__main__":
    main()
