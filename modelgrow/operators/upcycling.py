"""Sparse upcycling's tensors (modelgrow.upcycle plans them): any per-tensor operator grows
the dense model, and this wrapper turns its tensors into the mixture-of-experts block's.

- an expert's tensor (``made == "expert"``) is the operator's grown dense FFN tensor, then
  made diverse on request:
  ``--expert-noise s``: Gaussian noise of s times the tensor's spread, drawn per expert;
  ``--drop-upcycle r``: Drop-Upcycling (Nakamura et al., ICLR 2025): for each expert a
  random fraction r of its FFN units (the same units in its gate, up and down
  projections) is re-initialised from a normal distribution with the mean and spread of
  the tensor it replaces, the rest stays the dense FFN's;
- the router (``made == "router"``): zero, or normal with the config's
  ``initializer_range`` (``plan.upcycle.router_std``);
- ``made == "zero"``: zeros (Qwen2-MoE's shared-expert down projection and gate);
- everything else, shared-expert copies included: the operator's tensor as it is.

Draws are seeded by (seed, what, tensor or unit set), so they never depend on order. Only
roles are read: the FFN axis of an expert tensor is the one whose role is ``ffn`` or
``expert_ffn``; no architecture is named here.
"""

from __future__ import annotations

import math

import torch

from .. import seeding
from ..errors import UsageError
from ..plan import Plan, TargetTensor

FFN_ROLES = ("ffn", "expert_ffn")


def upcycled(op, plan: Plan):
    """``op`` as it is, or wrapped when ``plan`` upcycles into a mixture of experts."""
    if plan.upcycle is None:
        return op
    if op.learned:
        raise UsageError(f"--experts: the {op.name} operator is learned, and its fit runs the dense model; sparse "
                         "upcycling grows with an analytic operator", hint="leave out --operator: copy, the default, upcycles")
    return Upcycled(op, plan)


class Upcycled:
    """An operator whose tensors become a mixture-of-experts block's; the rest is the operator's."""

    def __init__(self, op, plan: Plan):
        self.op, self.plan, self.up = op, plan, plan.upcycle
        moe = self.up.layout
        self.ffn_axis = {}  # expert tensor (template) -> its FFN axis in the MoE layout
        for o in self.up.origins:
            if o.made == "expert":
                axes = [i for i, roles in enumerate(o.spec.axes) if any(r in FFN_ROLES for r in roles)]
                if len(axes) != 1:
                    raise UsageError(f"{moe.name}: {o.spec.name!r} has no single ffn axis to re-initialise")
                self.ffn_axis[o.dense.name] = axes[0]

    def grows_rows(self, target: TargetTensor) -> bool:  # made tensors are made whole; the rest as the operator grows them
        return target.made not in ("zero", "router", "expert") and self.op.grows_rows(target)

    def __getattr__(self, name):  # name, learned, settings, promise(), describe_options(), ...
        return getattr(self.op, name)

    def tensor(self, target: TargetTensor, rows: slice | None = None) -> torch.Tensor:
        if rows is not None:  # only asked of what grows_rows passes through
            return self.op.tensor(target, rows)
        if target.made == "zero":
            return torch.zeros(target.shape)
        if target.made == "router":
            if self.up.router_init == "zero":
                return torch.zeros(target.shape)
            gen = seeding.generator(self.op.seed, "router", target.name)
            return torch.randn(target.shape, generator=gen) * self.up.router_std
        w = self.op.tensor(target)
        if target.made != "expert" or not self.up.diverse:
            return w
        w = w.clone()
        if self.up.drop_upcycle > 0:
            w = self._drop(w, target)
        if self.up.expert_noise > 0:
            gen = seeding.generator(self.op.seed, "expert-noise", target.name)
            w = w + self.up.expert_noise * w.std() * torch.randn(w.shape, generator=gen)
        return w

    def _drop(self, w: torch.Tensor, target: TargetTensor) -> torch.Tensor:
        """Re-initialise the expert's dropped FFN units: the same units in each of its tensors."""
        axis = self.ffn_axis[target.spec.name]
        units = w.shape[axis]
        count = min(units, math.floor(self.up.drop_upcycle * units + 0.5))
        if count == 0:
            return w
        picked = seeding.generator(self.op.seed, "drop-upcycle", target.layer, target.expert)
        dropped = torch.randperm(units, generator=picked)[:count]
        gen = seeding.generator(self.op.seed, "drop-upcycle", target.name)
        moved = w.movedim(axis, 0)
        fresh = torch.randn((count, *moved.shape[1:]), generator=gen) * moved.std() + moved.mean()
        moved[dropped] = fresh
        return moved.movedim(0, axis)
