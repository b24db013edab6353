"""What `modelgrow inspect` reports about a checkpoint."""

from __future__ import annotations

from pathlib import Path

from .source import open_source


def describe(path: str | Path, config_path: str | Path | None = None, *, tensors: bool = False) -> dict:
    with open_source(path, config_path) as src:
        bound = src.bound()
        dtypes = sorted({str(src.checkpoint.info(b.name).dtype).replace("torch.", "") for b in bound})
        info = {
            "path": str(path),
            "architecture": src.layout.name,
            "class": src.arch.class_name(src.config),
            "dims": src.dims.as_dict(),
            "params": src.param_count(),
            "dtype": "/".join(dtypes),
            "files": [str(f) for f in src.checkpoint.files],
            "tied_embeddings": src.tied,
            "norm": f"{src.layout.norm_placement}-{src.layout.norm_type}",
            "num_tensors": len(bound),
        }
        if tensors:
            info["tensors"] = [
                {
                    "name": b.name,
                    "shape": list(src.checkpoint.info(b.name).shape),
                    "dtype": str(src.checkpoint.info(b.name).dtype).replace("torch.", ""),
                    "axes": " × ".join("|".join(a) for a in b.spec.axes),
                }
                for b in sorted(bound, key=lambda b: b.name)
            ]
    return info
