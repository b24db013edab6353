"""Mango's rank: which tensors the ring holds, the auto rank (the smallest with an exact
start) and its count before the plan exists, for the pre-flight estimate."""

from __future__ import annotations

import math
from types import SimpleNamespace

from ..layout import GROWABLE_ROLES, TensorSpec
from ..maps import RoleMaps
from .ring_init import exact_rank
from .slots import lay_out

MAX_RANK = 64
# The pre-flight lays the ring out from the dims (to count the auto rank's channels) up to
# this many target positions over all roles and modes; past it, it counts an upper bound.
PREFLIGHT_LAYOUT_UNITS = 1 << 17


def in_ring(spec: TensorSpec) -> bool:
    """A per-layer matrix whose two axes both grow: it goes into the ring."""
    return (spec.per_layer and spec.kind == "param" and len(spec.axes) == 2 and spec.in_axis is not None
            and all(r in GROWABLE_ROLES for a in spec.axes for r in a))


def auto_note(rank: int, channels, exact_plan: bool) -> str:
    """The plan's statement of an auto rank and why."""
    if channels.notes:  # more channels wanted than MAX_RANK (plan_channels' note says how many)
        return f"rank {rank} (auto: the highest --rank allows)"
    if channels.inexact_roles:  # roles whose copy map does not factor: inexact at any rank
        return f"rank {rank} (auto: every ring channel the copy start can use here; no rank starts exactly)"
    why = []
    if any(d == "writers" for _, _, d in channels.signatures):
        why.append("identity blocks zero their residual writers alone")
    own = sorted({role for _, role in channels.own})
    if len(own) == 1:
        why.append(f"{own[0]} needs its own unit map")
    elif own:
        why.append(f"{', '.join(own)} need their own unit maps")
    because = f": {rank} ring channels, as {' and '.join(why)}" if why else ""
    # A plan that is not exact itself (post-LN depth, say): the start is still the copy operator's.
    start = "an exact start" if exact_plan else "the copy operator's start"
    return f"rank {rank} (auto: the smallest with {start} here{because}; --rank sets another)"


def ring_sizes(source, new, options) -> tuple[int, tuple[int, int], tuple[int, int], int]:
    """Rank, units per slot (source, target), slots (source, target) and how many tensors
    the ring holds, from the dims and the options as given (a bad rank counts as auto)."""
    old, ring = source.dims, [s for s in source.specs() if in_ring(s)]
    grouping = options.get("slot_grouping", "slices")
    rank = options.get("rank")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= MAX_RANK):
        rank = _auto_rank_bound(source, new, ring, grouping if grouping in ("slices", "modules") else "slices")
    if grouping == "modules":
        units = tuple(max(d.role_size(r) or 0 for r in GROWABLE_ROLES) for d in (old, new))
    else:
        units = (old.residual, new.residual)

    def slots(d, u: int) -> int:
        return sum(math.ceil(d.role_size(o) / u) * math.ceil(d.role_size(i) / u)
                   for s in ring for o in s.axes[1 - s.in_axis] for i in s.axes[s.in_axis])

    return rank, units, (slots(old, units[0]), slots(new, units[1])), len(ring)


def _auto_rank_bound(source, new, ring: list[TensorSpec], grouping: str) -> int:
    """The auto rank before the plan exists (the pre-flight): the ring laid out from the
    dims alone, with identity blocks assumed whenever the target is deeper (the default
    depth mode; interleave and stack need no more). That is the plan's auto rank or more,
    except for a ``--layers`` map that drops source layers to make room for identity
    blocks at the same depth (not exact anyway), which may need one channel more. Past
    ``PREFLIGHT_LAYOUT_UNITS`` target positions the layout is not built (its read-back is
    per unit) and each (input role, output role, writer) of the ring counts as a
    channel: an upper bound."""
    if not ring:
        return 1
    old = source.dims
    identity = new.layers > old.layers
    pairs = {(i, o, s.writes_residual) for s in ring for i in s.axes[s.in_axis] for o in s.axes[1 - s.in_axis]}
    roles = {r for s in ring for a in s.axes for r in a}
    width = max(new.role_size(r) or 0 for r in roles)
    unit = max(1, new.residual if grouping == "slices" else width)
    positions = 2 * sum(math.ceil((new.role_size(r) or 0) / unit) * unit for r in roles)  # I and O modes
    if positions > PREFLIGHT_LAYOUT_UNITS:
        return min(MAX_RANK, len({(i, o, w and identity) for i, o, w in pairs}))
    layout = source.layout
    maps = RoleMaps(old, new, layout.norm_type, layout.norm_placement)
    laid = lay_out(SimpleNamespace(old=old, new=new), ring, grouping, maps)
    return min(MAX_RANK, exact_rank(laid, identity))
