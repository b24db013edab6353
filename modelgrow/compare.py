"""Run the source and the grown model side by side and measure how exactly the grown
one reproduces the source (the reference implementation runs both: transformers for the
built-in architectures)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import VerificationError
from .options import Options, option
from .source import SourceModel, load_module


class VerifyOptions(Options):
    """How `modelgrow verify` runs the two models."""

    kind = "verify"

    config: Path | None = option(None, "config.json of SOURCE, when not beside it.")
    batch: int = option(2, "Rows of random inputs.", ge=1, le=1024, strict=True)
    seq: int = option(16, "Tokens per row (at most the model's positions).", ge=1, le=65536, strict=True)
    seed: int = option(0, "Seed of the random inputs.", strict=True)

# Max abs difference allowed, relative to max(1, largest reference output), by the
# dtype the weights are stored in: fp32 round-off is ~1e-6, half precision far coarser.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class VerifyResult:
    output: str
    compared_shape: list[int]
    max_abs_diff: float
    reference_max_abs: float
    tolerance: float
    passed: bool
    batch: int
    seq: int
    seed: int
    # With a cast of the weights (--dtype): how far the cast alone moves the source's own
    # outputs ({"dtype", "max_abs_diff"}), so that the growth's share can be told apart.
    cast: dict | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        if out["cast"] is None:
            del out["cast"]
        return out

    def failure(self, source, grown) -> VerificationError:
        """The error a failed comparison of ``source`` and ``grown`` is reported as (exit 4)."""
        return VerificationError(f"outputs differ from {source} by {self.max_abs_diff:.3g} "
                                 f"(tolerance {self.tolerance:.3g})", path=grown)

    def to_json(self, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.as_dict(), indent=indent)


def stored_dtype(source: SourceModel) -> torch.dtype:
    names = source.checkpoint.names()
    return source.checkpoint.info(names[0]).dtype if names else torch.float32


@torch.no_grad()
def compare(source: SourceModel, grown: SourceModel, *, batch: int = 2, seq: int = 16, seed: int = 0,
            cast: torch.dtype | None = None) -> VerifyResult:
    """Both models on the same random inputs (in fp32); with ``cast``, also the source with
    its weights rounded to that dtype, to measure what the cast alone changes."""
    positions = source.dims.positions
    seq = min(seq, positions) if positions else seq
    gen = torch.Generator().manual_seed(seed)
    inputs = source.arch.example_inputs(source.config, batch, seq, gen)
    small = load_module(source)
    ref = source.arch.call(small, source.config, inputs)
    cast_diff = None
    if cast is not None:
        for p in small.parameters():
            p.copy_(p.to(cast).float())
        cast_diff = (source.arch.call(small, source.config, inputs).float() - ref.float()).abs().max().item()
    del small
    big = load_module(grown)
    out = grown.arch.call(big, grown.config, inputs)
    del big
    kind = source.arch.class_info(source.config)["output"]
    if kind == "last_hidden_state":
        # Hidden states are wider after growth; the first copy holds the original units.
        out = out[..., : ref.shape[-1]]
    ref, out = ref.float(), out.float()
    if out.shape != ref.shape:
        raise ValueError(f"output shapes differ: {list(ref.shape)} vs {list(out.shape)}")
    diff = (out - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    tol = TOLERANCE.get(stored_dtype(grown), 1e-2) * scale
    casting = {"dtype": str(cast).removeprefix("torch."), "max_abs_diff": cast_diff} if cast is not None else None
    return VerifyResult(kind, list(ref.shape), diff, ref.abs().max().item(), tol, diff <= tol, batch, seq, seed, casting)
