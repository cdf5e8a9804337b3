"""Streaming, bounded-memory checkpoint I/O.

Converting a model means touching every tensor once. Loading the whole state dict would need as much
memory as the model, so :class:`CheckpointReader` reads one tensor at a time with plain ``seek`` +
``readinto`` (no mmap, whose touched pages would count against RSS) and :class:`ShardedWriter`
streams each tensor to disk as it arrives. Every file is validated up front from its header, so a truncated download
fails with a one-line :class:`~moeforge.errors.MoeforgeError` before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import TracebackType

import torch

from moeforge.errors import MoeforgeError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype codes -> torch dtypes (the format is little-endian, like every host torch runs on).
_DTYPES: dict[str, torch.dtype] = {
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
            dtype = _DTYPES[info["dtype"]]
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
                entries = {
                    name: _Entry(shard, t.dtype, tuple(t.shape), -1, -1) for name, t in _load_bin(shard).items()
                }
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
                raise MoeforgeError(
                    f"{index} says {tensor!r} is in {shard_name}, but that shard lacks it; download the checkpoint again"
                )
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
            got = f.readinto(memoryview(flat.numpy())) if flat.numel() else 0
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


_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_SMALL_SHARD_BYTES = 256 * 1024**2


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks (the checksums recorded in moeforge.json)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class _OpenShard:
    """One shard being written: tensor bytes go straight to disk after a reserved header region,
    whose JSON is written (space-padded, as the format allows) when the shard is closed. Bookkeeping
    (:meth:`record`) happens on the caller's thread; :meth:`write`, :meth:`close` and :meth:`sha256` may
    run on the writer thread, in submission order."""

    def __init__(self, path: Path, header_reserve: int) -> None:
        self.path = path
        self.reserve = header_reserve
        self.handle = path.open("wb")
        self.handle.seek(8 + header_reserve)
        self.entries: dict[str, dict] = {}
        self.data_bytes = 0
        self.header_bytes = 2 + len('"__metadata__":{"format":"pt"},')

    def fits(self, name: str, tensor: torch.Tensor, max_bytes: int) -> bool:
        entry_bytes = len(name) + 80 + 12 * tensor.dim()
        within_header = self.header_bytes + entry_bytes <= self.reserve
        return not self.entries or (within_header and self.data_bytes + tensor.nbytes <= max_bytes)

    def record(self, name: str, tensor: torch.Tensor) -> None:
        start = self.data_bytes
        self.data_bytes += tensor.nbytes
        entry = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [start, self.data_bytes]}
        self.entries[name] = entry
        self.header_bytes += len(json.dumps({name: entry}, separators=(",", ":")))

    def write(self, tensor: torch.Tensor) -> None:
        if tensor.nbytes:
            self.handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.reserve:  # cannot happen: fits() keeps a margin; guard against silent corruption
            raise RuntimeError(f"safetensors header of {self.path} outgrew its reserved space")
        if self.data_bytes <= _SMALL_SHARD_BYTES:
            self._compact(header)
            return
        self.handle.seek(0)
        self.handle.write(struct.pack("<Q", self.reserve) + header.ljust(self.reserve, b" "))
        self.handle.close()

    def _compact(self, header: bytes) -> None:
        """Small shards are rewritten with a tight header (a cheap copy) so they look like any other file."""
        self.handle.close()
        header = header.ljust(-(-len(header) // 8) * 8, b" ")  # 8-byte aligned data, as safetensors writes it
        compact = self.path.with_suffix(".compact")
        with self.path.open("rb") as source, compact.open("wb") as target:
            target.write(struct.pack("<Q", len(header)) + header)
            source.seek(8 + self.reserve)
            shutil.copyfileobj(source, target, 1 << 24)
        os.replace(compact, self.path)

    def sha256(self) -> str:
        return sha256_file(self.path)


class ShardedWriter:
    """Write tensors as Hugging Face safetensors shards, streaming each tensor to disk as it comes.

    Nothing is buffered per shard: each tensor's bytes are written right after a reserved header region,
    so memory does not grow with the shard size, and views are written without copying. Writing, closing
    and checksumming shards happen on one background thread, overlapping the caller's compute; at most
    ``max_inflight_bytes`` of tensors wait for it. Use as a context manager to remove partial output on error.
    ``checksums`` (final file name → sha256) is filled by :meth:`close`.
    """

    def __init__(
        self,
        directory: Path,
        max_shard_bytes: int = 2 * 1024**3,
        header_reserve: int = 1 << 20,
        max_inflight_bytes: int = 512 * 1024**2,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.header_reserve = header_reserve
        self.max_inflight_bytes = max_inflight_bytes
        self.checksums: dict[str, str] = {}
        self._shard: _OpenShard | None = None
        self._shards: list[_OpenShard] = []
        self._shard_of: dict[str, int] = {}
        self._total_size = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeforge-writer")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeforge-sha256")
        self._pending: list[Future] = []
        self._digests: list[Future] = []
        self._inflight = 0
        self._room = threading.Condition()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._shard_of:
            raise ValueError(f"tensor {name!r} was already added")
        self._raise_worker_error()
        tensor = tensor.detach().to("cpu").contiguous()
        if self._shard is None or not self._shard.fits(name, tensor, self.max_shard_bytes):
            self._next_shard()
        self._shard.record(name, tensor)
        self._shard_of[name] = len(self._shards) - 1
        self._total_size += tensor.nbytes
        with self._room:
            self._room.wait_for(lambda: self._inflight == 0 or self._inflight + tensor.nbytes <= self.max_inflight_bytes)
            self._inflight += tensor.nbytes
        self._pending.append(self._pool.submit(self._write, self._shard, tensor))

    def _write(self, shard: _OpenShard, tensor: torch.Tensor) -> None:
        try:
            shard.write(tensor)
        finally:
            with self._room:
                self._inflight -= tensor.nbytes
                self._room.notify_all()

    def _raise_worker_error(self) -> None:
        while self._pending and self._pending[0].done():  # futures finish in submission order
            self._pending.pop(0).result()

    def _next_shard(self) -> None:
        if self._shard is not None:
            self._finish(self._shard)
        path = self.directory / f".moeforge-shard-{len(self._shards) + 1:05d}.safetensors.tmp"
        self._shard = _OpenShard(path, self.header_reserve)
        self._shards.append(self._shard)

    def _finish(self, shard: _OpenShard) -> None:
        """Close the shard on the writer thread, then checksum it on its own thread (overlapping later writes)."""
        closed = self._pool.submit(shard.close)
        self._pending.append(closed)
        self._digests.append(self._hasher.submit(lambda: (closed.result(), shard.sha256())[1]))

    def close(self) -> list[Path]:
        """Finish the last shard, give shards their final names and write the index; return the shard paths."""
        if self._shard is None:
            self._next_shard()
        self._finish(self._shard)
        self._shard = None
        for future in self._pending:
            future.result()
        digests = [future.result() for future in self._digests]
        self._pool.shutdown()
        self._hasher.shutdown()
        n = len(self._shards)
        if n == 1:
            final = [self.directory / SAFE_SINGLE]
        else:
            final = [self.directory / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for shard, path, digest in zip(self._shards, final, digests):
            os.replace(shard.path, path)
            self.checksums[path.name] = digest
        self._shards = []
        if n == 1:
            (self.directory / SAFE_INDEX).unlink(missing_ok=True)  # a stale index would shadow the new file
        else:
            weight_map = {name: final[i].name for name, i in sorted(self._shard_of.items())}
            index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return final

    def abort(self) -> None:
        """Stop writing and delete every partial shard."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._hasher.shutdown(wait=True, cancel_futures=True)
        for shard in self._shards:
            shard.handle.close()
            shard.path.unlink(missing_ok=True)
            shard.path.with_suffix(".compact").unlink(missing_ok=True)
        self._shards, self._shard = [], None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
