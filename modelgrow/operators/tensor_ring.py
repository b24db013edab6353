"""Tensor-ring algebra of the mango operator (docs/mango.md §2).

A map Φ from M1[B1, I1, O1, L1] to M2[B2, I2, O2, L2] is a ring of four cores
S_X[R, X2, X1, R], one per mode:

    M2[b2,i2,o2,l2] = Σ Tr(S_B[:,b2,b1,:] S_I[:,i2,i1,:] S_O[:,o2,o1,:] S_L[:,l2,l1,:]) · M1[b1,i1,o1,l1]

The full map is never built: M1 absorbs one core at a time, each next to those already
absorbed, so at most two ring indices are open; the cheapest of the 16 such orders is
chosen by its multiply-add count, and the work is chunked over the first core's target
index so the largest intermediate stays under a memory budget.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

RING = ("B", "I", "O", "L")  # core k's right ring index is core k+1's left one
MODE_DIM = {"B": 0, "I": 1, "O": 2, "L": 3}  # M is [B, I, O, L]


def contraction_orders() -> list[tuple[tuple[str, str], ...]]:
    """Every order that absorbs one core at a time next to those already absorbed, as
    ((mode, how), ...), how in first/right/left/close: 4 starts × 2 × 2 = 16 orders."""
    orders = []
    for start in range(4):
        for exts in itertools.product(("left", "right"), repeat=2):
            lo = hi = start
            steps = [(RING[start], "first")]
            for ext in exts:
                if ext == "right":
                    hi += 1
                    steps.append((RING[hi % 4], "right"))
                else:
                    lo -= 1
                    steps.append((RING[lo % 4], "left"))
            rest = next(m for m in RING if m not in {s[0] for s in steps})
            orders.append((*steps, (rest, "close")))
    return orders


def contraction_cost(order, src: dict[str, int], tgt: dict[str, int], rank: int) -> tuple[int, int]:
    """(multiply-adds, largest intermediate in elements) of one order, unchunked."""
    size, macs, peak = dict(src), 0, 0
    for mode, how in order:
        size[mode] = tgt[mode]
        bonds = 1 if how == "close" else rank * rank
        out = bonds * math.prod(size.values())
        summed = src[mode] * {"first": 1, "left": rank, "right": rank, "close": rank * rank}[how]
        macs += out * summed
        peak = max(peak, out)
    return macs, peak


def cheapest_order(src: dict[str, int], tgt: dict[str, int], rank: int):
    """The order with the fewest multiply-adds (ties: the smaller peak)."""
    return min(contraction_orders(), key=lambda o: contraction_cost(o, src, tgt, rank))


def chunk_for_budget(order, src: dict[str, int], tgt: dict[str, int], rank: int, budget_mb: float) -> int:
    """Target indices of the first core per chunk, so the largest intermediate stays
    under ``budget_mb`` (fp32)."""
    first = order[0][0]
    _, peak = contraction_cost(order, src, tgt, rank)
    per_index = peak / tgt[first]
    return max(1, min(tgt[first], int(budget_mb * 2**20 / 4 // per_index)))


def _absorb(state: torch.Tensor, core: torch.Tensor, mode: str, how: str) -> torch.Tensor:
    """One step. A core is [left, target, source, right]; the state is [p, q, b, i, o, l]
    with p, q the open ring indices of the absorbed arc (none before the first step and
    after the closing one)."""
    m = mode.lower()
    modes = "biol"
    out = modes.replace(m, "z")
    if how == "first":
        spec = f"pz{m}q,{modes}->pq{out}"
    elif how == "right":  # the core's left index is the arc's right one
        spec = f"qz{m}r,pq{modes}->pr{out}"
    elif how == "left":  # the core's right index is the arc's left one
        spec = f"rz{m}p,pq{modes}->rq{out}"
    else:  # close the ring
        spec = f"qz{m}p,pq{modes}->{out}"
    return torch.einsum(spec, core, state)


def _run(order, start: int, stop: int, m1: torch.Tensor, *cores: torch.Tensor) -> torch.Tensor:
    by_mode = dict(zip(RING, cores))
    state = m1
    for k, (mode, how) in enumerate(order):
        core = by_mode[mode]
        if k == 0:
            core = core[:, start:stop]  # the chunk: a slab of the first core's target index
        state = _absorb(state, core, mode, how)
    return state


def contract(cores: dict[str, torch.Tensor], m1: torch.Tensor, order=None, chunk: int | None = None,
             checkpoint: bool = False) -> torch.Tensor:
    """M2 = Φ(M1) for cores {"B", "I", "O", "L"}, never building the full map.

    ``chunk``: target indices of the first core per piece (None: one piece);
    ``checkpoint``: recompute each piece in backward instead of keeping its intermediates.
    """
    rank = cores["B"].shape[0]
    if order is None:
        src = {m: cores[m].shape[2] for m in RING}
        tgt = {m: cores[m].shape[1] for m in RING}
        order = cheapest_order(src, tgt, rank)
    ordered = [cores[m] for m in RING]
    first = order[0][0]
    n = cores[first].shape[1]
    chunk = n if chunk is None else max(1, min(int(chunk), n))
    pieces = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        if checkpoint and chunk < n:
            pieces.append(_checkpoint(_run, order, start, stop, m1, *ordered, use_reentrant=False))
        else:
            pieces.append(_run(order, start, stop, m1, *ordered))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=MODE_DIM[first])


def full_map(cores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The explicit map S[(b2,i2,o2,l2), (b1,i1,o1,l1)], for tests on tiny sizes only."""
    s = torch.einsum("aXxc,cYyd,dZze,eWwa->XYZWxyzw", cores["B"], cores["I"], cores["O"], cores["L"])
    n2 = math.prod(cores[m].shape[1] for m in RING)
    return s.reshape(n2, -1)
