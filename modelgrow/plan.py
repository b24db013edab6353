"""The growth plan: from source dims and a user's spec to target dims, the target
config, every target tensor's shape, parameter counts and an honest exactness promise.

No tensors are touched here, and nothing is listed per layer before the target dims
have passed the pre-flight (modelgrow.preflight), so `--dry-run` is instant on any size.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import ConfigDict

from .errors import UsageError
from .options import Options, option
from .layer_map import LayerMap, insert_identity, parse_layers
from .layout import Dims, TensorSpec, config_get, config_has, config_set
from .preflight import check_size
from .promise import Promise, norm_promises
from .source import SourceModel
from .upcycle import prepare_upcycle

DEPTH_MODES = ("identity", "interleave", "stack")


SIZE_HELP = "a factor (2x, 1.5x) or an absolute size (1024)"


class GrowthSpec(Options):
    """What the user asked for. Each size is a factor ("2x", "1.5x") or absolute ("1024")."""

    model_config = ConfigDict(frozen=True)
    kind = "growth"

    width: str | int | None = option(None, f"Hidden size: {SIZE_HELP}.")
    depth: str | int | None = option(None, f"Number of layers: {SIZE_HELP}.")
    heads: str | int | None = option(None, f"Attention heads (head size never changes): {SIZE_HELP}.")
    kv_heads: str | int | None = option(None, f"Key/value heads for grouped-query attention: {SIZE_HELP}.")
    ffn: str | int | None = option(None, f"FFN hidden size: {SIZE_HELP} [default: scaled with the width].")
    # A plain string: make_plan names the modes when it refuses one.
    layers: str | None = option(None, 'Source layers in target order: "0-23,8-31" (SOLAR), "0-3,3+,4-7" (3+: an '
                                      "identity copy of layer 3). Sets the depth.")
    insert: str | None = option(None, "Identity blocks after every K-th source layer (every:4, LLaMA Pro), at the end "
                                      "(end) or after the listed source layers (3,7). Sets the depth.")
    depth_mode: str = option("identity", "identity: inserted blocks add nothing (exact for pre-LN); interleave: "
                                         "0,0,1,1,..; stack: 0,1,..,0,1,.. (not exact).", choices=DEPTH_MODES)
    # Sparse upcycling (modelgrow.upcycle): the dense FFN becomes experts of the matching MoE family.
    experts: int | None = option(None, "Sparse upcycling: each FFN becomes this many experts (copies of it) in the "
                                       "layout's mixture-of-experts family (Llama/Mistral -> Mixtral, Qwen2/3 -> "
                                       "Qwen2/3-MoE).", ge=1, strict=True)
    top_k: int | None = option(None, "Experts per token [default: 2, at most --experts].", ge=1, strict=True)
    router_init: Literal["random", "zero"] | None = option(
        None, "Router weights: random (normal, the config's initializer_range) or zero; exact either way "
              "[default: random].")
    expert_noise: float = option(0.0, "Noise added to each expert, relative to each tensor's spread: the experts "
                                      "differ (not exact).", ge=0, allow_inf_nan=False)
    drop_upcycle: float = option(0.0, "Drop-Upcycling: re-initialise this fraction of each expert's FFN units, "
                                      "chosen per expert, from the weights' mean and spread (not exact).",
                                 ge=0, le=1, allow_inf_nan=False)


@dataclass(frozen=True)
class TargetTensor:
    spec: TensorSpec
    layer: int | None  # target layer index
    source_layer: int | None  # the source layer it is grown from
    inserted: bool  # a block added by depth growth: an identity block or an extra copy
    name: str
    shape: tuple[int, ...]
    source_shape: tuple[int, ...]
    identity: bool = False  # in an identity block: a residual writer here starts at zero
    # Sparse upcycling: "expert" (spec's grown tensor, copied into expert ``expert``), "zero" or
    # "router" (made here; ``spec`` only gives the dtype); None: the operator grows ``spec``.
    made: str | None = None
    expert: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
    source: SourceModel
    spec: GrowthSpec
    old: Dims
    new: Dims
    depth_map: list[tuple[int, bool]]  # per target layer: (source layer, inserted?)
    config: dict  # the target config.json
    targets: list[TargetTensor]
    promise: Promise
    identity: tuple[bool, ...] = ()  # per target layer: an identity block (residual writers zeroed)
    upcycle: object | None = None  # modelgrow.upcycle.Upcycle: sparse upcycling into a MoE family

    @property
    def width_multiple(self) -> int:
        """Whole copies of every residual unit (k in D2 = k*D1 + r)."""
        return self.new.residual // self.old.residual

    @property
    def residual_pad(self) -> int:
        return self.new.residual % self.old.residual

    @property
    def norm_scale(self) -> float:
        """s = k*D1/D2: the variance shrink that padding units cause (1 when r = 0)."""
        return self.width_multiple * self.old.residual / self.new.residual

    @property
    def eps_scale(self) -> float:
        """The factor the config's norm eps takes: s when a pre-norm model's width is padded."""
        layout = self.source.layout
        return self.norm_scale if self.residual_pad and layout.norm_placement == "pre" and layout.eps_key else 1.0

    def source_params(self) -> int:
        return self.source.param_count()

    def target_params(self) -> int:
        return sum(t.numel for t in self.targets)

    def summary(self) -> dict:
        return {
            "architecture": self.source.layout.name,
            "class": self.source.arch.class_name(self.source.config),
            "source": self.old.as_dict(),
            "target": self.new.as_dict(),
            "depth_mode": self.spec.depth_mode,
            "depth_map": [{"source_layer": s, "inserted": i, "identity": z}
                          for (s, i), z in zip(self.depth_map, self.identity)],
            "new_layers": [i for i, (_, inserted) in enumerate(self.depth_map) if inserted],
            "tied_embeddings": self.source.tied,
            "source_params": self.source_params(),
            "target_params": self.target_params(),
            "promise": self.promise.as_dict(),
            **({"upcycle": self.upcycle.summary()} if self.upcycle else {}),
        }


_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(x?)\s*$", re.IGNORECASE)


def parse_amount(text: str | None, current: int, what: str, option: str) -> int:
    """'2x' multiplies, '1024' is absolute; the result must be a whole number."""
    if text is None:
        return current
    m = _AMOUNT.match(str(text))
    if not m:
        raise UsageError(f"{option} {text!r} is not a size", hint="use a factor such as 2x or 1.5x, or an absolute number")
    value = float(m.group(1))
    result = value * current if m.group(2) else value
    if abs(result - round(result)) > 1e-9:
        raise UsageError(f"{option} {text} gives {result:g} {what}, not a whole number", hint="choose another factor or give the size")
    return int(round(result))


def make_plan(source: SourceModel, spec: GrowthSpec, preflight: Callable[[Dims], object] | None = None) -> Plan:
    """The plan; ``preflight`` (modelgrow.preflight.Preflight) sees the target dims first."""
    layout, old = source.layout, source.dims
    if spec.depth_mode not in DEPTH_MODES:
        raise UsageError(f"unknown depth mode {spec.depth_mode!r}", hint=f"choose one of {', '.join(DEPTH_MODES)}")
    promise = Promise()
    upcycle = prepare_upcycle(source, spec)  # None without --experts; refuses what cannot upcycle

    residual = parse_amount(spec.width, old.residual, "hidden units", "--width")
    layer_map = _layer_map(spec, old.layers)
    layers = parse_amount(spec.depth, old.layers, "layers", "--depth")
    if layer_map is not None:
        if spec.depth is not None and layers != len(layer_map.sources):
            flag = "--layers" if spec.layers is not None else "--insert"
            raise UsageError(f"--depth {spec.depth} disagrees with the {len(layer_map.sources)} layers {flag} gives",
                             hint=f"drop --depth: {flag} sets it")
        layers = len(layer_map.sources)
    for what, new, cur in (("width", residual, old.residual), ("depth", layers, old.layers)):
        if new < cur:
            raise UsageError(f"target {what} {new} is smaller than the source's {cur}", hint="modelgrow only grows models")

    # Heads grow in number; head_dim never changes (RoPE pairs and the 1/sqrt(d) scale need it).
    head_dim_free = "head_dim" in layout.config_keys  # hidden size need not equal heads*head_dim
    if spec.heads is not None:
        heads = parse_amount(spec.heads, old.heads, "heads", "--heads")
    elif head_dim_free:
        heads = old.heads * residual / old.residual
        if heads != int(heads):
            raise UsageError(f"--width gives {heads:g} attention heads", hint="pass --heads")
        heads = int(heads)
    else:
        if residual % old.head_dim:
            raise UsageError(
                f"width {residual} is not a multiple of head_dim {old.head_dim}",
                hint=f"heads keep their size; choose a width divisible by {old.head_dim}",
            )
        heads = residual // old.head_dim
    if heads < old.heads:
        raise UsageError(f"target heads {heads} is fewer than the source's {old.heads}", hint="modelgrow only grows models")
    if not head_dim_free and heads * old.head_dim != residual:
        raise UsageError(
            f"heads do not divide: {heads} heads of size {old.head_dim} make {heads * old.head_dim}, not the width {residual}",
            hint="change --heads or --width",
        )

    group = old.heads // old.kv_heads
    if spec.kv_heads is not None:
        if "kv_heads" not in layout.config_keys:
            raise UsageError(f"the {layout.name} architecture has no separate key/value heads", hint="drop --kv-heads")
        kv_heads = parse_amount(spec.kv_heads, old.kv_heads, "key/value heads", "--kv-heads")
    elif heads % group == 0:
        kv_heads = heads // group
    else:
        raise UsageError(f"{heads} heads cannot keep query groups of {group}", hint="pass --kv-heads or another --heads")
    if kv_heads < old.kv_heads or heads % kv_heads:
        raise UsageError(f"{kv_heads} key/value heads do not divide {heads} heads (source has {old.kv_heads})", hint="change --kv-heads")
    if heads // kv_heads != group:
        promise.heads = False
        promise.notes.append(f"query groups change from {group} to {heads // kv_heads} heads per key/value head: not exact")

    if spec.ffn and "ffn" not in layout.config_keys:
        # The FFN size is then a fixed multiple of the width (ffn_default_multiple); a
        # different one could not be recorded in the config, so the model could not load.
        raise UsageError(f"the {layout.name} config has no FFN size to change", hint="drop --ffn: it follows --width")
    ffn = parse_amount(spec.ffn, old.ffn, "FFN units", "--ffn") if spec.ffn else old.ffn * residual / old.residual
    if ffn != int(ffn):
        ffn = math.ceil(ffn)
    ffn = int(ffn)
    if ffn < old.ffn:
        raise UsageError(f"target FFN size {ffn} is smaller than the source's {old.ffn}", hint="modelgrow only grows models")

    # Expert and shared-expert FFNs (their own config keys) grow in proportion to the FFN.
    def scaled(size: int | None) -> int | None:
        return None if size is None else math.ceil(size * ffn / old.ffn)

    new = Dims(residual, layers, heads, kv_heads, old.head_dim, ffn, old.vocab, old.positions,
               old.experts, scaled(old.expert_ffn), scaled(old.shared_ffn))
    if upcycle is not None:
        new = upcycle.dims(new)
    check_size(source, new, spec)  # absurd sizes, then the run's needs: before anything is listed per layer
    if preflight is not None:
        preflight(new)

    if residual % old.residual:
        if layout.norm_placement == "pre":
            promise.notes.append("non-integer width: residual padded LEMON-style (norm gain x sqrt(s), eps x s)")
        else:
            promise.width = False
            promise.notes.append("non-integer width of a post-LN model: LayerNorm statistics change, not exact")

    norm_promises(layout, old, new, promise)

    if layer_map is None:
        depth_map = _depth_map(old.layers, layers, spec.depth_mode)
        identity = tuple(ins and spec.depth_mode == "identity" for _, ins in depth_map)
        if layers > old.layers and spec.depth_mode != "identity":
            promise.depth = False
            promise.notes.append(f"depth mode {spec.depth_mode!r} copies whole blocks: not function-preserving")
    else:
        depth_map, identity = layer_map.depth_map(), layer_map.identity
        reasons = layer_map.not_exact(old.layers)
        if reasons:
            promise.depth = False
            promise.notes += reasons
    if any(identity) and promise.depth and layout.norm_placement == "post":
        promise.depth = False
        promise.notes.append("post-LN model: an inserted block still applies its LayerNorms, so depth growth is not exact")
    moved = any(src != index for index, (src, inserted) in enumerate(depth_map) if not inserted)
    flags = [key for key in layout.layer_index_keys if config_has(source.config, key) and config_get(source.config, key)]
    if moved and flags and promise.depth:
        promise.depth = False
        promise.notes.append(f"{', '.join(flags)} is set: blocks depend on their index, and depth growth moves them, so it is not exact")

    if new == old and depth_map == [(i, False) for i in range(old.layers)]:
        promise.notes.append("nothing grows: the output is a copy of the source (give --width, --depth, --layers, ...)")
    plan = Plan(source, spec, old, new, depth_map, {}, [], promise, identity, upcycle)
    plan.config = _target_config(plan)
    if upcycle is not None:
        plan.config = upcycle.config(plan)
        upcycle.promise(plan)
    problem = (upcycle.arch if upcycle else source.arch).config_problem(plan.config)
    if problem:
        raise UsageError(f"the grown model's config is invalid: {problem}", hint="change --heads/--kv-heads/--width")
    plan.targets = [TargetTensor(**t) for t in upcycle.targets(plan)] if upcycle else _targets(plan)
    return plan


def _layer_map(spec: GrowthSpec, old_layers: int) -> LayerMap | None:
    """The explicit layer map of --layers or --insert, if either was given."""
    if spec.layers is not None and spec.insert is not None:
        raise UsageError("--layers and --insert both place layers", hint="use one: --layers can mark identity blocks with +")
    if spec.layers is None and spec.insert is None:
        return None
    if spec.depth_mode != "identity":
        flag = "--layers" if spec.layers is not None else "--insert"
        raise UsageError(f"{flag} gives the layer order, and so does --depth-mode {spec.depth_mode}", hint="drop --depth-mode")
    if spec.layers is not None:
        return parse_layers(spec.layers, old_layers)
    return insert_identity(spec.insert, old_layers)


def _depth_map(old: int, new: int, mode: str) -> list[tuple[int, bool]]:
    if mode == "stack":  # whole-model order: 0..L-1, 0..L-1, ... (G_stack, StackBERT)
        return [(i % old, i >= old) for i in range(new)]
    # identity / interleave: each source layer followed by its extra copies, spread evenly.
    extra = new - old
    out = []
    for i in range(old):
        copies = 1 + extra // old + (1 if (i + 1) * (extra % old) // old > i * (extra % old) // old else 0)
        out += [(i, False)] + [(i, True)] * (copies - 1)
    return out


def _target_config(plan: Plan) -> dict:
    layout, cfg = plan.source.layout, copy.deepcopy(plan.source.config)
    keys = layout.config_keys
    for role, value in (
        ("residual", plan.new.residual),
        ("layers", plan.new.layers),
        ("heads", plan.new.heads),
        ("kv_heads", plan.new.kv_heads),
        ("head_dim", plan.new.head_dim),
        ("ffn", plan.new.ffn),
        ("expert_ffn", plan.new.expert_ffn),
        ("shared_ffn", plan.new.shared_ffn),
    ):
        if role in keys:
            config_set(cfg, layout.config_key(cfg, role), value)
        # Keys that merely repeat a role's size (ViT's pooler_output_size) change with it;
        # absent ones are left absent, since the runtime then derives them from the role.
        for key in layout.config_also.get(role, ()):
            if config_has(cfg, key):
                config_set(cfg, key, value)
    for key in layout.config_per_layer:
        # One entry per layer (Qwen2's layer_types): each target layer takes its source
        # layer's entry, so an inserted copy behaves like the block it copies.
        values = config_get(cfg, key)
        if values is None:  # derived by the runtime (Gemma 3's sliding-window pattern): write it out
            values = plan.source.arch.derived_config_value(plan.source.config, key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != plan.old.layers:
            raise UsageError(
                f"config {key!r} should list one entry per layer ({plan.old.layers}), got {values!r}",
                hint="fix the source config.json",
            )
        config_set(cfg, key, [values[s] for s, _ in plan.depth_map])
    if plan.eps_scale != 1.0:
        eps = config_get(cfg, layout.eps_key)
        if eps is None:
            eps = layout.eps_default  # the runtime's default when the config leaves it out
        if eps is None:
            raise UsageError(f"non-integer width needs the norm epsilon, but config has no {layout.eps_key!r}")
        config_set(cfg, layout.eps_key, eps * plan.eps_scale)
    return cfg


def _targets(plan: Plan) -> list[TargetTensor]:
    src = plan.source
    out = []
    shapes: dict[tuple, tuple[int, ...] | None] = {}  # one per tensor and stored shape, not per layer
    layers = [(i, s, ins, z) for i, ((s, ins), z) in enumerate(zip(plan.depth_map, plan.identity))]
    for spec in src.specs():
        for layer, source_layer, inserted, identity in layers if spec.per_layer else [(None, None, False, False)]:
            stored = tuple(src.info(spec, source_layer).shape)
            if (spec.name, stored) not in shapes:
                shapes[spec.name, stored] = src.expected_shape(spec, plan.new, stored)
            shape = shapes[spec.name, stored]
            name = src.stored_name(spec, layer)
            out.append(TargetTensor(spec, layer, source_layer, inserted, name, shape, stored, identity))
    return out
