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
import math

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
        tiles = tile_count(m)
        if tiles:
            reps = [1] * w.dim()
            reps[axis] = tiles
            return w.repeat(reps)
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
        # In place and in the tensor's own layout: on a large model this is most of the
        # conversion's arithmetic (a transposed layout made every pass several times slower).
        tiles = tile_count(m)
        if tiles == 2 and self.noise > 0 and self.noise_mode == "exact":
            return self._split_in_two(w, axis, gen)
        shape = [1] * w.dim()
        shape[axis] = -1
        if tiles:  # whole copies side by side (every integer multiple): contiguous copies, no gather
            reps = [1] * w.dim()
            reps[axis] = tiles
            out = w.repeat(reps).div_(tiles)
        else:
            out = w.index_select(axis, m.index.clamp(min=0)).div_(m.count.view(shape))
        if self.noise > 0 and self.noise_mode == "exact":
            out.add_(_cancelling_noise(out.shape, axis, m, self.noise * float(out.std()), gen))
        pad = m.pad.nonzero().flatten()
        if pad.numel():
            out.index_fill_(axis, pad, 0.0)  # padding units are zero after the norm: their weights are free
        return out

    def _split_in_two(self, w: torch.Tensor, axis: int, gen: torch.Generator) -> torch.Tensor:
        """Two whole copies with cancelling noise (2x width, the common case) written straight
        into the output: w/2 + e, then w/2 - e. The same values as the general path, which
        makes them in five passes over the doubled tensor (repeat, divide, spread, concatenate
        e and -e, add): a third of a large conversion's time."""
        half = w.mul(0.5)
        n = half.numel()
        # The general path's spread: the unbiased std of both copies side by side, whose
        # squared deviations are the half's counted twice.
        spread = float(half.std()) * math.sqrt(2 * (n - 1) / (2 * n - 1)) if n > 1 else 0.0
        e = torch.randn(half.shape, generator=gen).mul_(self.noise * spread / math.sqrt(2))
        shape = list(w.shape)
        shape[axis] *= 2
        out = torch.empty(shape)
        torch.add(half, e, out=out.narrow(axis, 0, w.shape[axis]))
        torch.sub(half, e, out=out.narrow(axis, w.shape[axis], w.shape[axis]))
        return out


def tile_count(m: AxisMap) -> int | None:
    """k when the map lays k whole copies of the source units side by side (unit u's copy j
    at j * old + u, no padding), else None."""
    n, old = m.index.numel(), m.old_size
    if old == 0 or n % old or n == old:
        return None
    return n // old if bool((m.index == torch.arange(n) % old).all()) else None


def _cancelling_noise(shape: torch.Size, axis: int, m: AxisMap, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise that sums to zero along ``axis`` over the copies of each source unit
    (padding units' entries are left to the caller, which zeroes them)."""
    tiles = tile_count(m)
    if tiles == 2:  # two copies: (a - b)/2 and (b - a)/2 of two draws is e and -e of one, e ~ N(0, scale²/2)
        half = list(shape)
        half[axis] = m.old_size
        e = torch.randn(half, generator=gen).mul_(scale / math.sqrt(2))
        return torch.cat([e, e.neg()], dim=axis)
    noise = torch.randn(shape, generator=gen).mul_(scale)
    if tiles:  # copy k of unit u sits at k * old + u: the copies are a dimension of their own
        split = noise.view(*shape[:axis], tiles, m.old_size, *shape[axis + 1:])
        return noise.sub_(split.mean(dim=axis, keepdim=True).expand_as(split).reshape(shape))
    pad = m.pad.nonzero().flatten()
    if pad.numel():
        noise.index_fill_(axis, pad, 0.0)
    index = m.index.clamp(min=0)
    sums_shape = list(shape)
    sums_shape[axis] = m.old_size
    sums = torch.zeros(sums_shape).index_add_(axis, index, noise)
    copies = torch.bincount(m.index[~m.pad], minlength=m.old_size).clamp(min=1).to(sums.dtype)
    view = [1] * len(shape)
    view[axis] = -1
    return noise.sub_(sums.div_(copies.view(view)).index_select(axis, index))


@hookimpl
def register_operators(register):
    register(CopyOperator)
