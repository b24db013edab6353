"""The options of `modelgrow train`, declared once (flags, checks, defaults, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import model_validator

from . import seeding
from .engine.loop import LoopOptions
from .engine.schedule import Schedule
from .errors import UsageError
from .options import Options, defaults, option

# Options that do not change the trajectory: a resumed run may give other values.
RESUME_FREE = ("save_every", "plot", "device", "data", "val_data", "tokenizer")
# Options a resumed run does not take from the step folder: where this run draws its plot
# (an output path is given each time, never inherited).
NOT_RESUMED = ("plot",)
RESUMED_PATHS = ("data", "val_data", "tokenizer")


@defaults(lr=1e-3, weight_decay=0.1, eval_batches=8)
class TrainOptions(LoopOptions):
    """Every knob of a training run; all of them end up in the report."""

    kind = "train"

    data: list[Path] | None = option(None, "Training data: text (tokenised with --tokenizer), .npy ids or raw .bin "
                                           "ids; repeat for more files.")
    val_data: list[Path] | None = option(None, "Held-out data for the validation curve [default: the last "
                                               "--val-fraction of --data].")
    val_fraction: float = option(0.05, "Tail of the token stream held out for validation.", ge=0, lt=1)
    steps: int = option(1000, "Optimiser steps.", ge=1, strict=True)
    warmup: int | None = option(None, "Warmup steps [default: 10% of --steps, at most --relora-every].", ge=0, strict=True)
    eval_every: int | None = option(None, "Validation every N steps, 0 for only before and after [default: steps/10].",
                                    ge=0, strict=True)
    relora: bool = option(False, "ReLoRA: train low-rank adapters on the layer matrices, merged every --relora-every steps.")
    rank: int = option(128, "ReLoRA adapter rank.", ge=1, strict=True)
    alpha: float = option(32.0, "ReLoRA scale numerator: scale = alpha / rank.", gt=0, allow_inf_nan=False)
    adapter_dropout: float = option(0.1, "Dropout on the adapter branch.", ge=0, lt=1)
    relora_every: int = option(500, "Steps between merges; the LR drops to 0 there.", ge=1, strict=True)
    restart_warmup: int = option(50, "Steps to re-warm the LR after a merge.", ge=0, strict=True)
    optimizer_prune: float = option(0.9, "Fraction of the adapters' Adam moments zeroed (smallest |m|) at a merge; "
                                         ">= 1 resets them.", ge=0)
    save_every: int | None = option(None, "Also write OUTPUT-checkpoints/step-N/ every N steps: a dense checkpoint "
                                          "plus the state --resume needs.", ge=1, strict=True)
    plot: Path | None = option(None, "Draw the train and validation loss curves to this PNG (needs matplotlib).")

    @model_validator(mode="after")
    def _consistent(self) -> TrainOptions:
        if self.relora and self.restart_warmup >= self.relora_every:
            raise UsageError(f"--restart-warmup must be in [0, --relora-every), got {self.restart_warmup}")
        if self.relora and self.warmup is not None and self.warmup > self.relora_every:
            raise UsageError(f"--warmup {self.warmup} is longer than --relora-every {self.relora_every}",
                             hint="the first warmup must end before the first restart")
        return self

    def require_data(self) -> TrainOptions:
        """Checked once a resume has had its say: a resumed run may take --data from its step folder."""
        if not self.data:
            raise UsageError("no training data given", hint="pass --data FILE (text, .npy or .bin ids)")
        return self

    def resumed(self, state: dict) -> TrainOptions:
        """The step folder's options, overridden by those the caller gave (set explicitly).

        Relative data paths are taken from the folder the interrupted run started in.
        Whether the given ones may differ is the resume check's business (RESUME_FREE).
        """
        stored = state.get("options") or {}
        merged = {k: v for k, v in stored.items() if k in type(self).model_fields and k not in NOT_RESUMED}
        start = state.get("cwd")
        if start and Path(start) != Path.cwd():
            for key in RESUMED_PATHS:
                value = merged.get(key)
                if isinstance(value, list):
                    merged[key] = [str(Path(start) / v) for v in value]
                elif isinstance(value, str):
                    merged[key] = str(Path(start) / value)
        merged.update(self.model_dump(include=self.model_fields_set))
        return type(self).parse(merged)

    @property
    def warmup_steps(self) -> int:
        default = self.steps // 10
        if self.relora:
            default = min(default, self.relora_every)
        return default if self.warmup is None else min(self.warmup, self.steps)

    @property
    def eval_interval(self) -> int:
        return self.steps // 10 if self.eval_every is None else self.eval_every

    def schedule(self) -> Schedule:
        cycle = self.relora_every if self.relora else None
        return Schedule(self.steps, self.warmup_steps, self.min_lr_ratio, cycle, self.restart_warmup)

    def restart_after(self, step: int) -> bool:
        """ReLoRA merges right after step k·relora_every (k >= 1): the one taken at LR 0."""
        return self.relora and step > 0 and step % self.relora_every == 0

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> TrainOptions:
        return cls.parse(options)


class TrainRun(Options):
    """Where a training run reads and writes (the run itself: TrainOptions)."""

    kind = "train"

    resume: Path | None = option(None, "Continue from a step folder (or the latest one in OUTPUT-checkpoints/); "
                                       "its options apply unless given again, and must match where they shape "
                                       "the run.")
    config: Path | None = option(None, "config.json, when not beside SOURCE.")
    max_shard_size: str | int = option("2GB", "Largest shard in bytes (KB/MB/GB, KiB/MiB/GiB).")
    overwrite: bool = option(False, "Replace OUTPUT (and its step folders) if they exist.")
    report: Path | None = option(None, "Write a JSON report of the run here.")


def restart_generator(seed: int, restart: int) -> torch.Generator:
    """A's generator for a restart: the same on every rank, and on a resumed run."""
    return torch.Generator().manual_seed(seeding.torch_seed("relora-A", seed, restart))


def checkpoints_dir(dest: str | Path) -> Path:
    """Where --save-every writes: beside OUT, so OUT appears only when complete."""
    dest = Path(dest)
    return dest.parent / f"{dest.name}-checkpoints"
