"""Run a causal LM one decoder layer at a time, with weights handed in per layer.

The model skeleton has its parameters on the meta device (buffers such as RoPE frequencies are real);
a layer is materialised from the tensors given, run on the whole calibration batch, and released.
Memory is one layer plus the activations, whatever the model size: this is what lets conversion
calibrate and check fidelity while streaming shard by shard. A layer's FFN can be swapped for another
module (the converted MoE block) for one call.

What a decoder layer receives besides its hidden states (causal / sliding / linear-attention masks, the
RoPE of its layer type, per-layer inputs, a shared-KV store) is computed by the family's own forward:
:meth:`LayerwiseModel.layer_inputs` runs it with the layers replaced by recorders and keeps what each was
called with, and :meth:`LayerwiseModel.logits` runs it again with the layers replaying given hidden
states, so embedding scales, final norms, logit multipliers and soft-capping are the family's own too.
Nothing family-specific is written here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from moeforge.errors import MoeforgeError

LAYERS_PREFIX = "model.layers."
ATTENTION_MODULE = "self_attn"
"""A decoder layer's (softmax) attention, in every family: what attention MoE converts."""


class _Recorded(Exception):
    """Raised by the last recorder: everything the layers are called with is known, stop the forward there."""


@dataclass
class LayerInputs:
    """One stream through the decoder: its current hidden states and what each layer is called with
    (positional arguments after the hidden states, keyword arguments)."""

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict]]

    def fork(self) -> LayerInputs:
        """An independent stream: containers a layer may write into (a shared-KV store) are copied once and
        stay shared between the layers of this stream, exactly as in one forward."""
        memo: dict[int, object] = {}

        def own(value: object) -> object:
            if isinstance(value, (dict, list)):
                if id(value) not in memo:
                    memo[id(value)] = copy.copy(value)
                return memo[id(value)]
            return value

        calls = [(tuple(own(a) for a in args), {k: own(v) for k, v in kwargs.items()}) for args, kwargs in self.calls]
        return LayerInputs(self.hidden.clone(), calls)


def _set_parameters(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


def _release(module: nn.Module) -> None:
    """Drop a module's parameters back to the meta device (buffers stay: they are small and not re-read)."""
    for sub in module.modules():
        for leaf, parameter in sub._parameters.items():
            if parameter is not None and parameter.device.type != "meta":
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False)


class LayerwiseModel:
    def __init__(self, config: PretrainedConfig, ffn_module: str = "mlp") -> None:
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        self.model.eval()
        self.layers: nn.ModuleList = self.model.model.layers
        self.ffn_module = ffn_module
        self.outer_names = [name for name in self.model.state_dict() if not name.startswith(LAYERS_PREFIX)]
        head = self.model.get_output_embeddings()
        head_path = next((path for path, module in self.model.named_modules() if module is head), None)
        # what layer_inputs reads: everything outside the layers but the output head, which it never runs
        # (at Llama-3's vocabulary the head is 2.1 GB in fp32)
        self.input_names = [name for name in self.outer_names if head_path is None or not name.startswith(f"{head_path}.")]
        self.embedding = self.model.get_input_embeddings()
        embedding_path = next(path for path, module in self.model.named_modules() if module is self.embedding)
        self.embedding_name = f"{embedding_path}.weight"

    @contextmanager
    def _outer(self, tensors: dict[str, torch.Tensor], names: list[str], ids: torch.Tensor) -> Iterator[None]:
        """Materialise ``names``, tensors outside the decoder layers (embeddings, final norm, head, per-layer
        input projections), in fp32 for one forward on ``ids``. A tied head reuses the embedding; an untied
        input embedding holds only the rows of ``ids`` (:meth:`_rows_of`)."""
        tensors = dict(tensors)
        if "lm_head.weight" in names and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        missing = [name for name in names if tensors.get(name) is None]
        if missing:
            raise MoeforgeError(f"the checkpoint lacks {missing[0]}, which its config.json requires; re-download or re-save it")
        embedding = tensors.get(self.embedding_name)
        shared = any(tensors[name] is embedding for name in names if name != self.embedding_name)
        with self._rows_of(embedding, ids) if embedding is not None and not shared else nullcontext(None) as rows:
            materialised = {
                name: tensors[name] if name == self.embedding_name and rows is not None else tensors[name].float() for name in names
            }
            if rows is not None:
                materialised[self.embedding_name] = rows
            _set_parameters(self.model, materialised)
            try:
                yield
            finally:
                _release(self.model)

    @contextmanager
    def _rows_of(self, weight: torch.Tensor, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """The input embedding's rows for ``ids`` only, in fp32, with its forward renumbering the tokens to them:
        a lookup is exact in any dtype, so the family's own embedding forward (scaling included) gives the same
        result as with the whole table, without a 2.1 GB fp32 copy of Llama-3's 128256 rows. A token outside
        ``ids`` maps to -1, which the lookup rejects (never a wrong row)."""
        tokens = torch.unique(ids)
        position = torch.full((weight.shape[0],), -1, dtype=torch.long)
        position[tokens] = torch.arange(len(tokens))
        module, padding = self.embedding, getattr(self.embedding, "padding_idx", None)
        forward = module.forward
        module.forward = lambda input_ids, *args, **kwargs: forward(position[input_ids], *args, **kwargs)
        module.padding_idx = None  # an index into the whole table (it only affects gradients)
        try:
            yield weight[tokens].float()
        finally:
            del module.forward
            module.padding_idx = padding

    @contextmanager
    def _layers_replaced(self, forward: Callable[[int, tuple, dict], torch.Tensor]) -> Iterator[None]:
        """Each decoder layer's forward becomes ``forward(index, args, kwargs)`` for the duration."""
        for index, layer in enumerate(self.layers):
            layer.forward = lambda *args, _i=index, **kwargs: forward(_i, args, kwargs)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    @torch.no_grad()
    def layer_inputs(self, ids: torch.Tensor, outer: dict[str, torch.Tensor]) -> LayerInputs:
        """The first layer's hidden states for ``ids`` and what every layer is called with; ``outer`` needs
        :attr:`input_names` only."""
        calls: list[tuple[tuple, dict]] = []
        first: list[torch.Tensor] = []

        def record(index: int, args: tuple, kwargs: dict) -> torch.Tensor:
            hidden, *rest = args if args else (kwargs.pop("hidden_states"),)
            if index == 0:
                first.append(hidden)
            calls.append((tuple(rest), kwargs))
            if index == len(self.layers) - 1:
                raise _Recorded
            return hidden

        with self._outer(outer, self.input_names, ids), self._layers_replaced(record):
            try:
                self.model(input_ids=ids, use_cache=False)
            except _Recorded:
                pass
        return LayerInputs(first[0], calls)

    @torch.no_grad()
    def run_layer(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        stream: LayerInputs,
        *,
        mlp: nn.Module | None = None,
        attention: nn.Module | None = None,
        capture_mlp_input: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run decoder layer ``index`` with ``tensors`` (names relative to ``model.layers.{index}.``) on the stream's
        hidden states. ``mlp`` replaces the FFN and ``attention`` replaces ``self_attn`` for this call; their own
        parameters serve where ``tensors`` has none (a replacement released after one run needs them given).
        Returns the new hidden states and, if asked, the FFN's input. The stream itself is not advanced (the
        caller decides)."""
        layer = self.layers[index]
        replaced = {name: module for name, module in ((self.ffn_module, mlp), (ATTENTION_MODULE, attention)) if module is not None}
        originals = {name: getattr(layer, name) for name in replaced}
        for name, module in replaced.items():
            setattr(layer, name, module)
            tensors = {f"{name}.{key}": value for key, value in module.state_dict().items()} | tensors
        expected = set(layer.state_dict())
        try:
            if set(tensors) != expected:
                missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
                what = f"lacks {LAYERS_PREFIX}{index}.{missing[0]}" if missing else f"has an unexpected {LAYERS_PREFIX}{index}.{extra[0]}"
                raise MoeforgeError(f"the checkpoint {what} (its config.json says otherwise); re-download or re-save it")
            _set_parameters(layer, tensors)
            with self.recording(index, *((self.ffn_module,) if capture_mlp_input else ())) as seen:
                args, kwargs = stream.calls[index]
                output = layer(stream.hidden, *args, **kwargs)
        finally:
            for name, module in originals.items():
                setattr(layer, name, module)
            _release(layer)
        output = output[0] if isinstance(output, tuple) else output
        captured = seen.get(self.ffn_module)
        return output, (captured[0] if captured else None)

    @contextmanager
    def recording(self, index: int, *paths: str) -> Iterator[dict[str, list[torch.Tensor]]]:
        """What the submodules ``paths`` (relative to layer ``index``, as they are now) receive as their input
        (first argument or ``hidden_states``) in the runs inside the context, one tensor per call."""
        seen: dict[str, list[torch.Tensor]] = {path: [] for path in paths}
        hooks = [
            self.layers[index]
            .get_submodule(path)
            .register_forward_pre_hook(
                lambda _m, args, kwargs, _p=path: seen[_p].append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
            )
            for path in paths
        ]
        try:
            yield seen
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, final_hidden: torch.Tensor, outer: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits when its last decoder layer outputs ``final_hidden`` for ``ids``: the family's
        own final norm, head and logit transforms (multipliers, soft-capping)."""

        def replay(index: int, args: tuple, kwargs: dict) -> torch.Tensor:
            hidden = args[0] if args else kwargs["hidden_states"]
            return final_hidden if index == len(self.layers) - 1 else hidden

        with self._outer(outer, self.outer_names, ids), self._layers_replaced(replay):
            return self.model(input_ids=ids, use_cache=False).logits.float()
