"""Sparse upcycling (``convert --experts E``): a dense checkpoint becomes the mixture-of-
experts family its layout names in an ``upcycle`` block (data, schemas/LAYOUT.md):
Llama and Mistral become Mixtral, Qwen2 Qwen2-MoE, Qwen3 Qwen3-MoE.

The construction (Komatsuzaki et al., "Sparse Upcycling", ICLR 2023), after any width and
depth growth of the dense model:

- every expert of a layer is a copy of that layer's (grown) dense FFN;
- the router is small and random (``--router-init random``, the config's
  ``initializer_range``) or zero;
- each token's top-k routing weights sum to one: the family renormalises them (Mixtral
  always; Qwen2/3-MoE once the block's ``config`` sets ``norm_topk_prob``). Then
  sum_i w_i * FFN(x) = FFN(x) whatever the router picks, so the upcycled model computes
  what the dense one did (up to float rounding of the weights' sum). A zero router makes
  every logit tie; any k of the identical experts give the same sum;
- what else the block holds comes from the ``tensors`` map: a copy of a dense tensor, or
  zero (Qwen2-MoE's shared expert keeps the dense FFN's gate and up projections, its down
  projection and its sigmoid gate start at zero: it adds nothing yet).

A family that does not renormalise (``"normalised": false``) is written all the same and
promised not exact. ``--expert-noise`` and ``--drop-upcycle`` make the experts differ
(modelgrow.operators.upcycling): not exact, by design.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import plugins
from .config_access import config_get, config_set
from .errors import LayoutError, UsageError
from .layout import EXPERT, Dims, Layout, TensorSpec

ROUTER_STD = 0.02  # the router's spread when the config names no initializer_range
ROUTER_INITS = ("random", "zero")


@dataclass(frozen=True)
class Origin:
    """How one tensor of the mixture-of-experts layout is made."""

    spec: TensorSpec  # the MoE layout's tensor (``${expert}`` still in its name)
    made: str | None  # None: grown from ``dense`` by the operator; "expert", "zero", "router"
    dense: TensorSpec  # the dense tensor it copies (zero, router: the one whose dtype it takes)


@dataclass(frozen=True)
class Upcycle:
    """A resolved ``upcycle`` block and the options of one conversion."""

    dense: Layout
    arch: Any  # the mixture-of-experts family's Architecture
    target_class: str
    origins: tuple[Origin, ...]
    experts: int
    top_k: int
    router_init: str
    router_std: float
    expert_noise: float
    drop_upcycle: float

    @property
    def layout(self) -> Layout:
        return self.arch.layout

    @property
    def block(self) -> dict:
        return self.dense.upcycle

    @property
    def diverse(self) -> bool:
        return self.expert_noise > 0 or self.drop_upcycle > 0

    # -- the plan's pieces ------------------------------------------------------------------

    def dims(self, new: Dims) -> Dims:
        """The grown dense dims as the family counts them: experts and shared experts the FFN's size."""
        keys = self.layout.config_keys
        return dataclasses.replace(new, experts=self.experts, expert_ffn=new.ffn if "expert_ffn" in keys else None,
                                   shared_ffn=new.ffn if "shared_ffn" in keys else None)

    def config(self, plan) -> dict:
        """The grown dense config (modelgrow.plan) rewritten as the family's."""
        cfg = copy.deepcopy(plan.config)
        for key in self.block.get("drop", ()):
            cfg.pop(key, None)
        cfg["model_type"] = self.layout.model_types[0]
        cfg["architectures"] = [self.target_class]
        config_set(cfg, self.layout.config_key(cfg, "experts"), self.experts)
        config_set(cfg, self.block["top_k"], self.top_k)
        for role in ("expert_ffn", "shared_ffn"):
            if role in self.layout.config_keys:
                config_set(cfg, self.layout.config_key(cfg, role), getattr(plan.new, role))
        for key, value in self.block.get("config", {}).items():
            config_set(cfg, key, copy.deepcopy(value))
        return cfg

    def promise(self, plan) -> None:
        """Say in the plan's promise whether the upcycled block gives the dense FFN back, and why."""
        p, into, k = plan.promise, self.layout.name, self.top_k
        where = f"sparse upcycling into {into} ({self.target_class}, {self.experts} experts, top-{k})"
        if not self.block["normalised"]:
            p.experts = False
            p.notes.append(f"{where}: the family does not rescale each token's top-{k} routing weights to sum to "
                           "one, so identical experts give the dense FFN times that sum: not exact")
        if self.diverse:
            p.noise = False
            what = [f"--expert-noise {self.expert_noise:g}"] * (self.expert_noise > 0)
            what += [f"--drop-upcycle {self.drop_upcycle:g}"] * (self.drop_upcycle > 0)
            p.notes.append(f"{where}: experts start from copies of the dense FFN and are made to differ "
                           f"({' and '.join(what)}): not exact by design")
        elif self.block["normalised"]:
            router = "zero" if self.router_init == "zero" else f"random, std {self.router_std:g}"
            p.notes.append(f"{where}: every expert is the dense FFN and each token's top-{k} routing weights sum to "
                           f"one, so the block computes the dense FFN whatever the router ({router}); tokens whose "
                           f"router logits tie take any {k} of the identical experts, with the same result")
            if self.router_init == "zero":
                p.notes.append(f"zero router: every token goes to the same {k} experts, which then train alike; with "
                               "identical experts nothing separates them (add --expert-noise or --drop-upcycle)")
        written = self.block.get("config", {})
        if written:
            p.notes.append(f"{into} config: " + ", ".join(f"{key}={json.dumps(v)}" for key, v in written.items()))
        zeros = [short(o.spec.name) for o in self.origins if o.made == "zero"]
        if zeros:
            p.notes.append(f"{', '.join(zeros)} start at zero: the block adds nothing through them yet")

    def targets(self, plan) -> list[dict]:
        """Every tensor of the upcycled checkpoint, in layout order: the fields of the plan's
        TargetTensor (modelgrow.plan makes them; it imports this module, not the reverse)."""
        src, out = plan.source, []
        places = list(zip(range(plan.new.layers), plan.depth_map, plan.identity))
        for o in self.origins:
            shape_of = target_shape(src, plan.new, o)
            per_layer = [(i, s, ins, z) for i, (s, ins), z in places] if o.spec.per_layer else [(None, None, False, False)]
            for e in range(self.experts) if EXPERT in o.spec.name else [None]:
                one = o.spec if e is None else o.spec.for_expert(e)
                for layer, source_layer, inserted, identity in per_layer:
                    stored = tuple(src.info(o.dense, source_layer).shape)
                    out.append(dict(spec=o.dense, layer=layer, source_layer=source_layer, inserted=inserted,
                                    name=src.stored_name(one, layer), shape=shape_of(stored), source_shape=stored,
                                    identity=identity, made=o.made, expert=e))
        return out

    def summary(self) -> dict:
        """The report's plan.upcycle."""
        return {"architecture": self.layout.name, "class": self.target_class, "experts": self.experts,
                "top_k": self.top_k, "router_init": self.router_init,
                "router_std": self.router_std if self.router_init == "random" else 0.0,
                "expert_noise": self.expert_noise, "drop_upcycle": self.drop_upcycle,
                "normalised": bool(self.block["normalised"]),
                "zeroed": [short(o.spec.name) for o in self.origins if o.made == "zero"]}


def short(name: str) -> str:
    """A per-layer tensor's name within its block: "mlp.shared_expert_gate.weight"."""
    return name.split("${layer}.", 1)[-1]


def prepare_upcycle(source, spec) -> Upcycle | None:
    """The upcycling ``spec`` (a GrowthSpec) asks of ``source``; None without ``--experts``.
    Everything that cannot upcycle is refused here, before any work (exit 2)."""
    given = [flag for flag, on in (("--top-k", spec.top_k is not None), ("--router-init", spec.router_init is not None),
                                   ("--expert-noise", spec.expert_noise > 0), ("--drop-upcycle", spec.drop_upcycle > 0))
             if on]
    if spec.experts is None:
        if given:
            raise UsageError(f"{given[0]} is an option of sparse upcycling, and --experts is not given",
                             hint="add --experts N, or drop it")
        return None
    layout = source.layout
    if "experts" in layout.config_keys:
        raise UsageError(f"--experts: the source is already a mixture of experts ({layout.name}, "
                         f"{source.dims.experts} experts per block); sparse upcycling starts from a dense model",
                         hint="drop --experts to grow it as it is")
    if not layout.upcycle:
        known = [f"{a.layout.name} -> {a.layout.upcycle['into']}" for a in plugins.get_architectures().values()
                 if a.layout.upcycle]
        raise UsageError(f"--experts: the {layout.name} family has no mixture-of-experts counterpart (its layout has "
                         "no \"upcycle\" block)", hint=f"sparse upcycling knows {', '.join(sorted(known)) or 'none'}")
    top_k = spec.top_k if spec.top_k is not None else min(2, spec.experts)
    if top_k > spec.experts:
        raise UsageError(f"--top-k {top_k} is more than the {spec.experts} experts to choose from",
                         hint="choose --top-k at most --experts")
    block, arch = layout.upcycle, family(layout)
    name = source.arch.class_name(source.config)
    if name not in block["classes"]:
        raise UsageError(f"--experts: {name} has no counterpart in the {arch.layout.name} family",
                         hint=f"sparse upcycling takes {', '.join(block['classes'])}")
    for key, wanted in block.get("requires", {}).items():
        have = config_get(source.config, key)
        if have is not None and have != wanted:
            raise UsageError(f"--experts: the {arch.layout.name} family cannot compute what {key}={json.dumps(have)} "
                             f"does in this {layout.name} model", hint=f"only sources with {key}={json.dumps(wanted)} upcycle")
    router_init = spec.router_init or "random"
    std = config_get(source.config, "initializer_range")
    std = float(std) if isinstance(std, (int, float)) and not isinstance(std, bool) and std > 0 else ROUTER_STD
    return Upcycle(layout, arch, block["classes"][name], origins(source, arch.layout), spec.experts, top_k,
                   router_init, std, spec.expert_noise, spec.drop_upcycle)


def family(layout: Layout):
    """The registered architecture a dense layout's ``upcycle`` block names."""
    into = layout.upcycle["into"]
    arch = plugins.get_architectures().get(into)
    if arch is None or "experts" not in arch.layout.config_keys:
        raise LayoutError(f"layout {layout.name} upcycles into {into!r}, which is not a registered mixture-of-experts "
                          "architecture", path=layout.source)
    return arch


def origins(source, moe: Layout) -> tuple[Origin, ...]:
    """How each tensor of ``moe`` is made from ``source``'s; a source tensor the family has no
    place for is refused (Mixtral has no biases, say)."""
    dense, block = source.layout, source.layout.upcycle
    by_name = {t.name: t for t in dense.tensors}
    present = {s.name for s in source.specs()}
    mapping = block["tensors"]

    def spec_of(name: str) -> TensorSpec:
        if name not in by_name:
            raise LayoutError(f"the upcycle block maps to {name!r}, which is not a tensor of this layout",
                              path=dense.source)
        return by_name[name]

    copied = [spec_of(n) for n in mapping.values() if n is not None]
    anchor = next((s for s in copied if s.name in present), None)
    if anchor is None:
        raise LayoutError("the upcycle block copies no tensor this checkpoint has", path=dense.source)
    out, carried = [], set()
    for m in moe.tensors:
        if m.name == block["router"]:
            out.append(Origin(m, "router", anchor))
        elif m.name in mapping and mapping[m.name] is None:
            out.append(Origin(m, "zero", anchor))
        elif m.name in mapping or m.name in by_name:
            d = spec_of(mapping.get(m.name, m.name))
            if d.name in present:
                out.append(Origin(m, "expert" if EXPERT in m.name else None, d))
                carried.add(d.name)
            elif not (m.optional or d.optional or source.is_tied_head(d)):
                raise LayoutError(f"the upcycle block makes {m.name!r} from {d.name!r}, which this checkpoint lacks",
                                  path=dense.source)
        elif not m.optional:
            raise LayoutError(f"the upcycle block does not say how to make {moe.name}'s {m.name!r}", path=dense.source)
    left = [s for s in source.specs() if s.name not in carried]
    if left:
        raise UsageError(f"--experts: the {moe.name} family has no place for "
                         f"{source.stored_name(left[0], 0 if left[0].per_layer else None)!r}",
                         hint="the family has no such parameter: only a source without it upcycles")
    return tuple(out)


def target_shape(source, new: Dims, o: Origin) -> Callable[[tuple[int, ...]], tuple[int, ...]]:
    """Stored shape of ``o.dense`` -> the target tensor's shape under ``new``."""
    if o.made in ("zero", "router"):
        sizes = new.axis_sizes(o.spec)
        if None in sizes:
            raise LayoutError(f"{o.spec.name!r} has an axis of a size growth does not know", path=o.spec.name)
        return lambda _stored: tuple(sizes)
    return functools.partial(source.expected_shape, o.dense, new)


def target_specs(source, new: Dims) -> list[tuple[TensorSpec, Callable, int]]:
    """(source spec read for its dtype, stored shape -> target shape, copies per layer) for
    every target tensor but its per-layer and per-expert repeats: what the pre-flight counts."""
    if new.experts is None or source.dims.experts is not None or not source.layout.upcycle:
        return [(s, functools.partial(source.expected_shape, s, new), 1) for s in source.specs()]
    return [(o.dense, target_shape(source, new, o), new.experts if EXPERT in o.spec.name else 1)
            for o in origins(source, family(source.layout).layout)]
