"""``convert(recipe)``: recipe → plan → tensors → checkpoint, one decoder layer at a time.

Per layer: read the dense tensors, run the dense layer on the calibration batch (capturing the FFN
input), build the experts and router, run the converted layer on the MoE stream, write its tensors.
Two streams (dense and MoE) advance side by side, so the router sees its real input (the MoE stream's)
and the fidelity report costs no second pass. Output goes to a temporary directory renamed on success.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers
from torch import nn
from transformers.activations import ACT2FN

from moeforge.config.recipe import ConvertRecipe
from moeforge.conversion.experts import build_experts, scale_experts
from moeforge.conversion.export import (
    MOEFORGE,
    build_config,
    created_by_conversion,
    layer_tensors,
    llama_cpp_caveats,
    outer_sources,
    padded,
    resolve_export,
)
from moeforge.conversion.fidelity import FidelityReport, compare, default_tolerance
from moeforge.conversion.layerwise import ATTENTION_MODULE, LAYERS_PREFIX, LayerInputs, LayerwiseModel
from moeforge.conversion.plan import AttentionLayerPlan, ConversionPlan, LayerPlan, build_plan
from moeforge.conversion.router_init import init_router
from moeforge.data.calibration import calibration_ids
from moeforge.errors import FidelityError, MoeforgeError
from moeforge.families import source_family
from moeforge.io.loading import TORCH_DTYPES, copy_tokenizer_files, load_tokenizer, read_config, resolve_checkpoint, save_config
from moeforge.io.publish import check_output, staged_directory
from moeforge.io.safetensors_reader import CheckpointReader
from moeforge.io.safetensors_writer import ShardedWriter
from moeforge.modeling import AttentionMoeLayerSpec, MoeforgeSparseMoeBlock, moeforge_config
from moeforge.modeling.attention_moe import HeadGroupGate, with_head_gate

ATTENTION_ROUTER = f"{ATTENTION_MODULE}.head_gate.router.weight"
"""The one tensor attention MoE adds to a layer (relative to the layer)."""


@dataclass(frozen=True)
class ConversionResult:
    output: Path
    export: str
    plan: ConversionPlan
    fidelity: FidelityReport | None
    seconds: float


def _log(message: str) -> None:
    logging.getLogger(__name__).info(message)


def _ffn_activations(mlp_input: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Callable) -> torch.Tensor:
    flat = mlp_input.reshape(-1, mlp_input.shape[-1])
    return act(flat @ gate.T) * (flat @ up.T)


class _Converter:
    """One conversion: the resolved source, its family, plan and export target, and the streaming passes."""

    def __init__(self, recipe: ConvertRecipe, source_dir: Path, log: Callable[[str], None]) -> None:
        self.recipe = recipe
        self.log = log
        self.source_dir = source_dir
        self.source_config = read_config(source_dir)
        self.family = source_family(self.source_config, recipe.source)
        self.ffn = self.family.ffn
        self.reader = CheckpointReader(source_dir)
        self.plan = build_plan(recipe, self.source_config, self._ffn_sizes())
        self.target = resolve_export(recipe.export, self.plan, self.source_config)
        build_config(self.target, self.plan, self.source_config)  # its problems before any weight is read
        self.generator = torch.Generator().manual_seed(recipe.seed)
        self.out_dtype = TORCH_DTYPES.get(recipe.dtype) or self.reader.dtype_of(self._layer_names(0)[0])
        self.act = ACT2FN[self.family.activation(self.source_config)]
        self.checksums: dict[str, str] = {}
        self.scales: dict[int, float] = {}  # least-squares calibrated down_proj factors, by layer
        self.attention_specs: dict[int, AttentionMoeLayerSpec] = {}  # attention MoE layers as fitted, by layer
        # Calibration sequences used to fit (importance, k-means routers, scales); the fidelity report uses the
        # others, so its figures are held out. Nothing fitted: every sequence serves the report.
        sequences = recipe.calibration.num_sequences
        if self.plan.needs_calibration and sequences < 2:
            raise MoeforgeError(
                "calibration.num_sequences: this recipe fits to calibration text and needs at least 2 sequences (half fit, half report)"
            )
        self.fit_sequences = sequences // 2 if self.plan.needs_calibration else 0
        # config of the canonical MoE block that runs the MoE stream (eager experts: stored-dtype weights, fp32 compute)
        self.block_config = moeforge_config(self.source_config)
        self.block_config._experts_implementation = "eager"

    def _ffn_sizes(self) -> list[int]:
        """Each layer's FFN neuron count, read from the checkpoint's headers (families may vary it by layer)."""
        sizes = []
        for index in range(self.source_config.num_hidden_layers):
            prefix = f"{LAYERS_PREFIX}{index}."
            missing = [name for name in self.ffn.weight_names() if prefix + name not in self.reader]
            if missing:
                raise MoeforgeError(
                    f"source: {self.recipe.source} lacks {prefix}{missing[0]}: its layer {index} has no {self.family.title} FFN "
                    "where config.json says; re-download it or check that it is a plain dense checkpoint"
                )
            sizes.append(self.ffn.intermediate_size(lambda name, p=prefix: self.reader.shape_of(p + name)))
        biases = [
            name
            for name in self.reader.keys()
            if name.startswith(LAYERS_PREFIX) and f".{self.ffn.module}." in name and name.endswith(".bias")
        ]
        if biases:
            raise MoeforgeError(f"source: {self.recipe.source} has FFN biases ({biases[0]}); moeforge converts bias-free gated FFNs only")
        return sizes

    def _read(self, name: str) -> torch.Tensor:
        """A source tensor in the output dtype: the dense reference is the model as it will be stored."""
        return self.reader.get(name).to(self.out_dtype)

    def _layer_names(self, index: int) -> list[str]:
        prefix = f"{LAYERS_PREFIX}{index}."
        return [name for name in self.reader.keys() if name.startswith(prefix)]

    def _outer_names(self) -> list[str]:
        return [name for name in self.reader.keys() if not name.startswith(LAYERS_PREFIX)]

    def _outer_fp32(self, runner: LayerwiseModel, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors outside the layers for a forward, in fp32 but the input embedding, whose rows the runner
        picks (in the output dtype: the model as it will be stored); read last, so its table and another's
        fp32 copy are never in memory together."""
        names = sorted(names, key=lambda name: name == runner.embedding_name)
        return {name: self._read(name) if name == runner.embedding_name else self._read(name).float() for name in names}

    @property
    def target_config(self) -> transformers.PretrainedConfig:
        """The converted model's config: with the attention groups chosen during the run, once it has run."""
        return build_config(self.target, self.plan, self.source_config, self.attention_specs)

    def run(self, tmp: Path) -> tuple[FidelityReport | None, list[str]]:
        recipe, plan, config = self.recipe, self.plan, self.source_config
        tokenizer = load_tokenizer(self.source_dir)
        ids, origin = calibration_ids(recipe.calibration, tokenizer, config.vocab_size, self.generator)
        self.log(f"calibration: {ids.shape[0]} x {ids.shape[1]} tokens from {origin}")
        runner = LayerwiseModel(config, self.ffn.module)
        # Without a fidelity check and with nothing calibrated, conversion is a pure streaming rewrite.
        streams = recipe.fidelity.check or plan.needs_calibration
        new_params: list[str] = []
        with ShardedWriter(tmp, recipe.max_shard_bytes) as writer:
            dense = None
            if streams:  # what the first layer gets: needs the embedding's rows of the calibration tokens, not the head
                dense = runner.layer_inputs(ids, self._outer_fp32(runner, [n for n in self._outer_names() if n in runner.input_names]))
            sources = outer_sources(self.target, self._outer_names())
            for name, source in sources.items():  # one at a time: each is written, then released
                writer.add(name, self._read(source))
            self.log(f"  outside the layers: {len(sources)} tensors")
            moe = dense.fork() if dense is not None else None
            for index in range(plan.num_layers):
                new_params += self._stream_layer(index, runner, writer, dense, moe)
        self.checksums = writer.checksums
        report = None
        if recipe.fidelity.check:
            assert dense is not None and moe is not None  # a fidelity check runs both streams
            held_out = slice(self.fit_sequences, None)  # sequences nothing was fitted on
            outer = self._outer_fp32(runner, self._outer_names())
            dense_logits = runner.logits(ids[held_out], dense.hidden[held_out], outer)
            moe_logits = runner.logits(ids[held_out], moe.hidden[held_out], outer)
            del outer
            tolerance = recipe.fidelity.tolerance or default_tolerance(dense_logits, plan.num_layers)
            report = compare(dense_logits, moe_logits, ids[held_out], exact_expected=plan.exact, tolerance=tolerance)
        return report, new_params

    def _stream_layer(
        self, index: int, runner: LayerwiseModel, writer: ShardedWriter, dense: LayerInputs | None, moe: LayerInputs | None
    ) -> list[str]:
        """Write layer ``index`` of the converted model while advancing the dense and MoE streams (when running)."""
        plan = self.plan
        prefix = f"{LAYERS_PREFIX}{index}."
        stored = {name[len(prefix) :]: self._read(name) for name in self._layer_names(index)}
        weights = {name: tensor.float() for name, tensor in stored.items()} if dense is not None else {}
        dense_ffn_in = None
        if dense is not None:
            dense.hidden, dense_ffn_in = runner.run_layer(index, weights, dense, capture_mlp_input=True)
        attention_plan, attention, own = plan.attention_layers[index], None, weights
        created: list[str] = []
        if attention_plan is not None:  # the converted attention runs the MoE stream from here on, its router stored
            spec, router = self._fit_attention(index, attention_plan, weights, moe, runner)
            stored[ATTENTION_ROUTER] = router
            created.append(prefix + ATTENTION_ROUTER)
            if moe is not None:
                attention = self._attention(runner, index, spec)
                own = weights | {ATTENTION_ROUTER: router.float()}
        layer_plan = plan.layers[index]
        if layer_plan is None:
            if moe is not None:
                moe.hidden, _ = runner.run_layer(index, own, moe, attention=attention)
            disk = layer_tensors(self.target, prefix, stored, None)
        else:
            block, mlp = self._convert_layer(index, layer_plan, stored, weights, dense_ffn_in, moe, runner, own, attention)
            ffn_names = set(self.ffn.weight_names())
            if moe is not None:
                rest = {name: tensor for name, tensor in own.items() if name not in ffn_names}
                moe.hidden, _ = runner.run_layer(index, rest, moe, mlp=block, attention=attention)
            layer = {name: tensor for name, tensor in stored.items() if name not in ffn_names}
            disk = layer_tensors(self.target, prefix, layer, mlp, self.ffn.module)
            created += sorted(name for name in disk if created_by_conversion(self.target, name[len(prefix) :], self.ffn.module))
        for name, tensor in disk.items():
            writer.add(name, tensor)
        kind = ("moe" if layer_plan else "dense") + (", attention moe" if attention_plan else "")
        self.log(f"  layer {index} {kind}")  # 0-based, as recipes' placement.layers
        return created

    def _attention(self, runner: LayerwiseModel, index: int, spec: AttentionMoeLayerSpec) -> nn.Module:
        """The layer's attention MoE for the MoE stream, as the converted model will have it (:func:`with_head_gate`)
        over a copy of the runner's attention (the dense stream keeps the original); its parameters (router
        included) are given with the layer's tensors at each run."""
        dense: Any = runner.layers[index].self_attn
        attention = with_head_gate(copy.deepcopy(dense, memo={id(dense.config): dense.config}), spec)
        # a real gate (its head -> column buffer): the one built over the runner's meta skeleton is on meta
        attention.head_gate = HeadGroupGate(self.source_config.hidden_size, self.source_config.num_attention_heads, spec)
        return attention

    def _fit_attention(
        self,
        index: int,
        attention_plan: AttentionLayerPlan,
        weights: dict[str, torch.Tensor],
        moe: LayerInputs | None,
        runner: LayerwiseModel,
    ) -> tuple[AttentionMoeLayerSpec, torch.Tensor]:
        """The layer's attention MoE spec and router (in the output dtype), fitted on the fit sequences of the MoE
        stream where the plan says: the shared groups by importance (the groups whose output through o_proj is
        largest), k-means router rows (on the attention's input)."""
        spec = attention_plan.spec()
        attention_in = None
        if attention_plan.ranks_groups or attention_plan.router_init == "kmeans":
            assert moe is not None  # a plan that calibrates runs the MoE stream
            with runner.recording(index, ATTENTION_MODULE, f"{ATTENTION_MODULE}.o_proj") as seen:
                runner.run_layer(index, weights, moe)
            fit = slice(None, self.fit_sequences)
            attention_in = seen[ATTENTION_MODULE][0][fit].reshape(-1, self.source_config.hidden_size)
            if attention_plan.ranks_groups:
                importance = _group_importance(
                    seen[f"{ATTENTION_MODULE}.o_proj"][0][fit], weights[f"{ATTENTION_MODULE}.o_proj.weight"], attention_plan.num_experts
                )
                spec = replace(spec, shared_experts=tuple(sorted(importance.topk(attention_plan.num_shared).indices.tolist())))
        router = init_router(
            attention_plan.router_init,
            attention_plan.routed,
            "linear",
            0,
            self.source_config.hidden_size,
            attention_plan.router_init_std,
            attention_in if attention_plan.router_init == "kmeans" else None,
            self.generator,
        )["weight"].to(self.out_dtype)
        self.attention_specs[index] = spec
        return spec, router

    def _convert_layer(
        self,
        index: int,
        layer_plan: LayerPlan,
        stored: dict[str, torch.Tensor],
        weights: dict[str, torch.Tensor],
        dense_ffn_in: torch.Tensor | None,
        moe: LayerInputs | None,
        runner: LayerwiseModel,
        own: dict[str, torch.Tensor],
        attention: nn.Module | None,
    ) -> tuple[MoeforgeSparseMoeBlock, dict[str, torch.Tensor]]:
        """Build layer ``index``'s MoE block. Returns the block for the MoE stream (experts kept in the
        output dtype, upcast per expert as they run) and its canonical tensors (moeforge's names). ``own``
        and ``attention``: the layer's tensors and the attention module the MoE stream runs it with."""
        moe_spec, config = self.plan.moe, self.source_config
        activations = None
        if self.plan.needs_activations:
            assert dense_ffn_in is not None  # a plan that needs activations runs the dense stream
            gate, up, _ = self.ffn.split(weights)
            activations = _ffn_activations(dense_ffn_in[: self.fit_sequences], gate, up, self.act)
        moe_ffn_in = None
        if layer_plan.router_init == "kmeans" or layer_plan.calibrate_scale:
            # the router's real input: this layer's FFN input on the MoE stream (after its attention MoE, if any)
            assert moe is not None  # a plan that calibrates runs the MoE stream
            _, captured = runner.run_layer(index, own, moe, attention=attention, capture_mlp_input=True)
            assert captured is not None  # asked for with capture_mlp_input
            moe_ffn_in = captured[: self.fit_sequences].reshape(-1, captured.shape[-1])
        router_inputs = moe_ffn_in if layer_plan.router_init == "kmeans" else None
        mlp = build_experts(layer_plan, moe_spec, *self.ffn.split(stored), activations, self.generator)
        router = init_router(
            layer_plan.router_init,
            layer_plan.num_experts,
            moe_spec.routing.gate_type,
            moe_spec.routing.gate_hidden_size,
            config.hidden_size,
            moe_spec.routing.router_init_std,
            router_inputs,
            self.generator,
            layer_plan.n_split,
        )
        mlp.update({f"gate.{name}": tensor.to(self.out_dtype) for name, tensor in router.items()})
        block = self._block(layer_plan, mlp)
        if layer_plan.calibrate_scale:
            assert moe_ffn_in is not None  # captured above for every calibrated scale
            factor = _least_squares_scale(block, self.ffn.split(weights), moe_ffn_in, self.act)
            scale_experts(mlp["experts.down_proj"], factor)  # the block shares this storage (assign=True)
            self.scales[index] = layer_plan.scale * factor
        return block, mlp

    def _block(self, layer_plan: LayerPlan, mlp: dict[str, torch.Tensor]) -> MoeforgeSparseMoeBlock:
        """The canonical MoE block over these tensors: experts stay in the output dtype, the rest runs in fp32."""
        with torch.device("meta"):
            block = MoeforgeSparseMoeBlock(self.block_config, layer_plan.spec(self.plan.moe))
        block.load_state_dict(
            {name: tensor if name.startswith("experts.") else tensor.float() for name, tensor in mlp.items()},
            strict=True,
            assign=True,
        )
        return block


def _group_importance(o_proj_in: torch.Tensor, o_proj: torch.Tensor, groups: int) -> torch.Tensor:
    """Each head group's mean output norm through its columns of ``o_proj`` (``o_proj_in [..., heads·d]``:
    the attention output before o_proj): what the layer loses when the group is left out."""
    flat = o_proj_in.reshape(-1, o_proj_in.shape[-1])
    width = flat.shape[-1] // groups
    return torch.stack(
        [(flat[:, g * width : (g + 1) * width] @ o_proj[:, g * width : (g + 1) * width].T).norm(dim=-1).mean() for g in range(groups)]
    )


@torch.no_grad()
def _least_squares_scale(
    block: MoeforgeSparseMoeBlock, ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ffn_in: torch.Tensor, act: Callable
) -> float:
    """The factor on the routed experts that brings the block's output closest (L2) to the dense FFN's
    (``ffn`` = gate, up, down) on the same inputs: argmin_s ||dense - shared - s·routed||² = <dense - shared,
    routed> / ||routed||²."""
    gate, up, down = ffn
    target = _ffn_activations(ffn_in, gate, up, act) @ down.T
    total = block(ffn_in.unsqueeze(0)).squeeze(0)
    shared = block.shared_expert(ffn_in) if block.shared_expert is not None else torch.zeros_like(total)
    routed = total - shared
    denominator = (routed * routed).sum()
    return float(((target - shared) * routed).sum() / denominator) if denominator > 0 else 1.0


def _provenance(recipe: ConvertRecipe, converter: _Converter, report: FidelityReport | None, new_params: list[str], tmp: Path) -> dict:
    plan = converter.plan
    return {
        "moeforge_version": version("moeforge"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"spec": recipe.source, "resolved": str(converter.source_dir), "model_type": converter.source_config.model_type},
        "export": converter.target,
        "dtype": str(converter.out_dtype).removeprefix("torch."),
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "safetensors": safetensors.__version__},
        "layers": [
            None
            if layer is None
            else {
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "expert_intermediate_size": layer.expert_intermediate_size,
                "shared_intermediate_size": layer.shared_intermediate_size,
                "num_shared_experts": layer.num_shared_experts,
                "scale": converter.scales.get(index, layer.scale),
                "scale_calibrated": index in converter.scales,
                "router_init": layer.router_init,
                "exact": layer.exact,
            }
            for index, layer in enumerate(plan.layers)
        ],
        "attention_layers": [
            None
            if layer is None
            else {
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "shared_experts": list(converter.attention_specs[index].shared_experts),
                "shared_selection": layer.shared_selection,
                "router_init": layer.router_init,
                "scale": layer.scale,
                "exact": layer.exact,
            }
            for index, layer in enumerate(plan.attention_layers)
        ],
        "exact_by_construction": plan.exact,
        "fidelity": report.to_dict() if report else None,
        "newly_initialized": new_params,
        "checksums": converter.checksums,
    }


def convert(recipe: ConvertRecipe, *, overwrite: bool = False, log: Callable[[str], None] = _log) -> ConversionResult:
    """Convert a dense model into an MoE checkpoint as the recipe says. Raises MoeforgeError on bad input
    and FidelityError when a conversion that must be exact is not; nothing is left at ``recipe.output`` then."""
    start = time.perf_counter()
    check_output(recipe.output, overwrite=overwrite)  # before any work
    source_dir = resolve_checkpoint(recipe.source, gguf_file=recipe.gguf_file)
    converter = _Converter(recipe, source_dir, log)
    moe_count, attention_count = len(converter.plan.moe_layers), len(converter.plan.attention_moe_layers)
    log(
        f"converting {recipe.source} ({converter.source_config.model_type}, {converter.plan.num_layers} layers) -> "
        f"{converter.target}: {moe_count} MoE layers"
        + (f", init {recipe.moe.init}" if recipe.moe else "")
        + (f", {attention_count} attention MoE layers" if attention_count else "")
        + f", dtype {str(converter.out_dtype).removeprefix('torch.')}"
    )
    caveats = llama_cpp_caveats(converter.target, converter.plan, converter.source_config)
    if caveats and converter.target != MOEFORGE:
        log(f"note: llama.cpp will not run this {converter.target} export as transformers does: {'; '.join(caveats)}")
    size = converter.plan.moe_layers[0].expert_intermediate_size if converter.plan.moe_layers else 0
    if converter.target != MOEFORGE and padded(size) != size:
        log(f"note: expert FFNs padded from {size} to {padded(size)} zero neurons (exact; the row alignment experts kernels need)")
    if any(layer.top_k == 1 for layer in converter.plan.moe_layers) and converter.plan.moe.routing.normalize:
        log(
            "warning: top_k 1 with renormalised weights gives every token weight 1: the router gets no gradient "
            "from the LM loss (only from auxiliary losses); routing.normalize: false is Switch-style top-1"
        )
    with staged_directory(recipe.output, overwrite=overwrite) as tmp:
        report, new_params = converter.run(tmp)
        if report is not None:
            for line in report.lines():
                log(line)
            if not report.passed:
                raise FidelityError(
                    f"the conversion should reproduce the dense model exactly but max |Δlogit| is {report.max_abs_logit_diff:.3e} "
                    f"(tolerance {report.tolerance:.2e}); nothing was written. Please report this with your recipe"
                )
        save_config(converter.target_config, tmp)
        copy_tokenizer_files(source_dir, tmp)
        provenance = _provenance(recipe, converter, report, new_params, tmp)
        (tmp / "moeforge.json").write_text(json.dumps(provenance, indent=2) + "\n")
    seconds = time.perf_counter() - start
    log(f"wrote {recipe.output} ({converter.target}) in {seconds:.1f}s")
    return ConversionResult(recipe.output, converter.target, converter.plan, report, seconds)
