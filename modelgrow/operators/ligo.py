"""The `ligo` operator: a learned linear growth operator (LiGO, Wang et al. 2023),
started at the exact copy solution and fitted by modelgrow.fit.

Every target tensor is materialised as

    W_new[l] = M_0 ×_0 M_1 ×_1 … (Σ_j w[l, j] W_j)

where the sum mixes the source layers (depth) and each growable storage axis is
expanded by a learned matrix M (new × old) along it. Which matrix comes from the
axis's layout role and whether the axis is read or written (ligo_attention.py decides,
from roles, kinds and config values only):

- out-expansions E (the axis is written) copy units: one-hot rows at init;
- in-expansions S (the tensor's ``in`` axis, it reads) split units: 1/count at init,
  the reader's own matrix rather than Eᵀ, so the split stays exact and learnable;
- the residual pair (E_res, S_res) is one pair for the whole model: embeddings, norms,
  every residual writer's rows and reader's columns, the head; this keeps the
  residual stream one consistent space, as LiGO ties B_emb everywhere;
- attention, per target layer: separate B_Q, B_K, B_V (``width.out.query|key|value.L``;
  GQA: B_K and B_V act on key/value heads, B_Q on query heads, kept in step by the copy
  maps at init); O's input is *tied* to V's output, S_O = diag(r) · (B_V ⊗ I_G) with r
  the fixed copy split (1/count) and G query heads per kv head, so it is no parameter
  of its own: the tie is sound with our head layout and keeps the start exact
  (ligo_attention.py says why; where G changes with the growth, O's input is free).
  Rows mix across heads (the paper's D2 × D1 B) where positions are known not to be
  rotary (a learned position table, no rotary config setting, no per-head tensors);
  otherwise whole heads move ((H2 × H1) ⊗ I_head_dim), so no rotary pair is broken;
- FFN, per target layer: one out-expansion E_ffn (``width.out.ffn.L``, gate and up alike)
  and the down projection's input *tied* to it, S_ffn = diag(r) · E_ffn (the paper's
  A^fc2 = (B^fc1)ᵀ with the copy split), no parameter of its own; the same for experts'
  FFN axes (``expert_ffn``) and a shared expert's (``shared_ffn``); free only where
  nothing in the layer writes the axis;
- fused axes (q|k|v) are block-diagonal: one matrix per segment; heads stored as parts
  (``attn*3``) take one matrix per part;
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
receive different gradients. A tied input (O's, the FFN's) takes its noise as a fixed
offset (a buffer, ``noise.width.in.attn.L``, ``noise.width.in.ffn.L``), so the tie holds
throughout a fit. ``plain`` also perturbs the out-expansions (not exact). Matrices are
general (the paper's B), not LiGO-code's [I; C]: that form cannot express the normalised
split that makes the start exact.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from ..hookspecs import hookimpl
from ..maps import AxisMap, circular
from ..plan import TargetTensor
from .expansions import Recipe, Segment, Step, apply_recipe, build_recipe, copy_matrix, perturb_expansion
from .learned import LearnedOperator, operator_seed
from .ligo_attention import (FFN_ROLES, Attention, Matrix, broadcast, fixed_numbers, places, segment_matrices,
                             state_numbers)


class LiGOOperator(LearnedOperator):
    name = "ligo"
    description = ("learned growth (LiGO): shared residual expansion, per-layer Q/K/V (O's input tied to V) "
                   "and FFN (its down projection's input tied to it) expansions, depth mixing; starts at the "
                   "exact copy solution, fitted with --fit-data")

    def __init__(self, plan, **options):
        super().__init__(plan, **options)
        self.attention = Attention.of(plan.source.layout, plan.source.config, plan.old, plan.new)
        self.buffers: dict[str, torch.Tensor] = {}  # fixed tensors of the tied inputs (split, noise)
        self._row_maps: dict[str, AxisMap] = {}  # which source unit each matrix row copies
        self._ties: dict[str, Matrix] = {}  # a tied input (O's, the FFN's) by key; tied_to: what it follows
        self._recipes = {t.name: self._recipe(t) for t in plan.targets}
        for key in [k for k, m in self._ties.items() if m.tied_to not in self.params]:  # nothing written: free
            del self._ties[key], self.buffers[f"split.{key}"]
            self.params[key] = copy_matrix(self._row_maps[key], "in", self.maps.pad_value)
        self._add_noise()
        for t in self.params.values():
            t.requires_grad_(True)

    @classmethod
    def state_params(cls, source, new, options) -> int:
        """Exactly the numbers the operator trains: its matrices and depth vectors."""
        old = source.dims
        return state_numbers(Attention.of(source.layout, source.config, old, new), source.specs(), old, new)

    @classmethod
    def state_bytes(cls, source, new, options) -> int:
        """Also the tied inputs' fixed buffers (fp32, no gradient nor optimiser state)."""
        old, noise = source.dims, options.get("noise", 0.01) != 0
        fixed = fixed_numbers(Attention.of(source.layout, source.config, old, new), source.specs(), old, new, noise)
        return super().state_bytes(source, new, options) + 4 * fixed

    # -- building the parameterisation -------------------------------------------

    def _recipe(self, target: TargetTensor) -> Recipe:
        spec = target.spec
        layer = target.layer if spec.per_layer else None
        recipe = build_recipe(self.plan, target, self.maps, self.head_norms, self.params, lambda role, side: ("?", 1))
        steps = []
        for step in recipe.steps:
            roles = spec.axes[step.axis]
            side = "in" if step.axis == spec.in_axis else "out"
            steps.append(Step(step.axis, tuple(
                self._segment(segment_matrices(self.attention, spec, side, role, place, layer, self.plan.old.head_dim), s)
                if s.key else s for role, place, s in zip(roles, places(roles), step.segments))))
        return dataclasses.replace(recipe, steps=_cheapest_order(tuple(steps), target.source_shape))

    def _segment(self, matrices: tuple[Matrix, ...], seg: Segment) -> Segment:
        for m in matrices:
            self._make(m)
        first = matrices[0]
        if len(matrices) == 1:
            return Segment(seg.old, seg.new, first.key, first.group)
        return Segment(seg.old, seg.new, first.key, first.group, tuple(m.key for m in matrices), self.plan.old.head_dim)

    def _make(self, m: Matrix) -> None:
        """Create a matrix on first use: copy-initialised, or an input tied to an out-expansion."""
        if m.key in self._row_maps:
            return
        rows = self.maps.role(m.role)
        if m.group > 1:
            rows = _head_level(rows, m.group)
        self._row_maps[m.key] = rows
        if m.tied_to is None:
            self.params[m.key] = copy_matrix(rows, m.side, self.maps.pad_value)
        else:
            self._ties[m.key] = m
            self.buffers[f"split.{m.key}"] = torch.where(rows.pad, 0.0, 1.0 / rows.count)

    def _add_noise(self) -> None:
        if self.noise == 0:
            return
        for key, m in self._row_maps.items():
            gen = operator_seed(self.seed, f"ligo:{key}")
            if key in self._ties:  # a fixed offset: the learned tie stays a tie
                noise = torch.zeros(m.index.numel(), m.old_size)
                perturb_expansion(noise, m, "in", self.noise, self.noise_mode, gen)
                self.buffers[f"noise.{key}"] = noise
            else:
                perturb_expansion(self.params[key], m, key.split(".")[1], self.noise, self.noise_mode, gen)

    def expansion(self, key: str) -> torch.Tensor:
        """The matrix of ``key`` as the recipes use it (a tied input made from the
        out-expansion it follows: O's from B_V, the FFN's from E_ffn)."""
        tie = self._ties.get(key)
        if tie is None:
            return self.params[key]
        unit = self.plan.old.head_dim // tie.group  # matrix rows per head (broadcast over query heads only)
        mat = self.buffers[f"split.{key}"][:, None] * broadcast(self.params[tie.tied_to], tie.repeat, unit)
        noise = self.buffers.get(f"noise.{key}")
        return mat if noise is None else mat + noise

    # -- LearnedOperator -----------------------------------------------------------

    def param_group(self, name: str) -> str:
        return "depth" if name.startswith("depth.") else ".".join(name.split(".")[:2])

    def _source_tensors(self) -> dict[str, torch.Tensor]:
        """The small model in memory (fp32): per-layer tensors stacked [layers, ...]."""
        if self._src is None:
            self._src = {k: v.to(self.device) for k, v in self.stacked_source(self.source.specs()).items()}
        return self._src

    def compute(self, target: TargetTensor) -> torch.Tensor:
        w = self._source_tensors()[target.spec.name]
        w = apply_recipe(w, self._recipes[target.name], self.expansion, self.maps.maps["residual"])
        assert tuple(w.shape) == target.shape, (target.name, tuple(w.shape), target.shape)
        return w

    def to(self, device) -> None:
        super().to(device)
        self.buffers = {k: v.to(self.device) for k, v in self.buffers.items()}

    # -- reporting -----------------------------------------------------------------

    def promise(self):
        p = super().promise()
        if self.noise > 0 and self.noise_mode == "plain":
            return dataclasses.replace(p, noise=False, notes=p.notes + ["plain noise on the expansions: not exact by design"])
        return p

    def describe_options(self):
        return {
            **super().describe_options(),
            "noise_on": "in-expansions, zero-sum over copies" if self.noise_mode == "exact" else "all expansions",
            "params": sum(t.numel() for t in self.params.values()),
            "width_matrices": sum(1 for k in self.params if k.startswith("width.")),
            "tied_matrices": len(self._ties),
            "attention": self.attention.describe(),
            "ffn_input": self._ffn_inputs(),
            "depth_vectors": sum(1 for k in self.params if k.startswith("depth.")),
        }

    def _ffn_inputs(self) -> dict[str, str]:
        """Per FFN role grown: whether its readers' input expansions are tied (all of them)."""
        keys: dict[str, list[str]] = {}
        for key in self._row_maps:
            side, role = key.split(".")[1:3]
            if side == "in" and role in FFN_ROLES:
                keys.setdefault(role, []).append(key)
        return {role: "tied to its out-expansion (diag(1/copies) · E)" if all(k in self._ties for k in found)
                else "free: nothing in the layer writes the axis it reads" for role, found in keys.items()}


def _head_level(m: AxisMap, head_dim: int) -> AxisMap:
    """The unit map of whole heads, read back from the unit-level map (kept in step)."""
    heads = m.index.view(-1, head_dim)
    first = heads[:, 0]
    assert bool((heads == first[:, None] + torch.arange(head_dim)).all()) and bool((first % head_dim == 0).all())
    head_map = circular(m.old_size // head_dim, heads.shape[0])
    assert torch.equal(head_map.index, first // head_dim)
    return head_map


def _cheapest_order(steps: tuple[Step, ...], shape: tuple[int, ...]) -> tuple[Step, ...]:
    """Expanding axis a costs new_a × old_a × (the other axes' current sizes) multiply-adds;
    the order matters (a big FFN expansion is cheaper applied to the small tensor)."""
    if len(steps) < 2:
        return tuple(steps)

    def cost(order) -> int:
        sizes, total = list(shape), 0
        for step in order:
            others = math.prod(sizes) // sizes[step.axis]
            total += sum(s.cost for s in step.segments) * others
            sizes[step.axis] = sum(s.new for s in step.segments)
        return total

    return min(itertools.permutations(steps), key=cost)


@hookimpl
def register_operators(register):
    register(LiGOOperator)
