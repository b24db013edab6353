"""The factors a grown tensor takes beside its unit maps, shared by every operator.

Unit maps copy and split units; a few tensors must also be rescaled for the grown
model to compute what the small one did:

- residual norm gains (pre-norms and sublayer output norms) when the width is padded:
  the stream's mean square shrinks by s = k·D/D′, the config's eps is multiplied by s,
  and the gain by √s (LEMON);
- the norm right before a tied head: the embedding is copied, not split, so the logits
  would come out k times too large (times the embedding's own factor, below);
- a tensor the model multiplies by width**p at run time (Gemma's √hidden embedding):
  the grown multiplier is (D′/D)**p larger, so the tensor takes (D/D′)**p;
- the tensors that make what an inner norm (q/k norm) normalises, when the shared eps
  was multiplied by s: they take √s, and the norm, which is blind to scale but for its
  eps, then sees exactly the eps it had: x·√s / √(s·ms + s·eps) = x / √(ms + eps).

Gains stored with an offset (Gemma's norms multiply by 1 + w) are adjusted as gains: an
operator adds the offset, grows and scales, and takes the offset off again. A zeroed
output norm of an identity block is then a gain of zero, stored as −offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import RESIDUAL_NORM_KINDS, TensorSpec
from ..plan import Plan


@dataclass(frozen=True)
class Adjustment:
    scale: float = 1.0
    offset: float = 0.0  # stored value = effective value - offset (norm gains only)
    pad_fill: float = 0.0  # the effective value of a padding unit on a residual axis

    def to_effective(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.offset if self.offset else w

    def to_stored(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.offset if self.offset else w

    @property
    def stored_pad_fill(self) -> float:
        return self.pad_fill - self.offset


def adjustment(plan: Plan, spec: TensorSpec, head_norms: set[str]) -> Adjustment:
    """How ``spec``'s grown values are scaled, offset and padded under ``plan``."""
    layout = plan.source.layout
    gain = spec.kind in ("norm_weight", "output_norm_weight", "inner_norm_weight")
    scale = 1.0
    if spec.kind in RESIDUAL_NORM_KINDS and gain and plan.residual_pad:
        scale *= math.sqrt(plan.norm_scale)
    if spec.name in head_norms:
        scale /= plan.width_multiple * embedding_factor(plan, layout.tensor(layout.tie["embedding"]))
    scale *= embedding_factor(plan, spec)
    if spec.name in inner_norm_inputs(plan):
        scale *= math.sqrt(plan.eps_scale)
    return Adjustment(scale, layout.gain_offset if gain else 0.0, 1.0 if gain else 0.0)


def embedding_factor(plan: Plan, spec: TensorSpec) -> float:
    """(D/D′)**p for a tensor the model multiplies by width**p at run time; else 1."""
    if spec.runtime_scale is None:
        return 1.0
    return (plan.old.residual / plan.new.residual) ** spec.runtime_scale


def inner_norm_inputs(plan: Plan) -> set[str]:
    """Tensors feeding an inner norm whose eps the plan scaled (none when it did not)."""
    if plan.eps_scale == 1.0:
        return set()
    return {n for t in plan.source.layout.tensors if t.kind == "inner_norm_weight" for n in t.normalises}
