"""Training runs shared by the quality benchmarks (upcycle_vs_dense.py, attention_moe_training.py).

Each run is ``moeforge.training.train`` in its own process (this file is the child's entry point), so runs do
not share memory or global state. The child scores the held-out blocks itself before and after training:
the plain LM loss per block (router losses are added in training mode only), which lets the parent pair
runs block by block; a spec with ``"score_blocks": false`` skips that (two model loads) and keeps the
trainer's own held-out ``eval_loss`` (at step 0 and every ``eval_steps``) as the figure. Two spec options
save CPU when many runs share a source model:
  ``"start_losses"``  the per-block losses of the spec's model, scored once by an earlier run (the same
                      weights and blocks give the same figures), so the child does not load and score it again;
  ``"score_every"``   N: the child scores the blocks on the in-memory model every N steps (0: never) and after
                      the last step, in place of the trainer's evaluation (turned off: it is not per block and
                      would repeat the start and final scoring), and the final scoring needs no reload.

moeforge.training.train returns the last losses but not the history, so each child appends a read-only
recorder callback to transformers' default callbacks to keep ``state.log_history``.

    python benchmarks/_runs.py --child SPEC_JSON --child-out RESULT_JSON   (what run_child starts)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------------ child side


def _eval_blocks(recipe, tokenizer) -> torch.Tensor:
    """The held-out blocks exactly as the trainer sees them (same split, same packing)."""
    from moeforge.data import build_datasets, pack_texts

    data = build_datasets(recipe.data, recipe.stage)
    if data.eval is None:
        raise SystemExit("no held-out rows: raise --eval-ratio")
    return torch.tensor(pack_texts(data.eval, tokenizer, recipe.data.max_length)["input_ids"], dtype=torch.long)


@torch.no_grad()
def score_blocks(model: torch.nn.Module, blocks: torch.Tensor, batch: int) -> list[float]:
    """Mean next-token cross-entropy of each held-out block (what the trainer's eval_loss averages), in eval
    mode (no router losses); the model goes back to the mode it was in."""
    was_training = model.training
    model.eval()
    losses = []
    for start in range(0, blocks.shape[0], batch):
        ids = blocks[start : start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        # [tokens, vocab] layout: torch's CPU cross_entropy over a [batch, vocab, seq] input is off by ~1e-4 here
        token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        losses += token.view(ids.shape[0], -1).mean(dim=1).tolist()
    model.train(was_training)
    return losses


def block_losses(model_dir: str, blocks: torch.Tensor, batch: int) -> list[float]:
    """:func:`score_blocks` of the model saved in ``model_dir``."""
    from moeforge.io.loading import load_model

    model, _ = load_model(model_dir, dtype=torch.float32)
    losses = score_blocks(model, blocks, batch)
    del model
    return losses


def _block_scorer(blocks: torch.Tensor, batch: int, every: int):
    """A callback that scores ``blocks`` every ``every`` steps and after the last one, on the model being
    trained, and keeps the trainer from evaluating (its ``curve``: step -> per-block losses)."""
    from transformers import TrainerCallback

    class BlockScorer(TrainerCallback):
        def __init__(self) -> None:
            self.curve: dict[int, list[float]] = {}
            self.seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            args.eval_on_start = False  # read right after on_train_begin; the start losses are scored or given

        def on_step_end(self, args, state, control, model=None, **kwargs):
            control.should_evaluate = False
            step = state.global_step
            if (every and step % every == 0) or step >= state.max_steps:
                start = time.perf_counter()
                self.curve[step] = score_blocks(model, blocks, batch)
                self.seconds += time.perf_counter() - start

        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_evaluate = False

    return BlockScorer()


def run_training(spec: dict) -> dict:
    import transformers.trainer
    from transformers import TrainerCallback

    from moeforge.config.recipe import parse_recipe
    from moeforge.config.train_recipe import TrainRecipe
    from moeforge.io.loading import load_tokenizer, resolve_checkpoint
    from moeforge.training import train

    record: dict = {}

    class Recorder(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            record.update(log_history=list(state.log_history), steps=state.global_step, tokens=state.num_input_tokens_seen)

    recipe = parse_recipe(spec["recipe"], model=TrainRecipe)
    batch = recipe.training.per_device_eval_batch_size
    scored: dict = {}
    eval_seconds = 0.0
    callbacks: list = [Recorder]
    scorer = None
    if spec.get("score_blocks", True):  # off: the trainer's own eval_loss before and after is the figure
        blocks = _eval_blocks(recipe, load_tokenizer(resolve_checkpoint(recipe.model)))
        scored |= {"eval_blocks": blocks.shape[0], "block_tokens": blocks.shape[1]}
        if "start_losses" in spec:
            if len(spec["start_losses"]) != blocks.shape[0]:
                raise SystemExit(f"start_losses has {len(spec['start_losses'])} blocks, the held-out split {blocks.shape[0]}")
            scored["block_losses_start"] = spec["start_losses"]
        else:
            start = time.perf_counter()
            scored["block_losses_start"] = block_losses(recipe.model, blocks, batch)
            eval_seconds = time.perf_counter() - start
        if "score_every" in spec:
            scorer = _block_scorer(blocks, batch, spec["score_every"])
            callbacks.append(scorer)

    transformers.trainer.DEFAULT_CALLBACKS.extend(callbacks)
    try:
        start = time.perf_counter()
        result = train(recipe, log=lambda line: print(line, file=sys.stderr, flush=True))
        train_seconds = time.perf_counter() - start
    finally:
        for callback in callbacks:
            transformers.trainer.DEFAULT_CALLBACKS.remove(callback)

    if scorer is not None:  # scored in training: the last step's losses are the final ones
        scored["block_curve"] = sorted(scorer.curve.items())
        scored["block_losses_final"] = scorer.curve[max(scorer.curve)]
        scored["in_training_score_seconds"] = round(scorer.seconds, 1)
    elif scored:
        start = time.perf_counter()
        scored["block_losses_final"] = block_losses(str(result.model_dir), blocks, batch)
        eval_seconds += time.perf_counter() - start
    return {
        **record,
        **scored,
        "train_call_seconds": round(train_seconds, 1),
        "script_eval_seconds": round(eval_seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
    }


# ----------------------------------------------------------------------------------------- parent side


def convert_model(source: Path, output: Path, sections: dict, seed: int = 0) -> dict:
    """Convert ``source`` with the recipe ``sections`` (``moe``, ``attention_moe``) and report its fidelity."""
    from moeforge.config.recipe import parse_recipe
    from moeforge.conversion import convert

    start = time.perf_counter()
    recipe = parse_recipe({"source": str(source), "output": str(output), "dtype": "float32", "seed": seed, **sections})
    result = convert(recipe, overwrite=True, log=lambda _line: None)
    f = result.fidelity
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "export": result.export,
        "exact_by_construction": result.plan.exact,
        "max_abs_logit_diff": f.max_abs_logit_diff,
        "top1_agreement": f.top1_agreement,
        "passed": f.passed,
    }


def run_child(spec: dict, work: Path) -> dict:
    """Run one training (``spec``: its ``name`` and train ``recipe``) in a child process; its result."""
    out = work / f"{spec['name']}.result.json"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"run {spec['name']} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text()) | {"process_seconds": round(time.perf_counter() - start, 1)}


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def paired_gap(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(b - a) over held-out blocks and its standard error."""
    return mean_se([y - x for x, y in zip(a, b, strict=True)])


def summarize(name: str, out: dict) -> dict:
    """One run's child result as curves, start/final held-out loss (± SE over blocks) and timings."""
    history = out["log_history"]
    evals = [(0, statistics.fmean(out["block_losses_start"]))]
    if "block_curve" in out:  # scored by the child during training
        evals += [(step, statistics.fmean(losses)) for step, losses in out["block_curve"] if 0 < step < out["steps"]]
    else:
        evals += [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and 0 < e["step"] < out["steps"]]
    evals.append((out["steps"], statistics.fmean(out["block_losses_final"])))
    summary = next((e for e in reversed(history) if "train_loss" in e), {})  # the trainer's end-of-run summary
    eval_runtime = sum(e.get("eval_runtime", 0.0) for e in history if "eval_loss" in e) + out.get("in_training_score_seconds", 0.0)
    train_seconds = summary.get("train_runtime", 0.0) - eval_runtime
    start_mean, start_se = mean_se(out["block_losses_start"])
    final_mean, final_se = mean_se(out["block_losses_final"])
    return {
        "run": name,
        "steps": out["steps"],
        "tokens_seen": out["tokens"],
        "epochs": round(max((e.get("epoch", 0) for e in history), default=0), 2),
        "eval_curve": evals,
        "train_curve": [(e["step"], e["loss"]) for e in history if "loss" in e and "eval_loss" not in e],
        "start_loss": start_mean,
        "start_se": start_se,
        "final_loss": final_mean,
        "final_se": final_se,
        "trainer_start_eval_loss": next((e["eval_loss"] for e in history if "eval_loss" in e and e["step"] == 0), None),
        "trainer_final_eval_loss": next(
            (e["eval_loss"] for e in reversed(history) if "eval_loss" in e and e["step"] == out["steps"]), None
        ),
        "train_runtime_seconds": summary.get("train_runtime"),
        "in_training_eval_seconds": round(eval_runtime, 1),
        "train_seconds_excl_eval": round(train_seconds, 1),
        "train_tokens_per_second": round(out["tokens"] / train_seconds, 1) if train_seconds > 0 else None,
        "process_seconds": out["process_seconds"],
        "peak_rss_gb": out.get("peak_rss_gb"),
        "trainable_parameters": out["trainable_parameters"],
        "total_parameters": out["total_parameters"],
        "eval_blocks": out["eval_blocks"],
        "block_tokens": out["block_tokens"],
        "block_losses_start": out["block_losses_start"],
        "block_losses_final": out["block_losses_final"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", required=True, help="the run's spec (JSON)")
    parser.add_argument("--child-out", type=Path, required=True, help="where its result (JSON) goes")
    args = parser.parse_args()
    args.child_out.write_text(json.dumps(run_training(json.loads(args.child))))


if __name__ == "__main__":
    main()
