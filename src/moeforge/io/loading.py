"""Load any supported causal LM (a family of :mod:`moeforge.families`, dense or MoE) from a directory, a hub id or a GGUF file.

Everything funnels into a local Hugging Face directory first (:func:`resolve_checkpoint`), so the rest
of moeforge only ever deals with ``config.json`` + safetensors. Weight files are validated with
:class:`~moeforge.io.safetensors_reader.CheckpointReader` before transformers sees them, so a bad
download gives one actionable line instead of a deep traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.distributed import DistributedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from moeforge.config.experts import DEFAULT_BACKEND, implementation_name
from moeforge.errors import MoeforgeError
from moeforge.families import DENSE_MODEL_TYPES, LEGACY_MODEL_TYPES, MOEFORGE_MODEL_TYPE, NATIVE_MODEL_TYPES
from moeforge.io.adapter_dirs import base_model_of, is_adapter_dir
from moeforge.io.extensions import adapter_loader, config_extensions
from moeforge.io.publish import staged_directory
from moeforge.io.quantization import Bits, quantization_config
from moeforge.io.safetensors_reader import SAFE_INDEX, SAFE_SINGLE, CheckpointReader

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""dtype names recipes and flags use -> torch dtypes."""
MOE_MODEL_TYPES = (*NATIVE_MODEL_TYPES, MOEFORGE_MODEL_TYPE, *LEGACY_MODEL_TYPES)
SUPPORTED_MODEL_TYPES = DENSE_MODEL_TYPES + MOE_MODEL_TYPES

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
"""What travels with a checkpoint besides its config and weights."""
_TOKENIZER_PRESENT = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
"""transformers 5's class name for a plain tokenizer.json tokenizer, and the name transformers 4.5x reads too."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_META_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted checkpoints live: ``$MOEFORGE_CACHE`` or ``~/.cache/moeforge``."""
    env = os.environ.get("MOEFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moeforge"


def _first_line(err: BaseException) -> str:
    """Exception text fit for a one-line message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _has_config(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def gguf_to_safetensors(gguf_path: Path, target: Path) -> Path:
    """Dequantise ``gguf_path`` into a plain fp32 safetensors directory at ``target`` (once).

    The work happens in a temporary directory beside ``target`` that is renamed into place only when
    complete, so an aborted or concurrent run never leaves a half-written ``target``.
    """
    if _has_config(target):
        return target
    with staged_directory(target, overwrite=True) as tmp:  # a leftover without a model, or a concurrent run's identical copy
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (ValueError, KeyError, IndexError, OSError, TypeError, struct.error) as err:
            raise MoeforgeError(
                f"could not read GGUF file {gguf_path} ({_first_line(err)}): "
                "check that it is a complete GGUF of a model family moeforge supports"
            ) from None
        # The weights are now plain fp32 tensors: drop the GGUF quantizer so this saves (and later
        # loads) as an ordinary safetensors checkpoint.
        cast(Any, model).hf_quantizer = None  # set by transformers at load time, not a declared attribute
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        save_config(model.config, tmp)
        tokenizer.save_pretrained(tmp)
        portable_tokenizer_config(tmp)
    return target


def save_config(config: PretrainedConfig, directory: Path) -> None:
    """``config.json``, plus what transformers 4.5x reads where transformers 5 writes something else: the
    top-level ``rope_theta`` (4.5x ignores ``rope_parameters`` and would fall back to its class default) when
    every layer type has the same RoPE base, and every field under both names a config class aliases (transformers 5
    writes Qwen3-MoE's expert count as ``num_local_experts``; 4.5x reads ``num_experts``)."""
    config.save_pretrained(directory)
    path = Path(directory) / "config.json"
    raw = json.loads(path.read_text())
    legacy = {alias: raw[name] for alias, name in type(config).attribute_map.items() if name in raw and alias not in raw}
    rope = raw.get("rope_parameters")
    per_type = list(rope.values()) if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values()) else [rope]
    thetas = {entry.get("rope_theta") for entry in per_type if isinstance(entry, dict)}
    if len(thetas) == 1 and isinstance(theta := thetas.pop(), (int, float)) and "rope_theta" not in raw:
        legacy["rope_theta"] = theta  # one base for every layer type: what 4.5x's single field can say
    if legacy:
        path.write_text(json.dumps({**raw, **legacy}, indent=2, sort_keys=True) + "\n")


def _gguf_cache_dir(gguf_path: Path, cache_dir: Path | None) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    return (cache_dir or cache_root()) / "gguf" / key


def _convert_gguf(gguf_path: Path, cache_dir: Path | None) -> Path:
    if not gguf_path.is_file():
        raise MoeforgeError(f"{gguf_path} does not exist: pass an existing .gguf file")
    return gguf_to_safetensors(gguf_path, _gguf_cache_dir(gguf_path, cache_dir))


def is_hub_id(text: str) -> bool:
    """Whether a source names a Hugging Face hub model rather than a local path: shaped ``org/name``, nothing
    there locally, and no local folder ``org`` either. ``out/model`` beside an existing ``out/`` is a local path
    not written yet (a recipe's output, say): asking the hub for it would only hide that."""
    path = Path(text)
    return bool(HUB_ID.match(text)) and not path.exists() and not path.parent.is_dir()


def not_on_hub(repo_id: str, err: BaseException) -> MoeforgeError:
    """One line for an ``org/name`` source that is no local path and that the hub did not provide. Such a
    name may be either (a recipe's ``out/...`` output not written yet reads like a hub id), so the line says
    both where it looked; an unreachable hub (offline) is told apart from a hub that answered no."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = (
        "it is not cached and the hub is not reachable (offline)"
        if isinstance(err, LocalEntryNotFoundError)
        else f"the hub did not provide it ({_first_line(err)})"
    )
    return MoeforgeError(
        f"{repo_id} does not exist locally, and as a Hugging Face id {hub}: "
        "check the path (a recipe's output exists once that recipe has run) or the hub id"
    )


def _missing(text: str) -> MoeforgeError:
    """A source that is nothing local and no hub id: say which local folder made it a path, when one did."""
    parent = Path(text).parent
    if HUB_ID.match(text) and parent.is_dir():
        return MoeforgeError(
            f"{text} does not exist (a local path, not tried as a Hugging Face id since the folder {parent}/ is here): "
            "pass an existing model directory or .gguf file"
        )
    return MoeforgeError(f"{text} does not exist: pass a model directory, a .gguf file or a Hugging Face id (org/name)")


def _download(repo_id: str, revision: str | None, cache_dir: Path | None, gguf_file: str | None) -> Path:
    """Fetch only what loading needs: config, tokenizer and one weight format (safetensors preferred)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise not_on_hub(repo_id, err) from None

    if gguf_file:
        return fetch([gguf_file])
    directory = fetch(_HUB_META_PATTERNS + ["model*.safetensors", SAFE_INDEX])
    if not (directory / SAFE_SINGLE).is_file() and not (directory / SAFE_INDEX).is_file():
        directory = fetch(_HUB_META_PATTERNS + ["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    return directory


def resolve_checkpoint(
    source: str | Path,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Turn what the user typed into a local directory holding ``config.json`` and weights.

    ``source`` is an embedded model's name (``"default"``/``"smollm2"``, ``"gemma3"``), a local directory, a ``.gguf`` file
    (or a directory / hub id plus ``gguf_file``), or a hub id ``org/name``. GGUF files are converted once
    into ``cache_dir`` (default :func:`cache_root`); hub downloads go to ``cache_dir`` too when given,
    else to the usual Hugging Face cache.
    """
    text = str(source)
    from moeforge.io.embedded import EMBEDDED_ALIASES, embedded_model_dir  # lazy: embedded imports us

    if text in EMBEDDED_ALIASES and not Path(text).exists():
        return embedded_model_dir(text, cache_dir)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path, cache_dir)
    if path.is_dir():
        if gguf_file:
            return _convert_gguf(path / gguf_file, cache_dir)
        if not _has_config(path):
            raise MoeforgeError(f"{path} has no config.json: point to a Hugging Face model directory")
        return path
    if path.exists():
        raise MoeforgeError(f"{path} is neither a model directory nor a .gguf file")
    if is_hub_id(text):
        directory = _download(text, revision, cache_dir, gguf_file)
        return _convert_gguf(directory / gguf_file, cache_dir) if gguf_file else directory
    raise _missing(text)


def read_config(directory: Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """Read ``config.json``, refusing unsupported model types before transformers tries to build them.

    moeforge's own model types are known to ``AutoConfig`` once :mod:`moeforge.modeling` is imported
    (``import moeforge`` does)."""
    config_path = Path(directory) / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoeforgeError(f"{config_path} is not readable JSON ({type(err).__name__}); fix or re-download it") from None
    if not isinstance(raw, dict):
        raise MoeforgeError(f"{config_path} is not a JSON object; fix or re-download it")
    text = raw.get("text_config")
    _refuse_unsupported(raw.get("model_type"), raw.get("architectures"), text.get("model_type") if isinstance(text, dict) else None)
    _refuse_unknown_activation(raw, config_path)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise MoeforgeError(f"{config_path} is not a valid config ({_first_line(err)}); fix or re-download it") from None


_ACTIVATION_FIELDS = ("hidden_act", "hidden_activation")
"""Where the families moeforge knows name their FFN activation (:attr:`DenseFamily.activation_field`)."""


def _refuse_unknown_activation(raw: dict[str, Any], config_path: Path) -> None:
    """An activation transformers does not know fails deep inside model construction (``KeyError``): name it."""
    from transformers.activations import ACT2FN

    for field in _ACTIVATION_FIELDS:
        value = raw.get(field)
        if isinstance(value, str) and value not in ACT2FN:
            raise MoeforgeError(
                f"{config_path}: {field} {value!r} is not an activation transformers knows "
                f"(e.g. silu, gelu_pytorch_tanh, gelu); fix config.json"
            )


def _refuse_unsupported(model_type: object, architectures: object, text_model_type: object = None) -> None:
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    arch = f" ({', '.join(architectures)})" if isinstance(architectures, list) and architectures else ""
    if text_model_type in SUPPORTED_MODEL_TYPES:
        raise MoeforgeError(
            f"model_type {model_type!r}{arch} is a multimodal model; moeforge works on text decoders: "
            f"use a {text_model_type} checkpoint (its language model alone)"
        )
    raise MoeforgeError(f"model_type {model_type!r}{arch} is not supported; moeforge supports: {', '.join(SUPPORTED_MODEL_TYPES)}")


def check_supported(config: PretrainedConfig) -> None:
    """Raise :class:`MoeforgeError` unless ``config`` is a LLaMA-family model moeforge handles."""
    _refuse_unsupported(config.model_type, getattr(config, "architectures", None))


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in _TOKENIZER_PRESENT)


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """Copy ``source``'s tokenizer files into ``target``, readable by transformers 4.5x too (:func:`portable_tokenizer_config`)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    portable_tokenizer_config(target)


def portable_tokenizer_config(directory: Path) -> None:
    """A ``tokenizer_config.json`` written by transformers 5 names its tokenizer class ``TokenizersBackend``,
    which transformers 4.5x (and tools pinned to it, like llama.cpp's converter) cannot load: name the
    equivalent class both versions read."""
    config = Path(directory) / "tokenizer_config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # none, or unreadable: loading the tokenizer reports that
    portable = _PORTABLE_TOKENIZER_CLASS.get(str(raw.get("tokenizer_class"))) if isinstance(raw, dict) else None
    if portable:
        config.write_text(json.dumps({**raw, "tokenizer_class": portable}, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(directory: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer, or None (with a note) when the directory ships none."""
    directory = Path(directory)
    if not has_tokenizer(directory):
        logger.warning("note: %s has no tokenizer files; continuing without a tokenizer", directory)
        return None
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise MoeforgeError(f"could not load the tokenizer in {directory} ({_first_line(err)}); fix or re-download it") from None


def from_pretrained(
    directory: Path,
    *,
    config: PretrainedConfig | None = None,
    dtype: torch.dtype = torch.float32,
    model_class: type[Any] = AutoModelForCausalLM,
    trust_remote_code: bool = False,
    quantization: Bits | None = None,
    experts_backend: str = DEFAULT_BACKEND,
    distributed_config: DistributedConfig | None = None,
) -> PreTrainedModel:
    """``model_class.from_pretrained`` on a validated directory, plus what moeforge adds on top of the
    architecture: a config key registered in :mod:`moeforge.io.extensions` (``moice``: MoICE attention
    and its routers, which transformers alone would drop) gets its modules and weights back.
    ``quantization`` loads the weights in 4/8 bit with bitsandbytes onto the first GPU (a frozen base for
    adapters). ``experts_backend`` (:data:`moeforge.config.experts.EXPERTS_BACKENDS`) runs the experts of
    any MoE architecture, native or moeforge's, and the MoE adapters put on a dense one. ``distributed_config``
    has transformers shard the model over the launched processes as it loads (expert parallelism)."""
    reader = CheckpointReader(directory)  # validates every weight file before transformers opens it
    config = config or read_config(directory, trust_remote_code=trust_remote_code)
    extensions = config_extensions(config)
    extra: dict[str, Any] = {"quantization_config": quantization_config(quantization, dtype), "device_map": {"": 0}} if quantization else {}
    if distributed_config is not None:
        extra["distributed_config"] = distributed_config
    verbosity = transformers_logging.get_verbosity()
    if extensions:  # their weights are "unexpected" to the plain architecture; the extension loads them
        transformers_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(
            directory,
            config=config,
            dtype=dtype,
            use_safetensors=reader.format == "safetensors",
            weights_only=True,
            trust_remote_code=trust_remote_code,
            experts_implementation=implementation_name(experts_backend),
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below in one line, instead of transformers' report and traceback
            **extra,
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, *shapes = mismatched[0]
        found = f" (weights {tuple(shapes[0])}, config {tuple(shapes[1])})" if len(shapes) == 2 else ""
        raise MoeforgeError(
            f"{directory}: config.json disagrees with the weights at {name}{found}"
            + (f" and {len(mismatched) - 1} more tensors" if len(mismatched) > 1 else "")
            + "; fix config.json or re-download the checkpoint"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MoeforgeError(
            f"{directory}: the weights lack {missing[0]}{more}, which config.json requires (they would start random); "
            "fix config.json or re-download the checkpoint"
        )
    for _, entry, install in extensions:
        install(model, entry, reader, directory)
    return model


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    adapter: str | Path | None = None,
    quantization: Bits | None = None,
    experts_backend: str = DEFAULT_BACKEND,
    distributed_config: DistributedConfig | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Resolve, validate and load a supported causal LM (in eval mode) and its tokenizer.

    ``source`` may also be an adapter directory (``adapter_config.json``, e.g. what ``moeforge train`` wrote
    for a recipe with ``adapter:``): its recorded base model is loaded and the adapter put on it, as with
    ``adapter=``. The tokenizer then comes from the adapter directory when it has one."""
    tokenizer_dir = None
    if adapter is None and is_adapter_dir(source):
        adapter, tokenizer_dir = Path(source), Path(source)
        base = base_model_of(source)
        if not base:
            raise MoeforgeError(
                f"adapter {adapter} records no base model (base_model_name_or_path): load the base model with {adapter} as its adapter"
            )
        source = base
    directory = resolve_checkpoint(source, gguf_file=gguf_file)
    config = read_config(directory, trust_remote_code=trust_remote_code)
    model = from_pretrained(
        directory,
        config=config,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        quantization=quantization,
        experts_backend=experts_backend,
        distributed_config=distributed_config,
    )
    if quantization is None and distributed_config is None:  # a sharded model is placed by transformers
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapper around .to hides its signature
    if adapter is not None:
        model = cast(PreTrainedModel, adapter_loader()(model, Path(adapter)))  # a PeftModel forwards the model's interface
    model.eval()
    if tokenizer_dir is None or not has_tokenizer(tokenizer_dir):
        tokenizer_dir = directory
    return model, load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
