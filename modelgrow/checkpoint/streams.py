"""Output paths that name a stream, not a file to replace: ``-``, /dev/stdout, FIFOs, devices.

A file output is written atomically: a temporary file beside it, renamed over it
(checkpoint/atomic.py). For a path that names a stream that is wrong: renaming over
``/dev/stdout`` replaces the link in /dev (which root in a container may do, breaking
the container's standard output), and a FIFO's reader or a terminal would see nothing.
A report to such a path is written straight into what the path names, with no
temporary file and no rename:

- ``-``, and any path naming this process's descriptor 1 (``/dev/stdout``, ``/dev/fd/1``,
  ``/proc/self/fd/1``, or a link to one), go to standard output through ``sys.stdout``;
  descriptor 2 (``/dev/stderr``) likewise to ``sys.stderr``;
- another descriptor of this process (``/dev/fd/3`` with ``3>report.json``) is written
  where it stands, as the shell opened it;
- a FIFO or a character device (``/dev/null``, a terminal) is opened for writing
  (never created, never truncated) and written.

A socket, a block device or a descriptor that is not open is refused (UsageError,
exit 2), before any work: nothing sensible can be written there.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

from modelgrow import signals
from modelgrow.errors import OutputError, UsageError

STDOUT = "-"

# /proc/<pid>/fd/N (and /proc/<pid>/task/<tid>/fd/N): where /dev/stdout, /dev/fd/N and
# /proc/self/fd/N lead once /dev/fd and /proc/self are resolved.
_DESCRIPTOR = re.compile(r"/proc/(\d+)(?:/task/\d+)?/fd/(\d+)")


def descriptor(path: str | Path) -> int | None:
    """N where ``path`` names this process's file descriptor N, else None.

    Follows links one at a time: the last one (/proc/self/fd/N) is a "magic" link that
    resolves to whatever the descriptor is open on (a pipe, a file), which is exactly
    what must not be resolved.
    """
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        current = os.path.join(os.path.realpath(os.path.dirname(current)), os.path.basename(current))
        match = _DESCRIPTOR.fullmatch(current)
        if match and int(match.group(1)) == os.getpid():
            return int(match.group(2))
        try:
            target = os.readlink(current)
        except OSError:
            return None  # not a link: an ordinary path
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
    return None


def stream_kind(path: str | Path) -> str | None:
    """"stdout", "stderr", "descriptor" or "device" where ``path`` names a stream; None for a file path.

    A path that does not exist, a regular file or a folder is a file path (None).
    """
    if str(path) == STDOUT:
        return "stdout"
    fd = descriptor(path)
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError:
            raise UsageError(f"{path} names file descriptor {fd}, which is not open") from None
        return {1: "stdout", 2: "stderr"}.get(fd, "descriptor")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # absent (or unreachable): an ordinary file, checked as one
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "device"
    if stat.S_ISSOCK(mode) or stat.S_ISBLK(mode):
        kind = "a socket" if stat.S_ISSOCK(mode) else "a block device"
        raise UsageError(f"{path} is {kind}; give a file, a FIFO, a character device or - (standard output)")
    return None


def write_stream(path: str | Path, text: str, kind: str, *, what: str) -> None:
    """Write ``text`` into the stream ``path`` names (``kind`` from stream_kind), no temporary file."""
    signals.check()
    try:
        if kind in ("stdout", "stderr"):
            stream = sys.stdout if kind == "stdout" else sys.stderr
            stream.write(text)
            stream.flush()
            return
        data = text.encode("utf-8")
        if kind == "descriptor":
            _write_all(descriptor(path), data)
            return
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)  # a FIFO waits here for its reader
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot write {what}: {err.strerror or err}", path=path) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
