"""The `ligo` operator: a learned linear growth operator (LiGO, Wang et al. 2023),
started at the exact copy solution and fitted by modelgrow.fit.

Every target tensor is materialised as

    W_new[l] = M_0 ×_0 M_1 ×_1 … (Σ_j w[l, j] W_j)

where the sum mixes the source layers (depth) and each growable storage axis is
expanded by a learned matrix M (new × old) along it. Which matrix comes from the
axis's layout role and whether the axis is read or written:

- out-expansions E_r (the axis is written) copy units: one-hot rows at init;
- in-expansions S_r (the tensor's ``in`` axis, it reads) split units: 1/count at init,
  the reader's own matrix rather than E_rᵀ, so the split stays exact and learnable;
- the residual pair (E_res, S_res) is one pair for the whole model: embeddings, norms,
  every residual writer's rows and reader's columns, the head; this keeps the
  residual stream one consistent space, as LiGO ties B_emb everywhere;
- attn / kv / ffn pairs are per target layer. attn and kv act on whole heads
  (heads_new × heads_old, ⊗ I_head_dim): head_dim never changes and a rotary pair is
  never mixed with another dimension;
- fused axes (q|k|v) are block-diagonal: one matrix per segment;
- depth: one coefficient vector over the source layers per (target layer, tensor),
  weights and biases apart. Init: one-hot on the depth map's source layer; in
  identity mode the inserted layers' residual writers start at all-zero coefficients
  (the exact zero block), free to learn a mixture.

Padding (non-integer width) follows the copy operator: E_res's padding rows carry the
mean (LayerNorm) or zero (RMSNorm), S_res's are zero, norm gains/biases of padding
units are 1/0, gains × sqrt(s); a tied head's final norm takes 1/k. The
initialisation therefore materialises the copy operator's ``--noise 0`` output.

Symmetry breaking (``--noise ε``, default 0.01): copies of a unit get identical
gradients, so neither fitting nor later training could ever separate them.
``--noise-mode exact`` adds Gaussian noise to the in-expansions only, zero-sum over the
copies of each source unit, scaled so each reader column moves by ~ε of its norm: the
grown function is unchanged (the fit starts at exactly the copy loss) yet copies now
receive different gradients. ``plain`` also perturbs the out-expansions (not exact).
Matrices are general (the paper's B), not LiGO-code's [I; C]: that form cannot express
the normalised split that makes the start exact.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch

from .learned import LearnedOperator, operator_seed
from ..hookspecs import hookimpl
from ..maps import AxisMap, circular
from ..plan import TargetTensor
from .base import copy_maps, read_noise

# Roles whose units come in whole heads of head_dim (the role vocabulary's head spaces).
HEAD_ROLES = ("attn", "kv")


@dataclass(frozen=True)
class _Segment:
    old: int  # units of this segment in the source tensor
    new: int
    key: str | None  # expansion matrix, None: the segment passes through unchanged
    group: int  # units per matrix row (head_dim for head roles, else 1)


@dataclass(frozen=True)
class _Step:
    axis: int
    segments: tuple[_Segment, ...]


@dataclass(frozen=True)
class _Recipe:
    depth: str | None  # key of the depth coefficients (per-layer tensors)
    steps: tuple[_Step, ...]  # applied in this (cheapest) order
    pad_fill: float | None  # norm gains/biases: the constant of padding units
    scale: float


class LiGOOperator(LearnedOperator):
    name = "ligo"
    description = ("learned growth (LiGO): shared residual expansion, per-layer head/FFN expansions, "
                   "depth mixing; starts at the exact copy solution, fitted with --fit-data")

    def __init__(self, plan, **options):
        super().__init__(plan, **options)
        self.noise, self.noise_mode = read_noise(options)
        self.maps, self.head_norms = copy_maps(plan)
        self._row_maps: dict[str, AxisMap] = {}  # which source unit each matrix row copies
        self._recipes = {t.name: self._recipe(t) for t in plan.targets}
        self._add_noise()
        for t in self.params.values():
            t.requires_grad_(True)

    # -- building the parameterisation -------------------------------------------

    def _recipe(self, target: TargetTensor) -> _Recipe:
        spec, plan = target.spec, self.plan
        depth = None
        if spec.per_layer:
            depth = f"depth.{target.name}"
            coef = torch.zeros(plan.old.layers)
            if not (target.inserted and plan.spec.depth_mode == "identity" and spec.writes_residual):
                coef[target.source_layer] = 1.0
            self.params[depth] = coef
        layer = target.layer if spec.per_layer else None
        steps = []
        for axis, roles in enumerate(spec.axes):
            side = "in" if axis == spec.in_axis else "out"
            segments = []
            for role in roles:
                old_size, new_size = plan.old.role_size(role), plan.new.role_size(role)
                m = self.maps.maps.get(role)
                if m is None or m.is_identity:
                    size = target.source_shape[axis] if old_size is None else old_size
                    segments.append(_Segment(size, size, None, 1))
                else:
                    key, group = self._expansion(role, side, layer)
                    segments.append(_Segment(old_size, new_size, key, group))
            if any(s.key for s in segments):
                steps.append(_Step(axis, tuple(segments)))
        pad_fill = None
        if spec.kind in ("norm_weight", "norm_bias") and self.maps.maps["residual"].pad.any():
            pad_fill = 1.0 if spec.kind == "norm_weight" else 0.0
        scale = 1.0
        if spec.kind == "norm_weight" and plan.residual_pad:
            scale *= math.sqrt(plan.norm_scale)
        if spec.name in self.head_norms:
            scale /= plan.width_multiple
        return _Recipe(depth, _cheapest_order(steps, target.source_shape), pad_fill, scale)

    def _expansion(self, role: str, side: str, layer: int | None) -> tuple[str, int]:
        """The key of a role's expansion matrix (created on first use) and its row group."""
        # The residual stream is one space for the whole model; head and FFN spaces are
        # private to each layer.
        key = f"width.{side}.{role}" + (f".{layer}" if layer is not None and role != "residual" else "")
        group = self.plan.old.head_dim if role in HEAD_ROLES else 1
        if key not in self.params:
            m = self.maps.maps[role]
            if group > 1:
                m = _head_level(m, group)
            self.params[key] = _initial_matrix(m, side, self.maps.pad_value)
            self._row_maps[key] = m
        return key, group

    def _add_noise(self) -> None:
        if self.noise == 0:
            return
        for key, m in self._row_maps.items():
            side = key.split(".")[1]
            if side == "out" and self.noise_mode != "plain":
                continue
            mat = self.params[key]
            gen = operator_seed(self.seed, f"ligo:{key}")
            # Entry std ε/sqrt(old): a row's noise has norm ~ε × its own (one-hot or 1/c) norm.
            row_norm = (1.0 / m.count) if side == "in" else torch.ones(m.index.numel())
            noise = torch.randn(mat.shape, generator=gen) * (self.noise / math.sqrt(m.old_size)) * row_norm[:, None]
            if side == "in" and self.noise_mode == "exact":
                noise = _zero_sum_over_copies(noise, m)
            noise[m.pad] = 0.0  # padding rows keep their exact role (mean / zero)
            mat += noise

    # -- LearnedOperator -----------------------------------------------------------

    def param_group(self, name: str) -> str:
        return "depth" if name.startswith("depth.") else ".".join(name.split(".")[:2])

    def _source_tensors(self) -> dict[str, torch.Tensor]:
        """The small model in memory (fp32): per-layer tensors stacked [layers, ...]."""
        if self._src is None:
            self._src = {k: v.to(self.device) for k, v in self.stacked_source(self.source.specs()).items()}
        return self._src

    def compute(self, target: TargetTensor) -> torch.Tensor:
        recipe = self._recipes[target.name]
        w = self._source_tensors()[target.spec.name]
        if recipe.depth is not None:
            w = torch.tensordot(self.params[recipe.depth], w, dims=1)  # mix the source layers
        for step in recipe.steps:
            w = self._apply(w, step)
        if recipe.pad_fill is not None:
            pad = self.maps.maps["residual"].pad.to(w.device)
            w = torch.where(pad, torch.full_like(w, recipe.pad_fill), w)
        if recipe.scale != 1.0:
            w = w * recipe.scale
        assert tuple(w.shape) == target.shape, (target.name, tuple(w.shape), target.shape)
        return w

    def _apply(self, w: torch.Tensor, step: _Step) -> torch.Tensor:
        if len(step.segments) == 1:
            return self._apply_segment(w, step.axis, step.segments[0])
        parts = torch.split(w, [s.old for s in step.segments], dim=step.axis)
        return torch.cat([self._apply_segment(p, step.axis, s) for p, s in zip(parts, step.segments)], dim=step.axis)

    def _apply_segment(self, w: torch.Tensor, axis: int, seg: _Segment) -> torch.Tensor:
        if seg.key is None:
            return w
        mat = self.params[seg.key]  # [new groups, old groups]
        moved = w.movedim(axis, 0)
        rest = moved.shape[1:]
        grown = mat @ moved.reshape(mat.shape[1], -1)  # a head is a row of head_dim × rest values
        return grown.reshape(mat.shape[0] * seg.group, *rest).movedim(0, axis)

    # -- reporting -----------------------------------------------------------------

    def promise(self):
        p = super().promise()
        if self.noise > 0 and self.noise_mode == "plain":
            return dataclasses.replace(p, noise=False, notes=p.notes + ["plain noise on the expansions: not exact by design"])
        return p

    def describe_options(self):
        return {
            **super().describe_options(),
            "noise": self.noise,
            "noise_mode": self.noise_mode,
            "noise_on": "in-expansions, zero-sum over copies" if self.noise_mode == "exact" else "all expansions",
            "params": sum(t.numel() for t in self.params.values()),
            "width_matrices": sum(1 for k in self.params if k.startswith("width.")),
            "depth_vectors": sum(1 for k in self.params if k.startswith("depth.")),
        }


def _head_level(m: AxisMap, head_dim: int) -> AxisMap:
    """The unit map of whole heads, read back from the unit-level map (kept in step)."""
    heads = m.index.view(-1, head_dim)
    first = heads[:, 0]
    assert bool((heads == first[:, None] + torch.arange(head_dim)).all()) and bool((first % head_dim == 0).all())
    head_map = circular(m.old_size // head_dim, heads.shape[0])
    assert torch.equal(head_map.index, first // head_dim)
    return head_map


def _initial_matrix(m: AxisMap, side: str, pad_value: str) -> torch.Tensor:
    """The copy operator as a matrix: out = one-hot copies, in = one-hot / copy count."""
    new, old = m.index.numel(), m.old_size
    mat = torch.zeros(new, old)
    rows = torch.arange(new)[~m.pad]
    cols = m.index[~m.pad]
    mat[rows, cols] = 1.0 if side == "out" else 1.0 / m.count[~m.pad]
    if side == "out" and pad_value == "mean":
        mat[m.pad] = 1.0 / old  # a padding unit writes the mean of the stream (LEMON)
    return mat


def _zero_sum_over_copies(noise: torch.Tensor, m: AxisMap) -> torch.Tensor:
    """Remove each copy group's mean row: the copies' rows still sum to the original."""
    valid = ~m.pad
    index = m.index[valid]
    sums = torch.zeros((m.old_size, noise.shape[1])).index_add_(0, index, noise[valid])
    counts = torch.bincount(index, minlength=m.old_size).clamp(min=1).to(noise.dtype)
    noise[valid] -= (sums / counts[:, None])[index]
    return noise


def _cheapest_order(steps: list[_Step], shape: tuple[int, ...]) -> tuple[_Step, ...]:
    """Expanding axis a costs new_a × old_a × (the other axes' current sizes) multiply-adds;
    the order matters (a big FFN expansion is cheaper applied to the small tensor)."""
    if len(steps) < 2:
        return tuple(steps)

    def cost(order) -> int:
        sizes, total = list(shape), 0
        for step in order:
            others = math.prod(sizes) // sizes[step.axis]
            total += sum(s.new * s.old // s.group for s in step.segments if s.key) * others
            sizes[step.axis] = sum(s.new for s in step.segments)
        return total

    return min(itertools.permutations(steps), key=cost)


@hookimpl
def register_operators(register):
    register(LiGOOperator)
