"""Files that travel with a checkpoint (tokenizer, chat template, generation config, ...).

They are copied as regular files only: never through a link that leaves the source
folder (a ``chat_template.jinja -> /etc/shadow`` stays behind), never a device, FIFO or
socket, never past a size cap (a link to a huge sparse file stays behind too), and the
copy gets ordinary permissions. The one link accepted outside the folder is the Hugging
Face cache's own: ``<repo>/snapshots/<rev>/NAME -> ../../blobs/<hash>``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError

MAX_BYTES = 256 * 2**20  # the largest tokenizer files are tens of MB
CHUNK = 1 << 20


def vet(root: Path, name: str) -> tuple[Path | None, str | None]:
    """(the file to copy, None) or (None, why it stays behind); (None, None) if absent."""
    path = root / name
    if not os.path.lexists(path):
        return None, None
    real = path.resolve()
    allowed = [root.resolve()]
    if root.parent.name == "snapshots":
        allowed.append((root.parent.parent / "blobs").resolve())
    if not any(real == a or a in real.parents for a in allowed):
        return None, f"a link to {real}, outside the source folder"
    try:
        st = os.stat(real)
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if st.st_size > MAX_BYTES:
        return None, f"{st.st_size:,} bytes, over the {MAX_BYTES:,}-byte cap for such files"
    return real, None


def copy_regular(src: Path, dest: Path) -> None:
    """Copy the regular file ``src`` (not through a link, at most MAX_BYTES) to a new ``dest``."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"cannot copy: {exc.strerror or exc}", path=src) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            raise InputError("cannot copy: not a regular file of at most the size cap", path=src)
        with open(dest, "xb") as out:
            copied = 0
            while chunk := f.read(CHUNK):
                copied += len(chunk)
                if copied > MAX_BYTES:  # it grew while we copied
                    raise InputError("cannot copy: the file grows past the size cap", path=src)
                out.write(chunk)
