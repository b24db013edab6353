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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..layout import NORM_KINDS, Dims, Layout, TensorSpec, split_role

HEAD_ROLES = ("attn", "kv")  # roles whose units come in heads of head_dim
QUERY, KEY, VALUE = "query", "key", "value"
PART_SLOTS = {("attn", 3): (QUERY, KEY, VALUE), ("kv", 2): (KEY, VALUE)}  # heads stored as parts
ROTARY_WORD = re.compile(r"(^|[_.])(rope|rotary)([_.]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Matrix:
    key: str  # parameter key (O's input when tied: not a parameter, made from tied_to)
    role: str  # the role whose copy map initialises it
    side: str  # "out" (written axis: copies) or "in" (read axis: splits)
    group: int  # units per matrix row: head_dim (or head_dim × parts) for whole heads, else 1
    tied_to: str | None = None


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
        return (Matrix(f"width.{side}.{role}" + ("" if role == "residual" else suffix), role, side, 1),)
    unit = 1 if att.rows else head_dim
    if times > 1:
        slots = PART_SLOTS.get((base, times))
        if slots is None or side == "in":  # heads of other parts: one matrix for the whole head, as copied
            return (Matrix(f"width.{side}.{role}{suffix}", role, side, head_dim * times),)
        return tuple(Matrix(f"width.out.{s}{suffix}", base, side, unit) for s in slots)
    if side == "in":
        if base == "attn" and att.tied:
            return (Matrix(f"width.in.attn{suffix}", base, side, unit, tied_to=f"width.out.{VALUE}{suffix}"),)
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


def state_numbers(att: Attention, specs: list[TensorSpec], old: Dims, new: Dims) -> int:
    """How many numbers LiGO trains for this growth, counted as the operator makes them."""
    shapes: dict[str, int] = {}
    per_layer = 0
    for spec in specs:
        if spec.per_layer:
            per_layer += 1
        for axis, roles in enumerate(spec.axes):
            side = "in" if axis == spec.in_axis else "out"
            for role, place in zip(roles, places(roles)):
                a, b = old.role_size(role), new.role_size(role)
                if a is None or a == b:  # fixed, or a map that is the identity: no matrix
                    continue
                for m in segment_matrices(att, spec, side, role, place, "L" if spec.per_layer else None, old.head_dim):
                    if m.tied_to is None:
                        shapes[m.key] = (new.role_size(m.role) // m.group) * (old.role_size(m.role) // m.group)
    width = sum(n * (new.layers if k.endswith(".L") else 1) for k, n in shapes.items())
    return width + new.layers * old.layers * per_layer
