"""Depth recipes: which source block every target block is made from.

A layer map lists, in target order, the source layer each target layer copies.
``--layers "0-23,8-31"`` is SOLAR's depth up-scaling (two copies of a 32-layer model
with 8 layers cut from each seam: 48 layers) or any slice list of a mergekit
passthrough merge; a ``+`` after an index (``3+``) makes that copy an identity block
(its residual writers zeroed: it adds nothing until trained). ``--insert`` places
identity blocks without writing the map: ``every:4`` after every 4th source layer
(LLaMA Pro), ``end`` after the last layer, or the source layers to follow (``3,7``).

Each target layer is (source layer, inserted, identity): ``inserted`` for every block
that is not the first plain copy of its source layer in its place, ``identity`` for the
zeroed ones. Only identity insertions into the unchanged sequence 0..L-1 keep the
function; the plan says why anything else does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

_TOKEN = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?\s*(\+?)$")


@dataclass(frozen=True)
class LayerMap:
    sources: tuple[int, ...]  # per target layer: the source layer it copies
    identity: tuple[bool, ...]  # per target layer: an identity block (writers zeroed)

    @property
    def inserted(self) -> tuple[bool, ...]:
        """Blocks added by the growth: identity blocks, and repeats after a layer's first plain copy."""
        seen, out = set(), []
        for s, ident in zip(self.sources, self.identity):
            out.append(ident or s in seen)
            if not ident:
                seen.add(s)
        return tuple(out)

    def depth_map(self) -> list[tuple[int, bool]]:
        return list(zip(self.sources, self.inserted))

    def not_exact(self, old_layers: int) -> list[str]:
        """Why this map changes the function (empty when it does not)."""
        kept = [s for s, ident in zip(self.sources, self.identity) if not ident]
        reasons = []
        missing = sorted(set(range(old_layers)) - set(kept))
        if missing:
            reasons.append(f"source layers {_ranges(missing)} are removed: not exact")
        if len(kept) > len(set(kept)):
            repeats = sorted({s for s in kept if kept.count(s) > 1})
            reasons.append(f"source layers {_ranges(repeats)} run twice as full copies: not exact")
        if not missing and len(kept) == len(set(kept)) and kept != sorted(kept):
            reasons.append("the layer map reorders source layers: not exact")
        return reasons


def parse_layers(text: str, old_layers: int) -> LayerMap:
    """``"0-23,8-31"``, ``"0-3,3+,4-7,7+"``: inclusive ranges or single source layers."""
    sources, identity = [], []
    for token in (t.strip() for t in str(text).split(",")):
        m = _TOKEN.match(token)
        if not m:
            raise UsageError(f"--layers: {token!r} is not a layer, a range or an identity block",
                             hint='write source layers in target order, e.g. "0-23,8-31" or "0-3,3+,4-7"')
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise UsageError(f"--layers: range {token!r} runs backwards", hint=f"write {last}-{first} in increasing order")
        if last >= old_layers:
            raise UsageError(f"--layers: layer {last} is out of range: the source has layers 0-{old_layers - 1}")
        for s in range(first, last + 1):
            sources.append(s)
            identity.append(m.group(3) == "+")
    if not sources:
        raise UsageError("--layers is empty", hint='list source layers in target order, e.g. "0-23,8-31"')
    return LayerMap(tuple(sources), tuple(identity))


def insert_identity(where: str, old_layers: int) -> LayerMap:
    """Identity blocks placed by ``--insert``: ``every:K``, ``end`` or source layers ``3,7``."""
    where = str(where).strip()
    if where.startswith("every:"):
        k = where.split(":", 1)[1].strip()
        if not k.isdigit() or not 1 <= int(k) <= old_layers:
            raise UsageError(f"--insert {where}: K must be a whole number from 1 to {old_layers}",
                             hint="every:4 adds an identity block after every 4th layer (LLaMA Pro)")
        after = [i for i in range(old_layers) if (i + 1) % int(k) == 0]
    elif where == "end":
        after = [old_layers - 1]
    else:
        try:
            after = sorted(int(t) for t in where.split(","))
        except ValueError:
            raise UsageError(f"--insert {where!r} is not every:K, end or a list of source layers",
                             hint="e.g. --insert every:4, --insert end or --insert 3,7") from None
        bad = [i for i in after if not 0 <= i < old_layers]
        if bad:
            raise UsageError(f"--insert: layer {bad[0]} is out of range: the source has layers 0-{old_layers - 1}")
    sources, identity = [], []
    for i in range(old_layers):
        sources.append(i)
        identity.append(False)
        for _ in range(after.count(i)):
            sources.append(i)
            identity.append(True)
    return LayerMap(tuple(sources), tuple(identity))


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    out, start = [], None
    for i, s in enumerate(layers):
        if start is None:
            start = s
        if i + 1 == len(layers) or layers[i + 1] != s + 1:
            out.append(str(start) if start == s else f"{start}-{s}")
            start = None
    return ", ".join(out)
