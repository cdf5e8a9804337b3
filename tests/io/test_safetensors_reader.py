"""CheckpointReader: every accessor on a sharded checkpoint, corruption named up front, legacy .bin, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moeforge.errors import MoeforgeError
from moeforge.io.safetensors_reader import CheckpointReader
from moeforge.io.safetensors_writer import ShardedWriter
from tests.helpers import mixed_dtype_tensors


def test_reader_sees_every_tensor_of_a_sharded_checkpoint(tmp_path: Path) -> None:
    tensors = mixed_dtype_tensors()
    with ShardedWriter(tmp_path, max_shard_bytes=1000) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    shards = sorted(tmp_path.glob("*.safetensors"))
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]

    reader = CheckpointReader(tmp_path)
    assert reader.format == "safetensors"
    assert sorted(reader.keys()) == sorted(tensors)
    assert reader.shard_paths() == shards
    assert reader.metadata == {"format": "pt"}
    assert reader.total_bytes() == sum(p.stat().st_size for p in shards)
    assert reader.largest_shard_bytes() == max(p.stat().st_size for p in shards)
    for name, expected in tensors.items():
        assert reader.dtype_of(name) == expected.dtype
        assert reader.shape_of(name) == tuple(expected.shape)
        got = reader.get(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        assert reader.shard_of(name) == tmp_path / weight_map[name]
    assert "scalar" in reader and "nope" not in reader
    with pytest.raises(KeyError, match="'nope' is not in the checkpoint"):
        reader.get("nope")


def _write(tmp_path: Path, max_shard_bytes: int = 400) -> list[Path]:
    with ShardedWriter(tmp_path, max_shard_bytes=max_shard_bytes) as writer:
        for name, t in mixed_dtype_tensors(8).items():
            writer.add(name, t)
    return sorted(tmp_path.glob("*.safetensors"))


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    shard = _write(tmp_path)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MoeforgeError, match=rf"{shard.name} is truncated or corrupted; delete it and download it again"):
        CheckpointReader(tmp_path)


def test_garbage_header_is_named(tmp_path: Path) -> None:
    shard = _write(tmp_path, max_shard_bytes=10**9)[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(MoeforgeError, match=r"model.safetensors is truncated or corrupted"):
        CheckpointReader(tmp_path)


def test_index_naming_missing_shard_or_tensor(tmp_path: Path) -> None:
    shards = _write(tmp_path)
    shards[1].unlink()
    with pytest.raises(MoeforgeError, match=rf"index.json names shard {shards[1].name}, which is missing"):
        CheckpointReader(tmp_path)
    shards = _write(tmp_path / "again")
    index_path = tmp_path / "again" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = shards[0].name
    index_path.write_text(json.dumps(index))
    with pytest.raises(MoeforgeError, match=rf"'ghost' is in {shards[0].name}, but that shard lacks it"):
        CheckpointReader(tmp_path / "again")


def test_no_weights_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MoeforgeError, match="has no weights"):
        CheckpointReader(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_legacy_bin_reads_and_garbage_bin_is_named(tmp_path: Path) -> None:
    tensors = mixed_dtype_tensors(5)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    assert reader.format == "bin"
    for name, expected in tensors.items():
        assert reader.shape_of(name) == tuple(expected.shape)
        assert torch.equal(reader.get(name), expected)

    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # pre-2020 format
    assert torch.equal(CheckpointReader(tmp_path).get("scalar"), tensors["scalar"])

    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04garbage that is not a pickle" * 10)
    message = r"pytorch_model.bin is truncated or corrupted; delete it and download it again"
    with pytest.raises(MoeforgeError, match=message):
        CheckpointReader(tmp_path)


def test_bin_with_code_is_refused(tmp_path: Path) -> None:
    """weights_only loading: a pickle that would run code is refused, not executed."""
    torch.save({"w": torch.zeros(2), "evil": Path("/etc/passwd")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MoeforgeError, match="pytorch_model.bin is truncated or corrupted"):
        CheckpointReader(tmp_path)


_MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from moeforge.io.safetensors_reader import CheckpointReader

    def kib(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])

    reader = CheckpointReader(Path(sys.argv[1]))
    float(reader.get(reader.keys()[0]).float().sum())  # warm up the allocator and lazy imports (the loop does the same)
    base = kib("VmRSS:")
    total = 0
    for name in reader.keys():
        total += float(reader.get(name).float().sum())
    print(base, kib("VmHWM:"), kib("VmRSS:"))
    """
)


def test_reading_everything_needs_about_one_tensor_of_memory(tmp_path: Path) -> None:
    tensor_mib, count = 8, 50  # a 400 MiB checkpoint in 4 shards
    with ShardedWriter(tmp_path, max_shard_bytes=100 * 1024**2) as writer:
        for i in range(count):
            writer.add(f"t{i}", torch.full((tensor_mib * 1024**2 // 4,), float(i)))
    # glibc's malloc keeps freed 8 MiB blocks for reuse once its adaptive mmap threshold has grown, which would
    # measure the allocator, not the reader: a fixed threshold returns every freed tensor to the system
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1024**2)}
    probe = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True, check=True, env=env)
    base, peak, end = (int(x) for x in probe.stdout.split())
    # Peak covers the tensor read plus its float() copy; the whole checkpoint would be 400 MiB more.
    assert peak - base < 4 * tensor_mib * 1024, (base, peak)
    assert end - base < 4 * tensor_mib * 1024, (base, end)
