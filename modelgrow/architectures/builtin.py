"""The built-in architectures: one JSON layout each, run by transformers.

Registered through the same hooks a third-party plugin uses.
"""

from __future__ import annotations

from functools import lru_cache

from .hf import HFArchitecture
from ..hookspecs import hookimpl
from ..layout import Layout, builtin_layout_paths


@lru_cache(maxsize=1)
def builtin_architectures() -> tuple[HFArchitecture, ...]:
    # Parsed and schema-checked once per process: layouts are package data.
    return tuple(HFArchitecture(Layout.from_file(p)) for p in builtin_layout_paths())


@hookimpl
def register_architectures(register):
    for arch in builtin_architectures():
        register(arch)


@hookimpl(trylast=True)
def claim_checkpoint(config, tensor_names, architectures):
    # The default rule: the first architecture whose layout matches the config.
    for name, arch in architectures.items():
        if arch.claims(config, tensor_names):
            return name
    return None
