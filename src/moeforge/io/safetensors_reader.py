"""Streaming, bounded-memory checkpoint reading.

Converting a model means touching every tensor once. Loading the whole state dict would need as much
memory as the model, so :class:`CheckpointReader` reads one tensor at a time with plain ``seek`` +
``readinto`` (no mmap, whose touched pages would count against RSS). Every file is validated up front
from its header, so a truncated download fails with a one-line :class:`~moeforge.errors.MoeforgeError`
before any work starts. The file names and dtype codes here are the format's; the writer uses them too.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from moeforge.errors import MoeforgeError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype codes -> torch dtypes (the format is little-endian, like every host torch runs on).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# A header larger than this is not a safetensors header (the reference implementation caps it too).
_MAX_HEADER_BYTES = 100 * 1024**2


def _corrupted(path: Path, why: str) -> MoeforgeError:
    return MoeforgeError(f"{path} is truncated or corrupted; delete it and download it again ({why})")


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: enough to read it without opening anything else."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file (safetensors) or -1 (.bin: read through torch.load)
    end: int


def _read_safetensors_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and check one safetensors header; reading it costs one small read, not the data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupted(path, "shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise _corrupted(path, "bad header length")
            header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupted(path, f"unreadable header: {err}") from None
    except OSError as err:
        raise MoeforgeError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(header, dict):
        raise _corrupted(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: dict[str, _Entry] = {}
    data_end = 0
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupted(path, f"bad header entry for {name!r}") from None
        if end - begin != prod(shape) * dtype.itemsize or begin < 0:
            raise _corrupted(path, f"header entry for {name!r} does not match its shape")
        entries[name] = _Entry(path, dtype, shape, data_start + begin, data_start + end)
        data_end = max(data_end, end)
    if size != data_start + data_end:
        raise _corrupted(path, f"{size} bytes on disk, header says {data_start + data_end}")
    return entries, metadata


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Unpickle a legacy ``.bin`` shard safely (weights only) and lazily (mmap, for zip-format files)."""
    try:
        # Pre-2020 (non-zip) files cannot be mmapped; they are small enough to load whole.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise _corrupted(path, f"{type(err).__name__}") from None
    except OSError as err:
        raise MoeforgeError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise _corrupted(path, "not a state dict of tensors")
    return state


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise MoeforgeError(f"{path} is not a valid shard index ({type(err).__name__}); download it again") from None
    if not isinstance(weight_map, dict):
        raise MoeforgeError(f"{path} is not a valid shard index (weight_map is not an object); download it again")
    return weight_map


class CheckpointReader:
    """Read-only view of the weights of a Hugging Face checkpoint directory, one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._shards: list[Path] = []
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        d = self.directory
        if (d / SAFE_INDEX).is_file():
            self.format = "safetensors"
            self._open_index(d / SAFE_INDEX)
        elif (d / SAFE_SINGLE).is_file():
            self.format = "safetensors"
            self._open_shards([d / SAFE_SINGLE])
        elif (d / BIN_INDEX).is_file():
            self.format = "bin"
            self._open_index(d / BIN_INDEX)
        elif (d / BIN_SINGLE).is_file():
            self.format = "bin"
            self._open_shards([d / BIN_SINGLE])
        else:
            raise MoeforgeError(
                f"{d} has no weights ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}): "
                "point to a complete Hugging Face model directory"
            )

    def _open_shards(self, shards: list[Path]) -> dict[Path, dict[str, _Entry]]:
        per_shard: dict[Path, dict[str, _Entry]] = {}
        for shard in shards:
            if self.format == "safetensors":
                entries, metadata = _read_safetensors_header(shard)
                if not self._shards:
                    self.metadata = dict(metadata)
            else:
                entries = {name: _Entry(shard, t.dtype, tuple(t.shape), -1, -1) for name, t in _load_bin(shard).items()}
            per_shard[shard] = entries
            self._shards.append(shard)
        for entries in per_shard.values():
            self._entries.update(entries)
        return per_shard

    def _open_index(self, index: Path) -> None:
        weight_map = _read_index(index)
        shard_names = sorted(set(weight_map.values()))
        for name in shard_names:
            if not (self.directory / name).is_file():
                raise MoeforgeError(f"{index} names shard {name}, which is missing; download the checkpoint again")
        per_shard = self._open_shards([self.directory / name for name in shard_names])
        entries: dict[str, _Entry] = {}
        for tensor, shard_name in weight_map.items():
            entry = per_shard[self.directory / shard_name].get(tensor)
            if entry is None:
                raise MoeforgeError(f"{index} says {tensor!r} is in {shard_name}, but that shard lacks it; download the checkpoint again")
            entries[tensor] = entry
        self._entries = entries

    def keys(self) -> list[str]:
        """Tensor names in storage order (shard by shard, by offset), so reading them in turn is sequential."""
        order = {path: i for i, path in enumerate(self._shards)}
        return sorted(self._entries, key=lambda n: (order[self._entries[n].path], self._entries[n].begin, n))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in the checkpoint at {self.directory}") from None

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh, owned CPU memory in its stored dtype."""
        entry = self._entry(name)
        if entry.begin < 0:
            return self._get_bin(name, entry.path)
        flat = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        with entry.path.open("rb") as f:
            f.seek(entry.begin)
            got = f.readinto(flat.numpy().data) if flat.numel() else 0
        if got != flat.numel():
            raise _corrupted(entry.path, f"short read of {name!r}")
        return flat.view(entry.dtype).reshape(entry.shape)

    def _get_bin(self, name: str, shard: Path) -> torch.Tensor:
        # Keep only the current shard's (mmapped, lazily paged) state dict: shards are read in order.
        if self._bin_cache is None or self._bin_cache[0] != shard:
            self._bin_cache = None
            self._bin_cache = (shard, _load_bin(shard))
        return self._bin_cache[1][name].clone()

    def shard_of(self, name: str) -> Path:
        return self._entry(name).path

    def shard_paths(self) -> list[Path]:
        return list(self._shards)

    def largest_shard_bytes(self) -> int:
        return max(p.stat().st_size for p in self._shards)

    def total_bytes(self) -> int:
        """Size of the weight files on disk (headers included)."""
        return sum(p.stat().st_size for p in self._shards)

    def dtype_of(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape
