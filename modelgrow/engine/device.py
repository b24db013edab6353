"""Devices and precision: ``--device auto|cpu|cuda[:N]``; on CUDA the forward pass runs
under bf16 autocast with fp32 weights (ordinary mixed precision), on the CPU all fp32."""

from __future__ import annotations

import contextlib
import resource
import sys

import torch

from ..errors import UsageError


def resolve_device(spec: str | None, local_rank: int = 0, world: int = 1) -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is available", hint="use --device cpu")
        if spec == "cuda":
            index = local_rank if world > 1 else torch.cuda.current_device()
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--device {spec!r} is not a device", hint="auto, cpu, cuda or cuda:N") from None
        if not 0 <= index < torch.cuda.device_count():
            raise UsageError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    raise UsageError(f"--device {spec!r} is not a device", hint="auto, cpu, cuda or cuda:N")


def prepare_device(device: torch.device) -> None:
    """Make ``device`` current and start its peak-memory count from here."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device):
    """bf16 matmuls on CUDA (weights stay fp32); nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def precision(device: torch.device) -> str | None:
    return "bf16" if device.type == "cuda" else None


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda max allocated"}
    # ru_maxrss is KiB on Linux (bytes on macOS): the whole process's high-water mark.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "kind": "process max RSS"}
