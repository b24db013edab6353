"""Atomic output: every file or folder modelgrow writes appears whole or not at all.

Two patterns, one set of conventions:

* a single file (a report, a plot) is written to a hidden temporary file beside the
  destination, fsynced and renamed over it: ``write_file_atomically``;
* a group of files (a checkpoint folder, an ONNX graph and its data) is staged in a
  hidden folder beside the destination (``unique_sibling(dest, TMP_MARKER)``) and moved
  into place once complete.

Temporary names carry the writer's pid, so a later writer to the same destination can
tell a crashed writer's leftovers from a live one's (``remove_stale_temps``). OS-level
failures become an ``OutputError`` of one line that names the file; a full disk (or
quota, or file-size limit) says so.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from modelgrow.errors import OutputError

TMP_MARKER = ".modelgrow-tmp-"
OLD_MARKER = ".modelgrow-old-"

# Errors that mean "the disk (or a quota, or RLIMIT_FSIZE) has no room for this file".
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})

# The safetensors library reports I/O failures as its own exception type with the OS
# error only in the message, e.g. "I/O error: File too large (os error 27)".
_RUST_OS_ERROR = re.compile(r"os error (\d+)")


# -- errors ------------------------------------------------------------------------------


def output_error(code: int | None, detail: str, what: str, dest: str | Path) -> OutputError:
    """The one-line error for failing to write ``what`` (a file name) for ``dest``."""
    if code in NO_SPACE_ERRNOS:
        return OutputError(
            f"no space left writing {what}",
            path=dest,
            hint="the disk or quota is full or a file-size limit was hit; nothing was written",
        )
    return OutputError(f"cannot write {what}: {detail}", path=dest)


@contextmanager
def output_errors(path: Path, dest: str | Path, what: str | None = None) -> Iterator[None]:
    """Turn a failure to write ``path`` (for ``dest``) into an OutputError the CLI can print."""
    what = what or Path(path).name
    try:
        yield
    except OSError as err:
        raise output_error(err.errno, err.strerror or str(err), what, dest) from err
    except Exception as err:
        match = _RUST_OS_ERROR.search(str(err))
        if match is None or type(err).__name__ != "SafetensorError":
            raise
        raise output_error(int(match.group(1)), str(err), what, dest) from err


# -- durability --------------------------------------------------------------------------


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (an O_RDONLY descriptor is enough for both)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_and_fsync(path: str | Path) -> tuple[int, str]:
    """fsync a finished file and return its (size in bytes, sha256 hex digest)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, digest.hexdigest()


# -- single files ------------------------------------------------------------------------


def write_file_atomically(
    path: str | Path,
    content: bytes | str | Callable[[Path], object],
    *,
    what: str | None = None,
) -> None:
    """Write ``path`` so that readers see the old file or the new one, never half of one.

    ``content`` is the bytes, the text (written as UTF-8), or a callback that writes the
    file at the temporary path it is given, e.g. ``lambda tmp: fig.savefig(tmp, format="png")``.
    The temporary file sits beside ``path``, is fsynced and then renamed over it; on any
    failure it is removed and ``path`` is untouched. OS errors become an OutputError
    naming ``path`` and ``what`` (default: the file name), such as "the report".
    """
    path = Path(path)
    what = what or path.name
    tmp = unique_sibling(path, TMP_MARKER)
    try:
        with output_errors(tmp, path, what):
            remove_stale_temps(path)
            if callable(content):
                content(tmp)
            else:
                data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
                with open(tmp, "xb") as f:
                    f.write(data)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        remove_path(tmp)


# -- staging folders ---------------------------------------------------------------------


def unique_sibling(dest: str | Path, marker: str) -> Path:
    """A hidden name beside ``dest`` for a temporary or set-aside copy of it.

    Recognisable (and tied to our pid) so a later run can clean it up after a crash.
    """
    dest = Path(dest)
    return dest.parent / f".{dest.name}{marker}{os.getpid()}-{secrets.token_hex(4)}"


def make_staging_folder(dest: str | Path) -> Path:
    """Create an empty hidden folder beside ``dest`` to assemble its content in."""
    dest = Path(dest)
    staging = unique_sibling(dest, TMP_MARKER)
    with output_errors(dest.parent, dest):
        os.mkdir(staging)
    return staging


def remove_stale_temps(dest: str | Path) -> None:
    """Clean up after earlier writers to ``dest`` that died mid-write.

    Their temporary files and folders are deleted. A previous checkpoint that an
    overwrite had renamed aside is put back only if that writer died between its two
    renames (its temp folder is still there and the destination is missing); otherwise
    the new checkpoint did reach the destination, and the old one is deleted as the
    writer would have. OS errors propagate: callers wrap this in ``output_errors``.
    """
    dest = Path(dest)
    stale = _stale_temps(dest)
    unfinished = {pid for marker, pid, path in stale if marker == TMP_MARKER and path.is_dir()}
    for marker, pid, path in stale:
        if marker == OLD_MARKER and pid in unfinished and not os.path.lexists(dest):
            os.rename(path, dest)
        else:
            remove_path(path)


def _stale_temps(dest: Path) -> list[tuple[str, int, Path]]:
    """(marker, pid, path) of each temporary or set-aside copy of ``dest`` whose writer is gone."""
    stale = []
    for entry in sorted(os.scandir(dest.parent), key=lambda e: e.name):
        for marker in (TMP_MARKER, OLD_MARKER):
            prefix = f".{dest.name}{marker}"
            if not entry.name.startswith(prefix) or entry.is_symlink():
                continue
            if not (entry.is_dir() or (marker == TMP_MARKER and entry.is_file())):
                continue  # only single-file writes leave temporary files; nothing leaves old ones
            match = re.fullmatch(r"(\d+)-[0-9a-f]+", entry.name[len(prefix) :])
            if match and not _pid_alive(int(match.group(1))):
                stale.append((marker, int(match.group(1)), Path(entry.path)))
    return stale


def remove_path(path: Path) -> None:
    """Best-effort removal of a temporary file or folder (a leftover is not a failure)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True
