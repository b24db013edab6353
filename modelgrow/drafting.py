"""Draft a layout for an architecture no plugin knows (`modelgrow layout draft`).

From config.json and every tensor's name and shape (headers only; the norm gains are
the only values read) it proposes a layout: the per-layer name template, each axis's
role and `in` axis (draft_roles.py), then here norm kinds and placement, biases, the tie,
classes and the config sections. What the weights cannot show comes back as checks for
the author: an embedding multiplier, a post-LN placement, the order inside fused
projections, a parallel residual. Naming knowledge and the few families recognised by
name are data (``data/draft_hints.json``), not code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .architecture import Architecture
from .checkpoint import open_checkpoint
from .checkpoint.atomic import write_file_atomically
from .draft_roles import RANKS, WEIGHT_LEAVES, Drafter, Tensor, matches
from .errors import InputError, LayoutError, ModelgrowError, OutputError
from .layout import LAYER, RESIDUAL_NORM_KINDS, Layout, config_get
from .source import SourceModel


@dataclass
class Draft:
    """A drafted layout (a dict that validates with Layout.from_dict) and what to check."""

    layout: dict
    checks: list[str]

    def to_json(self) -> str:
        """The layout formatted like the built-in files: one tensor per line."""
        lines, items = ["{"], list(self.layout.items())
        for i, (key, value) in enumerate(items):
            comma = "," if i < len(items) - 1 else ""
            if key != "tensors":
                lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
                continue
            lines.append('  "tensors": {')
            sections = list(value.items())
            for j, (section, entries) in enumerate(sections):
                lines.append(f"    {json.dumps(section)}: [")
                lines += [f"      {json.dumps(e)}{',' if k < len(entries) - 1 else ''}" for k, e in enumerate(entries)]
                lines.append("    ]" + ("," if j < len(sections) - 1 else ""))
            lines.append("  }" + comma)
        return "\n".join(lines + ["}"]) + "\n"

    def write(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the JSON atomically; an existing file is replaced only with ``overwrite``."""
        path = Path(path)
        if path.is_dir():
            raise OutputError("is a folder; give a file name for the layout", path=path)
        if path.exists() and not overwrite:
            raise OutputError("exists", path=path, hint="pass --overwrite to replace it")
        write_file_atomically(path, self.to_json(), what="the drafted layout")


def draft_layout(path: str | Path, config_path: str | Path | None = None) -> Draft:
    """Draft a layout for the checkpoint at ``path`` from its config and tensor headers.

    Raises InputError (exit 3) when there is no config, no checkpoint, no size keys in
    the config or no per-layer name pattern. The draft validates; whether it binds its
    own checkpoint is tried, and a failure is one of the checks.
    """
    with open_checkpoint(path, config_path) as ckpt:
        drafter = Drafter(ckpt)
        layout = _Finisher(drafter, drafter.run()).layout()
        try:
            drafted = Layout.from_dict(layout, source="<draft>")
        except LayoutError as err:
            raise InputError(f"could not draft a valid layout: {err.problem}", path=ckpt.path) from None
        try:
            SourceModel(ckpt, Architecture(drafted))
        except ModelgrowError as err:
            drafter.check(f"the draft does not bind its own checkpoint yet: {err.problem}")
    drafter.check("a layout alone grows checkpoints; verify, fit, train and export also need a module "
                  "factory: package it as a plugin (schemas/LAYOUT.md, 'Writing a plugin')")
    return Draft(layout, drafter.checks)


class _Finisher:
    """Norms, biases, the tie, classes and config sections, on top of the projections' roles."""

    def __init__(self, drafter: Drafter, tensors: list[Tensor]):
        self.d, self.tensors, self.hints = drafter, tensors, drafter.hints
        self.config, self.sizes, self.check = drafter.config, drafter.sizes, drafter.check
        self.layer = [t for t in tensors if t.section == "layer"]

    def by_function(self, *functions: str) -> list[Tensor]:
        return [t for t in self.layer if t.function in functions]

    # -- 1-D tensors: biases and norms ------------------------------------------------

    def vectors(self) -> None:
        modules: dict[str, list[Tensor]] = {}
        for t in self.tensors:
            modules.setdefault(t.module, []).append(t)
        self.norms = []
        for t in (t for t in self.tensors if len(t.shape) == 1):
            weight = next((w for w in modules[t.module] if len(w.shape) >= 2 and w.axes), None)
            gain = next((w for w in modules[t.module] if len(w.shape) == 1 and w.leaf in WEIGHT_LEAVES), None)
            if weight is not None:  # a projection's bias: the role of the axis it writes
                t.axes, t.function, t.optional = [weight.axes[1 if weight.in_axis == 0 else 0]], weight.function, True
                t.rank = weight.rank + 0.1
            elif gain is not None and (t.leaf in WEIGHT_LEAVES or t.leaf in ("bias", "beta")):
                self.norms.append(t)
            else:
                t.axes = [next((r for r in ("vocab", "residual") if self.sizes.get(r) == t.shape[0]), "labels")]
                t.rank = 8
        for t in self.norms:
            self.norm(t, gain=t.leaf in WEIGHT_LEAVES)

    def norm(self, t: Tensor, gain: bool) -> None:
        module, size = (t.segs or [""])[-1], t.shape[0]
        inner = next((qk for qk, names in self.hints["inner_norms"].items() if module in names), None)
        if inner and gain:
            role = "head_dim" if size == self.sizes["head_dim"] else {"q": "attn", "k": "kv"}[inner]
            sources = self.by_function(inner, "qkv")
            t.axes, t.kind, t.rank = [role], "inner_norm_weight", RANKS["inner"] + (inner == "k") * 0.2
            t.normalises = [s.name for s in sources]
            if self.d.size(role) != size or not sources:
                self.check(f"{t.name}: a {inner} norm of size {size}; set its axes and 'normalises' by hand")
        elif size == self.sizes["residual"]:
            t.axes, t.kind = ["residual"], "norm_weight" if gain else "norm_bias"
        else:
            t.axes = [next((r for r in ("ffn", "attn", "kv", "head_dim") if self.sizes.get(r) == size), "labels")]
            self.check(f"{t.name}: a norm over {t.axes[0]} ({size}), which no norm kind covers; drafted as a plain parameter")

    def stage(self, t: Tensor) -> str:
        """Where a residual norm sits in the block: attn_in, attn_out, ffn_in or ffn_out."""
        module, ctx = (t.segs or [""])[-1], t.segs[:-1]
        ffn = any(w in module for w in ("feedforward", "ffw", "ffn", "mlp", "ff_", "fc"))
        if "post" in module:
            return "ffn_out" if ffn else "attn_out"
        if ffn or re.search(r"2|after", module):
            return "ffn_in"
        if any(c in self.hints["attention_context"] for c in ctx):
            return "attn_out"
        return "ffn_out" if any(c in self.hints["mlp_context"] for c in ctx) else "attn_in"

    def residual_norms(self) -> None:
        """Norm kinds (reading the stream, or on a sublayer's output) and the placement."""
        norms = [t for t in self.norms if t.kind in RESIDUAL_NORM_KINDS]
        layer = [t for t in norms if t.section == "layer"]
        stages = {t.name: self.stage(t) for t in layer}
        writers = self.by_function("attn_out", "ffn_out")
        beside = sorted({t.module for t in layer for w in writers if len(t.segs) > 1 and t.segs[:-1] == w.segs[:-1]})
        final = [t for t in norms if t.section == "post" and not matches(t.name, self.hints["head_cues"])]
        embedded = any(t.section == "pre" for t in norms) and not final  # normalised embeddings, no final norm
        self.placement = "post" if beside or embedded else "pre"
        if self.placement == "post":
            why = f"{beside[0]} sits beside a sublayer's output projection" if beside else \
                "the embeddings are normalised and no final norm follows the blocks"
            self.check(f"norm.placement 'post' (BERT-style post-LN): {why}; confirm")
        else:
            self.check("norm.placement 'pre': no norm sits beside a sublayer's output projection and a final norm "
                       "follows the blocks; a post-LN model (norms after the residual add, as BERT) needs 'post'")
        have = set(stages.values())
        for t in layer:
            stage = stages[t.name]
            output = self.placement == "pre" and (
                stage == "ffn_out" or stage == "attn_out" and ("ffn_in" in have or "attn_in" not in have))
            if stage == "attn_out" and not output and self.placement == "pre":
                stage = "ffn_in"  # Llama's post_attention_layernorm reads the stream before the MLP
            t.rank = {"attn_in": 0, "ffn_in": RANKS["ffn_in_norm"], "attn_out": RANKS["attn_out_norm"],
                      "ffn_out": RANKS["ffn_out_norm"]}[stage] + (t.kind == "norm_bias") * 0.1
            sources = [w.name for w in self.by_function(stage)] if output else []
            if sources:
                t.kind, t.normalises = "output_" + t.kind, sources
            elif output:
                self.check(f"{t.name} looks like a norm on a sublayer's output, but no output projection was found: "
                           "drafted as a norm that reads the stream")
        for t in norms:
            if t.section != "layer":
                head = matches(t.name, self.hints["head_cues"])
                t.rank = (5 if t.section == "pre" else 3.5 if head else 0) + (t.kind == "norm_bias") * 0.1
        self.norm_type = "layernorm" if any(t.kind.endswith("norm_bias") for t in norms) else "rmsnorm"
        if self.norm_type == "rmsnorm":
            self.check("norm.type 'rmsnorm': no norm stores a bias (a LayerNorm without bias looks the same)")
        self.gain_offset(norms + [t for t in self.norms if t.kind == "inner_norm_weight"])

    def gain_offset(self, norms: list[Tensor]) -> None:
        """Gains stored centred near 0 rather than 1: the model multiplies by 1 + w (Gemma)."""
        names = [t.name.replace(LAYER, str(i)) for t in norms if "weight" in t.kind
                 for i in (range(self.d.vals["layers"]) if t.section == "layer" else [None])]
        values = [self.d.ckpt.get(n).float().flatten() for n in names if n in self.d.ckpt]
        self.offset = None
        if values:
            gains = torch.cat(values)
            median, negative = gains.median().item(), (gains < 0).float().mean().item()
            if gains.abs().max().item() < 1e-6 or abs(median) < 0.5 and negative > 0.1:
                self.offset = 1
                self.check(f"norm.gain_offset 1 proposed: the stored norm gains are centred near 0 (median {median:.3g}, "
                           f"{negative:.0%} negative), as when a model multiplies by 1 + w (Gemma); confirm")
            elif abs(median) < 0.5:
                self.check(f"norm gains have median {median:.3g}: if the model multiplies by 1 + w, set norm.gain_offset 1")

    # -- head, tie, classes, config --------------------------------------------------

    def tie(self) -> dict | None:
        emb = next((t for t in self.tensors if t.section == "pre" and t.axes[:1] == ["vocab"] and len(t.shape) == 2), None)
        head = next((t for t in self.tensors if t.section == "post" and t.axes == ["vocab", "residual"]), None)
        key = next((k for k in self.hints["tie_keys"] if k in self.config), None)
        if emb is None or not (self.task in ("causal_lm", "masked_lm") or head) or not (key or head is None):
            return None
        if head is None:
            rule = next(r for r in self.hints["tied_heads"] if r.get("when_tensor", "") in ("", *self.d.shapes))
            bias = next((t for t in self.tensors if t.section == "post" and t.axes == ["vocab"] and t.leaf == "bias"), None)
            name = bias.module + ".weight" if bias and "when_tensor" not in rule else rule["head"]
            head = Tensor(name, "post", (self.sizes["vocab"], self.sizes["residual"]), ["vocab", "residual"], 1, rank=9)
            self.tensors.append(head)
            self.check(f"tie.head {head.name!r}: not stored (tied), name guessed; use the name the runtime gives the head")
        head.optional = True
        value = config_get(self.config, key) if key else None
        self.check(f"tie.default {value is None or bool(value)}: the runtime's value when the config omits "
                   f"{key or 'tie_word_embeddings'} (drafted from this config)")
        norms = [t for t in self.tensors if t.section == "post" and t.kind in ("norm_weight", "norm_bias")]
        common = {t.name: sum(1 for _ in _common(t.name, head.name)) for t in norms}
        best = max(common.values(), default=0)
        before = [t.name for t in sorted(norms, key=lambda t: (t.rank, t.name))
                  if (common[t.name] == best if best else not matches(t.name, self.hints["head_cues"]))]
        return {"config_key": key or "tie_word_embeddings", "default": value is None or bool(value), "head": head.name,
                "embedding": emb.name, **({"norm_before_head": before} if before else {})}

    def classes(self) -> dict:
        names = self.config.get("architectures")
        cls = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
        self.cls = cls
        self.task = next((task for suffix, task in self.hints["class_tasks"] if cls and cls.endswith(suffix)), None)
        if not cls:
            return {}
        with_head = bool(self.task) or bool(re.search(r"For[A-Z]|LMHead", cls))
        entry = {"output": "logits" if with_head else "last_hidden_state", **({"task": self.task} if self.task else {})}
        out = {cls: entry}
        base = re.sub(r"(For[A-Za-z]+|LMHeadModel)$", "Model", cls)
        if base != cls:
            out[base] = {"output": "last_hidden_state", "task": "causal_lm" if self.task == "causal_lm" else "encoder"}
            self.check(f"classes: the base class {base!r} is guessed from {cls!r}")
        return out

    def config_sections(self, layout: dict) -> None:
        cfg, d, layers = self.config, self.sizes["residual"], self.d.vals["layers"]
        also = [k for k in self.hints["config_also"]["residual"] if cfg.get(k) == d]
        if also:
            layout["config_also"] = {"residual": also}
        per_layer = [k for k, v in cfg.items() if isinstance(v, list) and len(v) == layers and k != "architectures"]
        if [k for k in per_layer if "layer" in k]:
            layout["config_per_layer"] = [k for k in per_layer if "layer" in k]
        for k in (k for k in per_layer if "layer" not in k and layers > 1):
            self.check(f"config {k!r} has {layers} entries: if one per layer, add it to config_per_layer")
        if "vocab" not in self.d.keys:
            image = {r: next((k for k in keys if k in cfg), None) for r, keys in self.hints["image_keys"].items()}
            if all(image.values()):
                layout["inputs"] = {"kind": "image", **image}
            else:
                layout["config_keys"]["vocab"] = "vocab_size"
                self.check("config has no vocabulary size: config_keys.vocab is a placeholder; name the key, or "
                           "declare 'inputs' for an image model")
        if self.d.vals.get("ffn") is None:
            ffn = self.sizes.get("ffn")
            multiple = round(ffn / d, 4) if ffn else 4
            layout["ffn_default_multiple"] = int(multiple) if multiple == int(multiple) else multiple
            self.check(f"ffn_default_multiple {layout['ffn_default_multiple']}: FFN size as a multiple of the width "
                       f"when the config gives none ({'from the stored FFN' if ffn else 'not found: a guess'})")
        index_keys = [k for k in self.hints["layer_index_keys"] if k in cfg]
        if index_keys:
            layout["layer_index_keys"] = index_keys
        for k in (k for k, v in cfg.items() if "parallel" in k.lower() and v):
            self.check(f"config {k}={cfg[k]!r}: a parallel residual (attention and MLP read the same input) is not "
                       "visible in the weights; the layout needs nothing for it, but verify a grown model")

    def layout(self) -> dict:
        self.vectors()
        self.residual_norms()
        classes = self.classes()
        tie = self.tie()
        if classes and tie:
            classes[self.cls]["tied_head"] = True
        mt = self.config.get("model_type")
        family = next((f for f in self.hints["families"] if isinstance(mt, str) and mt.startswith(f["model_type_prefix"])), None)
        tables = [t for t in self.tensors if t.section == "pre" and t.axes[-1:] == ["residual"] and t.in_axis == 0]
        emb = next((t for t in tables if t.axes[0] == "vocab"), tables[0] if tables else None)
        if emb is not None and family:
            emb.runtime_scale = family["embedding_runtime_scale"]
            self.check(f"{emb.name}: runtime_scale (hidden size)^{emb.runtime_scale}: {family['why']}; confirm")
        elif emb is not None:
            self.check(f"does the model multiply {emb.name}'s output by a function of the width at run time "
                       "(Gemma: sqrt(hidden))? then add runtime_scale to it")
        stack = self.d.stack
        prefix = stack.split(".")[0] + "." if "." in stack else ""
        if prefix and not all(t.name.startswith(prefix) for t in self.tensors if t.section == "pre"):
            prefix = ""
        if not prefix and self.task:
            self.check("no base_prefix: the names look like a bare base model's; if the class with a head nests "
                       "them (as 'transformer.' or 'model.'), set base_prefix")
        name = re.sub(r"[^a-z0-9_.-]", "_", mt.lower()) if isinstance(mt, str) and mt else "draft"
        name = name if re.match(r"^[a-z0-9]", name) else "draft_" + name
        norm = {"type": self.norm_type, "placement": self.placement}
        eps = next((k for k in self.hints["eps_keys"] if k in self.config), None)
        if eps:
            norm["eps_key"] = eps
        else:
            self.check("no norm epsilon key found in the config: set norm.eps_key or norm.eps_default")
        if self.offset:
            norm["gain_offset"] = self.offset
        layout = {"name": name, "description": f"Draft for model_type {mt!r} ({self.cls or 'no class named'}), "
                  "written by `modelgrow layout draft` from tensor names and shapes: review before use.",
                  "match": {"model_types": [mt]} if isinstance(mt, str) and mt else
                  {"config_has": [self.d.keys["residual"], self.d.keys["layers"]]},
                  "norm": norm, "config_keys": dict(self.d.keys)}
        self.config_sections(layout)
        if prefix:
            layout["base_prefix"] = prefix
        if classes:
            layout["classes"], layout["default_class"] = classes, self.cls
        if tie:
            layout["tie"] = tie
        if self.d.ignore:
            layout["ignore"] = sorted(self.d.ignore)
        order = {"pre": [], "layer": [], "post": []}
        for t in sorted(self.tensors, key=lambda t: (t.rank, t.name)):
            order[t.section].append(t.entry())
        layout["tensors"] = {k: v for k, v in order.items() if v or k == "layer"}
        return layout


def _common(a: str, b: str):
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            return
        yield x
