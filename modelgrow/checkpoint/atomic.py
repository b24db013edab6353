"""Atomic output: every file or folder modelgrow writes appears whole or not at all.

Two patterns, one set of conventions:

* a single file (a report, a plot) is written to a hidden temporary file beside the
  destination, fsynced and renamed over it: ``write_file_atomically``;
* a group of files (a checkpoint folder, an ONNX graph and its data) is staged in a
  hidden folder beside the destination (``make_staging_folder``) and moved into place
  once complete; files that must change together in place (a graph and the data file it
  names) are published by ``publish_file_set``.

A writer holds an exclusive ``flock`` on its temporary file, or on the lock file
``.modelgrow`` inside its staging folder, for its whole life; the kernel drops it when
the writer dies, however it dies. A later writer to the same destination deletes a
leftover (``remove_stale_temps``) only if it can take that lock without waiting, which
holds across PID namespaces (containers sharing a volume), where the pid in the name
means nothing. The staging folder's lock file becomes the committed folder's marker
(checkpoint/marker.py). OS-level failures become an ``OutputError`` of one line that
names the file; a full disk (or quota, or file-size limit) says so.
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from modelgrow.checkpoint.streams import stream_kind
from modelgrow import signals
from modelgrow.errors import OutputError

TMP_MARKER = ".modelgrow-tmp-"
OLD_MARKER = ".modelgrow-old-"
#: Lock file of a staging folder; commit turns it into the output folder's marker.
MARKER_NAME = ".modelgrow"

# Staging folders and temporary files this process holds locked -> the descriptor.
_held: dict[Path, int] = {}

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
    file at the temporary path it is given, e.g. ``lambda tmp: fig.savefig(tmp, format="png")``;
    that file exists already (empty, and locked by this process): open it for writing,
    do not replace it.
    The temporary file sits beside ``path``, is fsynced and then renamed over it; on any
    failure it is removed and ``path`` is untouched. OS errors become an OutputError
    naming ``path`` and ``what`` (default: the file name), such as "the report".
    """
    signals.check()  # nothing is published after a signal, even one a library swallowed
    path = Path(path)
    what = what or path.name
    if stream_kind(path) is not None:  # renaming over /dev/stdout or a FIFO replaces the link, not the stream
        raise OutputError(f"cannot write {what}: it names a stream or device, not a file (checkpoint/streams.py)", path=path)
    tmp = unique_sibling(path, TMP_MARKER)
    try:
        with output_errors(tmp, path, what):
            remove_stale_temps(path)
            tmp = _create_locked(lambda: unique_sibling(path, TMP_MARKER), lambda t: t)
            if callable(content):
                content(tmp)  # rewrites the same inode, so the lock stays on it
            else:
                data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
                with open(tmp, "r+b") as f:
                    f.write(data)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        remove_path(tmp)


def publish_file_set(files: Sequence[tuple[str | Path, str | Path]], *, obsolete: Iterable[str | Path] = ()) -> None:
    """Move staged files into place so that a kill at any moment leaves the old set or the new one.

    ``files`` are (staged path, destination) pairs. The last pair is the file that names
    the others (an ONNX graph naming its external data file); every other destination
    must be a name the old set is not read under: a fresh name, or a file already
    holding the same bytes (kept as it is). Those go in first, then the last file is
    renamed over its destination, which switches readers from the old set to the new
    one in one step, and then ``obsolete`` (files of the old set that the new one no
    longer names) are removed. A kill before the switch leaves the old set whole (plus
    unnamed new files); after it, the new set whole (plus old files nothing names).
    Everything is fsynced before the switch. OS errors propagate: wrap in output_errors.
    """
    pairs = [(Path(staged), Path(dest)) for staged, dest in files]
    if not pairs:
        raise ValueError("publish_file_set needs at least one file")
    folder = pairs[-1][1].parent
    names = [dest for _, dest in pairs]
    if len(set(names)) != len(names) or any(dest.parent != folder for dest in names):
        raise ValueError("publish_file_set needs distinct destinations in one folder")
    obsolete = [Path(path) for path in obsolete]
    if set(obsolete) & set(names):
        raise ValueError("a file of the new set cannot also be obsolete")
    for staged, dest in pairs[:-1]:
        if os.path.lexists(dest) and not (dest.is_file() and filecmp.cmp(staged, dest, shallow=False)):
            raise ValueError(f"{dest} exists with other content; the old set may read it")
    for staged, dest in pairs:
        fsync_path(staged)
    for staged, dest in pairs[:-1]:
        if os.path.lexists(dest):
            os.unlink(staged)  # the same bytes are already in place
        else:
            os.rename(staged, dest)
    fsync_path(folder)  # the new files are durable before anything names them
    os.replace(*pairs[-1])
    fsync_path(folder)
    for path in obsolete:
        path.unlink(missing_ok=True)
    if obsolete:
        fsync_path(folder)


# -- staging folders ---------------------------------------------------------------------


def unique_sibling(dest: str | Path, marker: str) -> Path:
    """A hidden name beside ``dest`` for a temporary or set-aside copy of it.

    Recognisable (and tied to our pid) so a later run can clean it up after a crash.
    """
    dest = Path(dest)
    return dest.parent / f".{dest.name}{marker}{os.getpid()}-{secrets.token_hex(4)}"


def make_staging_folder(dest: str | Path) -> Path:
    """Create an empty hidden folder beside ``dest``, locked until ``remove_path``/``release``.

    Empty but for its lock file ``MARKER_NAME``, which the folder keeps when a checkpoint
    writer moves it into place.
    """
    dest = Path(dest)

    def new_folder() -> Path:
        staging = unique_sibling(dest, TMP_MARKER)
        os.mkdir(staging)
        return staging

    with output_errors(dest.parent, dest):
        return _create_locked(new_folder, lambda staging: staging / MARKER_NAME)


def release(path: Path) -> None:
    """Drop this process's lock on a staging folder or temporary file (after its rename)."""
    fd = _held.pop(Path(path), None)
    if fd is not None:
        os.close(fd)


def aside_name(staging: Path, dest: Path) -> Path:
    """Where an overwrite sets ``dest`` aside: paired with its staging folder by name."""
    suffix = staging.name[len(f".{dest.name}{TMP_MARKER}") :]
    return dest.parent / f".{dest.name}{OLD_MARKER}{suffix}"


def remove_stale_temps(dest: str | Path) -> None:
    """Clean up after earlier writers to ``dest`` that died mid-write.

    A temporary file or staging folder is deleted only once its lock could be taken: its
    writer is gone. A previous checkpoint that an overwrite had renamed aside is put back
    only if that writer died between its two renames (its staging folder is still there
    and the destination is missing); otherwise the new checkpoint did reach the
    destination, and the old one is deleted as the writer would have, unless that writer
    is still alive finishing its commit. OS errors propagate: callers wrap this in
    ``output_errors``.
    """
    dest = Path(dest)
    temps, asides = _leftovers(dest)
    stale: dict[str, int] = {}  # suffix -> descriptor holding the dead writer's lock
    try:
        for suffix, path in temps.items():
            fd = _take_lock(path, int(suffix.split("-")[0]))
            if fd is not None:
                stale[suffix] = fd
        for suffix, path in asides.items():
            if suffix in temps and suffix not in stale:
                continue  # its writer is alive, between its two renames
            if suffix in stale and temps[suffix].is_dir() and not os.path.lexists(dest):
                os.rename(path, dest)  # died between the renames: the old checkpoint goes back
            elif suffix in temps or not _locked(dest / MARKER_NAME):
                remove_path(path)  # else the live writer that just committed removes it
        for suffix in stale:
            remove_path(temps[suffix])
    finally:
        for fd in stale.values():
            os.close(fd)


def _leftovers(dest: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Temporary files and staging folders of ``dest``, and set-aside copies, by pid-token suffix."""
    found: tuple[dict[str, Path], dict[str, Path]] = ({}, {})
    for entry in sorted(os.scandir(dest.parent), key=lambda e: e.name):
        for kind, marker in enumerate((TMP_MARKER, OLD_MARKER)):
            prefix = f".{dest.name}{marker}"
            if not entry.name.startswith(prefix) or entry.is_symlink():
                continue
            if not (entry.is_dir() or (marker == TMP_MARKER and entry.is_file())):
                continue  # only single-file writes leave temporary files; nothing leaves old ones
            suffix = entry.name[len(prefix) :]
            if re.fullmatch(r"\d+-[0-9a-f]+", suffix):
                found[kind][suffix] = Path(entry.path)
    return found


def _create_locked(make: Callable[[], Path], lock_file: Callable[[Path], Path]) -> Path:
    """Create a temporary path with ``make`` and hold the lock on ``lock_file(path)``.

    A clean-up that got there first (the lock file existed, or vanished, or was locked,
    or was replaced before ours was taken) costs a new name: the lock this returns
    holding is always on the file that is in place.
    """
    for _ in range(8):
        path = make()
        lock = lock_file(path)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except (FileExistsError, FileNotFoundError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.stat(lock, follow_symlinks=False), os.fstat(fd)):
                _held[path] = fd
                return path
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, "temporary names kept being taken by a concurrent clean-up")


def _take_lock(path: Path, pid: int) -> int | None:
    """The lock of a leftover staging folder or temporary file if its writer is gone, else None."""
    is_dir = path.is_dir()
    lock = path / MARKER_NAME if is_dir else path
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        locked_before = True
    except FileNotFoundError:
        # A folder without its lock file: left by an older modelgrow, or just created by a
        # writer that is about to lock it. Ours if its pid is gone and we create it first.
        if not is_dir or _pid_alive(pid):
            return None
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except (FileExistsError, FileNotFoundError):
            return None
        locked_before = False
    except OSError:
        return None  # not ours to judge (a symlink, a permission problem): left alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    # A temporary file need not be locked (an ONNX export's hard link is not): its pid decides too.
    if locked_before and not is_dir and _pid_alive(pid):
        os.close(fd)
        return None
    return fd


def _locked(lock: Path) -> bool:
    """Whether a live process holds the lock on ``lock`` (False if there is none)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Best-effort removal of a temporary file or folder (a leftover is not a failure).

    A staging folder or temporary file this process holds locked is unlocked after.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
    release(path)


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
