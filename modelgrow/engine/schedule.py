"""The one learning-rate schedule family: linear warmup, cosine decay to a floor, and
optionally ReLoRA's restarts (a drop to zero and a re-warm every ``cycle`` steps).

The multiplier is of the peak rate the caller scales it by. `modelgrow train`'s
``--lr-schedule`` choices are members of this one family (train_options.TrainOptions):
``rewarm`` warms up to ``--lr``; ``continue`` has no warmup (``warmup=0``: step 0 takes
the peak itself, then the cosine falls monotonically towards ``min_ratio`` x peak) and
its peak is the rate the source's training ended at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Multiplier of the peak learning rate at a 0-based step.

    ReLoRA (``cycle`` set): the learning rate is 0 at the switch from full-rank training
    to adapters (step ``start``, when ``start`` > 0) and at every merge, steps
    ``start + k * cycle`` (k >= 1); it re-warms over ``restart_warmup`` steps after each.
    A merge is skipped when its fresh adapters would get fewer than ``cycle // 2`` steps
    before the end (the last adapters then train on to the end instead).
    """

    steps: int
    warmup: int
    min_ratio: float = 0.1
    cycle: int | None = None
    restart_warmup: int = 0
    start: int = 0  # ReLoRA: full-rank steps before the adapters take over

    @property
    def merges(self) -> tuple[int, ...]:
        """The steps after which the adapters are merged (each taken at learning rate 0)."""
        if not self.cycle:
            return ()
        return tuple(range(self.start + self.cycle, self.steps - self.cycle // 2, self.cycle))

    def merges_after(self, step: int) -> bool:
        """Whether the adapters are merged right after ``step`` (``step in merges``, in O(1))."""
        c, into = self.cycle, step - self.start
        return bool(c) and into >= c and into % c == 0 and step < self.steps - c // 2

    def last_drop(self, step: int) -> int | None:
        """The latest step at or before ``step`` taken at learning rate 0 (switch or merge)."""
        c = self.cycle
        if not c or step < self.start:
            return None
        k = (min(step, self.steps - 1 - c // 2) - self.start) // c
        if k >= 1:
            return self.start + k * c
        return self.start if self.start > 0 else None

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        last = self.last_drop(step)
        if last is not None and step - last < self.restart_warmup:
            into = step - last
            return into / self.restart_warmup * self.cosine(last + self.restart_warmup)
        return self.cosine(step)

    def cosine(self, step: int) -> float:
        progress = min(1.0, max(0.0, (step - self.warmup) / max(1, self.steps - self.warmup)))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def describe(self) -> str:
        text = f"{'linear warmup' if self.warmup else 'no warmup'}, cosine to {self.min_ratio:g} x lr"
        if self.cycle:
            where = (f"full-rank for {self.start} steps, then adapters: LR 0 at step {self.start} and every "
                     f"{self.cycle} steps after it" if self.start else f"LR 0 at every {self.cycle}th step")
            text += f"; {where} (no merge in the last {self.cycle // 2}), then re-warm over {self.restart_warmup}"
        return text


def jagged_cosine(step: int, total: int, warmup: int, cycle: int | None, restart_warmup: int,
                  min_ratio: float = 0.1, start: int = 0) -> float:
    """``Schedule(total, warmup, min_ratio, cycle, restart_warmup, start)(step)``, as a function."""
    return Schedule(total, warmup, min_ratio, cycle, restart_warmup, start)(step)
