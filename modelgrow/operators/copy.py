"""The `copy` operator: function-preserving growth where mathematics allows it.

Width: residual writers copy rows along the unit map, readers copy columns and divide
by the copy count (Net2Net / HyperCloning); non-integer widths of pre-LN models pad the
residual with its mean (LayerNorm) or zero (RMSNorm) and rescale norm gains (LEMON).
Heads are copied whole, key/value heads in step, so query groups stay consistent.
Depth: `identity` inserts copies whose residual writers are zero; `interleave` and
`stack` insert full copies (not exact). Symmetry breaking: `--noise` with
`--noise-mode exact` adds noise that cancels across copies of a split input; `plain`
adds noise everywhere.
"""

from __future__ import annotations

import dataclasses

import torch

from ..hookspecs import hookimpl
from ..maps import AxisMap
from ..plan import Promise, TargetTensor  # noqa: F401 (Promise in signatures)
from .adjust import adjustment
from .base import NoiseOptions, Operator, copy_maps



class CopyOperator(Operator):
    Options = NoiseOptions
    name = "copy"
    description = "exact function-preserving growth (tile, split, pad, identity blocks); stack/interleave depth"

    def __init__(self, plan, **options):
        super().__init__(plan, **options)
        self.noise, self.noise_mode = self.settings.noise, self.settings.noise_mode
        self.maps, self.head_norms = copy_maps(plan)

    def promise(self) -> Promise:
        p = self.plan.promise
        if self.noise > 0 and self.noise_mode == "plain":
            return dataclasses.replace(p, noise=False, notes=p.notes + ["plain noise: not exact by design"])
        return p

    def grows_rows(self, target: TargetTensor) -> bool:
        # Rows of an axis the growth leaves alone (a vocabulary) are grown independently;
        # the noise's spread is then measured per slice of rows, not over the whole tensor.
        info = self.source.info(target.spec, target.source_layer)
        return len(info.shape) > 1 and self.maps.for_axis(target.spec.axes[0], info.shape[0]) is None

    def tensor(self, target: TargetTensor, rows: slice | None = None) -> torch.Tensor:
        spec = target.spec
        adjust = adjustment(self.plan, spec, self.head_norms)
        shape = target.shape if rows is None else (len(range(*rows.indices(target.shape[0]))), *target.shape[1:])
        if target.identity and spec.writes_residual:
            # An identity block: it reads the residual but adds nothing to it (yet).
            return adjust.to_stored(torch.zeros(shape))
        w = self.source.get(spec, target.source_layer, rows).to(torch.float32)
        gen = self.generator(target, rows)
        grown = False
        for axis, roles in enumerate(spec.axes):
            m = self.maps.for_axis(roles, w.shape[axis])
            if m is None:
                continue
            grown = True
            if axis == spec.in_axis:
                w = self._split(w, axis, m, gen)
            else:
                w = self._copy(w, axis, m, spec, adjust)
        if adjust.scale != 1.0:  # gains scale as gains (offset added first), never as stored differences
            w = adjust.to_stored(adjust.to_effective(w) * adjust.scale)
        if grown and self.noise > 0 and self.noise_mode == "plain" and spec.kind == "param":
            w = w + self.noise * w.std() * torch.randn(w.shape, generator=gen)
        assert tuple(w.shape) == tuple(shape), (target.name, w.shape, shape)
        return w

    def _copy(self, w: torch.Tensor, axis: int, m: AxisMap, spec, adjust) -> torch.Tensor:
        out = w.index_select(axis, m.index.clamp(min=0))
        if m.pad.any():
            moved = out.movedim(axis, 0)
            if spec.is_norm:  # a padding unit's gain is 1 and its bias 0 (stored: minus the offset)
                moved[m.pad] = adjust.stored_pad_fill
            elif self.maps.pad_value == "mean":  # the padding unit carries the mean of the stream
                moved[m.pad] = w.movedim(axis, 0).mean(dim=0)
            else:
                moved[m.pad] = 0.0
            out = moved.movedim(0, axis)
        return out

    def _split(self, w: torch.Tensor, axis: int, m: AxisMap, gen: torch.Generator) -> torch.Tensor:
        shape = [1] * w.dim()
        shape[axis] = -1
        out = w.index_select(axis, m.index.clamp(min=0)) / m.count.view(shape)
        moved = out.movedim(axis, 0)
        if self.noise > 0 and self.noise_mode == "exact":
            moved = moved + _cancelling_noise(moved, m, self.noise * float(moved.std()), gen)
        moved[m.pad] = 0.0  # padding units are zero after the norm: their weights are free
        return moved.movedim(0, axis)


def _cancelling_noise(x: torch.Tensor, m: AxisMap, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Noise along dim 0 that sums to zero over the copies of each source unit."""
    noise = torch.randn(x.shape, generator=gen) * scale
    valid = ~m.pad
    sums = torch.zeros((m.old_size, *x.shape[1:])).index_add_(0, m.index[valid], noise[valid])
    mean = sums / torch.bincount(m.index[valid], minlength=m.old_size).clamp(min=1).view(-1, *[1] * (x.dim() - 1))
    noise[valid] -= mean[m.index[valid]]
    return noise


@hookimpl
def register_operators(register):
    register(CopyOperator)
