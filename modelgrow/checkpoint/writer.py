"""Write a Hugging Face style safetensors checkpoint atomically.

Everything is written into a hidden temporary folder beside the destination (see
checkpoint/atomic.py) and renamed into place only by commit(), so a crash, a full disk or
an exception leaves either the old destination or nothing, never half a checkpoint.
Shards are packed greedily by bytes in the order tensors are added; at most one shard's
tensors are held in memory, or, once declare() has laid the shards out, a few tensors
(checkpoint/planned.py). The committed folder carries the ``.modelgrow`` marker listing
its files (checkpoint/marker.py); ``overwrite=True`` replaces only what modelgrow wrote.
"""

from __future__ import annotations

import errno
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelgrow.checkpoint.atomic import (
    aside_name,
    fsync_path,
    hash_and_fsync,
    make_staging_folder,
    output_errors,
    release,
    remove_path,
)
from modelgrow.checkpoint.marker import check_replaceable, check_target, write_marker
from modelgrow.checkpoint.planned import Entry, PlannedShards, sort_header_metadata
from modelgrow.checkpoint.tagalong import copy_regular, vet
from modelgrow.errors import InputError, OutputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputFile:
    """One file of a committed checkpoint; path is relative to the destination folder."""

    path: str
    bytes: int
    sha256: str


class CheckpointWriter:
    """Collect tensors and side files, then commit() them as one checkpoint folder.

    with CheckpointWriter(out, max_shard_bytes=parse_size("2GB")) as writer:
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.write_json("config.json", config)
        files = writer.commit()
    """

    def __init__(
        self,
        dest: str | Path,
        *,
        max_shard_bytes: int = 2_000_000_000,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ):
        if type(max_shard_bytes) is not int or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        metadata = metadata or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        self.dest = Path(dest)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        # transformers refuses to load safetensors files without format=pt.
        self._metadata = {"format": "pt", **metadata}
        self._tmp: Path | None = None
        self._state_finished = False  # finish() done: shards and index final
        self._hasher: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Path, Future]] = []  # (shard path, its fsync+sha256)
        self._state = "new"  # -> "open" -> "committed" | "aborted"
        self._names: set[str] = set()
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._shard_storages: set[tuple] = set()
        self._shards: list[tuple[str, list[str]]] = []  # temp file name, tensor names
        self._written: dict[str, tuple[int, str]] = {}  # file name -> (bytes, sha256)
        self._total_size = 0
        self._planned: PlannedShards | None = None  # declare(): each tensor written as it comes

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> CheckpointWriter:
        if self._state != "new":
            raise RuntimeError("a CheckpointWriter can be entered only once")
        dest = self.dest
        # Stale temporaries first: a checkpoint that a killed overwrite had set aside is
        # put back first, and then counts as existing.
        check_target(dest, self.overwrite, clean=True)
        self._tmp = make_staging_folder(dest)
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state == "open":
            self._abort()
            if exc_type is None:
                raise RuntimeError("CheckpointWriter left without commit(); nothing was written")
        return False  # never swallow the caller's exception

    # -- adding content ----------------------------------------------------------------

    def declare(self, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> list[str]:
        """Say up front which tensors add() will bring (name, shape, dtype): the shards are
        laid out now (as undeclared adds in this order would fill them), and add() writes
        each tensor into its place on a helper thread instead of holding a shard. Returns
        the order to add them in: each file is then written front to back and hashed on
        the way, never read back."""
        self._require_open()
        if self._names or self._planned is not None or self._state_finished:
            raise RuntimeError("declare() comes once, before any tensor is added")
        entries = [Entry(name, tuple(shape), dtype) for name, shape, dtype in tensors]
        if not entries:
            return []  # an empty checkpoint: finish() writes its one file
        self._planned = PlannedShards(self._tmp, self.dest, entries, self.max_shard_bytes, self._metadata,
                                      done=self._submit_hash)
        self._shards = [(tmp_name, [e.name for e in group]) for tmp_name, group in self._planned.shards]
        return self._planned.file_order()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; a full shard is written out before this one starts a new one."""
        self._require_open()
        if self._state_finished:
            raise RuntimeError("add() after finish(): the shards are final")
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        tensor = tensor.detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._planned is not None:
            self._planned.put(name, tensor.cpu())  # written from its own memory, on the writing thread
            self._names.add(name)
            self._total_size += nbytes
            return
        self.make_room(nbytes)
        # save_file refuses two tensors sharing memory in one file (tied weights added
        # under two names, repeated layers); copying costs memory only in that case.
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage[1] != 0:
            if storage in self._shard_storages:
                tensor = tensor.clone()
                storage = (tensor.device, tensor.untyped_storage().data_ptr())
            self._shard_storages.add(storage)
        self._names.add(name)
        self._shard[name] = tensor
        self._shard_bytes += nbytes
        self._total_size += nbytes

    def make_room(self, nbytes: int) -> None:
        """Write out the shard being filled if a tensor of ``nbytes`` will not fit in it:
        called before a large tensor is made, the shard is not held beside it.
        Greedy by bytes; a tensor larger than the limit still gets a shard of its own."""
        self._require_open()
        if self._planned is None and self._shard and self._shard_bytes + nbytes > self.max_shard_bytes:
            self._flush()

    def write_json(self, filename: str, obj: object) -> None:
        """Write a JSON side file (config.json, ...) deterministically."""
        self._require_open()
        self._check_side_file_name(filename)
        self._write_json(filename, obj)

    def write_text(self, filename: str, text: str) -> None:
        """Write a UTF-8 text side file (the model card, ...) as given; allowed until commit()."""
        self._require_open()
        self._check_side_file_name(filename)
        path = self._side_path(filename)
        with output_errors(path, self.dest):
            path.write_bytes(text.encode("utf-8"))
            self._record(filename)

    def _write_json(self, filename: str, obj: object) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
        path = self._side_path(filename)
        with output_errors(path, self.dest):
            path.write_bytes((text + "\n").encode("utf-8"))
            self._record(filename)

    def copy_file(self, src: str | Path, name: str | None = None, *, root: str | Path | None = None) -> None:
        """Copy a tag-along file (tokenizer, generation config, ...) into the checkpoint as
        ``name`` (a relative path: its folders are made). ``root``: the source folder
        ``src`` must lie in (default: its own folder)."""
        self._require_open()
        src = Path(src)
        name = name or src.name
        self._check_side_file_name(name)
        path = self._side_path(name)
        base = src.parent if root is None else Path(root)
        with output_errors(path, self.dest):
            # Content only, from a regular file reached without a final link, under a cap:
            # no timestamps or modes carried over (modelgrow.checkpoint.tagalong).
            real, why = vet(base, src.relative_to(base).as_posix())  # again: the folder may have changed since
            if real is None:
                raise InputError(f"cannot copy: {why or 'it is gone'}", path=src)
            copy_regular(real, path)
            self._record(name)

    def make_folder(self, name: str) -> None:
        """Make the folder ``name`` (a relative path), empty unless files go in; the marker lists an empty one."""
        self._require_open()
        self._check_side_file_name(name)
        with output_errors(self._tmp / name, self.dest):
            self._side_path(name).mkdir(exist_ok=True)

    # -- committing --------------------------------------------------------------------

    def finish(self) -> Path:
        """Finish the last shard and the index; return the staged (temporary) folder.

        Nothing is at the destination yet: callers can inspect or verify the staged
        checkpoint and still abandon it. commit() then moves it into place.
        """
        self._require_open()
        if self._state_finished:
            return self._tmp
        try:
            if self._planned is not None:
                self._planned.wait()
            elif self._shard or not self._shards:  # an empty checkpoint is still one file
                self._flush()
            self._wait_for_hashes()
            self._name_shards()
        except BaseException:
            self._abort()
            raise
        self._state_finished = True
        return self._tmp

    def commit(self) -> list[OutputFile]:
        """Finish (if not done yet) and move the folder into place."""
        self.finish()
        try:
            write_marker(self._tmp, self._metadata, self.dest)
            with output_errors(self._tmp, self.dest):
                fsync_path(self._tmp)
                self._move_into_place()
        except BaseException:
            self._abort()
            raise
        release(self._tmp)  # the lock moved in with the folder; it is no longer staging
        self._state = "committed"
        written = sorted(self._written.items())
        return [OutputFile(name, size, digest) for name, (size, digest) in written]

    def _name_shards(self) -> None:
        count = len(self._shards)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self._shards, start=1):
            final = SINGLE_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            with output_errors(self._tmp / final, self.dest):
                os.rename(self._tmp / tmp_name, self._tmp / final)
            self._written[final] = self._written.pop(tmp_name)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
            self._write_json(INDEX_FILE, index)

    def _move_into_place(self) -> None:
        dest = self.dest
        if not os.path.lexists(dest):
            try:
                os.rename(self._tmp, dest)
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise _created_meanwhile(dest) from err
                raise
        elif not self.overwrite:
            raise _created_meanwhile(dest)
        else:
            # Checked again: files may have been added since __enter__.
            check_replaceable(dest)
            # Two renames, not one: rename() cannot replace a non-empty folder. The old
            # checkpoint is deleted only once the new one is in place.
            aside = aside_name(self._tmp, dest)
            os.rename(dest, aside)
            try:
                os.rename(self._tmp, dest)
            except OSError as err:
                try:
                    os.rename(aside, dest)
                except OSError:
                    raise OutputError(
                        "could not move the new checkpoint into place; "
                        f"the previous one is kept at {aside}",
                        path=dest,
                    ) from err
                raise
            remove_path(aside)
        fsync_path(dest.parent)

    # -- internals ---------------------------------------------------------------------

    def _flush(self) -> None:
        tmp_name = f"shard-{len(self._shards):05d}.safetensors"
        path = self._tmp / tmp_name
        with output_errors(path, self.dest):
            save_file(self._shard, path, metadata=self._metadata)
            sort_header_metadata(path)
        self._submit_hash(tmp_name)
        self._shards.append((tmp_name, list(self._shard)))
        self._shard, self._shard_bytes, self._shard_storages = {}, 0, set()

    def _submit_hash(self, tmp_name: str, sha256: str | None = None) -> None:
        # fsync and sha256 re-read the file from the page cache: done on a helper thread
        # while the caller computes the next shard (hashlib and fsync release the GIL).
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelgrow-hash")
        self._pending.append((self._tmp / tmp_name, self._hasher.submit(self._record, tmp_name, sha256)))

    def _wait_for_hashes(self) -> None:
        pending, self._pending = self._pending, []
        try:
            for path, future in pending:
                with output_errors(path, self.dest):
                    future.result()
        finally:
            if self._hasher is not None:
                self._hasher.shutdown(wait=True, cancel_futures=True)
                self._hasher = None

    def _side_path(self, name: str) -> Path:
        """Where the side file ``name`` goes in the staged folder, its folders made."""
        path = self._tmp / name
        if "/" in name:
            with output_errors(path.parent, self.dest):
                path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _record(self, name: str, sha256: str | None = None) -> None:
        """fsync a finished file and remember its size and sha256 (read back unless known) for the caller."""
        path = self._tmp / name
        if sha256 is None:
            self._written[name] = hash_and_fsync(path)
        else:
            fsync_path(path)
            self._written[name] = (path.stat().st_size, sha256)

    def _check_side_file_name(self, name: str) -> None:
        if not isinstance(name, str) or "\\" in name or any(p in ("", ".", "..") for p in name.split("/")):
            raise ValueError(f"side file name must be a plain file name or a relative path of them, got {name!r}")
        if name.endswith(".safetensors") or name == INDEX_FILE:
            raise ValueError(f"{name!r} is reserved for the weights the writer produces")
        if name in self._written:
            raise ValueError(f"{name!r} was written twice")

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"CheckpointWriter is {self._state}; use it inside a with block")

    def _abort(self) -> None:
        self._state = "aborted"
        if self._planned is not None:
            self._planned.abort()
        if self._hasher is not None:
            self._hasher.shutdown(wait=True, cancel_futures=True)
            self._hasher, self._pending = None, []
        self._shard, self._shard_storages = {}, set()
        if self._tmp is not None:
            remove_path(self._tmp)


def _created_meanwhile(dest: Path) -> OutputError:
    return OutputError(
        "was created by another process while the checkpoint was being written; left untouched",
        path=dest,
        hint="pass --overwrite to replace it",
    )
