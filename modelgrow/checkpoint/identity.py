"""What a source checkpoint is, by content: the provenance an output records instead of a path.

The path a user typed (``small/``, ``./small``, ``/home/me/small``, a symlink to it)
says nothing about what was read and publishes a local path with every copy of the
grown checkpoint; two spellings would also give shards with different bytes. So the
safetensors metadata and the ``.modelgrow`` marker of every checkpoint modelgrow writes
name the source by ``source_digest``, and resuming a training run compares
``source_identity`` (the per-file list it is made of). Only the report, which the user
asked for and keeps, records the path as given.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from modelgrow.errors import InputError

# A source is identified by its files' names, sizes, headers and content. Headers and
# sizes alone cannot tell two checkpoints of one architecture and size apart (names,
# shapes, dtypes and offsets are the same: another seed, another training run), so the
# content counts too: whole files up to IDENTITY_WHOLE_BYTES, above that the header and
# IDENTITY_SAMPLES evenly spaced windows of the data (4 MiB read per file, milliseconds,
# where a full sha256 of a 15 GB model takes tens of seconds on every resume). Two
# different models differ in nearly every weight, so in every window; an edit of a few
# weights inside a big file can go unseen -- the check is against mix-ups, not tampering.
IDENTITY_WHOLE_BYTES = 64 * 1024 * 1024
IDENTITY_SAMPLES = 64
IDENTITY_WINDOW = 64 * 1024


def source_identity(files) -> list[dict]:
    """[{name, bytes, sha256}] for each file of a checkpoint; see IDENTITY_WHOLE_BYTES."""
    out = []
    for path in files:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                digest = hashlib.sha256()
                if size <= IDENTITY_WHOLE_BYTES:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                    sampled = False
                else:
                    header = 8 + int.from_bytes(f.read(8), "little")
                    f.seek(0)
                    digest.update(f.read(min(header, size)))
                    span = max(size - header - IDENTITY_WINDOW, 0)
                    for i in range(IDENTITY_SAMPLES):
                        f.seek(header + span * i // (IDENTITY_SAMPLES - 1))
                        digest.update(f.read(IDENTITY_WINDOW))
                    sampled = True
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None
        out.append({"name": path.name, "bytes": size, "sha256": digest.hexdigest(), "sampled": sampled})
    return out


def source_digest(identity: list[dict]) -> str:
    """One sha256 (hex) for a checkpoint: over its weight files' sizes and digests, in order.

    File names and paths do not count: the same weights read under any spelling, from
    a single file or from the folder holding it, give the same digest.
    """
    canonical = [[f["bytes"], f["sha256"], bool(f.get("sampled"))] for f in identity]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode("ascii")).hexdigest()
