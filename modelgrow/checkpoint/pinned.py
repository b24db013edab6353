"""A source checkpoint pinned while it is read: file identities, and tensor reads that cannot SIGBUS.

When a checkpoint is opened, each file it is read from (shards, index, config,
tokenizer files) has its identity recorded: device, inode, size, mtime and ctime
(nanoseconds). ``Checkpoint.verify_unchanged()`` compares them again; callers run it
after the last read and before committing, so a source rewritten in place, replaced by
another checkpoint or truncated during the run fails it with "the source changed while
it was read" (CheckpointError, exit 3) instead of producing a mixed output.

Tensor bytes are read with ``preadv`` into a fresh tensor, never through a memory map:
a file truncated under a memory map kills the reader with SIGBUS, while a short read is
an ordinary error reported in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from modelgrow.checkpoint.safetensors_format import TensorInfo
from modelgrow.errors import CheckpointError

CHANGED = "the source changed while it was read"

# One preadv moves at most this much on Linux (0x7ffff000); larger tensors loop.
_MAX_READ = 1 << 30


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is still the one that was opened."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def identity(path: Path) -> FileIdentity | None:
    """The identity of the file at ``path`` (symlinks followed), None if it cannot be stat'ed."""
    try:
        return FileIdentity.of(os.stat(path))
    except OSError:
        return None


def source_changed(path: Path, how: str) -> CheckpointError:
    return CheckpointError(
        f"{CHANGED} ({how})",
        path=path,
        hint="run again once nothing writes to the source",
    )


def check_unchanged(pins: dict[Path, FileIdentity | None], open_files: dict[Path, ShardFile]) -> None:
    """Raise the "source changed" CheckpointError naming the first file that differs from its pin."""
    for path, pinned in pins.items():
        now = identity(path)
        if now == pinned:
            continue
        if now is None:
            how = "removed"
        elif pinned is None:
            how = "created"
        elif (now.dev, now.ino) != (pinned.dev, pinned.ino):
            how = "replaced by another file"
        elif now.size != pinned.size:
            how = f"size {pinned.size} -> {now.size} bytes"
        else:
            how = "rewritten"
        raise source_changed(path, how)
    for path, shard in open_files.items():
        # The descriptor reads what was opened even after a rename over the path.
        if FileIdentity.of(os.fstat(shard.fd)) != pins.get(path):
            raise source_changed(path, "the file read is not the one opened")


class ShardFile:
    """One safetensors file open for ordinary reads; ``read`` returns one tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, data_start: int, info: TensorInfo, rows: slice | None = None) -> torch.Tensor:
        """Read ``info``'s bytes into a new tensor of its dtype and shape; ``rows`` (a
        slice of the first dimension, step 1) reads only those rows: they are contiguous."""
        shape, begin, nbytes = tuple(info.shape), info.begin, info.nbytes
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("rows must be a slice with step 1")
            row_bytes = nbytes // shape[0] if shape[0] else 0
            stop = max(start, stop)
            shape, begin, nbytes = (stop - start, *shape[1:]), begin + start * row_bytes, (stop - start) * row_bytes
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done, offset = 0, data_start + begin
        while done < nbytes:
            count = os.preadv(self.fd, [view[done : done + _MAX_READ]], offset + done)
            if count == 0:
                raise source_changed(
                    self.path,
                    f"the file ends inside tensor {info.name!r}: it was truncated or replaced",
                )
            done += count
        return buffer.view(info.dtype).reshape(shape)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
