"""The copy solution as learnable expansions, shared by the learned operators (ligo,
and mango for the tensors outside its ring).

A tensor is grown by a *recipe*: mix the source layers with a depth vector (per-layer
tensors), expand each growable axis by a matrix (new × old) per role segment, then set
the norms' padding units and scale as the copy operator does. At init the matrices are
the copy operator's maps (``copy_matrix``): out (written) axes copy, in (read) axes split
by the copy count, so the recipe reproduces the copy operator's ``--noise 0`` tensors.
``perturb_expansion`` adds the symmetry-breaking noise (docs/mango.md §4; the ligo
module's docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..maps import AxisMap, RoleMaps
from ..plan import Plan, TargetTensor
from .adjust import adjustment


@dataclass(frozen=True)
class Segment:
    old: int  # units of this segment in the source tensor
    new: int
    key: str | None  # expansion matrix, None: the segment passes through unchanged
    group: int = 1  # units per matrix row (head_dim for whole-head matrices, else 1)
    # Heads stored as parts side by side (``attn*3``: q, k, v of head 0, then head 1, ...):
    # one matrix per part, each acting on that part of every head (``head`` units each).
    parts: tuple[str, ...] = ()
    head: int = 0

    @property
    def cost(self) -> int:
        """Multiply-adds per unit of the other axes (0 for a pass-through)."""
        if not self.key:
            return 0
        return self.new * self.old // (self.group * max(1, len(self.parts)))


@dataclass(frozen=True)
class Step:
    axis: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Recipe:
    depth: str | None  # key of the depth coefficients (per-layer tensors)
    steps: tuple[Step, ...]  # applied in this order
    pad_fill: float | None  # norm gains/biases: the (effective) constant of padding units
    scale: float
    offset: float = 0.0  # gains stored as value - offset (Gemma's 1 + w): grown as values


def copy_matrix(m: AxisMap, side: str, pad_value: str, pad_rows: torch.Tensor | None = None,
                stream: int | None = None) -> torch.Tensor:
    """The copy operator as a matrix [new, old]: out = one-hot copies, in = one-hot / copy
    count; rows of ``m.pad`` copy nothing. With ``pad_value`` "mean" the out side's
    padding rows ``pad_rows`` (default: those of ``m.pad``) write the mean of the first
    ``stream`` source units (default: all), as LEMON pads the residual stream."""
    new, old = m.index.numel(), m.old_size
    mat = torch.zeros(new, old)
    rows = torch.arange(new)[~m.pad]
    cols = m.index[~m.pad]
    mat[rows, cols] = 1.0 if side == "out" else 1.0 / m.count[~m.pad]
    if side == "out" and pad_value == "mean":
        stream = old if stream is None else stream
        mat[m.pad if pad_rows is None else pad_rows, :stream] = 1.0 / stream
    return mat


def zero_sum_over_copies(noise: torch.Tensor, m: AxisMap) -> torch.Tensor:
    """Remove each copy group's mean row: the copies' rows still sum to the original."""
    valid = ~m.pad
    index = m.index[valid]
    sums = torch.zeros((m.old_size, noise.shape[1])).index_add_(0, index, noise[valid])
    counts = torch.bincount(index, minlength=m.old_size).clamp(min=1).to(noise.dtype)
    noise[valid] -= (sums / counts[:, None])[index]
    return noise


def perturb_expansion(mat: torch.Tensor, m: AxisMap, side: str, eps: float, mode: str, gen: torch.Generator) -> None:
    """Symmetry-breaking noise on a copy-initialised expansion ``mat``, in place. ``exact``:
    in-expansions only, zero-sum over the copies of each source unit (the function is
    unchanged); ``plain``: out-expansions too, not zero-sum. Padding rows keep their
    exact role (mean / zero)."""
    if side == "out" and mode != "plain":
        return
    # Entry std ε/sqrt(old): a row's noise has norm ~ε × its own (one-hot or 1/c) norm.
    row_norm = (1.0 / m.count) if side == "in" else torch.ones(m.index.numel())
    noise = torch.randn(mat.shape, generator=gen) * (eps / math.sqrt(m.old_size)) * row_norm[:, None]
    if side == "in" and mode == "exact":
        noise = zero_sum_over_copies(noise, m)
    noise[m.pad] = 0.0
    mat += noise


def initial_depth(plan: Plan, target: TargetTensor) -> torch.Tensor:
    """A per-layer tensor's depth vector at init: one-hot on the depth map's source layer;
    in identity mode an inserted layer's residual writers get all zeros (the exact zero
    block), free to learn a mixture."""
    coef = torch.zeros(plan.old.layers)
    if not (target.identity and target.spec.writes_residual):
        coef[target.source_layer] = 1.0
    return coef


def build_recipe(plan: Plan, target: TargetTensor, maps: RoleMaps, head_norms: set[str], params: dict,
                 expansion: Callable[[str, str], tuple[str, int]]) -> Recipe:
    """The copy-initialised recipe of one target tensor. Adds its depth vector to ``params``
    (``depth.<target name>``); ``expansion(role, side)`` gives (key, row group) of the
    matrix that grows a role's segment on an ``in`` or ``out`` axis."""
    spec = target.spec
    depth = None
    if spec.per_layer:
        depth = f"depth.{target.name}"
        params[depth] = initial_depth(plan, target)
    steps = []
    for axis, roles in enumerate(spec.axes):
        side = "in" if axis == spec.in_axis else "out"
        segments = []
        for role in roles:
            old_size, new_size = plan.old.role_size(role), plan.new.role_size(role)
            m = maps.role(role)
            if m is None or m.is_identity:
                size = target.source_shape[axis] if old_size is None else old_size
                segments.append(Segment(size, size, None))
            else:
                key, group = expansion(role, side)
                segments.append(Segment(old_size, new_size, key, group))
        if any(s.key for s in segments):
            steps.append(Step(axis, tuple(segments)))
    adjust = adjustment(plan, spec, head_norms)
    pad_fill = adjust.pad_fill if spec.is_norm and maps.maps["residual"].pad.any() and "residual" in spec.axes[0] else None
    return Recipe(depth, tuple(steps), pad_fill, adjust.scale, adjust.offset)


def expand_axis(w: torch.Tensor, step: Step, tensor: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One step: each segment of ``step.axis`` times its matrix ``tensor(key)``."""
    if len(step.segments) == 1:
        return _expand_segment(w, step.axis, step.segments[0], tensor)
    parts = torch.split(w, [s.old for s in step.segments], dim=step.axis)
    return torch.cat([_expand_segment(p, step.axis, s, tensor) for p, s in zip(parts, step.segments)], dim=step.axis)


def _expand_segment(w: torch.Tensor, axis: int, seg: Segment, tensor) -> torch.Tensor:
    if seg.key is None:
        return w
    if seg.parts:
        return _expand_parts(w, axis, seg, tensor)
    mat = tensor(seg.key)  # [new groups, old groups]
    moved = w.movedim(axis, 0)
    rest = moved.shape[1:]
    grown = mat @ moved.reshape(mat.shape[1], -1)  # a head is a row of head_dim × rest values
    return grown.reshape(mat.shape[0] * seg.group, *rest).movedim(0, axis)


def _expand_parts(w: torch.Tensor, axis: int, seg: Segment, tensor) -> torch.Tensor:
    """Heads of len(parts) × ``head`` units: part p of every head times ``tensor(parts[p])``."""
    moved = w.movedim(axis, 0)
    rest = moved.shape[1:]
    times = len(seg.parts)
    x = moved.reshape(seg.old // (times * seg.head), times, seg.head, -1)  # [heads, part, head units, rest]
    grown = []
    for p, key in enumerate(seg.parts):
        mat = tensor(key)  # [new rows, old rows], a row = ``group`` units of one head's part
        part = mat @ x[:, p].reshape(mat.shape[1], -1)
        grown.append(part.reshape(-1, seg.head, x.shape[-1]))
    return torch.stack(grown, 1).reshape(seg.new, *rest).movedim(0, axis)


def apply_recipe(w: torch.Tensor, recipe: Recipe, tensor: Callable[[str], torch.Tensor],
                 residual: AxisMap) -> torch.Tensor:
    """The grown tensor from the source one ``w`` (per-layer: stacked [layers, ...]);
    ``tensor(key)``: a depth vector or expansion matrix; ``residual``: the residual map."""
    if recipe.offset:
        w = w + recipe.offset  # mix and scale gains, not their stored differences
    if recipe.depth is not None:
        w = torch.tensordot(tensor(recipe.depth), w, dims=1)  # mix the source layers
    for step in recipe.steps:
        w = expand_axis(w, step, tensor)
    if recipe.pad_fill is not None:
        w = torch.where(residual.pad.to(w.device), torch.full_like(w, recipe.pad_fill), w)
    if recipe.scale != 1.0:
        w = w * recipe.scale
    if recipe.offset:
        w = w - recipe.offset
    return w
