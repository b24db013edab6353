"""Which expansion matrix grows each segment of a tensor under LiGO (modelgrow.operators.ligo),
decided from layout roles, tensor kinds and config values, never architecture names.

Attention, as in the paper (Wang et al. 2023, §3.2) and its code:

- *separate B_Q, B_K, B_V.* A written ``attn`` axis is the query. Of the written ``kv``
  axes, a fused one lists the key then the value (``attn|kv|kv``); separate projections
  are told apart by module (the tensor name without its last component, so a weight and
  its bias share one matrix): the module an inner norm ``normalises`` is the key, and
  without one the first kv module in layout order is the key, the second the value (the
  order of ``q|k|v``). ``attn*3`` heads store q, k, v side by side: one matrix per part.
  Where the layout does not resolve into one key and one value module, K and V share one
  matrix as before (``width.out.kv.L``).
- *O's input tied to V's output (A^O = B^V).* Sound with our head layout: O reads, head by
  head, what V wrote, so O's input can follow V's expansion. Two adjustments keep the
  copy start exact. The split: an in-expansion must divide each copy by its copy count
  (Net2Net's normalisation, which the paper's literal A = B cannot express), so
  S_O = diag(r) · B_V with r fixed at 1 / (copies of the unit the row starts on).
  Grouped-query attention: O reads ``heads`` heads, V writes ``kv_heads``; query head
  (g, j), the j-th of kv group g, reads value head g, so S_O = diag(r) · (B_V ⊗ I_G)
  over (g, j) (G query heads per kv head). That is only a tie while G is the same before
  and after growth; where it changes (``--kv-heads`` not in step) O's input is a free
  matrix again. Exact symmetry-breaking noise goes into a fixed zero-sum offset on O's
  side (``noise.in.attn.L``, a buffer): the tie holds throughout a fit, the learned
  parameter is B_V alone, and S_Oᵀ B_V is still the identity at the start.
- *Rows or whole heads.* The paper's B_Q, B_K, B_V mix rows of all heads. Rotary
  positions rotate pairs of a head's dimensions by position, so mixing a dimension with
  any other than the same one of another head breaks them; so do per-head tensors (a
  ``head_dim`` axis: q/k norms whose gain is indexed by a head's dimension). Rows are
  mixed only where positions are known not to be rotary: the layout has a learned
  position table (a ``positions`` axis) and no config key (at any depth) is a rotary
  setting (a ``rope``/``rotary`` word: ``rope_theta``, ``rope_scaling``, ``rotary_pct``,
  ``partial_rotary_factor``, ...) nor a ``position_embedding_type`` other than
  ``absolute``, and no tensor has a ``head_dim`` axis. Otherwise heads move whole
  ((H2 × H1) ⊗ I_head_dim), Q, K and V alike.

The FFN, as in the paper (A^fc2 = (B^fc1)ᵀ) and its code: the input expansion of the
tensors that read an FFN axis (the down projection) is tied to the per-layer
out-expansion of the tensors that write it (the up projection, and a gated FFN's gate,
which share one: ``width.out.ffn.L``), S_ffn = diag(r) · E_ffn with r the fixed copy
split, as for O. The same holds for a mixture of experts' FFN axes (``expert_ffn``, one
pair per layer shared by its experts, as before) and a shared expert's (``shared_ffn``).
Sound because reader and writer index one axis with one unit map and the activation
(and a gate's product) acts unit by unit, so copies of a unit stay copies through it at
the start. Where nothing in the layer writes the axis it reads, a reader's input is free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..layout import NORM_KINDS, Dims, Layout, TensorSpec, split_role

HEAD_ROLES = ("attn", "kv")  # roles whose units come in heads of head_dim
QUERY, KEY, VALUE = "query", "key", "value"
PART_SLOTS = {("attn", 3): (QUERY, KEY, VALUE), ("kv", 2): (KEY, VALUE)}  # heads stored as parts
FFN_ROLES = ("ffn", "expert_ffn", "shared_ffn")  # a reader's input expansion tied to the writers' output one
ROTARY_WORD = re.compile(r"(^|[_.])(rope|rotary)([_.]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Matrix:
    key: str  # parameter key (O's input when tied: not a parameter, made from tied_to)
    role: str  # the role whose copy map initialises it
    side: str  # "out" (written axis: copies) or "in" (read axis: splits)
    group: int  # units per matrix row: head_dim (or head_dim × parts) for whole heads, else 1
    tied_to: str | None = None  # the out-expansion a tied input expansion is made from
    repeat: int = 1  # a tied input over query heads: the query heads per value head it broadcasts over


@dataclass(frozen=True)
class Attention:
    rows: bool  # mix rows across heads (the paper's B), else whole heads
    rows_why: str
    slots: dict[str, str]  # separate key/value projections and their norms: tensor name -> KEY | VALUE
    value_role: str | None  # base role of the value's heads ("kv", or "attn" for attn*3); None: no value found
    groups: int  # query heads per value head (the same before and after growth when tied)
    tied: bool
    tie_why: str

    @classmethod
    def of(cls, layout: Layout, config: dict, old: Dims, new: Dims) -> Attention:
        rows, rows_why = head_mixing(layout, config)
        slots = kv_slots(layout)
        roles = [r for t in layout.tensors for axis in t.axes for r in axis]
        fused_kv = any(sum(r == "kv" for r in axis) == 2 for t in layout.tensors for axis in t.axes)
        value_role = ("attn" if "attn*3" in roles else "kv" if "kv*2" in roles or fused_kv or VALUE in slots.values()
                      else None)
        if value_role is None:
            return cls(rows, rows_why, slots, None, 1, False, "no value projection found among the kv writers")
        if value_role == "attn":
            return cls(rows, rows_why, slots, value_role, 1, True, "O's input follows V's output (per-head q|k|v)")
        g_old, g_new = old.heads // old.kv_heads, new.heads // new.kv_heads
        if g_old != g_new:
            return cls(rows, rows_why, slots, value_role, g_old, False,
                       f"query heads per key/value head change ({g_old} -> {g_new}): O's input is free")
        why = "O's input follows V's output" + (f", broadcast over {g_old} query heads per kv head" if g_old > 1 else "")
        return cls(rows, rows_why, slots, value_role, g_old, True, why)

    def describe(self) -> dict:
        return {"mixing": "rows" if self.rows else "heads", "mixing_why": self.rows_why,
                "key_value": "separate" if self.value_role else "shared",
                "output_input": "tied to value" if self.tied else "free", "output_input_why": self.tie_why}


def head_mixing(layout: Layout, config: dict) -> tuple[bool, str]:
    """Whether attention rows may mix across heads (True) or heads must move whole, and why."""
    for key, value in _config_items(config):
        if ROTARY_WORD.search(key):
            return False, f"config key {key!r}: rotary positions, heads move whole"
        if key.rsplit(".", 1)[-1] == "position_embedding_type" and value != "absolute":
            return False, f"config {key}={value!r}: positions inside attention, heads move whole"
    per_head = [t.name for t in layout.tensors if any("head_dim" in axis for axis in t.axes)]
    if per_head:
        return False, f"per-head tensor {per_head[0]!r} (head_dim axis): heads move whole"
    if not any("positions" in axis for t in layout.tensors for axis in t.axes):
        return False, "no learned position table (positions axis): positions may be rotary, heads move whole"
    return True, "learned position table and no rotary setting in the config: rows mix across heads"


def _config_items(config, prefix: str = ""):
    """(dotted key, value) of every config entry that is set, nested dicts included."""
    for key, value in (config.items() if isinstance(config, dict) else ()):
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _config_items(value, name + ".")
        elif value is not None:
            yield name, value


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def kv_slots(layout: Layout) -> dict[str, str]:
    """Separate key and value projections (an axis of the kv role alone, written), by tensor
    name; their inner norms take their slot. Empty unless exactly two such modules."""
    modules: list[str] = []
    for t in layout.tensors:
        if t.kind not in NORM_KINDS and any(axis == ("kv",) for i, axis in enumerate(t.axes) if i != t.in_axis):
            if _module(t.name) not in modules:
                modules.append(_module(t.name))
    if len(modules) != 2:
        return {}
    normalised = {_module(n) for t in layout.tensors if t.kind == "inner_norm_weight" for n in t.normalises}
    keys = [m for m in modules if m in normalised]
    key = keys[0] if len(keys) == 1 else modules[0]
    slot = {key: KEY, next(m for m in modules if m != key): VALUE}
    out = {t.name: slot[_module(t.name)] for t in layout.tensors if _module(t.name) in slot}
    for t in layout.tensors:
        found = {slot[_module(n)] for n in t.normalises if _module(n) in slot}
        if t.kind == "inner_norm_weight" and len(found) == 1:
            out[t.name] = found.pop()
    return out


def segment_matrices(att: Attention, spec: TensorSpec, side: str, role: str, place: tuple[int, int],
                     layer: int | str | None, head_dim: int) -> tuple[Matrix, ...]:
    """The matrices growing one segment (role) of ``spec``: one, or one per part of heads
    stored as parts. ``place``: (segments of this role before it, of this role in all) on its axis."""
    suffix = "" if layer is None else f".{layer}"
    base, times = split_role(role)
    if base not in HEAD_ROLES:
        key = f"width.{side}.{role}" + ("" if role == "residual" else suffix)
        if side == "in" and role in FFN_ROLES:  # reads what this layer's writers of the role wrote
            return (Matrix(key, role, side, 1, tied_to=f"width.out.{role}{suffix}"),)
        return (Matrix(key, role, side, 1),)
    unit = 1 if att.rows else head_dim
    if times > 1:
        slots = PART_SLOTS.get((base, times))
        if slots is None or side == "in":  # heads of other parts: one matrix for the whole head, as copied
            return (Matrix(f"width.{side}.{role}{suffix}", role, side, head_dim * times),)
        return tuple(Matrix(f"width.out.{s}{suffix}", base, side, unit) for s in slots)
    if side == "in":
        if base == "attn" and att.tied:
            return (Matrix(f"width.in.attn{suffix}", base, side, unit, tied_to=f"width.out.{VALUE}{suffix}",
                           repeat=att.groups),)
        return (Matrix(f"width.in.{base}{suffix}", base, side, unit),)
    if base == "attn":
        return (Matrix(f"width.out.{QUERY}{suffix}", base, side, unit),)
    slot = att.slots.get(spec.name)
    if place[1] == 2:  # fused: the key, then the value
        slot = (KEY, VALUE)[place[0]]
    return (Matrix(f"width.out.{slot or 'kv'}{suffix}", base, side, unit),)


def places(roles: tuple[str, ...]) -> list[tuple[int, int]]:
    """Each segment's (segments of its role before it, segments of its role) on one axis."""
    return [(roles[:i].count(r), roles.count(r)) for i, r in enumerate(roles)]


def broadcast(value: torch.Tensor, groups: int, unit: int) -> torch.Tensor:
    """B_V ⊗ I_G over query heads (g, j): [kv_new·unit, kv_old·unit] -> [heads_new·unit, heads_old·unit]
    (``unit``: matrix rows per head)."""
    if groups == 1:
        return value
    kn, ko = value.shape[0] // unit, value.shape[1] // unit
    eye = torch.eye(groups, dtype=value.dtype, device=value.device)
    out = torch.einsum("aubv,rs->arubsv", value.reshape(kn, unit, ko, unit), eye)
    return out.reshape(kn * groups * unit, ko * groups * unit)


def width_matrices(att: Attention, specs: list[TensorSpec], old: Dims,
                   new: Dims) -> dict[str, tuple[int, int, str | None]]:
    """Every width matrix LiGO makes for this growth, as the operator makes them (per-layer
    keys end in ``.L``): key -> (rows, columns, the out-expansion it is tied to or None).
    A tie to an out-expansion that nothing makes is no tie: the matrix is free."""
    found: dict[str, tuple[int, int, str | None]] = {}
    for spec in specs:
        for axis, roles in enumerate(spec.axes):
            side = "in" if axis == spec.in_axis else "out"
            for role, place in zip(roles, places(roles)):
                a, b = old.role_size(role), new.role_size(role)
                if a is None or a == b:  # fixed, or a map that is the identity: no matrix
                    continue
                for m in segment_matrices(att, spec, side, role, place, "L" if spec.per_layer else None, old.head_dim):
                    found[m.key] = (new.role_size(m.role) // m.group, old.role_size(m.role) // m.group, m.tied_to)
    return {k: (r, c, t if t in found else None) for k, (r, c, t) in found.items()}


def _times(key: str, new: Dims) -> int:
    return new.layers if key.endswith(".L") else 1


def state_numbers(att: Attention, specs: list[TensorSpec], old: Dims, new: Dims) -> int:
    """How many numbers LiGO trains for this growth, counted as the operator makes them:
    its free width matrices and a depth vector per per-layer tensor and target layer."""
    matrices = width_matrices(att, specs, old, new).items()
    width = sum(r * c * _times(k, new) for k, (r, c, tied) in matrices if tied is None)
    return width + new.layers * old.layers * sum(1 for spec in specs if spec.per_layer)


def fixed_numbers(att: Attention, specs: list[TensorSpec], old: Dims, new: Dims, noise: bool) -> int:
    """The numbers of the tied inputs' fixed buffers: a copy split per row and, with
    noise, an exact noise offset the size of the matrix."""
    ties = [(k, r, c) for k, (r, c, tied) in width_matrices(att, specs, old, new).items() if tied is not None]
    return sum((r + (r * c if noise else 0)) * _times(k, new) for k, r, c in ties)
