"""The `mango` operator: a learned multi-linear growth operator (Mango, Pan et al.,
NeurIPS 2023). Every per-layer weight matrix whose two axes have growable roles (q, k,
v, o, FFN up/gate/down, with their biases) is cut into slots and stacked into one tensor
M[B, I, O, L] (slot, input unit, output unit, layer); a tensor ring of four small cores
S_B, S_I, S_O, S_L maps the small model's M1 to the large model's M2. The cores start at
the copy operator's growth and are fitted by modelgrow.fit like LiGO; tensors outside
the ring (embeddings, norms, the head) grow by LiGO's recipe with a residual map pair.

docs/mango.md has the design: the slot layout (``--slot-grouping``), the map and its
contraction order, what the initialisation makes exact and at which rank, the noise,
the options and the measurements. The pieces live in:

- operators/tensor_ring.py: the ring algebra (contraction orders, costs, ``contract``);
- operators/slots.py: the stacked tensor's geometry (slots, read-back of target units);
- operators/ring_init.py: the starting channels, cores and symmetry-breaking noise;
- operators/mango_rank.py: which tensors the ring holds, the auto rank and its pre-flight count;
- operators/expansions.py: the copy-initialised recipes shared with LiGO.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..errors import UsageError
from ..options import option
from ..hookspecs import hookimpl
from ..layout import TensorSpec
from ..plan import TargetTensor
from .base import NoiseOptions
from .adjust import adjustment
from .expansions import apply_recipe, build_recipe, copy_matrix, perturb_expansion
from .learned import LearnedOperator, operator_seed
from .mango_rank import MAX_RANK, auto_note, in_ring, ring_sizes
from .ring_init import add_ring_noise, copy_cores, exact_rank, plan_channels
from .slots import lay_out, read_bias, read_block, write_block
from .tensor_ring import RING, cheapest_order, chunk_for_budget, contract, contraction_cost

DEFAULT_CHUNK_MB = 256


class MangoOptions(NoiseOptions):
    # Unset (None) is "auto": ring_init.exact_rank, stated in the plan (a promise note) and
    # recorded as the rank in effect in the report (benchmarks/RESULTS-mango.md: why).
    rank: int | None = option(
        None, "Ring rank of the tensor-ring operator [default: auto: the smallest rank with an exact start for "
              "this growth, one per ring channel the copy start needs: 1 for a width-only growth, 2 with identity "
              "depth blocks, more where a role needs its own unit map; the plan says which].",
        ge=1, le=MAX_RANK, strict=True)
    slot_grouping: Literal["slices", "modules"] = option(
        "slices", "slices (matrices cut into residual-sized slots) or modules (one slot per matrix, zero-padded).")
    ring_init: Literal["copy", "echo"] = option(
        "copy", "Ring channels beyond the copy map start at zero (copy) or as copies whose depth core is zero "
                "(echo); both exact.")
    ring_residual: Literal["separate", "tied"] = option(
        "separate", "Embeddings, norms and the head grow through their own residual map (separate) or the ring's "
                    "channel 0 (tied).")
    chunk_mb: float = option(DEFAULT_CHUNK_MB, "Memory budget of one ring-contraction chunk (fp32 MB).", gt=0, cli=False)
    lr_scales: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = option(
        {}, "Learning-rate multiple per parameter group (ring.B, residual, depth, ...).", cli=False)


class MangoOperator(LearnedOperator):
    Options = MangoOptions
    name = "mango"
    description = ("learned multi-linear growth (Mango): all per-layer matrices as one tensor mapped by a "
                   "tensor ring of four cores (--rank); starts at the copy solution, fitted with --fit-data")
    per_tensor = False  # every ring tensor is a slice of one contraction over all layers

    def __init__(self, plan, **options):
        super().__init__(plan, **options)
        o = self.settings
        self.grouping, self.ring_init, self.residual = o.slot_grouping, o.ring_init, o.ring_residual
        self.chunk_mb, self.lr_scales = o.chunk_mb, o.lr_scales
        self.buffers: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []
        self._cache: tuple | None = None

        self._classify()
        self._scales = {s.name: adjustment(plan, s, self.head_norms).scale
                        for s in [*self.ring_specs, *self.bias_of.values()]}
        self._layout_modes()
        self.rank_auto = o.rank is None
        self.rank = min(MAX_RANK, exact_rank(self.layout, any(plan.identity))) if self.rank_auto else o.rank
        self._init_cores()
        self._init_outside()
        self._add_noise()
        for t in self.params.values():
            t.requires_grad_(True)
        sizes = self.mode_sizes()
        self.order = cheapest_order(sizes["source"], sizes["target"], self.rank)

    # -- the pre-flight estimate (modelgrow.preflight) ------------------------------------

    @classmethod
    def state_params(cls, source, new, options) -> int:
        """The four ring cores, the residual pair and the depth vectors of the per-layer
        tensors outside the ring, from the dims (upper bounds; the auto rank as
        ``_ring_sizes`` counts it)."""
        rank, (u1, u2), (b1, b2), ringed = ring_sizes(source, new, options)
        cores = rank * rank * (b1 * b2 + (u1 + 1) * (u2 + 1) + u1 * u2 + source.dims.layers * new.layers)
        outside = sum(1 for s in source.specs() if s.per_layer) - ringed
        return cores + 2 * source.dims.residual * new.residual + new.layers * source.dims.layers * outside

    @classmethod
    def state_bytes(cls, source, new, options) -> int:
        """Also M1 (the small model's ring matrices stacked, fp32) and one contraction chunk."""
        _, (u1, _), (b1, _), _ = ring_sizes(source, new, options)
        chunk = options.get("chunk_mb", DEFAULT_CHUNK_MB)
        chunk = chunk if isinstance(chunk, (int, float)) and 0 < chunk < 1e9 else DEFAULT_CHUNK_MB
        m1 = 4 * b1 * (u1 + 1) * u1 * source.dims.layers
        return super().state_bytes(source, new, options) + m1 + int(chunk * 2**20)

    # -- which tensors go into the ring ------------------------------------------------

    def _classify(self) -> None:
        specs = self.source.specs()
        self.ring_specs = [s for s in specs if in_ring(s)]
        ringed = {s.name: s for s in self.ring_specs}
        self.bias_of: dict[str, TensorSpec] = {}  # matrix name -> its bias spec
        self.matrix_of: dict[str, TensorSpec] = {}  # bias name -> its matrix spec
        for s in specs:
            if not (s.per_layer and s.kind == "param" and len(s.axes) == 1 and s.name.endswith("bias")):
                continue
            m = ringed.get(s.name[: -len("bias")] + "weight")
            if m is not None and s.axes[0] == m.axes[1 - m.in_axis]:
                self.bias_of[m.name], self.matrix_of[s.name] = s, m
        self.outside = [s for s in specs if s.name not in ringed and s.name not in self.matrix_of]
        self.outside_names = {s.name for s in self.outside}

    def _layout_modes(self) -> None:
        layout = lay_out(self.plan, self.ring_specs, self.grouping, self.maps)
        self.layout = layout
        self.units, self.places, self.blocks, self.B = layout.units, layout.places, layout.blocks, layout.slots
        for (mode, role), place in self.places.items():
            self.buffers[f"readback.{mode}.{role}"] = place.readback

    def mode_sizes(self) -> dict[str, dict[str, int]]:
        """Sizes of M1's and M2's modes (I includes the homogeneous unit)."""
        (b1, b2), (i1, i2), (o1, o2) = self.B, self.units["I"], self.units["O"]
        return {"source": {"B": b1, "I": i1 + 1, "O": o1, "L": self.plan.old.layers},
                "target": {"B": b2, "I": i2 + 1, "O": o2, "L": self.plan.new.layers}}

    # -- initialisation ----------------------------------------------------------------

    def _init_cores(self) -> None:
        """The copy start's channels and cores (operators/ring_init.py)."""
        channels = plan_channels(self.plan, self.rank, self.layout)
        self.notes += channels.notes
        if self.rank_auto:
            self.notes.append(auto_note(self.rank, channels, self.plan.promise.exact))
        self.depth_fallback = channels.depth_fallback
        for mode, role in channels.own:  # a role on its own map is read in place: unit t at position t
            self.buffers[f"readback.{mode}.{role}"] = torch.arange(self.plan.new.role_size(role))
        self.inexact_roles = channels.inexact_roles
        self.channels, self.channel_of = channels.signatures, channels.of_block
        cores, self._copy_groups = copy_cores(self.plan, self.rank, self.ring_init, self.layout, channels, self.maps,
                                              self.mode_sizes())
        for m in RING:
            self.params[f"ring.{m}"] = cores[m]
        self.active = list(range(len(self.channels)))

    def _init_outside(self) -> None:
        """Recipes for tensors outside the ring (docs/mango.md §3): residual pair, depth vectors."""
        plan = self.plan
        m = self.maps.maps["residual"]
        if self.residual == "separate":
            self.params["residual.out"] = copy_matrix(m, "out", self.maps.pad_value)
            self.params["residual.in"] = copy_matrix(m, "in", self.maps.pad_value)
        else:
            # The residual frame of the channel that reads it (S_res) and of the one that writes it (E_res).
            self.tied_channel = {}
            for side, mode in (("in", "I"), ("out", "O")):
                g = next((g for b, g in zip(self.blocks, self.channel_of)
                          if (b.inp if mode == "I" else b.out).role == "residual"), None)
                if g is None:
                    raise UsageError("--ring-residual tied needs ring matrices that read and write the residual stream",
                                     hint="use --ring-residual separate")
                self.tied_channel[side] = g

        def expansion(role: str, side: str) -> tuple[str, int]:
            if role == "residual":
                return f"residual.{side}", 1
            key = f"fixed.{side}.{role}"  # other growable roles outside the ring: the copy map, fixed
            if key not in self.buffers:
                self.buffers[key] = copy_matrix(self.maps.role(role), side, self.maps.pad_value)
            return key, 1

        self.recipes = {t.name: build_recipe(plan, t, self.maps, self.head_norms, self.params, expansion)
                        for t in plan.targets if t.spec.name in self.outside_names}

    def _add_noise(self) -> None:
        if self.noise == 0:
            return
        add_ring_noise({m: self.params[f"ring.{m}"] for m in RING}, self.noise, self.noise_mode, self.ring_init,
                       self.active, self._copy_groups, self.units, self.seed)
        if self.residual == "separate":
            rm = self.maps.maps["residual"]
            for side in ("in", "out"):
                gen = operator_seed(self.seed, f"mango:residual.{side}")
                perturb_expansion(self.params[f"residual.{side}"], rm, side, self.noise, self.noise_mode, gen)

    # -- LearnedOperator ---------------------------------------------------------------

    def param_group(self, name: str) -> str:
        return name if name.startswith("ring.") else name.split(".")[0]

    def lr_scale(self, name: str) -> float:
        return float(self.lr_scales.get(self.param_group(name), 1.0))

    def to(self, device) -> None:
        super().to(device)
        self.buffers = {k: v.to(self.device) for k, v in self.buffers.items()}
        self._cache = None

    # -- the source side ---------------------------------------------------------------

    def _source_tensors(self) -> dict[str, torch.Tensor]:
        """M1 (key "M") and the tensors outside the ring (per-layer ones stacked [L, ...])."""
        if self._src is None:
            src, plan, out = self.source, self.plan, {}
            sizes = self.mode_sizes()["source"]
            m1 = torch.zeros(sizes["B"], sizes["I"], sizes["O"], sizes["L"])
            for layer in range(plan.old.layers):
                for spec in self.ring_specs:
                    w = src.get(spec, layer).to(torch.float32).movedim(spec.in_axis, 0)  # [in, out]
                    bias_spec = self.bias_of.get(spec.name)
                    bias = src.get(bias_spec, layer).to(torch.float32) if bias_spec is not None else None
                    for blk in (b for b in self.blocks if b.spec is spec):
                        write_block(m1, layer, blk, w, bias, self.units)
            out["M"] = m1
            out.update(self.stacked_source(self.outside))
            self._src = {k: v.to(self.device) for k, v in out.items()}
        return self._src

    # -- the ring ----------------------------------------------------------------------

    def chunk_size(self) -> int:
        """Target indices of the first core per chunk, so the largest intermediate stays
        under ``chunk_mb`` (fp32)."""
        sizes = self.mode_sizes()
        return chunk_for_budget(self.order, sizes["source"], sizes["target"], self.rank, self.chunk_mb)

    def ring_output(self) -> torch.Tensor:
        """M2 [B2, I2, O2, L2]. Without gradients the result is cached until a core changes."""
        cores = {m: self.params[f"ring.{m}"] for m in RING}
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores.values())
        key = tuple((id(c), c._version) for c in cores.values()) + (torch.is_autocast_enabled(self.device.type),)
        if not grad and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        m1 = self._source_tensors()["M"]
        chunk = self.chunk_size()
        m2 = contract(cores, m1, self.order, chunk=chunk, checkpoint=grad)
        self._cache = None if grad else (key, m2)
        return m2

    def _ring_tensor(self, target: TargetTensor, m2: torch.Tensor) -> torch.Tensor:
        m2l = m2[..., target.layer]
        spec = target.spec
        if spec.name in self.matrix_of:  # a bias
            matrix = self.matrix_of[spec.name]
            parts = [read_bias(m2l, b, self.units, self.buffers[f"readback.O.{b.out.role}"])
                     for b in self.blocks if b.spec is matrix and b.first_in]
            return self._adjusted(spec, torch.cat(parts) if len(parts) > 1 else parts[0])
        rows = []
        blocks = [b for b in self.blocks if b.spec is spec]
        for first in (b for b in blocks if b.out.start_old == 0):
            row = [read_block(m2l, b, self.units, self.buffers[f"readback.I.{b.inp.role}"],
                              self.buffers[f"readback.O.{b.out.role}"]) for b in blocks if b.inp == first.inp]
            rows.append(torch.cat(row, dim=1) if len(row) > 1 else row[0])
        w = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]  # [in, out]
        return self._adjusted(spec, w.movedim(0, spec.in_axis))

    def _adjusted(self, spec: TensorSpec, w: torch.Tensor) -> torch.Tensor:
        scale = self._scales[spec.name]  # q/k norm inputs at padded widths
        return w * scale if scale != 1.0 else w

    def _outside_tensor(self, target: TargetTensor) -> torch.Tensor:
        w = self._source_tensors()[target.spec.name]
        return apply_recipe(w, self.recipes[target.name], self._tensor, self.maps.maps["residual"])

    def _tensor(self, key: str) -> torch.Tensor:
        """A recipe's depth vector or expansion matrix."""
        if key.startswith("residual."):
            return self._residual_matrix(key.split(".")[1])
        return self.buffers[key] if key.startswith("fixed.") else self.params[key]

    def _residual_matrix(self, side: str) -> torch.Tensor:
        if self.residual == "separate":
            return self.params[f"residual.{side}"]
        mode, g = ("I" if side == "in" else "O"), self.tied_channel[side]
        core = self.params[f"ring.{mode}"][g, :, :, g]
        d1 = self.plan.old.residual
        return core.index_select(0, self.buffers[f"readback.{mode}.residual"])[:, :d1]

    def compute(self, target: TargetTensor) -> torch.Tensor:
        if target.spec.name in self.outside_names:
            w = self._outside_tensor(target)
        else:
            w = self._ring_tensor(target, self.ring_output())
        assert tuple(w.shape) == target.shape, (target.name, tuple(w.shape), target.shape)
        return w

    def materialise(self) -> dict[str, torch.Tensor]:
        m2 = self.ring_output()  # once per call: every ring tensor is a slice of it
        out = {}
        for t in self.plan.targets:
            w = self._outside_tensor(t) if t.spec.name in self.outside_names else self._ring_tensor(t, m2)
            assert tuple(w.shape) == t.shape, (t.name, tuple(w.shape), t.shape)
            out[t.name] = w
        return out

    # -- reporting ---------------------------------------------------------------------

    def promise(self):
        p = super().promise()
        width, depth, noise, notes = p.width, p.depth, p.noise, list(p.notes)
        if self.inexact_roles:
            width = False
            notes.append("the ring's Kronecker copy map cannot reproduce the copy operator's map for "
                         + ", ".join(self.inexact_roles) + ": per-layer matrices start near, not at, the copy solution")
        notes += self.notes
        if self.noise > 0 and self.noise_mode == "plain":
            noise = False
            notes.append("plain noise on every core: not exact by design")
        return dataclasses.replace(p, width=width, depth=depth, noise=noise, notes=notes)

    def describe_options(self):
        sizes = self.mode_sizes()
        macs, _ = contraction_cost(self.order, sizes["source"], sizes["target"], self.rank)
        ring = sum(self.params[f"ring.{m}"].numel() for m in RING)
        return {
            **super().describe_options(),
            "rank": self.rank,  # the rank in effect; auto (unset) resolved
            "rank_choice": "auto" if self.rank_auto else "given",
            "modes": sizes,
            "contraction_order": "".join(m for m, _ in self.order),
            "contraction_macs": macs,
            "chunk": self.chunk_size(),
            "channels": ["/".join(sig) for sig in self.channels],
            "params": sum(t.numel() for t in self.params.values()),
            "ring_params": ring,
            "depth_vectors": sum(1 for k in self.params if k.startswith("depth.")),
            "inexact_roles": self.inexact_roles,
        }


@hookimpl
def register_operators(register):
    register(MangoOperator)
