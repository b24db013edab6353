"""The `mango` operator: a learned multi-linear growth operator (Mango, Pan et al.,
NeurIPS 2023). The map from the small model's weights to the large model's is a tensor
ring of four small cores, fitted by modelgrow.fit like LiGO. docs/mango.md has the
reasoning, the measurements and what is not known about the paper.

The stacked tensor
------------------
Every per-layer weight matrix whose two axes both have growable roles (residual, attn,
kv, ffn: q, k, v, o, FFN up/gate/down in every built-in layout) is stored [in, out] and
cut into *slots*; the slots of all layers form one tensor M[B, I, O, L] (slot, input
unit, output unit, layer). ``--slot-grouping`` says how:

- ``slices`` (default): the unit modes are residual-sized (I = O = D). An axis of role
  size a is cut into n = ceil(a / D) strided pieces, unit f going to piece f mod n at
  unit f div n; a matrix gives n_out × n_in slots (GPT-2: q, k, v, o, 4 FFN-up and 4
  FFN-down pieces, B = 12). A narrower axis (GQA's kv) fills the first a units of its
  slot and leaves the rest zero. Strided, not contiguous, pieces are what make the copy
  map a Kronecker product: copying FFN unit f to f + a is copying unit u to u + D in
  every piece.
- ``modules``: one slot per matrix (per role segment of a fused matrix: GPT-2's c_attn
  is q, k, v), the unit modes as wide as the widest axis (I = O = 4D for a 4x FFN),
  narrower axes zero-padded: the paper's caption (B = 6 modules). It holds ~8x more
  zeros than ``slices`` (96 D² vs 12 D² per layer for a GPT-2 block), and S_I/S_O are
  16x larger; it lets S_I/S_O mix any FFN units with each other directly.

The I mode has one more unit, the homogeneous input "1": a matrix's bias (paired by the
PyTorch convention ``x.weight`` / ``x.bias`` with the same out roles) sits in that
column of the slot holding the first in-piece, so a bias is grown by exactly the maps
that grow its matrix's rows (x ↦ Wx + b is [W b]·[x; 1]).

The map
-------
With cores S_B[R, B2, B1, R], S_I[R, I2, I1, R], S_O[R, O2, O1, R], S_L[R, L2, L1, R]:

    M2[b2,i2,o2,l2] = Σ_{b1,i1,o1,l1} Tr(S_B[:,b2,b1,:] S_I[:,i2,i1,:] S_O[:,o2,o1,:] S_L[:,l2,l1,:]) M1[b1,i1,o1,l1]

At R = 1 this is vec(M2) = (S_B ⊗ S_I ⊗ S_O ⊗ S_L) vec(M1) (row-major over b, i, o, l).

Contraction order and cost
--------------------------
The full map (B2·I2·O2·L2 × B1·I1·O1·L1 entries, ~1.8e15 for DeiT-S→B) is never built.
M1 absorbs one core at a time, each new core adjacent in the ring to the ones already
absorbed, so at most two ring indices are ever open. The first core costs
R²·X2·X1·(other modes, source sizes), the two middle ones R³ × their sizes, the closing
one R²·X2·X1·(other modes, target sizes). Of the 16 such orders the cheapest by this
count is chosen (``contraction_cost``); for width growth it is I, B, L, O (or O, B, L,
I): the two big unit maps at R², the R³ steps only on the small slot and layer modes.
DeiT-S→B-like (D 384→768, 12 layers, B = 12) at R = 4: 0.85e12 multiply-adds, against
1.6e12 for L, B, I, O. The work is chunked over the first core's *target* index,
which no later step touches: each chunk yields a slab of M2, no chunk repeats another's
work, and the largest intermediate (R²·chunk·B·L·O1 floats) is held under a budget
(``chunk_mb``). With gradients each chunk is checkpointed, so the fit keeps only M2 and
the cores, recomputing a chunk in backward. benchmarks/RESULTS-mango.md has the
measured time and peak memory.

Outside the ring
----------------
Embeddings, norms, unpaired biases, the head and any tensor not ringed: as LiGO does,
the residual axis is expanded by a residual map pair, E_res (out, copies) and S_res (in,
splits); ``--ring-residual separate`` (default) gives the pair its own parameters,
``tied`` reads them from the ring's channel-0 blocks S_O[0,·,·,0] and S_I[0,·,·,0] (one
residual frame for the whole model; at R = 1 exactly the matrices' frame). Per-layer
tensors outside the ring also get a learned depth vector over the source layers per
(target layer, tensor). Other growable axes outside the ring (none in the built-in
layouts) follow the copy operator's map, fixed.

Initialisation: exactly what is and is not exact
-------------------------------------------------
Channel 0 of every core holds the copy operator's map: S_O one-hot copies u2 → u2 mod U1,
S_I the same divided by the copy count (the homogeneous unit maps to itself with 1),
S_B the slot copy map (piece s2 → s2 mod n1, split by the piece count on the in side),
S_L the plan's depth map. Each target unit is read back from the position holding the
copy that the copy operator would put there, so at noise 0 the per-layer matrices and
biases *equal* the copy operator's tensors (up to fp32 rounding) when every ringed role
grows so that the Kronecker copy map and the copy operator's map agree: integer width
multiples with heads, kv heads and FFN scaled in step (any depth mode), and post-LN
models at any width (both use circular maps there). Otherwise (pre-LN non-integer
width, whose residual padding a Kronecker copy map cannot express, or --ffn/--heads
ratios that differ from the width's) the affected units are read back from the nearest
free positions and the promise says not exact.

Identity depth growth must zero only the residual writers (o, FFN down and their
biases) of inserted layers. One Kronecker product cannot (S_L is shared by all slots),
so readers and writers take separate channels, the writers' S_L with the inserted rows
at zero. More generally every distinct (I map, O map, depth map) needs a channel: a
role whose copy map the shared u2 → u2 mod U1 cannot reproduce (pre-LN non-integer
width: the residual's LEMON padding; a kv ratio unlike the width's) gets its *own* unit
map when its copy map factors into unit × piece, in a channel of its own. With R at
least the number of channels, the start is exact. With fewer, the operator falls back to
the shared map (plus the writer channel if R ≥ 2) and the promise names the roles it
misses and the rank that would do. At R = 1 with inserted layers the whole inserted
block starts at zero, readers too: exact (it adds nothing), but dormant until the
gradient reaches its residual-writing biases (o, FFN down), which sit in the ring too.
Channels not used start at zero (``--ring-init copy``) or as copies of an active
channel with S_L zero (``echo``); both are exact.

Tensors outside the ring start at the copy operator's values in every case (padding,
LEMON gain scaling and the tied head's 1/k included), as LiGO's do.

Symmetry breaking (``--noise ε``, ``--noise-mode exact``): S_I's active blocks get
noise that sums to zero over the copies of each unit (copies of a unit carry equal
activations, so the sums readers see are unchanged); S_I and S_L get plain noise on
every block whose two ring indices are not both active channels. Any ring path that
leaves the active channels then passes an exactly-zero entry of S_B or S_O, so the
function is unchanged, yet every core entry gets a gradient from the first steps on
(S_B and S_O entries through the noise; the rest once those move). With ``plain``,
every core gets noise (not exact).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import UsageError
from .learned import LearnedOperator, operator_seed
from ..hookspecs import hookimpl
from ..layout import GROWABLE_ROLES, TensorSpec
from ..maps import AxisMap, circular
from ..plan import TargetTensor
from .base import copy_maps, read_noise
from .ligo import _initial_matrix, _zero_sum_over_copies

RING = ("B", "I", "O", "L")  # core k's right ring index is core k+1's left one
MODE_DIM = {"B": 0, "I": 1, "O": 2, "L": 3}  # M is [B, I, O, L]
GROUPINGS = ("slices", "modules")
RING_INITS = ("copy", "echo")
RESIDUAL_MODES = ("separate", "tied")
# benchmarks/RESULTS-mango.md: the rank sweep on the demo and the DeiT-S→B-sized cost.
DEFAULT_RANK = 4
DEFAULT_CHUNK_MB = 256
MAX_RANK = 64


# -- the contraction -----------------------------------------------------------------


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


# -- the stacked tensor's geometry ---------------------------------------------------


@dataclass(frozen=True)
class _Seg:
    """One role segment of a (possibly fused) matrix axis."""

    role: str
    start_old: int
    start_new: int
    old: int
    new: int


@dataclass(frozen=True)
class _Place:
    """A role's place in one unit mode: pieces per side and where each target unit is read."""

    pieces_old: int
    pieces_new: int
    readback: torch.Tensor  # [new]: target position u2 * pieces_new + s2 of each target unit
    exact: bool  # the shared circular unit map reproduces the copy operator's map
    own: AxisMap | None  # the role's own unit map, when its copy map factors (else None)
    own_pad: torch.Tensor | None  # rows of ``own`` that are residual padding units


@dataclass(frozen=True)
class _Block:
    spec: TensorSpec
    out: _Seg
    inp: _Seg
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


def _segments(plan, roles: tuple[str, ...]) -> list[_Seg]:
    segs, o, n = [], 0, 0
    for role in roles:
        a1, a2 = plan.old.role_size(role), plan.new.role_size(role)
        segs.append(_Seg(role, o, n, a1, a2))
        o, n = o + a1, n + a2
    return segs


def _readback(a1: int, a2: int, n1: int, n2: int, u1: int, u2: int, want: AxisMap) -> tuple[torch.Tensor, bool]:
    """Where each of a role's ``a2`` target units is read from in the grown mode.

    The copy initialisation sends target position (u2, s2) to source unit
    (u2 mod u1) * n1 + (s2 mod n1). Target unit t takes the next unused position that
    copies ``want.index[t]`` (the copy operator's source for t). Exact when every real
    source unit has as many such positions as the copy operator makes copies (so the
    split of S_I and S_B, 1/positions, is the copy operator's 1/count) and no unit is a
    padding unit; otherwise the rest take free positions, dead ones (zero) first.
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
    exact = not missing and all(not free.get(f) for f in range(a1))
    if missing:
        spare = free.get(-1, [])[::-1] + sorted(q for f, qs in free.items() if f >= 0 for q in qs)
        for t, q in zip(missing, spare):
            index[t] = q
    return torch.tensor(index, dtype=torch.int64), exact


def _own_unit_map(a1: int, a2: int, n1: int, n2: int, u1: int, u2: int, want: AxisMap):
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


def _same_map(a: _Place, b: _Place) -> bool:
    return (a.own.index.shape == b.own.index.shape and torch.equal(a.own.index, b.own.index)
            and torch.equal(a.own_pad, b.own_pad))


# -- the operator ----------------------------------------------------------------------


class MangoOperator(LearnedOperator):
    name = "mango"
    description = ("learned multi-linear growth (Mango): all per-layer matrices as one tensor mapped by a "
                   "tensor ring of four cores (--rank); starts at the copy solution, fitted with --fit-data")

    def __init__(self, plan, **options):
        super().__init__(plan, **options)
        self._read_options(options)
        self.maps, self.head_norms = copy_maps(plan)
        self.buffers: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []
        self._cache: tuple | None = None

        self._classify()
        self._layout_modes()
        self._init_cores()
        self._init_outside()
        self._add_noise()
        for t in self.params.values():
            t.requires_grad_(True)
        sizes = self.mode_sizes()
        self.order = cheapest_order(sizes["source"], sizes["target"], self.rank)

    # -- options -----------------------------------------------------------------------

    def _read_options(self, options: dict) -> None:
        rank = options.get("rank")
        rank = DEFAULT_RANK if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
            raise UsageError(f"--rank must be a whole number from 1 to {MAX_RANK}, got {rank!r}")
        self.rank = rank
        self.grouping = options.get("slot_grouping") or "slices"
        if self.grouping not in GROUPINGS:
            raise UsageError(f"unknown --slot-grouping {self.grouping!r}", hint=f"choose {' or '.join(GROUPINGS)}")
        self.ring_init = options.get("ring_init") or "copy"
        if self.ring_init not in RING_INITS:
            raise UsageError(f"unknown --ring-init {self.ring_init!r}", hint=f"choose {' or '.join(RING_INITS)}")
        self.residual = options.get("ring_residual") or "separate"
        if self.residual not in RESIDUAL_MODES:
            raise UsageError(f"unknown --ring-residual {self.residual!r}", hint=f"choose {' or '.join(RESIDUAL_MODES)}")
        self.noise, self.noise_mode = read_noise(options)
        chunk_mb = options.get("chunk_mb")
        self.chunk_mb = DEFAULT_CHUNK_MB if chunk_mb is None else float(chunk_mb)
        if not self.chunk_mb > 0:
            raise UsageError(f"chunk_mb must be positive, got {chunk_mb!r}")
        self.lr_scales = dict(options.get("lr_scales") or {})
        for group, scale in self.lr_scales.items():
            if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
                raise UsageError(f"lr_scales[{group!r}] must be a positive number, got {scale!r}")

    # -- which tensors go into the ring ------------------------------------------------

    def _classify(self) -> None:
        specs = self.source.specs()
        self.ring_specs = [s for s in specs if s.per_layer and s.kind == "param" and len(s.axes) == 2
                           and s.in_axis is not None and all(r in GROWABLE_ROLES for a in s.axes for r in a)]
        ringed = {s.name: s for s in self.ring_specs}
        self.bias_of: dict[str, TensorSpec] = {}  # matrix name -> its bias spec
        self.matrix_of: dict[str, TensorSpec] = {}  # bias name -> its matrix spec
        for s in specs:
            if not (s.per_layer and s.kind == "param" and len(s.axes) == 1 and s.name.endswith("bias")):
                continue
            m = ringed.get(s.name[: -len("bias")] + "weight")
            if m is not None and s.axes[0] == m.axes[1 - m.in_axis]:
                self.bias_of[m.name], self.matrix_of[s.name] = s, m
        self.outside = [s for s in specs if s.name not in ringed and s.name not in self.matrix_of]
        self.outside_names = {s.name for s in self.outside}

    def _layout_modes(self) -> None:
        plan = self.plan
        blocks: list[_Block] = []
        sides = {"I": [], "O": []}
        for spec in self.ring_specs:
            out_axis = 1 - spec.in_axis
            outs, ins = _segments(plan, spec.axes[out_axis]), _segments(plan, spec.axes[spec.in_axis])
            sides["O"] += outs
            sides["I"] += ins
            blocks += [(spec, o, i, k == 0) for k, i in enumerate(ins) for o in outs]
        if not blocks:
            raise UsageError("the mango operator found no per-layer matrices to grow in this layout",
                             hint="use --operator ligo or copy")
        # Unit sizes of the I and O modes (without the homogeneous unit).
        if self.grouping == "slices":
            self.units = {m: (plan.old.residual, plan.new.residual) for m in ("I", "O")}
        else:
            self.units = {m: (max(s.old for s in segs), max(s.new for s in segs)) for m, segs in sides.items()}
        self.places: dict[tuple[str, str], _Place] = {}
        for mode, segs in sides.items():
            u1, u2 = self.units[mode]
            for seg in segs:
                if (mode, seg.role) in self.places:
                    continue
                n1, n2 = math.ceil(seg.old / u1), math.ceil(seg.new / u2)
                want = self.maps.maps[seg.role]
                index, exact = _readback(seg.old, seg.new, n1, n2, u1, u2, want)
                own = _own_unit_map(seg.old, seg.new, n1, n2, u1, u2, want)
                self.places[(mode, seg.role)] = _Place(n1, n2, index, exact, *(own or (None, None)))
                self.buffers[f"readback.{mode}.{seg.role}"] = index
        self.blocks = []
        b1 = b2 = 0
        for spec, o, i, first_in in blocks:
            po, pi = self.places[("O", o.role)], self.places[("I", i.role)]
            blk = _Block(spec, o, i, first_in, b1, b2, po.pieces_old, pi.pieces_old, po.pieces_new, pi.pieces_new,
                         spec.writes_residual)
            self.blocks.append(blk)
            b1, b2 = b1 + blk.slots_old, b2 + blk.slots_new
        self.B = (b1, b2)

    def mode_sizes(self) -> dict[str, dict[str, int]]:
        """Sizes of M1's and M2's modes (I includes the homogeneous unit)."""
        (b1, b2), (i1, i2), (o1, o2) = self.B, self.units["I"], self.units["O"]
        return {"source": {"B": b1, "I": i1 + 1, "O": o1, "L": self.plan.old.layers},
                "target": {"B": b2, "I": i2 + 1, "O": o2, "L": self.plan.new.layers}}

    # -- initialisation ----------------------------------------------------------------

    def _init_cores(self) -> None:
        plan, rank = self.plan, self.rank
        sizes = self.mode_sizes()
        src, tgt = sizes["source"], sizes["target"]
        inserted = [ins for _, ins in plan.depth_map]
        # Identity depth growth zeroes the residual writers of inserted layers only.
        split_writers = plan.spec.depth_mode == "identity" and any(inserted) and any(b.writer for b in self.blocks)
        # A role whose copy map the shared circular unit map cannot reproduce (residual
        # padding, a kv ratio unlike the width's) can carry its own unit map when its copy
        # map factors into unit x piece; every distinct (I map, O map, depth map) then
        # needs its own ring channel: exact when the rank has room for all of them.
        fixable = {key for key, p in self.places.items() if not p.exact and p.own is not None}
        # Roles whose own maps are equal share a channel (GPT-2's attn and kv, say).
        canon = {}
        for mode, role in sorted(fixable):
            p = self.places[(mode, role)]
            canon[(mode, role)] = next(r for (m, r) in sorted(fixable) if m == mode and _same_map(self.places[(m, r)], p))

        def signature(blk: _Block, own: set, writers: bool) -> tuple[str, str, str]:
            i = f"role:{canon[('I', blk.inp.role)]}" if ("I", blk.inp.role) in own else "shared"
            o = f"role:{canon[('O', blk.out.role)]}" if ("O", blk.out.role) in own else "shared"
            return i, o, "writers" if (writers and blk.writer) or zero_all else "full"

        zero_all = False
        wanted = {signature(b, fixable, split_writers) for b in self.blocks}
        if len(wanted) <= rank:
            own, writers = fixable, split_writers
        else:
            own, writers = set(), split_writers and rank >= 2
            self.notes.append(f"rank {rank} has no room for the {len(wanted)} ring channels that an exact start needs "
                              f"here; use --rank {len(wanted)} or more")
        # Rank 1 cannot zero the writers alone; zeroing the whole inserted block is the
        # nearest function the ring can express (exact: the block adds nothing).
        self.depth_fallback = split_writers and not writers
        if self.depth_fallback:
            self.notes.append("rank 1 cannot zero only the residual writers of inserted layers: their ring matrices "
                              "start at zero, readers too (exact, but the block wakes only through its biases' "
                              "gradient); use --rank 2 or more")
        zero_all = self.depth_fallback
        self.own_maps = own
        for mode, role in own:  # a role on its own map is read in place: unit t at position t
            self.buffers[f"readback.{mode}.{role}"] = torch.arange(self.plan.new.role_size(role))
        self.inexact_roles = sorted(f"{role} ({mode})" for (mode, role), p in self.places.items()
                                    if not p.exact and (mode, role) not in own)
        sigs = [signature(b, own, writers) for b in self.blocks]
        self.channels = list(dict.fromkeys(sigs))  # first-seen order: channel 0 holds the first block
        self.channel_of = [self.channels.index(sg) for sg in sigs]

        slot_maps = torch.zeros(len(self.channels), tgt["B"], src["B"])
        for blk, g in zip(self.blocks, self.channel_of):
            count_in = torch.bincount(torch.arange(blk.ni2) % blk.ni1, minlength=blk.ni1).float()
            for so2, si2 in itertools.product(range(blk.no2), range(blk.ni2)):
                so1, si1 = so2 % blk.no1, si2 % blk.ni1
                slot_maps[g, blk.slot_new + so2 * blk.ni2 + si2, blk.slot_old + so1 * blk.ni1 + si1] = 1.0 / count_in[si1]
        depth = {"full": torch.zeros(tgt["L"], src["L"])}
        for l2, (l1, _) in enumerate(plan.depth_map):
            depth["full"][l2, l1] = 1.0
        depth["writers"] = depth["full"].clone()
        depth["writers"][torch.tensor(inserted, dtype=torch.bool)] = 0.0

        cores = {m: torch.zeros(rank, tgt[m], src[m], rank) for m in RING}
        self._copy_groups: dict[int, AxisMap] = {}  # channel -> S_I's copy groups (for the noise)
        maps = []
        for g, (i_key, o_key, d_key) in enumerate(self.channels):
            in_mat, in_map = self._unit_map("I", i_key)
            out_mat, _ = self._unit_map("O", o_key)
            maps.append((in_mat, out_mat))
            cores["B"][g, :, :, g] = slot_maps[g]
            cores["I"][g, :, :, g] = in_mat
            cores["O"][g, :, :, g] = out_mat
            cores["L"][g, :, :, g] = depth[d_key]
            self._copy_groups[g] = in_map
        if self.ring_init == "echo":
            # Another channel's maps in three cores, S_L zero: exact, and S_L of these
            # channels gets a full-size gradient at the first step.
            for r in range(len(self.channels), rank):
                g = (r - len(self.channels)) % len(self.channels)
                cores["B"][r, :, :, r] = slot_maps[g]
                cores["I"][r, :, :, r] = maps[g][0]
                cores["O"][r, :, :, r] = maps[g][1]
        for m in RING:
            self.params[f"ring.{m}"] = cores[m]
        self.active = list(range(len(self.channels)))

    def _unit_map(self, mode: str, key: str) -> tuple[torch.Tensor, AxisMap]:
        """A channel's copy map of one unit mode: the matrix (with the homogeneous unit on
        the I side) and the unit map it realises (dead and padding units marked -1)."""
        u1, u2 = self.units[mode]
        if key == "shared":
            m = circular(u1, u2)
            pad_rows = torch.zeros(u2, dtype=torch.bool)
        else:  # the role's own unit map (dead units -1)
            place = self.places[(mode, key[len("role:"):])]
            m, pad_rows = place.own, place.own_pad
        real = ~m.pad
        mat = torch.zeros(u2, u1)
        mat[torch.arange(u2)[real], m.index[real]] = (1.0 / m.count[real]) if mode == "I" else 1.0
        if mode == "O" and self.maps.pad_value == "mean" and pad_rows.any():
            # A residual padding unit writes the mean of the stream (LEMON), as the copy operator does.
            mat[pad_rows, : self.plan.old.residual] = 1.0 / self.plan.old.residual
        if mode == "I":
            full = torch.zeros(u2 + 1, u1 + 1)
            full[:-1, :-1] = mat
            full[-1, -1] = 1.0  # the homogeneous unit: a bias is copied, never split
            mat = full
        return mat, m

    def _init_outside(self) -> None:
        """Recipes for tensors outside the ring (module docstring): residual pair, depth vectors."""
        plan = self.plan
        m = self.maps.maps["residual"]
        if self.residual == "separate":
            self.params["residual.out"] = _initial_matrix(m, "out", self.maps.pad_value)
            self.params["residual.in"] = _initial_matrix(m, "in", self.maps.pad_value)
        else:
            # The residual frame of the channel that reads it (S_res) and of the one that writes it (E_res).
            self.tied_channel = {}
            for side, mode in (("in", "I"), ("out", "O")):
                g = next((g for b, g in zip(self.blocks, self.channel_of)
                          if (b.inp if mode == "I" else b.out).role == "residual"), None)
                if g is None:
                    raise UsageError("--ring-residual tied needs ring matrices that read and write the residual stream",
                                     hint="use --ring-residual separate")
                self.tied_channel[side] = g
        self.recipes: dict[str, tuple] = {}
        for target in plan.targets:
            spec = target.spec
            if spec.name not in self.outside_names:
                continue
            depth = None
            if spec.per_layer:
                depth = f"depth.{target.name}"
                coef = torch.zeros(plan.old.layers)
                if not (target.inserted and plan.spec.depth_mode == "identity" and spec.writes_residual):
                    coef[target.source_layer] = 1.0
                self.params[depth] = coef
            steps = []
            for axis, roles in enumerate(spec.axes):
                side = "in" if axis == spec.in_axis else "out"
                segs = []
                for role in roles:
                    old = plan.old.role_size(role)
                    rm = self.maps.maps.get(role)
                    if rm is None or rm.is_identity:
                        size = target.source_shape[axis] if old is None else old
                        segs.append((size, None))
                    elif role == "residual":
                        segs.append((old, f"residual.{side}"))
                    else:
                        key = f"fixed.{side}.{role}"
                        if key not in self.buffers:
                            self.buffers[key] = _initial_matrix(rm, side, self.maps.pad_value)
                        segs.append((old, key))
                if any(k for _, k in segs):
                    steps.append((axis, tuple(segs)))
            pad_fill = None
            if spec.kind in ("norm_weight", "norm_bias") and m.pad.any():
                pad_fill = 1.0 if spec.kind == "norm_weight" else 0.0
            scale = 1.0
            if spec.kind == "norm_weight" and plan.residual_pad:
                scale *= math.sqrt(plan.norm_scale)
            if spec.name in self.head_norms:
                scale /= plan.width_multiple
            self.recipes[target.name] = (depth, tuple(steps), pad_fill, scale)

    def _add_noise(self) -> None:
        if self.noise == 0:
            return
        eps, rank, active = self.noise, self.rank, set(self.active)
        for m in RING:
            core = self.params[f"ring.{m}"]
            gen = operator_seed(self.seed, f"mango:ring.{m}")
            # Entry std ε/sqrt(fan-in): a row of noise has norm ~ε × a copy row's norm.
            std = eps / math.sqrt(core.shape[2])
            if m == "I":
                std *= self.units["I"][0] / self.units["I"][1]  # S_I's copy rows hold 1/count
            noise = torch.randn(core.shape, generator=gen) * std
            if self.noise_mode == "plain":
                core += noise
                continue
            if m not in ("I", "L"):
                continue  # S_B and S_O stay exact: every path off the active channels meets a zero
            if m == "L" and self.ring_init == "echo":
                continue  # echo channels are exact only while S_L is zero off the active blocks
            for c, d in itertools.product(range(rank), repeat=2):
                if c in active and d in active:
                    if m == "I" and c == d:
                        # Zero-sum over the copies of each unit; dead and padding rows stay exact.
                        copies = self._copy_groups[c]
                        block = torch.randn(copies.index.numel(), copies.old_size, generator=gen)
                        block = _zero_sum_over_copies(block * (eps / math.sqrt(copies.old_size)) / copies.count[:, None], copies)
                        block[copies.pad] = 0.0
                        core[c, :-1, :-1, d] += block
                    continue
                core[c, :, :, d] += noise[c, :, :, d]
        if self.residual == "separate":
            rm = self.maps.maps["residual"]
            for side in ("in", "out"):
                if side == "out" and self.noise_mode != "plain":
                    continue
                mat = self.params[f"residual.{side}"]
                gen = operator_seed(self.seed, f"mango:residual.{side}")
                row = (1.0 / rm.count) if side == "in" else torch.ones(rm.index.numel())
                noise = torch.randn(mat.shape, generator=gen) * (eps / math.sqrt(rm.old_size)) * row[:, None]
                if side == "in" and self.noise_mode == "exact":
                    noise = _zero_sum_over_copies(noise, rm)
                noise[rm.pad] = 0.0
                mat += noise

    # -- LearnedOperator ---------------------------------------------------------------

    def param_group(self, name: str) -> str:
        return name if name.startswith("ring.") else name.split(".")[0]

    def lr_scale(self, name: str) -> float:
        return float(self.lr_scales.get(self.param_group(name), 1.0))

    def to(self, device) -> None:
        super().to(device)
        self.buffers = {k: v.to(self.device) for k, v in self.buffers.items()}
        self._cache = None

    # -- the source side ---------------------------------------------------------------

    def _source_tensors(self) -> dict[str, torch.Tensor]:
        """M1 (key "M") and the tensors outside the ring (per-layer ones stacked [L, ...])."""
        if self._src is None:
            src, plan, out = self.source, self.plan, {}
            sizes = self.mode_sizes()["source"]
            m1 = torch.zeros(sizes["B"], sizes["I"], sizes["O"], sizes["L"])
            hom = self.units["I"][0]
            for layer in range(plan.old.layers):
                for spec in self.ring_specs:
                    w = src.get(spec, layer).to(torch.float32).movedim(spec.in_axis, 0)  # [in, out]
                    bias_spec = self.bias_of.get(spec.name)
                    bias = src.get(bias_spec, layer).to(torch.float32) if bias_spec is not None else None
                    for blk in (b for b in self.blocks if b.spec is spec):
                        sub = w[blk.inp.start_old:blk.inp.start_old + blk.inp.old,
                                blk.out.start_old:blk.out.start_old + blk.out.old]
                        grid = _to_grid(sub, blk.ni1, self.units["I"][0], blk.no1, self.units["O"][0])
                        m1[blk.slot_old:blk.slot_old + blk.slots_old, :hom, :, layer] = grid
                        if bias is not None and blk.first_in:
                            seg = bias[blk.out.start_old:blk.out.start_old + blk.out.old]
                            pieces = _to_pieces(seg, blk.no1, self.units["O"][0])  # [no1, U]
                            m1[blk.slot_old + torch.arange(blk.no1) * blk.ni1, hom, :, layer] = pieces
            out["M"] = m1
            out.update(self.stacked_source(self.outside))
            self._src = {k: v.to(self.device) for k, v in out.items()}
        return self._src

    # -- the ring ----------------------------------------------------------------------

    def chunk_size(self) -> int:
        """Target indices of the first core per chunk, so the largest intermediate stays
        under ``chunk_mb`` (fp32)."""
        sizes = self.mode_sizes()
        first = self.order[0][0]
        _, peak = contraction_cost(self.order, sizes["source"], sizes["target"], self.rank)
        per_index = peak / sizes["target"][first]
        return max(1, min(sizes["target"][first], int(self.chunk_mb * 2**20 / 4 // per_index)))

    def ring_output(self) -> torch.Tensor:
        """M2 [B2, I2, O2, L2]. Without gradients the result is cached until a core changes."""
        cores = {m: self.params[f"ring.{m}"] for m in RING}
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores.values())
        key = tuple((id(c), c._version) for c in cores.values()) + (torch.is_autocast_enabled(self.device.type),)
        if not grad and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        m1 = self._source_tensors()["M"]
        chunk = self.chunk_size()
        m2 = contract(cores, m1, self.order, chunk=chunk, checkpoint=grad)
        self._cache = None if grad else (key, m2)
        return m2

    def _read_block(self, m2l: torch.Tensor, blk: _Block) -> torch.Tensor:
        """One block of a target matrix, [in units, out units], from M2 at one layer."""
        (_, ui2), (_, uo2) = self.units["I"], self.units["O"]
        grid = m2l[blk.slot_new:blk.slot_new + blk.slots_new, :ui2, :]
        # [no2, ni2, ui2, uo2] -> [ui2, ni2, uo2, no2]: position u * n + s along each axis
        grid = grid.reshape(blk.no2, blk.ni2, ui2, uo2).permute(2, 1, 3, 0).reshape(ui2 * blk.ni2, uo2 * blk.no2)
        rb_in = self.buffers[f"readback.I.{blk.inp.role}"]
        rb_out = self.buffers[f"readback.O.{blk.out.role}"]
        return grid.index_select(0, rb_in).index_select(1, rb_out)

    def _read_bias(self, m2l: torch.Tensor, blk: _Block) -> torch.Tensor:
        hom = self.units["I"][1]
        uo2 = self.units["O"][1]
        col = m2l[blk.slot_new:blk.slot_new + blk.slots_new, hom, :].reshape(blk.no2, blk.ni2, uo2)
        # Every in-piece's homogeneous column belongs to the bias: the slot map splits a
        # source piece over its copies, and the copies' sum is the bias.
        col = col.sum(dim=1).transpose(0, 1).reshape(uo2 * blk.no2)
        return col.index_select(0, self.buffers[f"readback.O.{blk.out.role}"])

    def _ring_tensor(self, target: TargetTensor, m2: torch.Tensor) -> torch.Tensor:
        m2l = m2[..., target.layer]
        spec = target.spec
        if spec.name in self.matrix_of:  # a bias
            matrix = self.matrix_of[spec.name]
            parts = [self._read_bias(m2l, b) for b in self.blocks if b.spec is matrix and b.first_in]
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        rows = []
        blocks = [b for b in self.blocks if b.spec is spec]
        for first in (b for b in blocks if b.out.start_old == 0):
            row = [self._read_block(m2l, b) for b in blocks if b.inp == first.inp]
            rows.append(torch.cat(row, dim=1) if len(row) > 1 else row[0])
        w = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]  # [in, out]
        return w.movedim(0, spec.in_axis)

    def _outside_tensor(self, target: TargetTensor) -> torch.Tensor:
        depth, steps, pad_fill, scale = self.recipes[target.name]
        w = self._source_tensors()[target.spec.name]
        if depth is not None:
            w = torch.tensordot(self.params[depth], w, dims=1)
        for axis, segs in steps:
            parts = torch.split(w, [old for old, _ in segs], dim=axis) if len(segs) > 1 else (w,)
            grown = []
            for part, (_, key) in zip(parts, segs):
                if key is None:
                    grown.append(part)
                    continue
                mat = self._residual_matrix(key.split(".")[1]) if key.startswith("residual.") else self.buffers[key]
                moved = part.movedim(axis, 0)
                g = mat @ moved.reshape(mat.shape[1], -1)
                grown.append(g.reshape(mat.shape[0], *moved.shape[1:]).movedim(0, axis))
            w = torch.cat(grown, dim=axis) if len(grown) > 1 else grown[0]
        if pad_fill is not None:
            pad = self.maps.maps["residual"].pad.to(w.device)
            w = torch.where(pad, torch.full_like(w, pad_fill), w)
        if scale != 1.0:
            w = w * scale
        return w

    def _residual_matrix(self, side: str) -> torch.Tensor:
        if self.residual == "separate":
            return self.params[f"residual.{side}"]
        mode, g = ("I" if side == "in" else "O"), self.tied_channel[side]
        core = self.params[f"ring.{mode}"][g, :, :, g]
        d1 = self.plan.old.residual
        return core.index_select(0, self.buffers[f"readback.{mode}.residual"])[:, :d1]

    def compute(self, target: TargetTensor) -> torch.Tensor:
        if target.spec.name in self.outside_names:
            w = self._outside_tensor(target)
        else:
            w = self._ring_tensor(target, self.ring_output())
        assert tuple(w.shape) == target.shape, (target.name, tuple(w.shape), target.shape)
        return w

    def materialise(self) -> dict[str, torch.Tensor]:
        m2 = self.ring_output()  # once per call: every ring tensor is a slice of it
        out = {}
        for t in self.plan.targets:
            w = self._outside_tensor(t) if t.spec.name in self.outside_names else self._ring_tensor(t, m2)
            assert tuple(w.shape) == t.shape, (t.name, tuple(w.shape), t.shape)
            out[t.name] = w
        return out

    # -- reporting ---------------------------------------------------------------------

    def promise(self):
        p = super().promise()
        width, depth, noise, notes = p.width, p.depth, p.noise, list(p.notes)
        if self.inexact_roles:
            width = False
            notes.append("the ring's Kronecker copy map cannot reproduce the copy operator's map for "
                         + ", ".join(self.inexact_roles) + ": per-layer matrices start near, not at, the copy solution")
        notes += self.notes
        if self.noise > 0 and self.noise_mode == "plain":
            noise = False
            notes.append("plain noise on every core: not exact by design")
        return dataclasses.replace(p, width=width, depth=depth, noise=noise, notes=notes)

    def describe_options(self):
        sizes = self.mode_sizes()
        macs, _ = contraction_cost(self.order, sizes["source"], sizes["target"], self.rank)
        ring = sum(self.params[f"ring.{m}"].numel() for m in RING)
        return {
            **super().describe_options(),
            "rank": self.rank,
            "slot_grouping": self.grouping,
            "ring_init": self.ring_init,
            "ring_residual": self.residual,
            "noise": self.noise,
            "noise_mode": self.noise_mode,
            "modes": sizes,
            "contraction_order": "".join(m for m, _ in self.order),
            "contraction_macs": macs,
            "chunk": self.chunk_size(),
            "channels": ["/".join(sig) for sig in self.channels],
            "params": sum(t.numel() for t in self.params.values()),
            "ring_params": ring,
            "depth_vectors": sum(1 for k in self.params if k.startswith("depth.")),
            "inexact_roles": self.inexact_roles,
        }


def _unit_matrix(m: AxisMap, split: bool) -> torch.Tensor:
    new, old = m.index.numel(), m.old_size
    mat = torch.zeros(new, old)
    mat[torch.arange(new), m.index] = (1.0 / m.count) if split else 1.0
    return mat


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


@hookimpl
def register_operators(register):
    register(MangoOperator)
