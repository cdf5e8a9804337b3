"""ShardedWriter: shard layout and index, round trips, transformers compatibility, cleanup on error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from transformers import AutoModelForCausalLM

from moeforge.io.safetensors_reader import CheckpointReader
from moeforge.io.safetensors_writer import ShardedWriter
from tests.helpers import build_tiny_llama, mixed_dtype_tensors


def test_round_trip_across_shards(tmp_path: Path) -> None:
    tensors = mixed_dtype_tensors()
    writer = ShardedWriter(tmp_path, max_shard_bytes=1000)
    for name, t in tensors.items():
        writer.add(name, t)
    shards = writer.close()
    assert len(shards) > 3
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(tmp_path.iterdir()) == sorted([*shards, tmp_path / "model.safetensors.index.json"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert sorted(writer.checksums) == sorted(p.name for p in shards)
    for name, expected in tensors.items():
        with safetensors.safe_open(str(tmp_path / index["weight_map"][name]), framework="pt") as handle:
            got = handle.get_tensor(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_shards_keep_the_order_tensors_were_added_in(tmp_path: Path) -> None:
    """The pipeline writes layer by layer; a reader streaming the output must meet the layers in that order."""
    tensors = mixed_dtype_tensors()
    with ShardedWriter(tmp_path, max_shard_bytes=1000) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    assert CheckpointReader(tmp_path).keys() == list(tensors)


def test_single_shard_has_no_index_and_writer_handles_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    with ShardedWriter(tmp_path) as writer:
        writer.add("a", base)
        writer.add("b", base)  # same storage: must be cloned for safetensors
        writer.add("c", base.view(3, 4)[:, 1])  # a non-contiguous view
        with pytest.raises(ValueError, match="'a'"):
            writer.add("a", base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.get("b"), base)
    assert torch.equal(reader.get("c"), torch.tensor([1.0, 5.0, 9.0]))


def test_a_repeated_row_is_written_as_its_copies(tmp_path: Path) -> None:
    """Copied experts arrive as one expert expanded along dim 0; the file holds every copy."""
    row = torch.arange(6, dtype=torch.bfloat16).view(1, 2, 3)
    with ShardedWriter(tmp_path) as writer:
        writer.add("repeated", row.expand(4, 2, 3))
        writer.add("after", torch.ones(2))  # offsets after it stay right
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.get("repeated"), row.repeat(4, 1, 1)) and torch.equal(reader.get("after"), torch.ones(2))


def test_writer_context_cleans_up_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardedWriter(tmp_path, max_shard_bytes=8) as writer:
        writer.add("a", torch.zeros(4))
        writer.add("b", torch.zeros(4))  # flushes "a" to a provisional shard
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_transformers_loads_sharded_writer_output(tmp_path: Path) -> None:
    model = build_tiny_llama()
    model.config.save_pretrained(tmp_path)
    writer = ShardedWriter(tmp_path, max_shard_bytes=200_000)
    for name, t in model.state_dict().items():
        writer.add(name, t)
    assert len(writer.close()) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_large_shards_keep_a_padded_header_that_every_reader_accepts(tmp_path: Path, monkeypatch) -> None:
    """Shards above the compaction size keep their reserved (space-padded) header instead of being rewritten."""
    monkeypatch.setattr("moeforge.io.safetensors_writer._SMALL_SHARD_BYTES", 0)
    tensors = mixed_dtype_tensors()
    with ShardedWriter(tmp_path, max_shard_bytes=10**9, header_reserve=4096) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    path = tmp_path / "model.safetensors"
    assert int.from_bytes(path.read_bytes()[:8], "little") == 4096
    with safetensors.safe_open(str(path), framework="pt") as handle:
        for name, expected in tensors.items():
            assert torch.equal(handle.get_tensor(name), expected)
    reader = CheckpointReader(tmp_path)
    assert all(torch.equal(reader.get(name), t) for name, t in tensors.items())


def test_header_reserve_starts_a_new_shard_instead_of_overflowing(tmp_path: Path) -> None:
    tensors = mixed_dtype_tensors(40)
    with ShardedWriter(tmp_path, max_shard_bytes=10**9, header_reserve=1024) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    reader = CheckpointReader(tmp_path)
    assert len(reader.shard_paths()) > 1
    assert all(torch.equal(reader.get(name), t) for name, t in tensors.items())
