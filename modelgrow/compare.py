"""Run the source and the grown model side by side and measure how exactly the grown
one reproduces the source (the reference implementation runs both: transformers for the
built-in architectures).

Both run streamed (modelgrow.streamed): one block's weights in memory at a time, so a
4B-parameter growth is checked in the memory of one block. Each block's output is
compared too, through the depth map that ``growth_map.json`` records: a layout mistake
shows up as "block 17 (a copy of source block 8) differs by 3e-2", where it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import UsageError, VerificationError
from .options import Options, option, seed_option
from .growth_map import read_growth_map
from .source import SourceModel
from .streamed import run_streamed


class VerifyOptions(Options):
    """How `modelgrow verify` runs the two models."""

    kind = "verify"

    config: Path | None = option(None, "config.json of SOURCE, when not beside it.")
    batch: int = option(2, "Rows of random inputs.", ge=1, le=1024, strict=True)
    seq: int = option(16, "Tokens per row (at most the model's positions).", ge=1, le=65536, strict=True)
    seed: int = seed_option("Seed of the random inputs.")

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
    # Per grown block: its output against the source block it copies (None: depth map unknown).
    blocks: list[dict] | None = None
    peak_block_bytes: int = 0  # the most weight bytes held at once (one block or embedding, fp32)

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("cast", "blocks"):
            if out[key] is None:
                del out[key]
        first = self.first_divergent()
        if first is not None:
            out["first_divergent_block"] = first
        return out

    def first_divergent(self) -> dict | None:
        """The first grown block whose output departs from its source block, if any."""
        return next((b for b in self.blocks or [] if b["max_abs_diff"] > b["tolerance"]), None)

    def failure(self, source, grown) -> VerificationError:
        """The error a failed comparison of ``source`` and ``grown`` is reported as (exit 4)."""
        first = self.first_divergent()
        where = (f"; block {first['layer']} (from source block {first['source_layer']}) departs first, "
                 f"by {first['max_abs_diff']:.3g}" if first else "")
        return VerificationError(f"outputs differ from {source} by {self.max_abs_diff:.3g} "
                                 f"(tolerance {self.tolerance:.3g}){where}", path=grown)

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
    small = run_streamed(source, inputs)
    ref = small.output
    cast_diff = None
    if cast is not None:
        cast_diff = (run_streamed(source, inputs, round_to=cast).output - ref).abs().max().item()
    big = run_streamed(grown, inputs)
    out = big.output
    kind = source.arch.class_info(source.config)["output"]
    if kind == "last_hidden_state":
        # Hidden states are wider after growth; the first copy holds the original units.
        out = out[..., : ref.shape[-1]]
    if out.shape != ref.shape:
        raise ValueError(f"output shapes differ: {list(ref.shape)} vs {list(out.shape)}")
    diff = (out - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    rel = TOLERANCE.get(stored_dtype(grown), 1e-2)
    tol = rel * scale
    blocks = block_differences(small.blocks, big.blocks, source_layers(grown, len(small.blocks)), rel)
    casting = {"dtype": str(cast).removeprefix("torch."), "max_abs_diff": cast_diff} if cast is not None else None
    return VerifyResult(kind, list(ref.shape), diff, ref.abs().max().item(), tol, diff <= tol, batch, seq, seed, casting,
                        blocks, max(small.peak_block_bytes, big.peak_block_bytes))


def source_layers(grown: SourceModel, source_depth: int) -> list[int] | None:
    """Per grown layer, the source layer it was made from (growth_map.json), if known."""
    try:
        found = read_growth_map(grown.checkpoint.root)
    except UsageError:  # an unreadable map only costs the per-block diagnosis
        return None
    if found is not None:
        return found["source_layers"]
    return list(range(source_depth)) if grown.dims.layers == source_depth else None


def block_differences(small: list[torch.Tensor], big: list[torch.Tensor], sources: list[int] | None,
                      rel: float) -> list[dict] | None:
    """Each grown block's output against the source block it copies (first units of the
    residual: the copy of the original ones); None when the depth map is unknown."""
    if sources is None or len(sources) != len(big) or any(not 0 <= s < len(small) for s in sources):
        return None
    out = []
    for layer, (hidden, s) in enumerate(zip(big, sources)):
        ref = small[s]
        if hidden.shape[:-1] != ref.shape[:-1] or hidden.shape[-1] < ref.shape[-1]:
            return None
        d = (hidden[..., : ref.shape[-1]] - ref).abs().max().item()
        out.append({"layer": layer, "source_layer": s, "max_abs_diff": d,
                    "tolerance": rel * max(1.0, ref.abs().max().item())})
    return out
