"""The exactness promise of a growth: which parts preserve the function, and why not.

``make_plan`` (modelgrow.plan) starts from a promise that everything is exact and lowers
it with a note per reason; operators may lower it further (plain noise, a fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .layout import Dims


@dataclass
class Promise:
    """Which parts of the growth preserve the function exactly, and why not."""

    width: bool = True
    heads: bool = True
    depth: bool = True
    noise: bool = True  # False when symmetry-breaking noise changes the function
    experts: bool = True  # False when sparse upcycling's routing does not give the dense FFN back
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.width and self.heads and self.depth and self.noise and self.experts

    def as_dict(self) -> dict:
        return {
            "exact": self.exact,
            "width": self.width,
            "heads": self.heads,
            "depth": self.depth,
            "noise": self.noise,
            "experts": self.experts,
            "notes": list(self.notes),
        }


def norm_promises(layout, old: Dims, new: Dims, promise: Promise) -> None:
    """What output and inner norms (schemas/LAYOUT.md, "kind") allow."""
    kinds = {t.kind for t in layout.tensors}
    padded = new.residual % old.residual != 0
    if padded and layout.norm_type == "layernorm" and kinds & {"output_norm_weight", "output_norm_bias"}:
        promise.width = False
        promise.notes.append("non-integer width: the zero padding of a sublayer's output moves its LayerNorm's mean, not exact")
    for t in layout.tensors:
        if t.kind != "inner_norm_weight":
            continue
        role = t.axes[0][0]
        pairs = {"attn": (old.heads, new.heads), "kv": (old.kv_heads, new.kv_heads)}
        if role in pairs and pairs[role][1] % pairs[role][0]:
            promise.heads = False
            promise.notes.append(f"{t.name.split('.')[-2]} normalises all heads together: {pairs[role][0]} -> "
                                 f"{pairs[role][1]} heads is not a whole multiple, its statistics change: not exact")
        elif padded and layout.eps_key and not t.normalises:
            promise.width = False
            promise.notes.append(f"{t.name.split('.')[-2]} shares the padded residual's eps but its layout names no "
                                 "inputs to rescale: not exact")
    if padded and layout.eps_key and any(t.kind == "inner_norm_weight" and t.normalises for t in layout.tensors):
        promise.notes.append("q/k norms share the residual eps: their inputs take sqrt(s), so they see the eps they had")
