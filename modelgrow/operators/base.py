"""The growth-operator interface. Operators speak in layout roles, never architecture
names: they see a plan (dims, depth map, promise) and produce one target tensor at a time.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch

from ..plan import Plan, Promise, TargetTensor


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
        digest = hashlib.sha256(f"{self.seed}:{target.name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def describe_options(self) -> dict[str, Any]:
        return {"seed": self.seed}
