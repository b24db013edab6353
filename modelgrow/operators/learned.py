"""Learned growth operators: operators with trainable tensors of their own.

A learned operator starts at the copy solution (exact where the plan is) and is then
fitted by the training engine (modelgrow.fit), which only needs what this base class
declares: ``parameters()`` to optimise and ``materialise()`` to build every target
tensor differentiably from them. Nothing here knows how the fit runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..plan import Promise
from .. import seeding
from .base import NoiseOptions, Operator, copy_maps


@dataclass
class FittedPromise(Promise):
    """A learned operator's promise: exact only while it sits at its exact initialisation."""

    fitted: bool = False

    @property
    def exact(self) -> bool:
        return super().exact and not self.fitted

    def as_dict(self) -> dict:
        return {**super().as_dict(), "fitted": self.fitted}


class LearnedOperator(Operator):
    """Base of operators with trainable tensors. Subclasses fill ``self.params`` (name ->
    trainable tensor) and implement ``compute`` (one target tensor, differentiable, on
    the operator's device); ``self._src`` caches the source tensors they read.

    They start at the copy solution: ``self.maps`` and ``self.head_norms`` are its unit
    maps, ``self.noise``/``self.noise_mode`` its symmetry breaking.
    """

    learned = True
    Options = NoiseOptions
    # compute(target) makes one tensor at about its own share of materialise()'s cost, so
    # the fit can make each block's weights inside its forward (--fit-materialise block).
    per_tensor = True

    def __init__(self, plan, **options):
        super().__init__(plan, **options)
        self.noise, self.noise_mode = self.settings.noise, self.settings.noise_mode
        self.maps, self.head_norms = copy_maps(plan)
        self.device = torch.device("cpu")
        self.fitted_steps = 0
        self.params: dict[str, torch.Tensor] = {}
        self._src: dict[str, torch.Tensor] | None = None

    @classmethod
    def state_bytes(cls, source, new, options) -> int:
        """The maps, the small model in fp32 and the operator's tensors four times over
        (values, gradients and AdamW's two moments, fp32)."""
        held = super().state_bytes(source, new, options) + 4 * source.param_count()
        return held + 16 * cls.state_params(source, new, options)

    @classmethod
    def state_params(cls, source, new, options) -> int:
        """How many numbers the operator trains, from the dims (an upper bound). Here
        LiGO's: the residual pair, an in and an out expansion of every other growable role
        per target layer, and a depth vector per per-layer tensor and target layer."""
        old = source.dims
        pairs = [(getattr(old, r), getattr(new, r)) for r in ("heads", "kv_heads", "ffn", "expert_ffn", "shared_ffn")]
        per_layer = 2 * sum(a * b for a, b in pairs if a) + old.layers * sum(1 for s in source.specs() if s.per_layer)
        return 2 * old.residual * new.residual + new.layers * per_layer

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.params

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """The tensors as this operator was built, made again (on the CPU) from the plan,
        the options and the seed: a fit measures its drift against them and keeps no
        copy of them while it runs."""
        return type(self)(self.plan, **self.options).parameters()

    def compute(self, target) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device) -> None:
        device = torch.device(device)
        self.params = {k: v.detach().to(device).requires_grad_(True) for k, v in self.params.items()}
        if self._src is not None:
            self._src = {k: v.to(device) for k, v in self._src.items()}
        self.device = device

    def stacked_source(self, specs) -> dict[str, torch.Tensor]:
        """The small model's tensors of ``specs`` in fp32: per-layer ones stacked [layers, ...]."""
        src, layers = self.source, self.plan.old.layers
        return {spec.name: torch.stack([src.get(spec, j).to(torch.float32) for j in range(layers)]) if spec.per_layer
                else src.get(spec, None).to(torch.float32) for spec in specs}

    def param_group(self, name: str) -> str:
        """Which group a parameter's drift is reported under."""
        return name.split(".")[0]

    def lr_scale(self, name: str) -> float:
        """A parameter's learning rate as a multiple of --fit-lr (1 unless overridden)."""
        return 1.0

    def materialise(self) -> dict[str, torch.Tensor]:
        """Every target tensor, keyed by its checkpoint name (differentiable)."""
        return {t.name: self.compute(t) for t in self.plan.targets}

    def tensor(self, target) -> torch.Tensor:
        with torch.no_grad():
            return self.compute(target).detach().to("cpu", torch.float32)

    def promise(self) -> Promise:
        p = super().promise()
        fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(Promise)}
        fields["notes"] = list(p.notes)
        if self.fitted_steps:
            fields["notes"].append(f"{self.name} fitted for {self.fitted_steps} steps: moved away from its exact initialisation by design")
        return FittedPromise(**fields, fitted=bool(self.fitted_steps))


def operator_seed(seed: int, name: str) -> torch.Generator:
    """A generator seeded by (seed, name): results never depend on build order."""
    return seeding.generator(seed, name)
