"""GPU memory of a training run, estimated from counts and shapes alone (no weights, no device).

Four parts add up to the estimate: weights, gradients, optimizer states and activations. The first three
follow from parameter counts and dtypes (counted on a ``meta``-device model, :mod:`moeforge.planning.counting`);
activations follow from the per-layer formulas below, which were checked against the tensors autograd
actually saves on small models (``tests/planning``). Spread over several GPUs (:class:`Sharding`: ZeRO /
FSDP stages, CPU offload, expert parallelism), each part is what one GPU holds. docs/plan.md states every
formula and assumption.
Nothing here imports torch: the functions are plain arithmetic so they can be reasoned about and tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Optimizer = Literal["adamw", "adamw8bit", "sgd"]
Quantization = Literal["4bit", "8bit"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# State bytes per trainable parameter, as a multiple of the parameter's own bytes (AdamW: torch keeps
# exp_avg and exp_avg_sq in the parameter's dtype) or, for 8-bit AdamW, absolute bytes per parameter
# (two uint8 states plus one fp32 absmax per 256-value block each, bitsandbytes' blockwise layout).
ADAMW_STATES = 2
ADAMW8BIT_BYTES_PER_PARAM = 2 + 2 * 4 / 256

MASTER_WEIGHTS_NOTE = "DeepSpeed bf16: bf16 weights and gradients, fp32 master weights + AdamW states in its optimizer (12 B/param)"

OPTIMIZER_NOTES = {
    "adamw": "AdamW: 2 states per trainable parameter in that parameter's dtype (8 B/param for fp32)",
    "adamw8bit": "8-bit AdamW (bitsandbytes): 2 uint8 states + fp32 absmax per 256 values ≈ 2.03 B/param",
    "sgd": "SGD without momentum (transformers' sgd): no optimizer state",
}

# bitsandbytes storage per quantised weight. NF4 with double quantisation (moeforge's QLoRA setting):
# 4 bits, one 8-bit absmax per 64-value block, one fp32 second-level constant per 256 blocks
# = 0.5 + 1/64 + 4/16384 bytes (≈ 4.13 bits). LLM.int8: 1 byte plus an fp32 scale per output row,
# which is below 1% for any real layer and left out.
QUANTIZED_BYTES_PER_PARAM = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}


@dataclass(frozen=True)
class FfnShape:
    """One decoder layer's feed-forward: dense SwiGLU (``num_experts == 0``) or an MoE block."""

    intermediate_size: int
    """The dense FFN width, or each routed expert's width."""
    num_experts: int = 0
    top_k: int = 0
    shared_intermediate_size: int = 0


@dataclass(frozen=True)
class ModelShape:
    """What the activation formulas need of a LLaMA-family model."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    ffn: tuple[FfnShape, ...]


@dataclass(frozen=True)
class AdapterPart:
    """One module an adapter wraps, as the activation formula needs it (read off the built model)."""

    kind: Literal["mixture", "lora", "merged"]
    """``mixture``: a routed MoE-LoRA / bottleneck FFN; ``lora``: LoRA on a Linear; ``merged``: LoRA added to
    fused expert weights (the summed weights are new tensors autograd keeps)."""
    layer: int | None
    in_features: int = 0
    width: int = 0
    """mixture: the experts' hidden width (the FFN's for moe_lora, the rank for a bottleneck); lora: the rank."""
    num_experts: int = 0
    top_k: int = 0
    merged_bytes: int = 0


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of one scenario's model, as built (adapter and MoICE routers included)."""

    total: int
    trainable: int
    active: int
    """Parameters one token runs through: every routed expert block counts top_k / num_experts."""
    total_bytes: int
    """Every parameter at its built dtype (a PEFT adapter's parameters stay fp32 on a bf16 base)."""
    trainable_bytes: int
    quantizable: int
    """Parameters bitsandbytes would quantise (the ``nn.Linear`` weights it replaces)."""
    quantizable_bytes: int
    first_trained_layer: int | None
    """Lowest decoder layer autograd records (0 when embeddings train; None: nothing below the head trains)."""
    adapter_parts: tuple[AdapterPart, ...] = ()
    layer_bytes: int = 0
    """The largest decoder layer's parameters: what ZeRO-3 / FSDP gathers whole to run it."""
    layer_expert_bytes: int = 0
    """The routed-expert share of that layer (expert parallelism gathers only the rank's own experts)."""


@dataclass(frozen=True)
class Sharding:
    """How a run spreads over GPUs, one process each. ``stage`` says what the data-parallel ranks split
    among themselves, in ZeRO's terms: 0 nothing (DDP), 1 optimizer states, 2 also gradients (ZeRO-2, FSDP
    without resharding after forward), 3 also weights (ZeRO-3, FSDP full shard)."""

    gpus: int = 1
    stage: Literal[0, 1, 2, 3] = 0
    offload: bool = False
    """Sharded weights, gradients and optimizer states live in host memory (ZeRO-3 offload, FSDP cpu_offload)."""
    expert_parallel: int = 1
    """Ranks that hold distinct experts of each MoE layer (transformers' EP: the rest is FSDP-sharded)."""

    @property
    def shards(self) -> int:
        return self.gpus if self.stage or self.expert_parallel > 1 else 1


@dataclass(frozen=True)
class TrainingSetup:
    stage: Literal["pt", "sft", "dpo"] = "pt"
    batch_size: int = 4
    seq_len: int = 512
    dtype: str = "float32"
    """Dtype the weights are loaded in (the recipe's ``dtype``)."""
    mixed_precision: bool = False
    """``training.bf16`` on fp32 weights: autocast runs the matmuls in bf16."""
    optimizer: Optimizer = "adamw"
    gradient_checkpointing: bool = False
    quantization: Quantization | None = None
    adapter: bool = False
    sharding: Sharding = Sharding()
    master_weights: bool = False
    """16-bit weights whose optimizer keeps fp32 master copies (DeepSpeed's bf16: the ZeRO paper's
    2 + 2 + 12 bytes per trainable parameter), rather than training the 16-bit weights directly."""

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element: bf16 under autocast or on a 16-bit model, else the weights' dtype."""
        return 2 if self.mixed_precision else DTYPE_BYTES[self.dtype]

    @property
    def sequences(self) -> int:
        """Sequences per forward: DPO runs every chosen and rejected completion, twice the batch."""
        return self.batch_size * (2 if self.stage == "dpo" else 1)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    host: int = 0
    """Bytes per GPU moved to host memory by offloading (not part of the GPU total)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def norm_bytes(hidden: int, b: int) -> int:
    """RMSNorm (transformers' Llama): its fp32 input, the per-token rsqrt, the normalised value cast back
    (kept for the weight's gradient) and the output (kept by the projections that read it)."""
    return (4 + 2 * b) * hidden + 4


def attention_bytes(shape: ModelShape, b: int) -> int:
    """Pre-attention norm, q and k after RoPE, v, the SDPA output (also o_proj's input) and SDPA's fp32
    log-sum-exp per head. Fused SDPA (flash / memory-efficient) keeps O(seq), never the seq x seq scores."""
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    return norm_bytes(shape.hidden_size, b) + b * (2 * q + 2 * kv) + 4 * shape.num_heads


def ffn_bytes(ffn: FfnShape, hidden: int, b: int) -> int:
    """Post-attention norm plus the SwiGLU's gate and up outputs, the activation and the product fed to
    down_proj (4 x width). An MoE block keeps that for each of its top_k experts, plus each expert's copy of
    its input and its output before the routing weight, and the router's fp32 probabilities and choices."""
    swiglu = 4 * ffn.intermediate_size
    if not ffn.num_experts:
        return norm_bytes(hidden, b) + b * swiglu
    routed = ffn.top_k * b * (swiglu + 2 * hidden)
    router = 4 * ffn.num_experts + 16 * ffn.top_k
    shared = b * (4 * ffn.shared_intermediate_size + hidden) if ffn.shared_intermediate_size else 0
    return norm_bytes(hidden, b) + router + routed + shared


def head_bytes(shape: ModelShape, b: int) -> int:
    """Final norm, the logits, the fp32 log-softmax the loss keeps, and the fp32 gradient of the logits
    that exists at the start of backward: with a large vocabulary this often outweighs a decoder layer."""
    return norm_bytes(shape.hidden_size, b) + (b + 4 + 4) * shape.vocab_size


def adapter_bytes(part: AdapterPart, b: int) -> tuple[int, int]:
    """``(per token, fixed)`` bytes one adapted module adds. A routed mixture keeps what an MoE FFN with the
    adapter's top_k experts keeps, plus the dropout mask and dropped input; LoRA on a Linear keeps its dropout
    mask, its fp32 input and the rank-r intermediate; LoRA merged into fused experts keeps the summed weights."""
    if part.kind == "mixture":
        routed = FfnShape(part.width, part.num_experts, part.top_k)
        return ffn_bytes(routed, part.in_features, b) - norm_bytes(part.in_features, b) + (1 + b) * part.in_features, 0
    if part.kind == "lora":
        return 5 * part.in_features + 4 * part.width, 0
    return 0, part.merged_bytes


def activation_bytes(
    shape: ModelShape, setup: TrainingSetup, first_trained_layer: int | None, adapter_parts: tuple[AdapterPart, ...] = ()
) -> int:
    """Activation memory of one training step. Layers below ``first_trained_layer`` run without anything
    to differentiate, so autograd keeps nothing of them. With gradient checkpointing a recorded layer keeps
    only its input, and backward recomputes one layer at a time (the largest one counts)."""
    b = setup.compute_bytes
    tokens = setup.sequences * setup.seq_len
    first = len(shape.ffn) if first_trained_layer is None else first_trained_layer
    per_token = {i: attention_bytes(shape, b) + ffn_bytes(ffn, shape.hidden_size, b) for i, ffn in enumerate(shape.ffn) if i >= first}
    fixed = dict.fromkeys(per_token, 0)
    for part in adapter_parts:
        if part.layer in per_token:
            token_bytes, fixed_bytes = adapter_bytes(part, b)
            per_token[part.layer] += token_bytes
            fixed[part.layer] += fixed_bytes
    layers = [tokens * per_token[i] + fixed[i] for i in per_token]
    if setup.gradient_checkpointing and layers:
        kept = len(layers) * tokens * b * shape.hidden_size + max(layers)
    else:
        kept = sum(layers)
    return kept + tokens * head_bytes(shape, b)


def weight_bytes(counts: ParameterCounts, setup: TrainingSetup) -> int:
    """Weights as loaded, with the quantised share at bitsandbytes' size; a reference copy for DPO without an
    adapter (with one, TRL runs the reference as the base with the adapter off); and under mixed precision
    the bf16 copies autocast caches of the fp32 trainable weights (held until backward)."""
    weights = counts.total_bytes
    if setup.quantization:
        weights += round(counts.quantizable * QUANTIZED_BYTES_PER_PARAM[setup.quantization]) - counts.quantizable_bytes
    if setup.stage == "dpo" and not setup.adapter:
        weights *= 2
    if setup.mixed_precision and DTYPE_BYTES[setup.dtype] == 4:
        weights += 2 * counts.trainable
    return weights


def optimizer_bytes(counts: ParameterCounts, optimizer: Optimizer, master_weights: bool = False) -> int:
    """AdamW: two states per trainable parameter in its dtype (8 bytes each for fp32); 8-bit AdamW: ~2 bytes;
    plain SGD (no momentum, transformers' ``sgd``): none. With fp32 master weights the optimizer also holds
    the fp32 copy, and AdamW's states are fp32 (12 bytes per trainable parameter)."""
    master = 4 * counts.trainable if master_weights else 0
    if optimizer == "adamw" and master_weights:
        return master + ADAMW_STATES * 4 * counts.trainable
    if optimizer == "adamw":
        return ADAMW_STATES * counts.trainable_bytes
    if optimizer == "adamw8bit":
        return master + round(ADAMW8BIT_BYTES_PER_PARAM * counts.trainable)
    return master


def gathered_layer_bytes(counts: ParameterCounts, sharding: Sharding) -> int:
    """One decoder layer's parameters as ZeRO-3 / FSDP gather them to run it; under expert parallelism only
    the rank's own experts are gathered (the others run on their ranks)."""
    experts = counts.layer_expert_bytes
    return counts.layer_bytes - experts + experts // sharding.expert_parallel


def shard(full: MemoryEstimate, counts: ParameterCounts, sharding: Sharding) -> MemoryEstimate:
    """One GPU's share of a single-GPU estimate. Split parts are divided by the number of GPUs (with expert
    parallelism the experts are split over the EP ranks and their FSDP groups, which again makes all GPUs).
    Fully sharded runs gather each layer whole to run it, and prefetch the next one: two layers' weights,
    and one layer's unsharded gradient before it is reduce-scattered, are the working set. Offloading moves
    the optimizer states and the other split parts to host memory; the working set stays on the GPU."""
    if sharding.shards == 1:
        return full
    n, split = sharding.shards, sharding.stage == 3 or sharding.expert_parallel > 1
    weights = full.weights // n if split else full.weights
    gradients = full.gradients // n if split or sharding.stage == 2 else full.gradients
    optimizer = full.optimizer // n
    host = 0
    if sharding.offload:  # the optimizer's states always; what else is split goes with them
        host, optimizer = optimizer, 0
        if gradients < full.gradients:
            host, gradients = host + gradients, 0
        if split:
            host, weights = host + weights, 0
    if split:
        gathered = gathered_layer_bytes(counts, sharding)
        weights += 2 * gathered
        gradients += gathered if counts.trainable_bytes else 0
    return MemoryEstimate(weights, gradients, optimizer, full.activations, host)


def estimate(counts: ParameterCounts, shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """The four parts of one training step's peak on one GPU (gradients share the trainable parameters' dtype)."""
    full = MemoryEstimate(
        weights=weight_bytes(counts, setup),
        gradients=counts.trainable_bytes,
        optimizer=optimizer_bytes(counts, setup.optimizer, setup.master_weights),
        activations=activation_bytes(shape, setup, counts.first_trained_layer, counts.adapter_parts),
    )
    return shard(full, counts, setup.sharding)


def largest_fitting_batch(counts: ParameterCounts, shape: ModelShape, setup: TrainingSetup, budget: int) -> int | None:
    """The largest batch size below ``setup``'s that fits ``budget`` (activations scale with it), or None."""
    for batch in range(setup.batch_size - 1, 0, -1):
        if estimate(counts, shape, replace(setup, batch_size=batch)).total <= budget:
            return batch
    return None
