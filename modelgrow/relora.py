"""ReLoRA pieces: low-rank adapters that are periodically merged into the frozen weights,
so that many rank-r updates add up to a high-rank change (Lialin et al., ICLR 2024).

Which matrices get adapters comes from the layout (per-layer parameters with an input
axis), never from module-name guesses. Known defects of the reference code are avoided:
A is Kaiming-initialised and B zero (the reference zeroes both, so its first cycle
learns nothing); Adam moments are pruned with one joint mask for both moments (two
independent masks can leave a large m over a zeroed v, i.e. a huge first step).

Full-rank warm start (the paper's recipe; the reference code needs two runs for it):
the adapters are in place from the start but idle -- branch skipped, A and B frozen, the
adapted matrices trainable -- so the first steps are plain full-rank training; at the
switch the matrices freeze (their Adam moments are dropped) and the adapters take over.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import nn

from .errors import UsageError
from .layout import EXPERT, LAYER, Layout


class LoRAAdapter(nn.Module):
    """Wraps a module holding a 2-D ``weight``: base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Module, in_axis: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.in_axis = in_axis  # 1 for nn.Linear [out, in]; 0 for GPT-2's Conv1D [in, out]
        w = base.weight
        n_in, n_out = w.shape[in_axis], w.shape[1 - in_axis]
        self.lora_A = nn.Parameter(torch.empty(rank, n_in, dtype=torch.float32, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, dtype=torch.float32, device=w.device))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.active = True  # False: idle during a full-rank warm start (base(x) alone)
        base.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.base(x)
        lora = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + (self.scale * lora).to(x.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the frozen weight (in fp32) and zero B."""
        delta = (self.lora_B @ self.lora_A) * self.scale  # [out, in]
        if self.in_axis == 0:
            delta = delta.T
        w = self.base.weight
        w.copy_((w.float() + delta).to(w.dtype))
        self.lora_B.zero_()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator) -> None:
        # kaiming_uniform_(a=sqrt(5)) as nn.Linear does, drawn from an explicit generator
        # so every DDP rank draws the same A.
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        a = torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound
        self.lora_A.copy_(a.to(self.lora_A.device))
        self.lora_B.zero_()


def set_full_rank(adapters: list[LoRAAdapter], full_rank: bool) -> None:
    """Full-rank warm start on or off: the adapted matrices train themselves (adapters idle,
    A and B frozen), or the ReLoRA arrangement (matrices frozen, adapters training)."""
    for a in adapters:
        a.active = not full_rank
        a.base.weight.requires_grad_(full_rank)
        a.lora_A.requires_grad_(not full_rank)
        a.lora_B.requires_grad_(not full_rank)


def switch_to_adapters(adapters: list[LoRAAdapter], optimizer: torch.optim.Optimizer) -> None:
    """End of the full-rank warm start: freeze the matrices, drop their Adam moments, and let
    the adapters (B still zero: the function is unchanged) train from here."""
    set_full_rank(adapters, False)
    for a in adapters:
        optimizer.state.pop(a.base.weight, None)


def check_rank(source, rank: int) -> None:
    """Adapters must be low-rank: r below both sides of every adapted matrix (before any step)."""
    if not adapter_targets(source.layout):
        raise UsageError(f"--relora: the {source.layout.name} layout names no per-layer matrices to adapt")
    adapted = {t.name for t in source.layout.tensors if adaptable(t)}  # templates: per-expert specs are not
    sides = [min(source.checkpoint.info(b.name).shape) for b in source.bound() if b.spec.name in adapted]
    if sides and rank >= min(sides):
        raise UsageError(f"--rank {rank} is not below the smallest adapted matrix side ({min(sides)}): the adapters "
                         "would hold at least as many parameters as the matrices",
                         hint=f"use --rank < {min(sides)}, or train full-rank without --relora")


def adaptable(spec) -> bool:
    """A per-layer matrix an adapter can wrap: not a router or a one-unit gate (modules that
    return more than a Linear's output, or have a side of one), nor a per-expert tensor
    (transformers fuses a block's experts into one 3-D parameter)."""
    roles = {r for axis in spec.axes for r in axis}
    return (spec.per_layer and spec.kind == "param" and spec.in_axis is not None and len(spec.axes) == 2
            and not roles & {"experts", "one"} and EXPERT not in spec.name)


def adapter_targets(layout: Layout) -> list[tuple[re.Pattern, int]]:
    """(pattern of module weight names, input axis) for every per-layer matrix."""
    out = []
    for spec in layout.tensors:
        if adaptable(spec):
            name = spec.name
            if layout.base_prefix and name.startswith(layout.base_prefix):
                name = name[len(layout.base_prefix):]
            body = re.escape(name).replace(re.escape(LAYER), r"\d+")
            out.append((re.compile(rf"^(?:.*\.)?{body}$"), spec.in_axis))
    return out


def add_adapters(module: nn.Module, layout: Layout, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator) -> list[LoRAAdapter]:
    """Replace every per-layer matrix of ``module`` with an adapter; freeze its weight."""
    targets = adapter_targets(layout)
    found = []
    for name, child in list(module.named_modules()):
        w = getattr(child, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2 or isinstance(child, LoRAAdapter):
            continue
        for pattern, in_axis in targets:
            if pattern.match(f"{name}.weight"):
                found.append((name, child, in_axis))
                break
    adapters = []
    for name, child, in_axis in found:
        adapter = LoRAAdapter(child, in_axis, rank, alpha, dropout)
        adapter.redraw(generator)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, adapter)
        adapters.append(adapter)
    if not adapters:
        raise ValueError(f"the {layout.name} layout names no per-layer matrices to adapt")
    return adapters


def remove_adapters(module: nn.Module) -> None:
    """Merge every adapter and put the plain modules back: a dense model again."""
    for name, child in list(module.named_modules()):
        if isinstance(child, LoRAAdapter):
            child.merge()
            child.base.weight.requires_grad_(True)
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.base)


@torch.no_grad()
def prune_moments(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], ratio: float) -> None:
    """Zero the Adam moments of ``params``: the smallest ``ratio`` by |m| (one mask for
    both m and v); ratio >= 1 resets them fully. The step count is kept."""
    for p in params:
        state = optimizer.state.get(p)
        if not state or "exp_avg" not in state:
            continue
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if ratio >= 1:
            m.zero_()
            v.zero_()
            continue
        k = int(ratio * m.numel())
        if k == 0:
            continue
        # kthvalue, not quantile: quantile refuses tensors over 2**24 elements.
        threshold = m.abs().flatten().float().kthvalue(k).values
        keep = m.abs() > threshold
        m.mul_(keep)
        v.mul_(keep)


def restart(adapters: list[LoRAAdapter], optimizer: torch.optim.Optimizer, generator: torch.Generator,
            prune: float) -> bytes:
    """A ReLoRA restart: merge every adapter, redraw A from ``generator``, zero B, prune
    the adapters' Adam moments. Returns the sha256 of the new A matrices (ranks compare it)."""
    for a in adapters:
        a.merge()
    for a in adapters:
        a.redraw(generator)
    prune_moments(optimizer, [p for a in adapters for p in (a.lora_A, a.lora_B)], prune)
    digest = hashlib.sha256()
    for a in adapters:
        digest.update(a.lora_A.detach().cpu().numpy().tobytes())
    return digest.digest()


def relora_report(o, adapters: list[LoRAAdapter], restarts: list[dict]) -> dict:
    """The report's ``relora`` section for TrainOptions ``o``."""
    return {
        "rank": o.rank, "alpha": o.alpha, "scale": o.alpha / o.rank, "adapter_dropout": o.adapter_dropout,
        "every": o.relora_every, "restart_warmup": o.restart_warmup, "optimizer_prune": o.optimizer_prune,
        "full_rank_steps": o.full_rank_steps,
        "adapters": len(adapters), "adapter_params": sum(a.lora_A.numel() + a.lora_B.numel() for a in adapters),
        "merge_timing": "after the step taken at LR 0 (0-based steps full_rank_steps + k*every, k >= 1, none "
                        "leaving fewer than every // 2 steps): merge in fp32, redraw A from (seed, k), zero B, prune "
                        "the adapters' Adam moments",
        "restarts": restarts,
    }
