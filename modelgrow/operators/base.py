"""The growth-operator interface. Operators speak in layout roles, never architecture
names: they see a plan (dims, depth map, promise) and produce one target tensor at a time.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from .. import seeding
from ..errors import UsageError
from ..options import Options, option, seed_option
from ..layout import Dims
from ..maps import RoleMaps, map_bytes
from ..plan import Plan, Promise, TargetTensor



class OperatorOptions(Options):
    """What every operator takes. An operator declares its own group as a subclass;
    each field becomes a `modelgrow convert` flag."""

    kind = "operator"

    seed: int = seed_option("Seed for noise; same seed, same bytes.")


class NoiseOptions(OperatorOptions):
    """The symmetry-breaking options of every copy-initialised operator."""

    noise: float = option(0.01, "Symmetry-breaking noise, relative to each tensor's spread (0 for none).",
                          ge=0, allow_inf_nan=False)
    noise_mode: Literal["exact", "plain"] = option(
        "exact", "exact: noise cancels across copies (function preserved); plain: noise everywhere.")


class Operator:
    """Subclass, set ``name``/``description``/``Options``, implement ``tensor``.

    ``options`` are validated into ``self.settings`` (an instance of ``Options``); the raw
    dict stays in ``self.options``. Learned operators subclass ``LearnedOperator``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    learned: ClassVar[bool] = False
    Options: ClassVar[type[OperatorOptions]] = OperatorOptions

    def __init__(self, plan: Plan, **options: Any):
        self.plan = plan
        self.source = plan.source
        unknown = sorted(set(options) - set(self.Options.model_fields))
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            raise UsageError(f"{flags}: not an option of the {self.name} operator",
                             hint="`modelgrow convert --help` says which operator takes which option")
        self.settings = self.Options.parse(options)
        self.options = options
        self.seed = self.settings.seed

    @classmethod
    def state_bytes(cls, source, new: Dims, options: dict[str, Any]) -> int:
        """The memory this operator holds for a whole conversion into ``new``, beside the
        tensor it is growing, worked out before it is built (modelgrow.preflight; ``source``
        is the SourceModel, ``options`` as given, unchecked): here the unit maps."""
        return map_bytes(new)

    def promise(self) -> Promise:
        """What this operator guarantees for this plan (starts from the plan's promise)."""
        return self.plan.promise

    def tensor(self, target: TargetTensor, rows: slice | None = None) -> torch.Tensor:
        """The target tensor in float32, shaped ``target.shape``; ``rows`` (only asked for when
        ``grows_rows(target)``): that slice of its first dimension alone."""
        raise NotImplementedError

    def grows_rows(self, target: TargetTensor) -> bool:
        """Whether ``tensor(target, rows)`` can grow the first dimension's rows a slice at a
        time, so that a large tensor (a vocabulary's embedding) is never held whole in fp32.
        Default: no, the writer asks for the whole tensor."""
        return False

    def generator(self, target: TargetTensor, rows: slice | None = None) -> torch.Generator:
        """A generator seeded by (seed, tensor name[, first row of the slice]): results never
        depend on order."""
        return seeding.generator(self.seed, target.name if rows is None or rows.start == 0 and rows.stop >= target.shape[0]
                                 else f"{target.name}[{rows.start}:]")

    def describe_options(self) -> dict[str, Any]:
        """The options in effect (defaults included), for the report and provenance."""
        return self.settings.as_dict()


def copy_maps(plan: Plan) -> tuple[RoleMaps, set[str]]:
    """The unit maps of the copy solution, and the norms that take 1/k before a tied head."""
    layout = plan.source.layout
    maps = RoleMaps(plan.old, plan.new, layout.norm_type, layout.norm_placement)
    tie = layout.tie
    head_norms = set(tie.get("norm_before_head", [])) if tie and plan.source.tied else set()
    return maps, head_norms
