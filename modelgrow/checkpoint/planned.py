"""Shards laid out before their tensors exist.

A conversion knows every output tensor's name, shape and dtype from its plan. Knowing
them, the writer can work out each shard's header and every tensor's offset up front,
write each tensor into its place as soon as it is made (on a helper thread, while the
next one is computed) and drop it: memory holds a few tensors rather than a shard, and
growth overlaps the writes instead of waiting for them.

The bytes are the ones safetensors' ``save_file`` writes for the same tensors: data
ordered by its dtype order (widest first) and then by name, the header in that order
after ``__metadata__``, compact JSON padded with spaces to a multiple of 8 bytes.
Metadata keys are sorted (``save_file`` writes them in hash order; the writer sorts them
afterwards), so a file is the same whichever way it was written (a test holds both to
each other).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from modelgrow.checkpoint.atomic import output_errors
from modelgrow.checkpoint.safetensors_format import SAFETENSORS_DTYPES

# safetensors' Dtype enum, narrowest first; its files put the widest first.
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64")
_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# Bytes handed to the writing thread and not yet written, beside the tensor being made.
WRITE_AHEAD = 512 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor to come: what its header entry says."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def code(self) -> str:
        return _CODES[self.dtype]


def pack(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy shards by bytes, in order: a tensor starts a new shard when the one being
    filled holds something and would pass ``max_bytes`` with it (one larger than the
    limit gets a shard of its own). The same rule as ``CheckpointWriter.add``."""
    shards: list[list[Entry]] = [[]]
    filled = 0
    for entry in entries:
        if shards[-1] and filled + entry.nbytes > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += entry.nbytes
    return shards


def header(entries: list[Entry], metadata: dict[str, str]) -> tuple[bytes, dict[str, int], int]:
    """(the file's first bytes: length and header, each tensor's offset in the file, the file's size)."""
    ordered = sorted(entries, key=lambda e: (-DTYPE_ORDER.index(e.code), e.name))
    doc: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    begins, end = {}, 0
    for entry in ordered:
        doc[entry.name] = {"dtype": entry.code, "shape": list(entry.shape), "data_offsets": [end, end + entry.nbytes]}
        begins[entry.name] = end
        end += entry.nbytes
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    head = len(text).to_bytes(8, "little") + text
    return head, {name: len(head) + begin for name, begin in begins.items()}, len(head) + end


class ShardFile:
    """One safetensors file whose header is written when it is opened; each tensor then
    goes to its own offset. Written front to back (``file_order``), its sha256 is
    taken from the tensors as they go by, and the file is never read back for it."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str]):
        head, self.offsets, self.size = header(entries, metadata)
        self.path = path
        self.left = {entry.name: entry for entry in entries}
        self.digest: hashlib._Hash | None = hashlib.sha256(head)  # None once a tensor came out of order
        self.cursor = len(head)  # where the digest has got to
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.ftruncate(self.fd, self.size)
            _write_at(self.fd, memoryview(head), 0)
        except BaseException:
            self.close()
            raise

    def write(self, name: str, tensor: torch.Tensor, hashing: ThreadPoolExecutor) -> bool:
        """Write one declared tensor at its offset, hashing it meanwhile on ``hashing``
        when it comes in file order; True once every tensor is written (the file is
        then closed)."""
        entry = self.left.pop(name)
        data = memoryview((ctypes.c_char * entry.nbytes).from_address(tensor.data_ptr())).cast("B") if entry.nbytes \
            else memoryview(b"")  # the tensor's own bytes, no copy
        offset = self.offsets[name]
        absorbed = None
        if self.digest is not None and offset == self.cursor:
            absorbed = hashing.submit(self.digest.update, data)  # hashlib lets go of the GIL: both cores work
            self.cursor += entry.nbytes
        else:
            self.digest = None
        try:
            _write_at(self.fd, data, offset)
        finally:  # the digest reads the tensor's memory: it must outlive the reading, even on an error
            if absorbed is not None:
                absorbed.result()
        if self.left:
            return False
        self.close()
        return True

    def sha256(self) -> str | None:
        """The finished file's digest, or None when it must be read back for one."""
        return self.digest.hexdigest() if self.digest is not None and not self.left else None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    # pwrite may write less than asked (a signal, a large request): go on from there.
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class PlannedShards:
    """The shards of a checkpoint whose tensors were declared up front, written as the
    tensors come. ``put`` hands a tensor to the writing thread and returns; at most
    ``WRITE_AHEAD`` bytes (or one tensor, if larger) wait to be written, so memory holds the
    tensor being made and those; a written tensor is let go at once. ``done(file name,
    sha256 or None)`` is called (on the writing thread) as each file is complete."""

    def __init__(self, folder: Path, dest: Path, entries: list[Entry], max_bytes: int, metadata: dict[str, str], done):
        self.folder, self.dest, self.metadata, self.done = folder, dest, metadata, done
        self.shards: list[tuple[str, list[Entry]]] = [
            (f"shard-{i:05d}.safetensors", group) for i, group in enumerate(pack(entries, max_bytes))]
        self.where = {entry.name: (i, entry) for i, (_, group) in enumerate(self.shards) for entry in group}
        self.files: dict[int, ShardFile] = {}
        self.added: set[str] = set()
        self.pending: list[tuple[Path, int, Future]] = []  # (file, bytes, its write)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelgrow-write")
        self.hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelgrow-sha256")

    def file_order(self) -> list[str]:
        """The declared names shard by shard, each shard front to back: added in this
        order, every file is written sequentially and hashed on the way."""
        return [name for _, group in self.shards for name in header(group, {})[1]]

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Hand one declared tensor (contiguous, on the CPU) to the writing thread."""
        if name not in self.where:
            raise ValueError(f"tensor {name!r} was not declared")
        index, entry = self.where[name]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise ValueError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, declared as {entry.shape} "
                             f"{entry.dtype}")
        self.added.add(name)
        self._settle(WRITE_AHEAD - entry.nbytes)
        path = self.folder / self.shards[index][0]
        # In a list the writing thread empties: the pool's record of the call would hold it.
        self.pending.append((path, entry.nbytes, self.pool.submit(self._write, index, name, [tensor])))

    def wait(self) -> None:
        """Every write finished (its error raised here); every declared tensor added."""
        self._settle(0)
        missing = [name for name in self.where if name not in self.added]
        if missing:
            raise RuntimeError(f"{len(missing)} declared tensors were never added, e.g. {missing[0]!r}")
        self._shutdown(cancel=False)

    def abort(self) -> None:
        self._shutdown(cancel=True)
        for file in self.files.values():
            file.close()
        self.pending = []

    def _shutdown(self, cancel: bool) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)
        self.hashing.shutdown(wait=True, cancel_futures=cancel)

    def _settle(self, room: int) -> None:
        """Wait for the oldest writes until those still waiting hold at most ``room`` bytes."""
        while self.pending and (room <= 0 or sum(n for _, n, _ in self.pending) > room):
            path, _, future = self.pending.pop(0)
            with output_errors(path, self.dest):
                future.result()

    def _write(self, index: int, name: str, box: list[torch.Tensor]) -> None:
        tensor = box.pop()
        file = self.files.get(index)
        if file is None:
            tmp_name, group = self.shards[index]
            file = self.files[index] = ShardFile(self.folder / tmp_name, group, self.metadata)
        written = file.write(name, tensor, self.hashing)
        del tensor
        if written:
            del self.files[index]
            self.done(file.path.name, file.sha256())


def sort_header_metadata(path: Path) -> None:
    """Rewrite __metadata__ in sorted key order, in place.

    safetensors serialises the metadata map in hash-map order, which differs from run to
    run once there are two or more keys; sorting makes identical inputs byte-identical.
    The compact re-serialisation has the same length; any shortfall is padded with
    spaces, which the format allows at the end of the header.
    """
    with open(path, "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        doc = json.loads(f.read(header_len))
        metadata = doc.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        doc["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > header_len:
            raise RuntimeError(f"re-serialised header of {path.name} grew; cannot sort metadata")
        f.seek(8)
        f.write(text.ljust(header_len, b" "))
