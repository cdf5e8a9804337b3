"""One plan: a row per scenario (counts + memory estimate), and for the primary run a verdict against the
GPU's memory with concrete changes that would make it fit, each re-estimated rather than guessed."""

from __future__ import annotations

from dataclasses import dataclass, replace

from moeforge.config.adapter import EXPERTS_TARGET, FFN_TARGETS, AdapterSpec
from moeforge.config.recipe import parse_size
from moeforge.errors import MoeforgeError
from moeforge.planning.counting import ModelSpec, count_parameters, model_shape
from moeforge.planning.memory import (
    MASTER_WEIGHTS_NOTE,
    OPTIMIZER_NOTES,
    MemoryEstimate,
    ModelShape,
    ParameterCounts,
    TrainingSetup,
    estimate,
    largest_fitting_batch,
)
from moeforge.planning.sources import Scenario

SUGGESTED_ADAPTER = AdapterSpec(targets=[*FFN_TARGETS, EXPERTS_TARGET])
"""moeforge's default MoE-LoRA, also on an MoE base's routed experts, for the "try an adapter" hint."""


@dataclass(frozen=True)
class Row:
    scenario: Scenario
    shape: ModelShape
    counts: ParameterCounts
    memory: MemoryEstimate


@dataclass(frozen=True)
class Plan:
    target: str
    gpu_bytes: int | None
    rows: list[Row]

    @property
    def primary(self) -> Row:
        return next(row for row in self.rows if row.scenario.primary)


def parse_gpu_memory(text: str) -> int:
    """``24GB`` → 24·10⁹ bytes, ``80GiB`` → 80·2³⁰ (the size conventions recipes use for ``max_shard_size``)."""
    try:
        size = parse_size(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise MoeforgeError(f"GPU memory {text!r} is not a memory size: write it like 24GB, 80GiB or 24000MB")
    return size


def gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def build_row(scenario: Scenario) -> Row:
    counts = count_parameters(scenario.model)
    shape = model_shape(scenario.model.config)
    _check_expert_parallel(scenario, shape)
    return Row(scenario, shape, counts, estimate(counts, shape, scenario.setup))


def _check_expert_parallel(scenario: Scenario, shape: ModelShape) -> None:
    """Expert parallelism splits every MoE layer's experts evenly: a model without experts, or a layer whose
    expert count the EP size does not divide, cannot run that way (the dense base of a convert recipe is
    planned without it)."""
    size = scenario.setup.sharding.expert_parallel
    counts = {ffn.num_experts for ffn in shape.ffn if ffn.num_experts}
    if size == 1:
        return
    if not counts:
        raise MoeforgeError(f"{scenario.name}: expert parallelism needs an MoE model; this one has no routed experts")
    if any(n % size for n in counts):
        raise MoeforgeError(
            f"{scenario.name}: expert parallelism over {size} ranks must divide every MoE layer's experts ({sorted(counts)})"
        )


def plan_scenarios(target: str, scenarios: list[Scenario], gpu_bytes: int | None) -> Plan:
    return Plan(target, gpu_bytes, [build_row(scenario) for scenario in scenarios])


def _with_adapter(row: Row, setup: TrainingSetup) -> tuple[ParameterCounts, TrainingSetup]:
    """The row's model with its adapter (or the suggested one) on a frozen base, under ``setup``."""
    model = row.scenario.model
    if model.adapter is None:
        model = ModelSpec(model.config, model.dtype, SUGGESTED_ADAPTER)
    return count_parameters(model), replace(setup, adapter=True)


def suggestions(row: Row, budget: int) -> list[tuple[str, int]]:
    """Changes to the row's run that lower its total, each with the total it would need: gradient
    checkpointing (with the largest batch that then fits), the largest batch that fits as is, on several GPUs
    ZeRO-3 and offloading, an adapter on a frozen base, a 4-bit base under the adapter."""
    setup, counts, shape = row.scenario.setup, row.counts, row.shape
    options: list[tuple[str, ParameterCounts, TrainingSetup]] = []
    if not setup.gradient_checkpointing:
        checkpointed = replace(setup, gradient_checkpointing=True)
        options.append(("--gradient-checkpointing", counts, checkpointed))
        batch = largest_fitting_batch(counts, shape, checkpointed, budget)
        if batch and estimate(counts, shape, checkpointed).total > budget:
            options.append((f"--gradient-checkpointing --batch-size {batch}", counts, replace(checkpointed, batch_size=batch)))
    batch = largest_fitting_batch(counts, shape, setup, budget)
    if batch:
        options.append((f"--batch-size {batch}", counts, replace(setup, batch_size=batch)))
    sharding = setup.sharding
    if sharding.gpus > 1 and sharding.stage < 3:
        options.append(("--zero 3", counts, replace(setup, sharding=replace(sharding, stage=3))))
    if sharding.shards > 1 and not sharding.offload:
        options.append(("--offload", counts, replace(setup, sharding=replace(sharding, offload=True))))
    try:
        if not setup.adapter:
            options.append(("an adapter (adapter: {method: moe_lora})", *_with_adapter(row, setup)))
        if setup.quantization != "4bit":
            options.append(("a 4-bit base (adapter: {load_in_4bit: true})", *_with_adapter(row, replace(setup, quantization="4bit"))))
    except MoeforgeError:  # no adapter target in this model: those two hints do not apply
        pass
    totals = [(label, estimate(c, shape, s).total) for label, c, s in options]
    helpful = [(label, total) for label, total in totals if total < row.memory.total]
    if all(total > budget for _, total in helpful):
        helpful += _combined(row, budget)
    return helpful


def _combined(row: Row, budget: int) -> list[tuple[str, int]]:
    """When no single change is enough: gradient checkpointing, then an adapter, then a 4-bit base, stacked
    until the run fits (at its batch size, else the largest batch that fits)."""
    setup, counts = row.scenario.setup, row.counts
    labels: list[str] = []
    steps = [
        ("--gradient-checkpointing", lambda s: replace(s, gradient_checkpointing=True), setup.gradient_checkpointing),
        ("an adapter", lambda s: replace(s, adapter=True), setup.adapter),
        ("a 4-bit base", lambda s: replace(s, quantization="4bit"), setup.quantization == "4bit"),
    ]
    try:
        for label, change, already in steps:
            if already:
                continue
            setup, labels = change(setup), [*labels, label]
            counts = _with_adapter(row, setup)[0] if setup.adapter else counts
            total = estimate(counts, row.shape, setup).total
            batch = None if total <= budget else largest_fitting_batch(counts, row.shape, setup, budget)
            if total <= budget or batch:
                chosen = setup if total <= budget else replace(setup, batch_size=batch)
                suffix = "" if total <= budget else f" + --batch-size {batch}"
                return [(" + ".join(labels) + suffix, estimate(counts, row.shape, chosen).total)]
    except MoeforgeError:  # no adapter target in this model
        pass
    return []


def verdict(row: Row, budget: int) -> str:
    """``fits (X of Y)`` or ``does not fit: ... try: ...`` for one row."""
    total = row.memory.total
    if total <= budget:
        return f"fits ({gb(total)} of {gb(budget)})"
    hints = [f"{label} ({gb(need)}{', fits' if need <= budget else ''})" for label, need in suggestions(row, budget)]
    return f"does not fit: needs {gb(total)} of {gb(budget)}" + (f"; try: {', '.join(hints)}" if hints else "")


def assumptions(plan: Plan) -> list[str]:
    """The few choices behind the figures that a reader must know to trust them (docs/plan.md has the rest)."""
    setups = {row.scenario.setup for row in plan.rows}
    lines = [MASTER_WEIGHTS_NOTE if setup.master_weights else OPTIMIZER_NOTES[setup.optimizer] for setup in setups]
    if any(setup.mixed_precision for setup in setups):
        lines.append("bf16 mixed precision: the fp32 weights are the master copy; autocast adds bf16 copies of the trainable ones")
    if any(setup.dtype != "float32" and not setup.mixed_precision and not setup.master_weights for setup in setups):
        lines.append("16-bit weights are trained directly (the Trainer keeps no fp32 master copy)")
    if any(setup.quantization for setup in setups):
        lines.append(
            "quantised base: NF4 ≈ 0.516 B/param (double-quantised absmax), int8 1 B/param; embeddings, norms, "
            "lm_head and fused experts stay in the compute dtype; needs CUDA + bitsandbytes"
        )
    if any(setup.stage == "dpo" for setup in setups):
        lines.append("dpo: chosen + rejected run together (2 x batch); without an adapter the reference model is a second copy")
    if any(setup.sharding.shards > 1 for setup in setups):
        lines.append(
            "sharded: split parts / GPUs; fully sharded runs also hold two gathered layers (running + prefetched) and one "
            "layer's unsharded gradient; activations assume balanced routing"
        )
    if any(setup.sharding.offload for setup in setups):
        lines.append("offload: the host-memory column of --json is per GPU process; host RAM must hold it for every process on the node")
    lines.append("not included: the CUDA context and allocator fragmentation (~0.5-1 GB): keep ~10% headroom")
    return list(dict.fromkeys(lines))
