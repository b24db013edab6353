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

import torch

from ..hookspecs import hookimpl
from ..layout import split_role
from ..maps import AxisMap, circular
from ..plan import TargetTensor
from .expansions import Recipe, Step, apply_recipe, build_recipe, copy_matrix, perturb_expansion
from .learned import LearnedOperator, operator_seed

# Roles whose units come in whole heads of head_dim (the role vocabulary's head spaces).
HEAD_ROLES = ("attn", "kv")


class LiGOOperator(LearnedOperator):
    name = "ligo"
    description = ("learned growth (LiGO): shared residual expansion, per-layer head/FFN expansions, "
                   "depth mixing; starts at the exact copy solution, fitted with --fit-data")

    def __init__(self, plan, **options):
        super().__init__(plan, **options)
        self._row_maps: dict[str, AxisMap] = {}  # which source unit each matrix row copies
        self._recipes = {t.name: self._recipe(t) for t in plan.targets}
        self._add_noise()
        for t in self.params.values():
            t.requires_grad_(True)

    # -- building the parameterisation -------------------------------------------

    def _recipe(self, target: TargetTensor) -> Recipe:
        layer = target.layer if target.spec.per_layer else None
        recipe = build_recipe(self.plan, target, self.maps, self.head_norms, self.params,
                              lambda role, side: self._expansion(role, side, layer))
        return dataclasses.replace(recipe, steps=_cheapest_order(recipe.steps, target.source_shape))

    def _expansion(self, role: str, side: str, layer: int | None) -> tuple[str, int]:
        """The key of a role's expansion matrix (created on first use) and its row group."""
        # The residual stream is one space for the whole model; head and FFN spaces are
        # private to each layer.
        key = f"width.{side}.{role}" + (f".{layer}" if layer is not None and role != "residual" else "")
        base, times = split_role(role)
        group = self.plan.old.head_dim * times if base in HEAD_ROLES else 1
        if key not in self.params:
            m = self.maps.role(role)
            if group > 1:
                m = _head_level(m, group)
            self.params[key] = copy_matrix(m, side, self.maps.pad_value)
            self._row_maps[key] = m
        return key, group

    def _add_noise(self) -> None:
        if self.noise == 0:
            return
        for key, m in self._row_maps.items():
            gen = operator_seed(self.seed, f"ligo:{key}")
            perturb_expansion(self.params[key], m, key.split(".")[1], self.noise, self.noise_mode, gen)

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
        w = apply_recipe(w, self._recipes[target.name], self.params.__getitem__, self.maps.maps["residual"])
        assert tuple(w.shape) == target.shape, (target.name, tuple(w.shape), target.shape)
        return w

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


def _cheapest_order(steps: tuple[Step, ...], shape: tuple[int, ...]) -> tuple[Step, ...]:
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
