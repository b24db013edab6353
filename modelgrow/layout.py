"""Architecture layouts: the declarative description of a checkpoint (data, not code).

A layout says where an architecture keeps its sizes in config.json and, for every
tensor, its name template and what each storage axis means (its *role*). Growth
operators read only roles, never architecture names. The format is specified by
``schemas/layout.schema.json`` and explained field by field in ``schemas/LAYOUT.md``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from .config_access import config_get, config_has, config_set
from .errors import InputError, LayoutError

LAYER = "${layer}"
EXPERT = "${expert}"  # mixture-of-experts: one tensor per expert, 0 .. experts-1

# Roles whose size follows the model's dims; every other role is a fixed size that
# growth leaves alone (vocabulary, positions, image channels, head_dim, experts, ...).
GROWABLE_ROLES = ("residual", "attn", "kv", "ffn", "expert_ffn", "shared_ffn")

# What a model is fed: token ids (text) or pixel_values (vision). See "inputs" in the schema.
INPUT_KINDS = ("tokens", "image")

# Norm gains and biases by where the norm sits (schemas/LAYOUT.md, "kind"): on the
# residual stream's readers (norm_*), on a sublayer's output before the residual add
# (output_norm_*), or inside a sublayer over query/key heads (inner_norm_weight).
RESIDUAL_NORM_KINDS = ("norm_weight", "norm_bias", "output_norm_weight", "output_norm_bias")
NORM_KINDS = RESIDUAL_NORM_KINDS + ("inner_norm_weight",)


def split_role(role: str) -> tuple[str, int]:
    """"attn*3" -> ("attn", 3): heads whose units come as 3 blocks of head_dim each
    (GPT-NeoX's query_key_value stores q, k, v per head); a plain role has multiplicity 1."""
    base, _, times = role.partition("*")
    return base, int(times) if times else 1


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: a name template and a role per storage axis.

    ``axes[i]`` is the tuple of roles concatenated along axis i (fused projections such
    as GPT-2's ``c_attn`` have several). ``in_axis`` is the axis the tensor reads from
    (the input of a Linear); every other axis is written to.
    """

    name: str
    axes: tuple[tuple[str, ...], ...]
    in_axis: int | None
    kind: str
    optional: bool
    section: str
    normalises: tuple[str, ...] = ()  # output/inner norms: the tensors that make what they normalise
    behind_norm: bool = False  # an output norm normalises what this tensor writes
    runtime_scale: float | None = None  # the model multiplies this tensor's output by residual**power

    @property
    def per_layer(self) -> bool:
        return self.section == "layer"

    @property
    def is_norm(self) -> bool:
        return self.kind in NORM_KINDS

    @property
    def writes_residual(self) -> bool:
        """True for the last tensors before the residual add (output projections,
        embeddings, their biases; an output norm instead of what it normalises): the
        tensors an identity block must zero."""
        if self.kind in ("output_norm_weight", "output_norm_bias"):
            return True
        return self.kind == "param" and not self.behind_norm and any(
            axis == ("residual",) for i, axis in enumerate(self.axes) if i != self.in_axis
        )

    def render(self, layer: int | None) -> str:
        return self.name if layer is None else self.name.replace(LAYER, str(layer))

    def for_expert(self, expert: int) -> TensorSpec:
        """This spec for one expert (``${expert}`` filled in): a tensor of its own."""
        return dataclasses.replace(self, name=self.name.replace(EXPERT, str(expert)))


@dataclass(frozen=True)
class Dims:
    """The sizes growth changes. ``attn`` and ``kv`` role sizes derive from heads."""

    residual: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int | None  # None for models fed something other than tokens (images)
    positions: int | None = None
    experts: int | None = None  # mixture of experts: experts per MoE block
    expert_ffn: int | None = None  # one expert's FFN size, where it has its own config key
    shared_ffn: int | None = None  # the shared expert's FFN size (Qwen2-MoE)

    def role_size(self, role: str) -> int | None:
        role, times = split_role(role)
        size = {
            "residual": self.residual,
            "attn": self.heads * self.head_dim,
            "kv": self.kv_heads * self.head_dim,
            "ffn": self.ffn,
            "vocab": self.vocab,
            "positions": self.positions,
            # Per-head tensors (Qwen3's q_norm/k_norm): sized by head_dim, which growth keeps.
            "head_dim": self.head_dim,
            "experts": self.experts,
            "expert_ffn": self.expert_ffn,
            "shared_ffn": self.shared_ffn,
            "one": 1,  # a single unit (Qwen2-MoE's shared-expert gate writes one logit)
        }.get(role)
        return None if size is None else size * times

    def axis_sizes(self, spec: TensorSpec) -> tuple[int | None, ...]:
        """The size of each of ``spec``'s storage axes under these dims: the sum of its
        roles' sizes, or None where a role is not one of the dims' (a fixed size that only
        a checkpoint can tell, such as image channels)."""
        sizes = []
        for roles in spec.axes:
            each = [self.role_size(r) for r in roles]
            sizes.append(None if None in each else sum(each))
        return tuple(sizes)

    def as_dict(self) -> dict[str, int | None]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    model_types: tuple[str, ...]
    config_has: tuple[str, ...]
    norm_type: str
    norm_placement: str
    eps_key: str | None
    config_keys: dict[str, str | list[str]]  # a list: spellings tried in order (num_experts, num_local_experts)
    ffn_default_multiple: float | None
    base_prefix: str
    classes: dict[str, dict[str, Any]]
    default_class: str | None
    tie: dict[str, Any] | None
    aliases: tuple[tuple[str, str], ...]
    ignore: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]
    source: str = field(default="<memory>", compare=False)
    # Vocabulary added for vision and non-HF plugins (schemas/LAYOUT.md explains each).
    eps_default: float | None = None  # the runtime's norm epsilon when the config omits eps_key
    inputs: dict[str, str] = field(default_factory=lambda: {"kind": "tokens"})
    config_also: dict[str, tuple[str, ...]] = field(default_factory=dict)  # role -> keys that copy its size
    config_per_layer: tuple[str, ...] = ()  # config lists with one entry per layer
    layer_index_keys: tuple[str, ...] = ()  # config flags that make a block depend on its index
    gain_offset: float = 0.0  # norms multiply by (gain_offset + stored gain): Gemma's (1 + w)
    upcycle: dict | None = field(default=None, compare=False)  # the MoE family it upcycles into (modelgrow.upcycle)

    # -- loading -----------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Layout:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise LayoutError(f"cannot read layout: {exc}", path=path) from None
        except json.JSONDecodeError as exc:
            raise LayoutError(f"layout is not valid JSON: {exc}", path=path) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> Layout:
        validate_layout(data, source)
        tensors = []
        for section in ("pre", "layer", "post"):
            for entry in data["tensors"].get(section, []):
                axes = tuple(tuple(a.split("|")) for a in entry["axes"])
                tensors.append(
                    TensorSpec(
                        name=entry["name"],
                        axes=axes,
                        in_axis=entry.get("in"),
                        kind=entry.get("kind", "param"),
                        optional=entry.get("optional", False),
                        section=section,
                        normalises=tuple(entry.get("normalises", ())),
                        runtime_scale=(entry.get("runtime_scale") or {}).get("power"),
                    )
                )
        behind = {n for t in tensors if t.kind.startswith("output_norm") for n in t.normalises}
        tensors = [dataclasses.replace(t, behind_norm=t.name in behind) for t in tensors]
        layout = cls(
            name=data["name"],
            description=data.get("description", ""),
            model_types=tuple(data["match"].get("model_types", ())),
            config_has=tuple(data["match"].get("config_has", ())),
            norm_type=data["norm"]["type"],
            norm_placement=data["norm"]["placement"],
            eps_key=data["norm"].get("eps_key"),
            config_keys=dict(data["config_keys"]),
            ffn_default_multiple=data.get("ffn_default_multiple"),
            base_prefix=data.get("base_prefix", ""),
            classes=dict(data.get("classes", {})),
            default_class=data.get("default_class"),
            tie=data.get("tie"),
            aliases=tuple((a, b) for a, b in data.get("aliases", [])),
            ignore=tuple(data.get("ignore", [])),
            tensors=tuple(tensors),
            source=source,
            eps_default=data["norm"].get("eps_default"),
            inputs=dict(data.get("inputs", {"kind": "tokens"})),
            config_also={role: tuple(keys) for role, keys in data.get("config_also", {}).items()},
            config_per_layer=tuple(data.get("config_per_layer", [])),
            layer_index_keys=tuple(data.get("layer_index_keys", [])),
            gain_offset=float(data["norm"].get("gain_offset", 0.0)),
            upcycle=data.get("upcycle"),
        )
        layout._check_consistency()
        return layout

    def _check_consistency(self) -> None:
        """Rules JSON Schema cannot say: cross-references between fields."""
        names = {t.name for t in self.tensors}
        if len(names) != len(self.tensors):
            self._fail("tensors", "a tensor name appears twice")
        for t in self.tensors:
            where = f"tensors.{t.section}[{t.name}]"
            if t.in_axis is not None and t.in_axis >= len(t.axes):
                self._fail(where, f"'in' is {t.in_axis} but the tensor has {len(t.axes)} axes")
            if (LAYER in t.name) != t.per_layer:
                self._fail(where, "exactly the 'layer' tensors must contain ${layer} in their name")
            if EXPERT in t.name and not (t.per_layer and "experts" in self.config_keys):
                self._fail(where, "${expert} belongs in 'layer' tensors of a layout with an 'experts' config key")
            if t.kind in RESIDUAL_NORM_KINDS and t.axes != (("residual",),):
                self._fail(where, f"a {t.kind} tensor must have axes [\"residual\"]")
            if t.kind == "inner_norm_weight" and t.axes not in ((("head_dim",),), (("attn",),), (("kv",),)):
                self._fail(where, "an inner_norm_weight tensor must have axes [\"head_dim\"], [\"attn\"] or [\"kv\"]")
            if t.normalises and not t.kind.startswith(("output_norm", "inner_norm")):
                self._fail(where, "only output and inner norms list the tensors they normalise")
            for n in t.normalises:
                if n not in names:
                    self._fail(f"{where}.normalises", f"'{n}' is not a tensor of this layout")
            if any(split_role(r)[1] > 1 and split_role(r)[0] not in ("attn", "kv") for a in t.axes for r in a):
                self._fail(where, "only attn and kv heads take a multiplicity (\"attn*3\": q, k, v per head)")
            if t.runtime_scale is not None and "residual" not in (r for a in t.axes for r in a):
                self._fail(where, "runtime_scale needs a residual axis: the multiplier follows the width")
        if self.tie:
            for key in ("head", "embedding"):
                if self.tie[key] not in names:
                    self._fail(f"tie.{key}", f"'{self.tie[key]}' is not a tensor of this layout")
            for n in self.tie.get("norm_before_head", []):
                if n not in names:
                    self._fail("tie.norm_before_head", f"'{n}' is not a tensor of this layout")
        if self.default_class and self.classes and self.default_class not in self.classes:
            self._fail("default_class", f"'{self.default_class}' is not one of 'classes'")
        if self.inputs.get("kind", "tokens") == "tokens" and "vocab" not in self.config_keys:
            self._fail("config_keys", "a model fed tokens needs a 'vocab' key (or declare other \"inputs\")")
        for role in self.config_also:
            if role not in self.config_keys:
                self._fail(f"config_also.{role}", f"'{role}' has no entry in config_keys to follow")

    def _fail(self, where: str, reason: str) -> None:
        raise LayoutError(f"layout is invalid at $.{where}: {reason}", path=self.source)

    # -- queries -----------------------------------------------------------------

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def config_key(self, config: dict, role: str) -> str | None:
        """The key holding ``role``'s size in this config: the first spelling present."""
        keys = self.config_keys.get(role)
        if keys is None or isinstance(keys, str):
            return keys
        return next((k for k in keys if config_has(config, k)), keys[0])

    def dims(self, config: dict, config_path: str | Path | None = None) -> Dims:
        """Read the growable sizes from a config, filling the usual defaults."""

        def read(role: str, required: bool = True) -> int | None:
            key = self.config_key(config, role)
            value = config_get(config, key) if key else None
            if value is None:
                if required:
                    raise InputError(
                        f"config has no '{key or role}' ({role} size) for a {self.name} model",
                        path=config_path,
                    )
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"config '{key}' must be a positive integer, got {value!r}", path=config_path)
            return value

        residual = read("residual")
        heads = read("heads")
        kv_heads = read("kv_heads", required=False) or heads
        head_dim = read("head_dim", required=False)
        if head_dim is None:
            if residual % heads:
                raise InputError(
                    f"{self.config_keys['residual']}={residual} is not divisible by "
                    f"{self.config_keys['heads']}={heads}",
                    path=config_path,
                )
            head_dim = residual // heads
        if heads % kv_heads:
            raise InputError(f"{heads} attention heads are not divisible by {kv_heads} key/value heads", path=config_path)
        ffn = read("ffn", required=False)
        if ffn is None:
            if self.ffn_default_multiple is None:
                raise InputError(f"config has no '{self.config_keys.get('ffn', 'ffn')}'", path=config_path)
            ffn = int(round(self.ffn_default_multiple * residual))
        return Dims(
            residual=residual,
            layers=read("layers"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            ffn=ffn,
            vocab=read("vocab", required="vocab" in self.config_keys),
            positions=read("positions", required=False),
            experts=read("experts", required="experts" in self.config_keys),
            expert_ffn=read("expert_ffn", required="expert_ffn" in self.config_keys),
            shared_ffn=read("shared_ffn", required="shared_ffn" in self.config_keys),
        )

    def claims(self, config: dict) -> bool:
        if self.model_types and config.get("model_type") in self.model_types:
            return True
        return bool(self.config_has) and all(config_has(config, k) for k in self.config_has)

    def ignore_patterns(self) -> list[re.Pattern]:
        return [template_regex(p) for p in self.ignore]


def template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(re.escape(LAYER), r"\d+").replace(re.escape(EXPERT), r"\d+")
    return re.compile("^" + pattern + "$")


@lru_cache(maxsize=None)
def _schema(name: str) -> dict:
    text = resources.files("modelgrow").joinpath("schemas", name).read_text(encoding="utf-8")
    return json.loads(text)


def layout_schema() -> dict:
    return _schema("layout.schema.json")


def validate_layout(data: Any, source: str = "<memory>") -> None:
    """Validate against the JSON Schema; the error names the JSON path and the reason."""
    validator = jsonschema.Draft202012Validator(layout_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise LayoutError(f"layout does not validate at {error.json_path}: {error.message}", path=source)


def builtin_layout_paths() -> list[Path]:
    folder = resources.files("modelgrow.layouts")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json"))
