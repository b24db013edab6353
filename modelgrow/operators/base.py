"""The growth-operator interface. Operators speak in layout roles, never architecture
names: they see a plan (dims, depth map, promise) and produce one target tensor at a time.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .. import seeding
from ..errors import UsageError
from ..maps import RoleMaps
from ..plan import Plan, Promise, TargetTensor

NOISE_MODES = ("exact", "plain")


class Operator:
    """Subclass, set ``name``/``description``, implement ``tensor``.

    ``options`` come from the command line (``--noise``, ``--seed``, ...); an operator
    reads the ones it understands. Learned operators also implement ``fit``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    learned: ClassVar[bool] = False

    def __init__(self, plan: Plan, **options: Any):
        self.plan = plan
        self.source = plan.source
        self.options = options
        self.seed = int(options.get("seed", 0))

    def promise(self) -> Promise:
        """What this operator guarantees for this plan (starts from the plan's promise)."""
        return self.plan.promise

    def tensor(self, target: TargetTensor) -> torch.Tensor:
        """The target tensor in float32, shaped ``target.shape``."""
        raise NotImplementedError

    def generator(self, target: TargetTensor) -> torch.Generator:
        """A generator seeded by (seed, tensor name): results never depend on order."""
        return seeding.generator(self.seed, target.name)

    def describe_options(self) -> dict[str, Any]:
        return {"seed": self.seed}


def read_noise(options: dict[str, Any], default: float = 0.01) -> tuple[float, str]:
    """The symmetry-breaking options every copy-initialised operator shares."""
    noise = options.get("noise")
    noise = default if noise is None else float(noise)
    mode = options.get("noise_mode") or "exact"
    if noise < 0 or not math.isfinite(noise):
        raise UsageError(f"--noise must be a non-negative number, got {noise}")
    if mode not in NOISE_MODES:
        raise UsageError(f"unknown --noise-mode {mode!r}", hint="choose exact or plain")
    return noise, mode


def copy_maps(plan: Plan) -> tuple[RoleMaps, set[str]]:
    """The unit maps of the copy solution, and the norms that take 1/k before a tied head."""
    layout = plan.source.layout
    maps = RoleMaps(plan.old, plan.new, layout.norm_type, layout.norm_placement)
    tie = layout.tie
    head_norms = set(tie.get("norm_before_head", [])) if tie and plan.source.tied else set()
    return maps, head_norms
