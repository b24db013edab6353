"""The options of `modelgrow train`, declared once (flags, checks, defaults, report)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import model_validator

from . import seeding
from .checkpoint.dtypes import DtypeName
from .checkpoint.sizes import ShardSize
from .engine.loop import LoopOptions
from .engine.schedule import Schedule
from .errors import InputError, UsageError
from .growth_map import GROWTH_MAP, read_growth_map
from .options import Options, defaults, option

# Options that do not change the trajectory: a resumed run may give other values.
RESUME_FREE = ("save_every", "plot", "device", "data", "val_data", "tokenizer", "accumulate")
# Options a resumed run does not take from the step folder: where this run draws its plot
# (an output path is given each time, never inherited).
NOT_RESUMED = ("plot",)
RESUMED_PATHS = ("data", "val_data", "tokenizer")
# Hugging Face's Trainer writes it into every checkpoint-N/ folder: log_history holds the
# learning_rate it logged every logging_steps.
TRAINER_STATE = "trainer_state.json"
TRAINER_STATE_BYTES = 256 * 2**20  # a long run's log is tens of MB at most


@defaults(lr=1e-3, weight_decay=0.1, eval_batches=8)
class TrainOptions(LoopOptions):
    """Every knob of a training run; all of them end up in the report."""

    kind = "train"
    help_after = {"lr_schedule": "warmup", "source_final_lr": "lr_schedule"}
    _lr_from: str | None = None  # where lr came from when not typed: a record, a step folder (lr_plan)

    data: list[Path] | None = option(None, "Training data: text (tokenised with --tokenizer), .npy ids or raw .bin "
                                           "ids; repeat for more files.")
    val_data: list[Path] | None = option(None, "Held-out data for the validation curve [default: the last "
                                               "--val-fraction of --data].")
    val_fraction: float = option(0.05, "Tail of the token stream held out for validation.", ge=0, lt=1)
    steps: int = option(1000, "Optimiser steps.", ge=1, strict=True)
    lr: float = option(1e-3, "Peak learning rate (AdamW): where the cosine starts [default: 1e-3; with --lr-schedule "
                             "continue: the source's final learning rate, --source-final-lr].", gt=0, le=1e30,
                       allow_inf_nan=False)
    warmup: int | None = option(None, "Warmup steps [default: --steps // 10; with --relora at most "
                                      "--full-rank-steps if given, else --relora-every: it ends before the LR "
                                      "first drops to 0; --lr-schedule continue: 0].", ge=0, strict=True)
    lr_schedule: Literal["rewarm", "continue"] = option(
        "rewarm", "rewarm: linear warmup to --lr, then cosine to --min-lr-ratio x --lr (a fresh run's schedule). "
                  "continue: no warmup spike: the first step takes the learning rate the source's training ended at "
                  "(--source-final-lr, else the last learning_rate in trainer_state.json beside SOURCE, else the rate "
                  "convert recorded in its growth_map.json; a typed --lr replaces it), then cosine to --min-lr-ratio x that rate; it keeps more of a grown model's head "
                  "start in short runs (BENCHMARKS.md section 1). A typed --warmup N with continue warms up to that "
                  "rate over N steps first (a short, low re-warm).")
    source_final_lr: float | None = option(
        None, "The learning rate the source's own training ended at (e.g. the last lr_curve value of its train "
              "report), where --lr-schedule continue starts [default: the last learning_rate logged in "
              "trainer_state.json beside SOURCE, as Hugging Face's Trainer writes it, else the rate convert "
              "recorded in growth_map.json].", gt=0, le=1e30,
        allow_inf_nan=False)
    eval_every: int | None = option(None, "Validation every N steps, 0 for only before and after "
                                          "[default: --steps // 10].", ge=0, strict=True)
    train: str = option("all", "Which tensors train: all; new (what growth_map.json beside SOURCE marks as new: "
                               "inserted blocks and repeated copies, as LLaMA Pro trains); or a glob of tensor names "
                               "('model.layers.1?.*'). The rest keep their bytes.", min_length=1)
    relora: bool = option(False, "ReLoRA: train low-rank adapters on the layer matrices, merged every --relora-every steps.")
    rank: int = option(128, "ReLoRA adapter rank.", ge=1, strict=True)
    alpha: float = option(32.0, "ReLoRA scale numerator: scale = alpha / rank.", gt=0, allow_inf_nan=False)
    adapter_dropout: float = option(0.1, "Dropout on the adapter branch.", ge=0, lt=1)
    relora_every: int = option(500, "Steps between merges; the LR drops to 0 there. A merge that would leave its fresh "
                                    "adapters fewer than --relora-every // 2 steps before the end is skipped (the "
                                    "last adapters train on to the end).", ge=1, strict=True)
    restart_warmup: int | None = option(None, "Steps to re-warm the LR after a merge (and after the switch from "
                                              "--full-rank-steps) [default: --relora-every // 10, at least 1, at most "
                                              "50, always below --relora-every].", ge=0, strict=True)
    full_rank_steps: int = option(0, "ReLoRA warm start: the first N steps train every parameter full-rank, then the "
                                     "adapters take over (the LR drops to 0 there and re-warms as after a merge; merges "
                                     "follow every --relora-every steps from N); 0: adapters from the first step.",
                                  ge=0, strict=True)
    optimizer_prune: float = option(0.9, "Fraction of the adapters' Adam moments zeroed (smallest |m|) at a merge; "
                                         ">= 1 resets them. The default follows the reference code's README (0.9), not "
                                         "the paper's 0.99, so that earlier runs stay reproducible.", ge=0)
    save_every: int | None = option(None, "Also write OUTPUT-checkpoints/step-N/ every N steps: a dense checkpoint "
                                          "plus the state --resume needs.", ge=1, strict=True)
    plot: Path | None = option(None, "Draw the train and validation loss curves to this PNG (needs matplotlib).")

    @model_validator(mode="after")
    def _consistent(self) -> TrainOptions:
        """Refuse typed values that contradict each other, then fill in the derived defaults.

        A derived value is written into the model but not marked as set (``model_fields_set``
        stays what the caller gave), so it is derived afresh whenever the options it
        depends on change, and reports record the value in effect.
        """
        typed = self.model_fields_set
        if "source_final_lr" in typed and self.lr_schedule != "continue":
            raise UsageError(f"--source-final-lr sets where --lr-schedule continue starts, not {self.lr_schedule}",
                             hint="add --lr-schedule continue, or leave it out: rewarm warms up to --lr")
        if self.relora and self.train != "all":
            raise UsageError(f"--train {self.train} with --relora is not supported yet",
                             hint="train the chosen tensors full-rank, or everything with --relora")
        if self.full_rank_steps and not self.relora:
            raise UsageError(f"--full-rank-steps {self.full_rank_steps} needs --relora",
                             hint="plain training is full-rank throughout; add --relora or leave it out")
        if self.relora and self.full_rank_steps >= self.steps:
            raise UsageError(f"--full-rank-steps must be below --steps ({self.steps}), got {self.full_rank_steps}")
        if self.relora and "restart_warmup" in typed and self.restart_warmup >= self.relora_every:
            raise UsageError(f"--restart-warmup must be in [0, --relora-every), got {self.restart_warmup}")
        first, by = self.first_drop
        if "warmup" in typed and first is not None and self.warmup > first:
            raise UsageError(f"--warmup {self.warmup} is longer than {by} {first}",
                             hint="the first warmup must end before the learning rate first drops to 0")
        for name, value in self.derived().items():
            if name not in typed:
                self.__dict__[name] = value
        return self

    @property
    def first_drop(self) -> tuple[int | None, str]:
        """The first step ReLoRA takes at LR 0, and the flag that put it there (None: none)."""
        if not self.relora:
            return None, ""
        if self.full_rank_steps:
            return self.full_rank_steps, "--full-rank-steps"
        return self.relora_every, "--relora-every"

    def derived(self) -> dict[str, int | float]:
        """The defaults that follow from other options, as their help says: warmup, eval_every,
        restart_warmup, lr (used where the caller gave none; never contradicting what was given).

        lr with --lr-schedule continue: the source's final rate once known (with_source_lr
        reads it from beside SOURCE); until then the plain default, which no run trains with.
        """
        first = self.first_drop[0]
        warmup = 0 if self.continues else self.steps // 10
        final = self.source_final_lr if self.continues else None
        return {
            "warmup": warmup if first is None else min(warmup, first),
            "eval_every": self.steps // 10,
            "restart_warmup": min(50, max(1, self.relora_every // 10), self.relora_every - 1),
            "lr": type(self).model_fields["lr"].default if final is None else final,
        }

    @property
    def continues(self) -> bool:
        return self.lr_schedule == "continue"

    def with_source_lr(self, folder: Path) -> TrainOptions:
        """These options with the rate --lr-schedule continue starts at: itself when --lr or
        --source-final-lr gave it, else read from beside SOURCE (``folder``: recorded_final_lr);
        with nothing there, one line (exit 2) saying what to pass."""
        if not self.continues or "lr" in self.model_fields_set or self.source_final_lr is not None:
            return self
        lr, where = recorded_final_lr(Path(folder))
        out = type(self).parse({**self.model_dump(include=self.model_fields_set), "source_final_lr": lr})
        out._lr_from = where
        return out

    def lr_plan(self) -> dict[str, Any]:
        """The report's account of the schedule: its name, the peak rate (where continue's first
        step starts, without --warmup), where that rate came from, the floor and the warmup.
        A resumed run's rate comes from its step folder's options unless --lr is given again."""
        if self._lr_from is not None:
            where = self._lr_from
        elif "lr" in self.model_fields_set or not self.continues:
            where = "--lr" if "lr" in self.model_fields_set else "--lr's default"
        else:  # None: not known yet (train reads it from beside SOURCE first)
            where = "--source-final-lr" if self.source_final_lr is not None else None
        return {"name": self.lr_schedule, "peak_lr": self.lr, "peak_lr_from": where, "warmup": self.warmup_steps,
                "floor_lr": self.lr * self.min_lr_ratio, "source_final_lr": self.source_final_lr}

    def require_data(self) -> TrainOptions:
        """Checked once a resume has had its say: a resumed run may take --data from its step folder."""
        if not self.data:
            raise UsageError("no training data given", hint="pass --data FILE (text, .npy or .bin ids)")
        return self

    def resumed(self, state: dict, where: Path | None = None) -> TrainOptions:
        """The step folder's options, overridden by those the caller gave (set explicitly).

        Relative data paths are taken from the folder the interrupted run started in.
        Whether the given ones may differ is the resume check's business (RESUME_FREE).
        Stored values that do not validate are bad input in the step folder ``where``.
        """
        stored = state.get("options") or {}
        merged = {k: v for k, v in stored.items() if k in type(self).model_fields and k not in NOT_RESUMED}
        start = state.get("cwd")
        if start and Path(start) != Path.cwd():
            for key in RESUMED_PATHS:
                value = merged.get(key)
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    merged[key] = [str(Path(start) / v) for v in value]
                elif isinstance(value, str):
                    merged[key] = str(Path(start) / value)
        merged.update(self.model_dump(include=self.model_fields_set))
        try:
            out = type(self).parse(merged)
        except UsageError as exc:
            if where is None:
                raise
            raise InputError(f"the step folder's options do not hold: {exc.problem}", path=where,
                             hint="resume from another step folder, or give the option again") from None
        # Resumed twice (the API resumes, then train does): the first one's account stays.
        out._lr_from = self._lr_from if "lr" in self.model_fields_set else "the step folder's options"
        return out

    @property
    def warmup_steps(self) -> int:
        return min(self.warmup, self.steps)

    @property
    def eval_interval(self) -> int:
        return self.eval_every

    def schedule(self) -> Schedule:
        if not self.relora:
            return Schedule(self.steps, self.warmup_steps, self.min_lr_ratio)
        return Schedule(self.steps, self.warmup_steps, self.min_lr_ratio, self.relora_every, self.restart_warmup,
                        self.full_rank_steps)

    def restart_after(self, step: int) -> bool:
        """ReLoRA merges right after the steps taken at LR 0 (Schedule.merges)."""
        return self.relora and self.schedule().merges_after(step)

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
    max_shard_size: ShardSize = option("2GB", "Largest shard in bytes (KB/MB/GB, KiB/MiB/GiB).")
    overwrite: bool = option(False, "Replace OUTPUT (and its step folders) if they exist.")
    report: Path | None = option(None, "Write a JSON report of the run here; - (or /dev/stdout) prints it, like --json.")
    dtype: DtypeName = option("source", "Store the trained weights as bf16, fp16 or fp32 (training keeps fp32 weights "
                                        "either way); source: as SOURCE stores them.")
    keep_card: bool = option(False, "Copy SOURCE's README.md (its model card) instead of writing a new card.")


def recorded_final_lr(folder: Path) -> tuple[float, str]:
    """(the last learning_rate in ``folder``/trainer_state.json's log_history, where it was read).

    Hugging Face's Trainer logs the rate every logging_steps, so it is the last one logged,
    which may lie a few steps before the end. Without one, a grown model's growth_map.json:
    `modelgrow convert` records there the rate a trainer_state.json beside its source gave.
    (A modelgrow train output records its curve only in the report.) Missing or unusable:
    one line naming the file.
    """
    path = folder / TRAINER_STATE
    hint = "pass --source-final-lr LR, the rate the source's training ended at, or --lr LR to start there"
    if not path.is_file():
        grown = read_growth_map(folder)  # a grown model: the rate convert found beside ITS source
        if grown is not None and grown["source_final_lr"] is not None:
            return grown["source_final_lr"], f"{folder / GROWTH_MAP}: the source's final rate, recorded by convert"
        raise UsageError(f"--lr-schedule continue starts at the learning rate the source's training ended at, and "
                         f"nothing beside SOURCE records it (no {TRAINER_STATE} in {folder}, and no rate in a "
                         f"{GROWTH_MAP})", hint=hint)
    try:
        if path.stat().st_size > TRAINER_STATE_BYTES:
            raise InputError(f"over {TRAINER_STATE_BYTES:,} bytes, too large for a trainer state", path=path)
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"not readable as JSON ({type(exc).__name__}: {exc})", path=path, hint=hint) from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise InputError("no log_history list: not a Hugging Face trainer state", path=path, hint=hint)
    logged = [e for e in history if isinstance(e, dict) and "learning_rate" in e]
    if not logged:
        raise UsageError("--lr-schedule continue: its log_history logs no learning_rate", path=path, hint=hint)
    lr, step = logged[-1]["learning_rate"], logged[-1].get("step")
    at = f" at step {step}" if isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 10**15 else ""
    # Bounds before isfinite: a huge JSON integer overflows a float.
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0 or lr > 1e30 or not math.isfinite(lr):
        raise InputError(f"the last logged learning_rate{at} is {lr!r:.40}, not a learning rate", path=path, hint=hint)
    if lr == 0:
        raise UsageError(f"--lr-schedule continue: the last logged learning_rate{at} is 0 (the source's schedule "
                         "decayed to zero), where nothing trains", path=path, hint="pass --lr LR to continue at LR")
    return float(lr), f"{path}: the last learning_rate in log_history{at}"


def restart_generator(seed: int, restart: int) -> torch.Generator:
    """A's generator for a restart: the same on every rank, and on a resumed run."""
    return torch.Generator().manual_seed(seeding.torch_seed("relora-A", seed, restart))


def file_names(value: Any) -> Any:
    """A path option's files by name (a list stays a list, None stays None)."""
    if isinstance(value, list):
        return [Path(v).name for v in value]
    return Path(value).name if value else value


def checkpoints_dir(dest: str | Path) -> Path:
    """Where --save-every writes: beside OUT, so OUT appears only when complete."""
    dest = Path(dest)
    return dest.parent / f"{dest.name}-checkpoints"
