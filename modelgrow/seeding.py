"""The one way modelgrow derives seeds: sha256 of the parts, so a stream depends only on
what it is for (a tensor's name, a restart's number, a rank and a step), never on the
order in which things are built or on how many processes run."""

from __future__ import annotations

import hashlib

import torch


def derive(*parts) -> int:
    """A 64-bit seed from ``parts`` (joined by ':')."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded by ``parts``."""
    return torch.Generator().manual_seed(derive(*parts))


def torch_seed(*parts) -> int:
    """A seed for ``torch.manual_seed`` (63 bits: the global generators' range)."""
    return derive(*parts) & ((1 << 63) - 1)
