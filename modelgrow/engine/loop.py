"""The one optimisation loop behind the fit pass and `modelgrow train`.

A pass supplies what differs — the tensors to optimise, the summed loss of a local
batch, what to do before and after a step (dropout seeds, ReLoRA merges), how to score
held-out data and how to save a resumable step — and the loop does the rest the same
way for both: global batches split over ranks (and on each rank into ``accumulate``
micro-batches, run one after another before one optimiser step), bf16 autocast on
CUDA, one flat gradient all-reduce, clipping, the learning-rate schedule, AdamW,
divergence checks, curves, progress and timing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from ..errors import UsageError
from ..options import Options, option, seed_option
from .device import autocast
from .distributed import Dist, grad_norm, sync_grads, world_size
from .sharding import full_norm
from .objective import LMObjective
from .schedule import Schedule


Beta = Annotated[float, Field(ge=0, lt=1)]  # what AdamW accepts


class LoopOptions(Options):
    """What every optimisation pass takes; the fit and train groups set their own defaults."""

    data: list[Path] | None = option(None, "Data: text (tokenised with --tokenizer), .npy ids, or raw .bin ids "
                                           "(uint16, uint32 past 65,536 ids); repeat for more files.")
    steps: int = option(1000, "Optimiser steps.", ge=1, strict=True)
    # le: torch keeps the rate as a float32 tensor in places; 1e308 overflows it.
    lr: float = option(1e-3, "Peak learning rate: AdamW, linear warmup, cosine to the floor.", gt=0, le=1e30,
                       allow_inf_nan=False)
    warmup: int | None = option(None, "Warmup steps [default: 10% of the steps].", ge=0, strict=True)
    min_lr_ratio: float = option(0.1, "Where the cosine ends, as a fraction of the peak learning rate.", ge=0, le=1)
    weight_decay: float = option(0.1, "AdamW weight decay.", ge=0, lt=1)
    batch_size: int = option(16, "Global batch in windows, split across torchrun processes.", ge=1, strict=True)
    accumulate: int = option(1, "Gradient accumulation: each process runs its share of the batch as N consecutive "
                                "micro-batches (forward and backward each) before one optimiser step; the same "
                                "gradient, the activation memory of one micro-batch.", ge=1, strict=True)
    seq_len: int | None = option(None, "Tokens per window [default: min(128, the model's positions)].", ge=1, strict=True)
    seed: int = seed_option("Seed of data order, masks and dropout.")
    device: str = option("auto", "Where to run: auto, cpu, cuda or cuda:N; bf16 autocast on CUDA.")
    tokenizer: Path | None = option(None, "tokenizer.json for text data [default: the checkpoint's].")
    grad_clip: float = option(1.0, "Gradient norm clip, 0 for none.", ge=0)
    betas: tuple[Beta, Beta] = option((0.9, 0.95), "AdamW betas.")
    eps: float = option(1e-8, "AdamW epsilon.", gt=0, cli=False)
    eval_batches: int = option(8, "Held-out batches of --batch-size windows scored.", ge=0, strict=True)
    mask_rate: float = option(0.15, "Masked LM: fraction of positions masked.", gt=0, lt=1, cli=False)
    mask_token_id: int | None = option(None, "Masked LM: the mask token's id [default: the tokenizer's [MASK]].",
                                       strict=True, cli=False)
    bin_dtype: str | None = option(None, "Raw .bin ids: uint16 or uint32 [default: from the vocabulary size].", cli=False)

    @model_validator(mode="after")
    def _micro_batches(self) -> LoopOptions:
        """Every micro-batch needs a window: each process's share of the batch (torchrun's
        WORLD_SIZE, as engine.distributed reads it) must hold ``accumulate`` of them."""
        world = world_size()
        per_rank = self.batch_size // max(1, world)
        if per_rank < self.accumulate:
            flag = type(self).flag
            share = f"{per_rank} per process over {world} processes" if world > 1 else f"only {per_rank}"
            raise UsageError(f"{flag('accumulate')} {self.accumulate} needs at least {self.accumulate} windows per "
                             f"process, but {flag('batch_size')} {self.batch_size} gives {share}",
                             hint=f"lower {flag('accumulate')} or raise {flag('batch_size')}")
        return self

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else min(self.warmup, self.steps)

    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.warmup_steps, self.min_lr_ratio)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at 0-based ``step``."""
        return self.schedule()(step)


@dataclass
class History:
    """The curves of a run (restored on resume, so a resumed run reports the whole run)."""

    loss_curve: list[float] = field(default_factory=list)
    lr_curve: list[float] = field(default_factory=list)
    grad_norm_curve: list[float] = field(default_factory=list)
    val_curve: list[list] = field(default_factory=list)  # [steps done, loss]
    step_times: list[float] = field(default_factory=list)

    def score(self, done: int, loss: float | None) -> None:
        if loss is not None:
            self.val_curve.append([done, loss])


def micro_batches(local: dict, parts: int) -> list[dict]:
    """``parts`` consecutive row slices of a rank's batch (sizes differ by one at most).
    Every tensor is keyed by rows; plain values (the global ``count``) pass through whole."""
    if parts == 1:
        return [local]
    rows = local["input_ids"].shape[0]
    cuts = [i * rows // parts for i in range(parts + 1)]
    return [{k: (v[a:b] if torch.is_tensor(v) else v) for k, v in local.items()} for a, b in zip(cuts, cuts[1:])]


@dataclass
class Loop:
    """One optimisation run. ``loss_sum(local_batch)`` returns the summed loss of this
    rank's rows (one micro-batch of them, with ``accumulate`` > 1); the loop divides by
    the global count. Hooks are optional.

    ``begin_step()`` and ``end_backward()`` bracket the micro-batches of one optimiser
    step: the first runs before the first forward (under autocast, gradients on), the
    second after the last backward, before the gradient all-reduce. A pass whose
    forward starts with costly work shared by every micro-batch does it once there (the
    fit materialises the grown weights in ``begin_step`` and backpropagates their
    accumulated gradients through that in ``end_backward``).
    """

    options: LoopOptions
    groups: list[dict]  # AdamW parameter groups; "lr_scale" multiplies the scheduled lr
    objective: LMObjective
    sampler: object  # corpus.WindowSampler
    mask_gen: torch.Generator
    dist: Dist
    device: torch.device
    loss_sum: Callable[[dict], torch.Tensor]
    schedule: Schedule
    name: str = "training"
    evaluate: Callable[[], float | None] | None = None
    eval_every: int = 0  # 0: only before the first step and after the last
    before_step: Callable[[int], None] | None = None
    after_step: Callable[[int], None] | None = None
    begin_step: Callable[[], None] | None = None
    end_backward: Callable[[], None] | None = None
    summed: bool = False  # the tensors are FSDP2 shards (engine.sharding): their gradients arrive summed
    save: Callable[[int], None] | None = None
    save_every: int | None = None
    history: History = field(default_factory=History)

    def __post_init__(self) -> None:
        o = self.options
        self.tensors = [p for g in self.groups for p in g["params"]]
        # A group's own "weight_decay" overrides the option (norms and biases take none).
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "lr_scale"} for g in self.groups],
                                           lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.scales = [g.get("lr_scale", 1.0) for g in self.groups]

    def score(self, done: int) -> None:
        if self.evaluate is not None:
            with torch.no_grad(), autocast(self.device):
                self.history.score(done, self.evaluate())

    def run(self, *, start: int = 0, show: bool = False) -> History:
        o, h = self.options, self.history
        if start == 0:
            self.score(0)
        bar = tqdm(range(start, o.steps), desc=self.name, unit="step", disable=not show, leave=False,
                   initial=start, total=o.steps)
        for step in bar:
            t_step = time.perf_counter()
            value, norm, lr = self.step(step)
            h.loss_curve.append(value)
            h.lr_curve.append(lr)
            h.grad_norm_curve.append(norm)
            if self.after_step is not None:
                self.after_step(step)
            h.step_times.append(time.perf_counter() - t_step)
            bar.set_postfix(loss=f"{value:.4f}")
            done = step + 1
            if done == o.steps or (self.eval_every and done % self.eval_every == 0):
                self.score(done)
            if self.save is not None and self.save_every and done % self.save_every == 0 and done < o.steps:
                self.save(done)
        bar.close()
        return h

    def step(self, step: int) -> tuple[float, float, float]:
        o, dist = self.options, self.dist
        if self.before_step is not None:
            self.before_step(step)
        batch = self.objective.batch(self.sampler.windows(o.batch_size), self.mask_gen)
        local = dist.local(batch, self.device)
        if self.begin_step is not None:
            with autocast(self.device):
                self.begin_step()
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for part in micro_batches(local, o.accumulate):
            with autocast(self.device):
                part_loss = self.loss_sum(part) / batch["count"]  # the global count: parts add up to the mean
            part_loss.backward()
            loss += part_loss.detach().double()
        if self.end_backward is not None:
            self.end_backward()
        # Only what trains now: a frozen tensor (ReLoRA's idle adapters or frozen matrices)
        # must not get a zero gradient, on which AdamW would still decay it.
        live = [t for t in self.tensors if t.requires_grad]
        if not self.summed:
            sync_grads(dist, live)
        clip = o.grad_clip
        norm = full_norm(torch.nn.utils.clip_grad_norm_(live, clip) if clip > 0 else grad_norm(live))
        lr = o.lr * self.schedule(step)
        for group, scale in zip(self.optimizer.param_groups, self.scales):
            group["lr"] = lr * scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(dist.sum_(loss))
        if not math.isfinite(value):
            raise UsageError(f"{self.name} diverged at step {step}: loss {value}",
                             hint="lower the learning rate or lengthen the warmup; nothing was written")
        return value, float(norm), lr

    def optimizer_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t))
