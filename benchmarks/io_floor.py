"""The safetensors I/O floor of a conversion: the least any converter must do.

Read every tensor of the source checkpoint (single file or shards), then write tensors of
the grown checkpoint's exact names, shapes, dtypes and shard layout with safetensors, one
shard in memory at a time, in one process. No growth arithmetic, no checks, no hashes;
``--fsync`` also flushes each file to disk as modelgrow does before it publishes.

    python benchmarks/io_floor.py SRC GROWN DEST [--fsync]

prints {"s": seconds after imports, "rss": peak resident bytes} as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def shards_of(folder: Path) -> dict[str, list[str] | None]:
    """Shard file -> tensor names (None: every tensor of a single file)."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return {"model.safetensors": None}
    shards: dict[str, list[str] | None] = {}
    for name, shard in json.loads(index.read_text())["weight_map"].items():
        shards.setdefault(shard, []).append(name)
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("grown", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--fsync", action="store_true")
    a = ap.parse_args()
    t = time.perf_counter()
    for shard in shards_of(a.src):
        with safe_open(a.src / shard, "pt") as f:
            for k in f.keys():
                f.get_tensor(k)  # every input byte read into memory
    a.dest.mkdir()
    for shard, names in shards_of(a.grown).items():
        with safe_open(a.grown / shard, "pt") as f:  # shapes only: the header, no data read
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in names or f.keys()}
        path = a.dest / shard
        save_file({k: torch.ones(s, dtype=DTYPES[d]) for k, (s, d) in shapes.items()}, path, metadata={"format": "pt"})
        if a.fsync:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    print(json.dumps({"s": time.perf_counter() - t, "rss": int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024}))


if __name__ == "__main__":
    main()
