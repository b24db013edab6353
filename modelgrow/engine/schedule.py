"""The one learning-rate schedule family: linear warmup, cosine decay to a floor, and
optionally ReLoRA's restarts (a drop to zero and a re-warm every ``cycle`` steps)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Multiplier of the peak learning rate at a 0-based step."""

    steps: int
    warmup: int
    min_ratio: float = 0.1
    cycle: int | None = None  # ReLoRA: the learning rate is 0 at every k * cycle (k >= 1)
    restart_warmup: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        cycle = self.cycle
        if cycle and step >= cycle and step % cycle < self.restart_warmup:
            into = step % cycle
            return into / self.restart_warmup * self.cosine(step - into + self.restart_warmup)
        return self.cosine(step)

    def cosine(self, step: int) -> float:
        progress = min(1.0, max(0.0, (step - self.warmup) / max(1, self.steps - self.warmup)))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def describe(self) -> str:
        text = f"linear warmup, cosine to {self.min_ratio:g} x lr"
        if self.cycle:
            text += f"; LR 0 at every {self.cycle}th step, then re-warm over {self.restart_warmup}"
        return text


def jagged_cosine(step: int, total: int, warmup: int, cycle: int | None, restart_warmup: int,
                  min_ratio: float = 0.1) -> float:
    """``Schedule(total, warmup, min_ratio, cycle, restart_warmup)(step)``, as a function."""
    return Schedule(total, warmup, min_ratio, cycle, restart_warmup)(step)
