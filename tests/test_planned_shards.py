"""Shards laid out before their tensors exist (checkpoint/planned.py): the same files as
the writer's held shards (and as safetensors' save_file), digests taken on the way,
tensors let go once written, and every failure leaving nothing behind."""

from __future__ import annotations

import errno
import gc
import hashlib
import weakref

import pytest
import torch
from safetensors.torch import load_file

from modelgrow.checkpoint import CheckpointWriter
from modelgrow.checkpoint import planned
from modelgrow.errors import OutputError

META = {"format": "pt", "zeta": "1", "alpha": "2", "modelgrow.plan": '{"a": 1}'}


def mixed_tensors():
    """Every width of dtype, an empty tensor, names whose sorted order is not this order."""
    g = torch.Generator().manual_seed(0)
    return {
        "layers.10.w": torch.randn(7, 5, generator=g),
        "layers.2.w": torch.randn(3, 9, generator=g).to(torch.bfloat16),
        "embed": torch.randn(11, 4, generator=g).to(torch.float16),
        "steps": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.arange(13, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "bias": torch.randn(9, generator=g, dtype=torch.float64),
        "layers.1.w": torch.randn(3, generator=g).to(torch.bfloat16),
    }


def write(dest, tensors, declare: bool, order=None, max_shard_bytes=200):
    with CheckpointWriter(dest, max_shard_bytes=max_shard_bytes, metadata=META) as writer:
        if declare:
            given = writer.declare([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
            order = order(given) if order else given
        for name in order or tensors:
            writer.add(name, tensors[name])
        return {f.path: f for f in writer.commit()}


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("order", [None, lambda given: given[::-1]], ids=["file order", "reversed"])
def test_declared_shards_are_the_files_held_shards_give(tmp_path, order):
    """Byte for byte (the held path is safetensors' save_file with sorted metadata),
    several shards, in the writer's order and against it; the reported sha256 is the
    file's, whether taken on the way or read back."""
    tensors = mixed_tensors()
    held = write(tmp_path / "held", tensors, declare=False)
    declared = write(tmp_path / "declared", tensors, declare=True, order=order)
    assert len([n for n in held if n.endswith(".safetensors")]) >= 3
    assert files(tmp_path / "held") == files(tmp_path / "declared")
    for name, f in declared.items():
        assert f.sha256 == hashlib.sha256((tmp_path / "declared" / name).read_bytes()).hexdigest() == held[name].sha256
    loaded = {}
    for name in declared:
        if name.endswith(".safetensors"):
            loaded.update(load_file(tmp_path / "declared" / name))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_the_writer_order_writes_each_file_front_to_back():
    entries = [planned.Entry(n, tuple(t.shape), t.dtype) for n, t in mixed_tensors().items()]
    for group in planned.pack(entries, 200):
        _, offsets, _ = planned.header(group, {})
        order = [name for name in offsets]
        assert [offsets[n] for n in order] == sorted(offsets.values())
        sizes = {e.name: e.nbytes for e in group}
        assert all(offsets[a] + sizes[a] == offsets[b] for a, b in zip(order, order[1:]))


def test_a_declared_writer_refuses_what_it_was_not_told(tmp_path):
    tensors = mixed_tensors()
    declared = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    for mistake, error in ((lambda w: w.add("other", torch.zeros(2)), "was not declared"),
                           (lambda w: w.add("embed", torch.zeros(11, 4)), "declared as"),
                           (lambda w: w.add("embed", torch.zeros(11, 5, dtype=torch.float16)), "declared as"),
                           (lambda w: w.commit(), "never added")):
        with pytest.raises((ValueError, RuntimeError), match=error):
            with CheckpointWriter(tmp_path / "out", max_shard_bytes=200) as writer:
                writer.declare(declared)
                writer.add("layers.10.w", tensors["layers.10.w"])
                mistake(writer)
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="once, before"):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add("a", torch.zeros(1))
            writer.declare(declared)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_a_declared_tensor_is_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    real = planned.os.pwrite
    calls = []

    def fills_up(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:  # the headers and a tensor go in; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(planned.os, "pwrite", fills_up)
    with pytest.raises(OutputError, match="no space left writing shard-"):
        write(tmp_path / "out", mixed_tensors(), declare=True)
    assert list(tmp_path.iterdir()) == []


def test_a_written_tensor_is_let_go(tmp_path, monkeypatch):
    """With nothing allowed ahead, each add waits for the writes before it: by then no
    earlier tensor is held anywhere (the pool's record of the call included)."""
    monkeypatch.setattr(planned, "WRITE_AHEAD", 0)
    refs, put = [], planned.PlannedShards.put

    def spy_put(self, name, tensor):  # the tensor the writer keeps (add() detaches it)
        refs.append(weakref.ref(tensor))
        put(self, name, tensor)
        gc.collect()
        assert [r() is None for r in refs[:-1]] == [True] * (len(refs) - 1)

    monkeypatch.setattr(planned.PlannedShards, "put", spy_put)
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=10**6) as writer:
        for name in writer.declare([(f"t{i}", (64, 64), torch.float32) for i in range(6)]):
            writer.add(name, torch.randn(64, 64))
        writer.commit()
    gc.collect()
    assert len(refs) == 6 and all(r() is None for r in refs)
