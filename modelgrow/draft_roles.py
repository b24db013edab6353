"""The first half of `modelgrow layout draft` (modelgrow/drafting.py): from config.json
and the tensors' names and shapes, the config keys of the sizes, the per-layer name
template and each projection's and embedding's axis roles and `in` axis.

Naming knowledge (config key spellings, tensor-name cues) is data: ``data/draft_hints.json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from .errors import InputError
from .layout import LAYER

ATTN_FUNCS = ("q", "k", "v", "qkv", "attn_out")
# function -> (role of the axis it writes, role of the axis it reads); "qkv" is filled in per model.
FUNC_ROLES = {"q": ("attn", "residual"), "k": ("kv", "residual"), "v": ("kv", "residual"),
              "attn_out": ("residual", "attn"), "ffn_in": ("ffn", "residual"),
              "ffn_fused": ("ffn|ffn", "residual"), "ffn_out": ("residual", "ffn")}
RANKS = {"attn_in": 0, "q": 1, "qkv": 1, "k": 2, "v": 3, "attn_out": 4, "inner": 5, "attn_out_norm": 6,
         "ffn_in_norm": 7, "ffn_in": 8, "ffn_fused": 8, "ffn_out": 10, "ffn_out_norm": 11}
WEIGHT_LEAVES = ("weight", "gamma", "scale", "g")


@lru_cache(maxsize=1)
def hints() -> dict:
    return json.loads(resources.files("modelgrow.data").joinpath("draft_hints.json").read_text(encoding="utf-8"))


@dataclass
class Tensor:
    """One drafted tensor: a name template (``${layer}`` in the layer section) and its guesses."""

    name: str
    section: str
    shape: tuple[int, ...]
    axes: list[str] = field(default_factory=list)
    in_axis: int | None = None
    kind: str = "param"
    optional: bool = False
    normalises: list[str] = field(default_factory=list)
    runtime_scale: float | None = None
    function: str | None = None
    rank: float = 20

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    @property
    def segs(self) -> list[str]:
        """The module path inside the block (or the whole path outside it), lower case."""
        path = self.module.split(LAYER + ".", 1)[-1] if self.section == "layer" else self.module
        return [s.lower() for s in path.split(".") if s]

    def entry(self) -> dict:
        out: dict = {"name": self.name, "axes": self.axes}
        for key, value in (("in", self.in_axis), ("kind", None if self.kind == "param" else self.kind),
                           ("optional", self.optional or None), ("normalises", self.normalises or None)):
            if value is not None:
                out[key] = value
        if self.runtime_scale is not None:
            out["runtime_scale"] = {"by": "residual", "power": self.runtime_scale}
        return out


def matches(name: str, cues) -> bool:
    return any(c in name.lower() for c in cues)


class Drafter:
    """The tensor-level guesses: config keys of the sizes, the layer stack, projections' roles."""

    def __init__(self, ckpt):
        self.ckpt, self.config, self.hints, self.checks = ckpt, ckpt.config, hints(), []
        self.shapes = {n: tuple(ckpt.info(n).shape) for n in ckpt.names()}

    def check(self, line: str) -> None:
        self.checks.append(line)

    # -- sizes -------------------------------------------------------------------------

    def find_keys(self) -> None:
        """The config keys of the sizes, at the top level or one object down ("model_args.n_embd")."""
        scopes = [("", self.config)] + [(k + ".", v) for k, v in self.config.items() if isinstance(v, dict)]
        for prefix, scope in scopes:
            found = {}
            for role, names in self.hints["config_keys"].items():
                for n in (n for n in names if n in scope):
                    value = scope[n]
                    if isinstance(value, int) and not isinstance(value, bool) and value > 0 or \
                            value is None and role in ("ffn", "head_dim"):
                        found[role] = (prefix + n, value)
                        break
            if {"residual", "layers", "heads"} <= found.keys():
                self.keys = {role: key for role, (key, _) in found.items()}
                self.vals = {role: value for role, (_, value) in found.items()}
                return
        missing = [r for r in ("residual", "layers", "heads") if not any(n in self.config for n in self.hints["config_keys"][r])]
        tried = "; ".join(f"{r}: {', '.join(self.hints['config_keys'][r])}" for r in missing or ("residual", "layers", "heads"))
        raise InputError(f"config has no positive integer size key for {', '.join(missing) or 'the sizes'} (tried {tried})",
                         path=self.ckpt.config_path, hint="write the layout by hand (schemas/LAYOUT.md)")

    def size(self, role: str) -> int | None:
        total = 0
        for part in role.split("|"):
            base, _, times = part.partition("*")
            value = self.sizes.get(base)
            if value is None:
                return None
            total += value * int(times or 1)
        return total

    # -- the layer stack ---------------------------------------------------------------

    def find_stack(self) -> None:
        stacks: dict[str, dict[int, set[str]]] = {}
        for name in self.shapes:
            parts = name.split(".")
            i = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
            if i is not None:
                stacks.setdefault(".".join(parts[:i]), {}).setdefault(int(parts[i]), set()).add(".".join(parts[i + 1:]))

        def score(item):
            _, by_index = item
            return (set(by_index) == set(range(len(by_index))), len(by_index) == self.vals["layers"],
                    sum(map(len, by_index.values())))

        best = max(stacks.items(), key=score, default=None)
        if best is None or not score(best)[0]:
            raise InputError("no per-layer name pattern: no path segment numbers the tensors 0, 1, ..., L-1",
                             path=self.ckpt.path, hint="write the layout by hand (schemas/LAYOUT.md)")
        self.stack, by_index = best
        for other, indices in stacks.items():
            if other != self.stack and len(indices) == len(by_index) and score((other, indices))[0]:
                self.check(f"a second stack of {len(indices)} blocks under {other} (encoder-decoder?): a layout describes "
                           f"one stack ({self.stack or '(top level)'}); the other's tensors are drafted one by one")
        if len(by_index) != self.vals["layers"]:
            self.check(f"config {self.keys['layers']}={self.vals['layers']} but the tensors number "
                       f"{len(by_index)} layers under {self.stack or '(top level)'}")
        head = f"{self.stack}.{LAYER}." if self.stack else f"{LAYER}."
        self.layer_names = {}
        for index, rests in sorted(by_index.items()):
            for rest in sorted(rests):
                self.layer_names.setdefault(head + rest, f"{head.replace(LAYER, str(index))}{rest}")
        nested = sorted({t for t in self.layer_names if re.search(r"\.\d+\.", t[len(head) - 1:])})
        if nested:
            self.check(f"{nested[0]}: numbered modules inside a block (sublayers, experts?) are drafted one entry each; a mixture "
                       "of experts names them with ${expert} (schemas/LAYOUT.md)")
        for template, count in ((t, sum(t[len(head):] in r for r in by_index.values())) for t in self.layer_names):
            if count != len(by_index):
                self.check(f"{template} is stored in {count} of {len(by_index)} layers; a layout needs it in all")

    # -- tensors -----------------------------------------------------------------------

    def collect(self) -> list[Tensor]:
        stacked = re.compile("^" + re.escape(self.stack + "." if self.stack else "") + r"\d+\.")
        found = [Tensor(t, "layer", self.shapes[n]) for t, n in self.layer_names.items()]
        for name, shape in self.shapes.items():
            if not stacked.match(name):
                post = matches(name, self.hints["head_cues"]) or not matches(name, self.hints["embedding_cues"])
                found.append(Tensor(name, "post" if post else "pre", shape))
        keep, self.ignore = [], []
        for t in found:
            dtype = self.ckpt.info(self.layer_names.get(t.name, t.name)).dtype
            mask = len(t.shape) == 4 and t.shape[:2] == (1, 1) and t.leaf == "bias"
            if t.name.endswith(tuple(self.hints["ignore_suffixes"])) or not dtype.is_floating_point or mask:
                self.ignore.append(t.name)
            elif not t.shape:
                self.ignore.append(t.name)
                self.check(f"{t.name} is a scalar, which a layout cannot describe: ignored, so a grown checkpoint lacks it")
            else:
                keep.append(t)
        return keep

    def function_of(self, t: Tensor) -> str | None:
        segs, funcs = t.segs, self.hints["functions"]
        in_attn = any(s in self.hints["attention_context"] for s in segs[:-1])
        in_mlp = not in_attn and any(s in self.hints["mlp_context"] for s in segs[:-1])
        for seg in reversed(segs):
            cands = [f for f, names in funcs.items() if seg in names]
            if in_attn and len(cands) > 1:
                cands = [f for f in cands if f in ATTN_FUNCS]
            elif in_mlp:
                cands = [f for f in cands if f not in ATTN_FUNCS]
            if len(cands) == 1:
                return cands[0]
        return None

    def orient(self, t: Tensor, out_role: str, in_role: str, linear: bool) -> bool:
        """Set axes and ``in`` of a 2-D projection; False when its shape fits neither way."""
        want = (self.size(out_role), self.size(in_role))
        if t.shape == want and (linear or t.shape != want[::-1]):
            t.axes, t.in_axis = [out_role, in_role], 1
        elif t.shape == want[::-1]:
            t.axes, t.in_axis = [in_role, out_role], 0
        else:
            return False
        return True

    def fallback(self, t: Tensor) -> None:
        order = ("residual", "ffn", "attn", "kv", "head_dim", "vocab", "positions")
        t.axes = ["one" if s == 1 else next((r for r in order if self.sizes.get(r) == s), "labels") for s in t.shape]
        t.in_axis = 1 if len(t.shape) == 2 else None  # flipped below for [in, out] storage
        self.check(f"{t.name}: role unclear from its name; axes {t.axes} guessed from sizes {list(t.shape)}")

    def projections(self, tensors: list[Tensor]) -> None:
        matrices = [t for t in tensors if t.section == "layer" and len(t.shape) == 2]
        for t in matrices:
            t.function = self.function_of(t)
        if self.sizes.get("ffn") is None:
            guesses = [s for t in matrices if t.function in ("ffn_in", "ffn_out") for s in t.shape if s != self.sizes["residual"]]
            self.sizes["ffn"] = max(set(guesses), key=guesses.count) if guesses else None
        per_head = any(matches(t.name, self.hints["per_head_qkv"]) for t in matrices)
        qkv = "attn*3" if per_head and self.sizes["kv"] == self.sizes["attn"] else "attn|kv|kv"
        roles = {**FUNC_ROLES, "qkv": (qkv, "residual")}
        votes = [t.in_axis for t in matrices
                 if t.function and t.shape[0] != t.shape[1] and self.orient(t, *roles[t.function], linear=True)]
        linear = votes.count(0) <= votes.count(1)
        for t in matrices:
            if t.function is None or not self.orient(t, *roles[t.function], linear=linear):
                t.function = None
                self.fallback(t)
            elif t.function == "qkv":
                order = "per head (q, k, v of head 0, then head 1, ...)" if qkv == "attn*3" else "all queries, then keys, then values"
                self.check(f"{t.name}: fused q/k/v drafted as {qkv}: {order}; confirm the stored order")
            if not linear:
                t.in_axis = 1 - t.in_axis if t.function is None and t.in_axis is not None else t.in_axis
            t.rank = RANKS.get(t.function or "", 20) + (0.5 if re.search(r"up|w3|wi_1", t.segs[-1] if t.segs else "") else 0)
        if not linear:
            self.check("projections are stored [in, out] (Conv1D, as GPT-2): 'in' is 0 for them")
        for t in (t for t in tensors if t.section == "layer" and len(t.shape) > 2):
            self.fallback(t)

    def embeddings_and_heads(self, t: Tensor) -> None:
        d, name = self.sizes["residual"], t.name.lower()
        cue = ("positions" if matches(name, self.hints["position_cues"]) else
               "token_types" if matches(name, self.hints["token_type_cues"]) else None)

        def role(size: int) -> str:
            if size == 1:
                return "one"
            if cue:
                return cue
            return next((r for r in ("vocab", "positions") if self.sizes.get(r) == size), "labels")

        if len(t.shape) == 4:
            t.axes, t.in_axis = ["residual" if t.shape[0] == d else role(t.shape[0]), "channels", "pixels", "pixels"], 1
            t.rank = 3
        elif len(t.shape) == 2 and t.shape[1] == d:
            pre = t.section == "pre"
            rows = role(t.shape[0]) if pre else ("vocab" if t.shape[0] == self.sizes.get("vocab") else
                                                  "residual" if t.shape[0] == d else "labels")
            t.axes, t.in_axis = [rows, "residual"], 0 if pre else 1
            t.rank = {"vocab": 0, "positions": 1, "token_types": 2}.get(rows, 3) if pre else (9 if rows == "vocab" else 3)
        elif len(t.shape) >= 2:
            last = len(t.shape) - 1
            t.axes = ["residual" if s == d and (i == last or not cue) else role(s) for i, s in enumerate(t.shape)]
            t.rank = 4
        if t.axes and "labels" in t.axes:
            self.check(f"{t.name}: axes {t.axes}: 'labels' stands for a size no config key gives; confirm it is fixed")

    def run(self) -> list[Tensor]:
        self.find_keys()
        v = self.vals
        heads, kv = v["heads"], v.get("kv_heads") or v["heads"]
        head_dim = v.get("head_dim") or v["residual"] // heads
        self.sizes = {"residual": v["residual"], "attn": heads * head_dim, "kv": kv * head_dim, "head_dim": head_dim,
                      "ffn": v.get("ffn"), "vocab": v.get("vocab"), "positions": v.get("positions")}
        self.find_stack()
        tensors = self.collect()
        self.projections(tensors)
        for t in tensors:
            if t.section != "layer" and len(t.shape) > 1:
                self.embeddings_and_heads(t)
        return tensors
