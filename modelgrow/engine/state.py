"""Resumable step state: what a pass needs to continue exactly where it stopped.

A step folder holds ``training_state/state.safetensors`` (tensors: the pass's own
values, the Adam moments and step counts, the generators' states) and
``training_state/state.json`` (the step, the options, data fingerprints, the curves).
safetensors and JSON only: nothing is pickled, nothing runs code when read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import safe_open

from ..checkpoint.identity import source_digest, source_identity  # noqa: F401 - where resume and train read them
from ..errors import InputError

STATE_DIR = "training_state"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
STATE_FORMAT = "modelgrow-train-state"
STATE_VERSION = 1


class _History(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    loss_curve: list[float]
    lr_curve: list[float]
    grad_norm_curve: list[float]
    val_curve: list[Annotated[list[float], Field(min_length=2, max_length=2)]]  # [steps done, loss]
    restarts: list[dict]


class StepState(BaseModel):
    """state.json's shape: a resume trusts nothing in it that this has not checked.

    A state file is input like any other (copied between machines, edited, truncated), so
    a wrong type or an impossible value is bad input naming the file, never a crash later.
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    format: str
    version: int
    step: int = Field(ge=1)
    options: dict
    fingerprints: dict[str, str | None]
    seq_len: int = Field(ge=1)
    source: str
    source_params: int = Field(ge=1)
    world_size: int = Field(ge=1)
    source_identity: list[dict]
    cwd: str
    history: _History

    @model_validator(mode="after")
    def _curves_match_the_step(self) -> StepState:
        h = self.history
        if not len(h.loss_curve) == len(h.lr_curve) == len(h.grad_norm_curve) == self.step:
            raise ValueError(f"its curves do not hold one value per step done ({self.step})")
        return self


def capture(named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
            generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The optimizer's moments and step counts (by parameter name) and the generators' states."""
    tensors = {}
    for name, p in named:
        state = optimizer.state.get(p)
        if state:
            tensors[f"exp_avg/{name}"] = state["exp_avg"]
            tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"]
            tensors[f"adam_step/{name}"] = state["step"]
    for key, gen in generators.items():
        tensors[f"rng/{key}"] = gen.get_state()
    return tensors


class StateTensors:
    """Tensors read back from a step folder, each checked against what the run needs."""

    def __init__(self, folder: Path):
        self.where = folder / STATE_DIR / STATE_TENSORS
        self.tensors = read_tensors(folder)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str, like: torch.Tensor | None = None) -> torch.Tensor:
        if key not in self.tensors:
            raise InputError(f"training state lacks {key!r}", path=self.where)
        t = self.tensors[key]
        if like is not None and t.shape != like.shape:
            raise InputError(f"training state {key!r} is {list(t.shape)}, the run needs {list(like.shape)}", path=self.where)
        return t

    @torch.no_grad()
    def restore(self, named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                generators: dict[str, torch.Generator]) -> None:
        """Put back what ``capture`` saved."""
        for name, p in named:
            if f"adam_step/{name}" in self.tensors:
                optimizer.state[p] = {"step": self.get(f"adam_step/{name}").clone(),
                                      "exp_avg": self.get(f"exp_avg/{name}", p).to(p.device, p.dtype),
                                      "exp_avg_sq": self.get(f"exp_avg_sq/{name}", p).to(p.device, p.dtype)}
        for key, gen in generators.items():
            gen.set_state(self.get(f"rng/{key}"))


def find_state(path: str | Path) -> Path:
    """The step folder to resume from: ``path`` itself, or the latest step-N inside it."""
    path = Path(path)
    if (path / STATE_DIR / STATE_JSON).is_file():
        return path
    steps = sorted((p for p in path.glob("step-*") if (p / STATE_DIR / STATE_JSON).is_file()),
                   key=lambda p: int(p.name.split("-", 1)[1]) if p.name.split("-", 1)[1].isdigit() else -1)
    if not path.is_dir() or not steps:
        raise InputError(f"no training state here (looked for {STATE_DIR}/{STATE_JSON} and step-N/ folders)", path=path,
                         hint="give a step folder written by --save-every")
    return steps[-1]


def read_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / STATE_DIR / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable training state: {exc}", path=folder / STATE_DIR / STATE_JSON) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise InputError(f"not a {STATE_FORMAT} v{STATE_VERSION} file", path=folder / STATE_DIR / STATE_JSON)
    try:  # text a file name could hold (surrogate escapes of undecodable bytes), nothing else
        json.dumps(state, ensure_ascii=False).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InputError("corrupt training state: it holds text that is not valid Unicode (a lone surrogate)",
                         path=folder / STATE_DIR / STATE_JSON, hint="resume from another step folder") from None
    try:
        StepState.model_validate(state)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "the file"
        raise InputError(f"corrupt training state: {where}: {err['msg']}", path=folder / STATE_DIR / STATE_JSON,
                         hint="resume from another step folder, or start the run again") from None
    if not (folder / STATE_DIR / STATE_TENSORS).is_file():
        raise InputError("training state tensors are missing", path=folder / STATE_DIR / STATE_TENSORS)
    return state


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / STATE_DIR / STATE_TENSORS
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"unreadable training state tensors: {exc}", path=path) from None


def fingerprint(tokens) -> str:
    """sha256 of a token stream's values (as int64, so .npy/.bin/text agree)."""
    digest = hashlib.sha256()
    step = 1 << 22
    for start in range(0, len(tokens), step):
        digest.update(np.asarray(tokens[start:start + step], dtype=np.int64).tobytes())
    return digest.hexdigest()


def is_step_folder(folder: Path) -> bool:
    """A step folder modelgrow wrote: its training_state/state.json carries our format marker."""
    try:
        state = json.loads((folder / STATE_DIR / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("format") == STATE_FORMAT


def remove_step_folders(parent: Path) -> list[Path]:
    """Delete the step-N/ folders of an earlier run under ``parent`` (only those we wrote).

    The marker file goes first, so a kill midway leaves a folder that no resume picks up.
    Anything else in ``parent`` stays, and so does ``parent`` unless it ends up empty.
    """
    removed = []
    if not parent.is_dir() or parent.is_symlink():
        return removed
    for folder in sorted(parent.glob("step-*")):
        if folder.is_dir() and not folder.is_symlink() and is_step_folder(folder):
            (folder / STATE_DIR / STATE_JSON).unlink()
            shutil.rmtree(folder)
            removed.append(folder)
    if removed and not any(parent.iterdir()):
        parent.rmdir()
    return removed
