"""The mango operator's stacked tensor: where each per-layer matrix sits in M[B, I, O, L]
and where each target unit is read back from (docs/mango.md §1, §4).

A matrix, read [in, out], is cut along each axis into ``n`` strided pieces of ``u``
units (unit f of an axis goes to piece f mod n, position f div n); a pair (out piece,
in piece) is a *slot*. ``slices`` grouping: u is the residual width; ``modules``: the
widest axis, one piece per role segment. The I mode has one more unit, the homogeneous
input "1", whose column in the first in-piece's slots holds the matrix's bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..layout import TensorSpec
from ..maps import AxisMap, RoleMaps


@dataclass(frozen=True)
class RoleSegment:
    """One role segment of a (possibly fused) matrix axis."""

    role: str
    start_old: int
    start_new: int
    old: int
    new: int


@dataclass(frozen=True)
class Placement:
    """A role's place in one unit mode: pieces per side and where each target unit is read."""

    pieces_old: int
    pieces_new: int
    readback: torch.Tensor  # [new]: target position u2 * pieces_new + s2 of each target unit
    exact: bool  # the shared circular unit map reproduces the copy operator's map
    own: AxisMap | None  # the role's own unit map, when its copy map factors (else None)
    own_pad: torch.Tensor | None  # rows of ``own`` that are residual padding units


@dataclass(frozen=True)
class SlotBlock:
    """One (out segment, in segment) block of a ringed matrix and its slots in M1 / M2."""

    spec: TensorSpec
    out: RoleSegment
    inp: RoleSegment
    first_in: bool  # the first in-segment: its slots' homogeneous column holds the bias
    slot_old: int
    slot_new: int
    no1: int
    ni1: int
    no2: int
    ni2: int
    writer: bool

    @property
    def slots_old(self) -> int:
        return self.no1 * self.ni1

    @property
    def slots_new(self) -> int:
        return self.no2 * self.ni2


@dataclass(frozen=True)
class SlotLayout:
    units: dict[str, tuple[int, int]]  # I and O unit modes (without the homogeneous unit): (old, new)
    places: dict[tuple[str, str], Placement]  # (mode, role) -> its placement
    blocks: list[SlotBlock]
    slots: tuple[int, int]  # B mode: (old, new)


def role_segments(plan, roles: tuple[str, ...]) -> list[RoleSegment]:
    segs, o, n = [], 0, 0
    for role in roles:
        a1, a2 = plan.old.role_size(role), plan.new.role_size(role)
        segs.append(RoleSegment(role, o, n, a1, a2))
        o, n = o + a1, n + a2
    return segs


def readback(a1: int, a2: int, n1: int, n2: int, u1: int, u2: int, want: AxisMap,
             split: bool = True) -> tuple[torch.Tensor, bool]:
    """Where each of a role's ``a2`` target units is read from in the grown mode.

    The copy initialisation sends target position (u2, s2) to source unit
    (u2 mod u1) * n1 + (s2 mod n1). Target unit t takes the next unused position that
    copies ``want.index[t]`` (the copy operator's source for t). Exact when every target
    unit finds such a position (so no unit is a padding unit) and, where the mode splits
    a source unit over its positions (``split``: the I mode, whose S_I and S_B hold
    1/positions), no real source unit has a position left over, so that the split is the
    copy operator's 1/count. The O mode copies without splitting: a position nobody
    reads back does no harm there. Otherwise the rest take free positions, dead ones
    (zero) first.
    """
    p = torch.arange(n2 * u2)
    src = (p // n2 % u1) * n1 + (p % n2 % n1)
    src = torch.where(src < a1, src, torch.full_like(src, -1))
    free: dict[int, list[int]] = {}
    for pos, s in zip(p.tolist(), src.tolist()):
        free.setdefault(s, []).append(pos)
    for positions in free.values():
        positions.reverse()  # pop() from the end takes them in ascending order
    index, missing = [-1] * a2, []
    for t, f in enumerate(want.index.tolist()):
        if f >= 0 and free.get(f):
            index[t] = free[f].pop()
        else:
            missing.append(t)
    exact = not missing and not (split and any(free.get(f) for f in range(a1)))
    if missing:
        spare = free.get(-1, [])[::-1] + sorted(q for f, qs in free.items() if f >= 0 for q in qs)
        for t, q in zip(missing, spare):
            index[t] = q
    return torch.tensor(index, dtype=torch.int64), exact


def own_unit_map(a1: int, a2: int, n1: int, n2: int, u1: int, u2: int, want: AxisMap):
    """The role's copy map as a unit map g with piece map s2 -> s2 mod n1, i.e. with
    want.index[n2*v + s2] == n1*g[v] + s2 mod n1 for every target unit, or None when it
    does not factor so. Residual padding units (index -1, one piece) become padding rows.
    Returns (AxisMap over u2 rows with -1 for dead and padding rows, padding-row mask)."""
    g = torch.full((u2,), -1, dtype=torch.int64)
    pad = torch.zeros(u2, dtype=torch.bool)
    index = want.index.tolist()
    for v in range(u2):
        ts = [(n2 * v + s, s) for s in range(n2) if n2 * v + s < a2]
        if not ts:
            continue
        firsts = [index[t] for t, _ in ts]
        if any(f < 0 for f in firsts):
            if n1 == n2 == 1:
                pad[v] = True
                continue
            return None
        unit = firsts[0] // n1
        if any(index[t] != n1 * unit + s % n1 for t, s in ts) or unit >= u1:
            return None
        g[v] = unit
    valid = g >= 0
    counts = torch.bincount(g[valid], minlength=u1).to(torch.float32)
    count = torch.ones(u2)
    count[valid] = counts[g[valid]]
    return AxisMap(g, count, u1), pad


def same_unit_map(a: Placement, b: Placement) -> bool:
    """Whether two placements' own unit maps are equal (their roles can share a channel)."""
    return (a.own.index.shape == b.own.index.shape and torch.equal(a.own.index, b.own.index)
            and torch.equal(a.own_pad, b.own_pad))


def lay_out(plan, specs: list[TensorSpec], grouping: str, maps: RoleMaps) -> SlotLayout:
    """The slots of the ringed matrices ``specs`` and the placement of every role."""
    pairs = []
    sides = {"I": [], "O": []}
    for spec in specs:
        out_axis = 1 - spec.in_axis
        outs, ins = role_segments(plan, spec.axes[out_axis]), role_segments(plan, spec.axes[spec.in_axis])
        sides["O"] += outs
        sides["I"] += ins
        pairs += [(spec, o, i, k == 0) for k, i in enumerate(ins) for o in outs]
    if not pairs:
        raise UsageError("the mango operator found no per-layer matrices to grow in this layout",
                         hint="use --operator ligo or copy")
    if grouping == "slices":
        units = {m: (plan.old.residual, plan.new.residual) for m in ("I", "O")}
    else:
        units = {m: (max(s.old for s in segs), max(s.new for s in segs)) for m, segs in sides.items()}
    places: dict[tuple[str, str], Placement] = {}
    for mode, segs in sides.items():
        u1, u2 = units[mode]
        for seg in segs:
            if (mode, seg.role) in places:
                continue
            n1, n2 = math.ceil(seg.old / u1), math.ceil(seg.new / u2)
            want = maps.maps[seg.role]
            index, exact = readback(seg.old, seg.new, n1, n2, u1, u2, want, split=mode == "I")
            own = own_unit_map(seg.old, seg.new, n1, n2, u1, u2, want)
            places[(mode, seg.role)] = Placement(n1, n2, index, exact, *(own or (None, None)))
    blocks = []
    b1 = b2 = 0
    for spec, o, i, first_in in pairs:
        po, pi = places[("O", o.role)], places[("I", i.role)]
        blk = SlotBlock(spec, o, i, first_in, b1, b2, po.pieces_old, pi.pieces_old, po.pieces_new, pi.pieces_new,
                        spec.writes_residual)
        blocks.append(blk)
        b1, b2 = b1 + blk.slots_old, b2 + blk.slots_new
    return SlotLayout(units, places, blocks, (b1, b2))


# -- moving matrices in and out of the stacked tensor ---------------------------------


def _to_grid(sub: torch.Tensor, ni: int, ui: int, no: int, uo: int) -> torch.Tensor:
    """[a_in, a_out] -> [no * ni, ui, uo]: unit f of an axis goes to piece f mod n, unit
    f div n (zero-padded to n * u units), slot s_out * ni + s_in."""
    full = sub.new_zeros(ni * ui, no * uo)
    full[: sub.shape[0], : sub.shape[1]] = sub
    return full.reshape(ui, ni, uo, no).permute(3, 1, 0, 2).reshape(no * ni, ui, uo)


def _to_pieces(vec: torch.Tensor, n: int, u: int) -> torch.Tensor:
    full = vec.new_zeros(n * u)
    full[: vec.shape[0]] = vec
    return full.reshape(u, n).transpose(0, 1)


def write_block(m1: torch.Tensor, layer: int, blk: SlotBlock, w: torch.Tensor, bias: torch.Tensor | None,
                units: dict[str, tuple[int, int]]) -> None:
    """Put one block of a source matrix ``w`` [in, out] (and, on the first in-segment, its
    bias) into M1's slots at ``layer``."""
    hom, uo1 = units["I"][0], units["O"][0]
    sub = w[blk.inp.start_old:blk.inp.start_old + blk.inp.old, blk.out.start_old:blk.out.start_old + blk.out.old]
    m1[blk.slot_old:blk.slot_old + blk.slots_old, :hom, :, layer] = _to_grid(sub, blk.ni1, hom, blk.no1, uo1)
    if bias is not None and blk.first_in:
        seg = bias[blk.out.start_old:blk.out.start_old + blk.out.old]
        pieces = _to_pieces(seg, blk.no1, uo1)  # [no1, U]
        m1[blk.slot_old + torch.arange(blk.no1) * blk.ni1, hom, :, layer] = pieces


def read_block(m2l: torch.Tensor, blk: SlotBlock, units: dict[str, tuple[int, int]], rb_in: torch.Tensor,
               rb_out: torch.Tensor) -> torch.Tensor:
    """One block of a target matrix, [in units, out units], from M2 at one layer."""
    (_, ui2), (_, uo2) = units["I"], units["O"]
    grid = m2l[blk.slot_new:blk.slot_new + blk.slots_new, :ui2, :]
    # [no2, ni2, ui2, uo2] -> [ui2, ni2, uo2, no2]: position u * n + s along each axis
    grid = grid.reshape(blk.no2, blk.ni2, ui2, uo2).permute(2, 1, 3, 0).reshape(ui2 * blk.ni2, uo2 * blk.no2)
    return grid.index_select(0, rb_in).index_select(1, rb_out)


def read_bias(m2l: torch.Tensor, blk: SlotBlock, units: dict[str, tuple[int, int]],
              rb_out: torch.Tensor) -> torch.Tensor:
    """The bias of a first-in-segment block, from M2's homogeneous column at one layer."""
    hom, uo2 = units["I"][1], units["O"][1]
    col = m2l[blk.slot_new:blk.slot_new + blk.slots_new, hom, :].reshape(blk.no2, blk.ni2, uo2)
    # Every in-piece's homogeneous column belongs to the bias: the slot map splits a
    # source piece over its copies, and the copies' sum is the bias.
    col = col.sum(dim=1).transpose(0, 1).reshape(uo2 * blk.no2)
    return col.index_select(0, rb_out)
