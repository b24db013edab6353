"""The mango operator's starting ring: which channels the copy solution needs, the cores
that hold it, and the symmetry-breaking noise that keeps it (docs/mango.md §4).

Each channel c holds one Kronecker product of copy maps in the cores' diagonal blocks
S_X[c, :, :, c]: S_B the slot copy map (piece s2 -> s2 mod n1, split by the piece count
on the in side), S_I the unit copy map divided by the copy count (the homogeneous unit
maps to itself with 1), S_O the unit copy map, S_L the plan's depth map (the writers'
channel with inserted layers' rows at zero). A channel's signature is its (I map, O map,
depth map); every distinct signature among the blocks needs a channel of its own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..maps import AxisMap, RoleMaps, circular
from .expansions import copy_matrix, zero_sum_over_copies
from .learned import operator_seed
from .slots import SlotBlock, SlotLayout, same_unit_map
from .tensor_ring import RING


@dataclass(frozen=True)
class Channels:
    signatures: list[tuple[str, str, str]]  # per channel: (I map, O map, depth map), first-seen order
    of_block: list[int]  # the channel of each slot block
    own: set[tuple[str, str]]  # (mode, role) read on the role's own unit map
    inexact_roles: list[str]  # roles whose copy map the start does not reproduce
    depth_fallback: bool  # rank 1: inserted blocks start all zero, readers too
    notes: list[str]


def _signatures(layout: SlotLayout):
    """The roles that can carry their own unit map, and each block's channel signature."""
    # A role whose copy map the shared circular unit map cannot reproduce (residual
    # padding, a kv ratio unlike the width's) can carry its own unit map when its copy
    # map factors into unit x piece; every distinct (I map, O map, depth map) then
    # needs its own ring channel: exact when the rank has room for all of them.
    places = layout.places
    fixable = {key for key, p in places.items() if not p.exact and p.own is not None}
    # Roles whose own maps are equal share a channel (GPT-2's attn and kv, say).
    canon = {}
    for mode, role in sorted(fixable):
        p = places[(mode, role)]
        canon[(mode, role)] = next(r for (m, r) in sorted(fixable) if m == mode and same_unit_map(places[(m, r)], p))

    def signature(blk: SlotBlock, own: set, writers: bool) -> tuple[str, str, str]:
        i = f"role:{canon[('I', blk.inp.role)]}" if ("I", blk.inp.role) in own else "shared"
        o = f"role:{canon[('O', blk.out.role)]}" if ("O", blk.out.role) in own else "shared"
        return i, o, "writers" if writers and blk.writer else "full"

    return fixable, signature


def exact_rank(layout: SlotLayout, identity: bool) -> int:
    """The smallest rank whose start is exact for this growth (``identity``: the plan has
    identity depth blocks): one ring channel per distinct (I map, O map, depth map) that
    the copy start wants, at least 1 (``--rank``'s default, docs/mango.md §6).

    Counting the writers' depth map as a channel of its own keeps this off the rank-1
    fallback: there an identity block's readers start at zero with its writers. That is
    function-preserving, but it is not the copy operator's start, and the block is
    dormant: only its writers' biases get a gradient, and a block without such biases
    (Llama) never wakes. So a plan with identity blocks gets 2 or more; a width-only
    growth whose roles all sit on the shared map gets 1. Roles whose copy map does not
    factor into unit x piece stay inexact at every rank, so they add no channel here.
    """
    fixable, signature = _signatures(layout)
    split_writers = identity and any(b.writer for b in layout.blocks)
    return max(1, len({signature(b, fixable, split_writers) for b in layout.blocks}))


def plan_channels(plan, rank: int, layout: SlotLayout) -> Channels:
    """The channels an exact start needs, or the fallback when ``rank`` has no room."""
    notes = []
    # Identity depth growth zeroes the residual writers of identity blocks only.
    split_writers = any(plan.identity) and any(b.writer for b in layout.blocks)
    places = layout.places
    fixable, signature = _signatures(layout)
    wanted = {signature(b, fixable, split_writers) for b in layout.blocks}
    if len(wanted) <= rank:
        own, writers = fixable, split_writers
    else:
        own, writers = set(), split_writers and rank >= 2
        notes.append(f"rank {rank} has no room for the {len(wanted)} ring channels that an exact start needs "
                     f"here; use --rank {len(wanted)} or more")
    # Rank 1 cannot zero the writers alone; zeroing the whole inserted block is the
    # nearest function the ring can express (exact: the block adds nothing).
    depth_fallback = split_writers and not writers
    if depth_fallback:
        notes.append("rank 1 cannot zero only the residual writers of inserted layers: their ring matrices "
                     "start at zero, readers too (exact, but the block wakes only through its biases' "
                     "gradient); use --rank 2 or more")
    inexact_roles = sorted(f"{role} ({mode})" for (mode, role), p in places.items()
                           if not p.exact and (mode, role) not in own)
    sigs = [signature(b, own, writers) for b in layout.blocks]
    if depth_fallback:  # one channel with the writers' depth map: every ringed matrix of the block at zero
        sigs = [(i, o, "writers") for i, o, _ in sigs]
    signatures = list(dict.fromkeys(sigs))  # first-seen order: channel 0 holds the first block
    return Channels(signatures, [signatures.index(sg) for sg in sigs], own, inexact_roles, depth_fallback, notes)


def unit_copy_matrix(mode: str, key: str, layout: SlotLayout, maps: RoleMaps,
                     residual: int) -> tuple[torch.Tensor, AxisMap]:
    """A channel's copy map of one unit mode: the matrix (with the homogeneous unit on
    the I side) and the unit map it realises (dead and padding units marked -1)."""
    u1, u2 = layout.units[mode]
    if key == "shared":
        m = circular(u1, u2)
        pad_rows = torch.zeros(u2, dtype=torch.bool)
    else:  # the role's own unit map (dead units -1)
        place = layout.places[(mode, key[len("role:"):])]
        m, pad_rows = place.own, place.own_pad
    # A residual padding unit writes the mean of the stream (LEMON), as the copy operator does.
    mat = copy_matrix(m, "in" if mode == "I" else "out", maps.pad_value, pad_rows=pad_rows, stream=residual)
    if mode == "I":
        full = torch.zeros(u2 + 1, u1 + 1)
        full[:-1, :-1] = mat
        full[-1, -1] = 1.0  # the homogeneous unit: a bias is copied, never split
        mat = full
    return mat, m


def copy_cores(plan, rank: int, ring_init: str, layout: SlotLayout, channels: Channels, maps: RoleMaps,
               sizes: dict[str, dict[str, int]]) -> tuple[dict[str, torch.Tensor], dict[int, AxisMap]]:
    """The cores S_X[rank, X2, X1, rank] of the copy start, and each active channel's
    S_I copy groups (for the noise)."""
    src, tgt = sizes["source"], sizes["target"]
    slot_maps = torch.zeros(len(channels.signatures), tgt["B"], src["B"])
    for blk, g in zip(layout.blocks, channels.of_block):
        count_in = torch.bincount(torch.arange(blk.ni2) % blk.ni1, minlength=blk.ni1).float()
        for so2, si2 in itertools.product(range(blk.no2), range(blk.ni2)):
            so1, si1 = so2 % blk.no1, si2 % blk.ni1
            slot_maps[g, blk.slot_new + so2 * blk.ni2 + si2, blk.slot_old + so1 * blk.ni1 + si1] = 1.0 / count_in[si1]
    depth = {"full": torch.zeros(tgt["L"], src["L"])}
    for l2, (l1, _) in enumerate(plan.depth_map):
        depth["full"][l2, l1] = 1.0
    depth["writers"] = depth["full"].clone()
    depth["writers"][torch.tensor(plan.identity, dtype=torch.bool)] = 0.0

    cores = {m: torch.zeros(rank, tgt[m], src[m], rank) for m in RING}
    copy_groups: dict[int, AxisMap] = {}  # channel -> S_I's copy groups
    unit_maps = []
    for g, (i_key, o_key, d_key) in enumerate(channels.signatures):
        in_mat, in_map = unit_copy_matrix("I", i_key, layout, maps, plan.old.residual)
        out_mat, _ = unit_copy_matrix("O", o_key, layout, maps, plan.old.residual)
        unit_maps.append((in_mat, out_mat))
        cores["B"][g, :, :, g] = slot_maps[g]
        cores["I"][g, :, :, g] = in_mat
        cores["O"][g, :, :, g] = out_mat
        cores["L"][g, :, :, g] = depth[d_key]
        copy_groups[g] = in_map
    if ring_init == "echo":
        # Another channel's maps in three cores, S_L zero: exact, and S_L of these
        # channels gets a full-size gradient at the first step.
        n = len(channels.signatures)
        for r in range(n, rank):
            g = (r - n) % n
            cores["B"][r, :, :, r] = slot_maps[g]
            cores["I"][r, :, :, r] = unit_maps[g][0]
            cores["O"][r, :, :, r] = unit_maps[g][1]
    return cores, copy_groups


def add_ring_noise(cores: dict[str, torch.Tensor], eps: float, mode: str, ring_init: str, active: list[int],
                   copy_groups: dict[int, AxisMap], units: dict[str, tuple[int, int]], seed: int) -> None:
    """Symmetry-breaking noise on the cores, in place (docs/mango.md §4)."""
    rank, active = cores["B"].shape[0], set(active)
    for m in RING:
        core = cores[m]
        gen = operator_seed(seed, f"mango:ring.{m}")
        # Entry std ε/sqrt(fan-in): a row of noise has norm ~ε × a copy row's norm.
        std = eps / math.sqrt(core.shape[2])
        if m == "I":
            std *= units["I"][0] / units["I"][1]  # S_I's copy rows hold 1/count
        noise = torch.randn(core.shape, generator=gen) * std
        if mode == "plain":
            core += noise
            continue
        if m not in ("I", "L"):
            continue  # S_B and S_O stay exact: every path off the active channels meets a zero
        if m == "L" and ring_init == "echo":
            continue  # echo channels are exact only while S_L is zero off the active blocks
        for c, d in itertools.product(range(rank), repeat=2):
            if c in active and d in active:
                if m == "I" and c == d:
                    # Zero-sum over the copies of each unit; dead and padding rows stay exact.
                    copies = copy_groups[c]
                    block = torch.randn(copies.index.numel(), copies.old_size, generator=gen)
                    block = zero_sum_over_copies(block * (eps / math.sqrt(copies.old_size)) / copies.count[:, None], copies)
                    block[copies.pad] = 0.0
                    core[c, :-1, :-1, d] += block
                continue
            core[c, :, :, d] += noise[c, :, :, d]
