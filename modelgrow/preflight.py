"""Pre-flight: what a conversion will need, worked out from the target dims alone and
checked before anything is allocated or enumerated per layer.

``make_plan`` calls ``check_size`` as soon as it knows the target dims: a target past
``MAX_LAYERS`` layers or ``MAX_PARAMS`` parameters is a usage error, whatever the options.
It then calls the ``Preflight`` that ``grow.convert`` hands it, which estimates the
grown model's parameters, its bytes on disk and the peak memory of this run, and
refuses (exit 2, one line with the figures) a job that cannot fit the free disk at the
output's parent or the memory available now. ``--no-preflight`` skips that second check,
never the first. Nothing here is per target layer: a per-layer tensor is counted once
and multiplied by the target's layers, so a million-layer request costs what a
two-layer one does.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import dtypes
from .checkpoint.planned import WRITE_AHEAD
from .checkpoint.sizes import PART_BYTES, format_size
from .errors import UsageError
from .layout import Dims
from .maps import map_bytes
from .source import SourceModel
from .upcycle import target_specs

MAX_PARAMS = 10**13  # more than any machine holds: refused outright
MAX_LAYERS = 10**6
FP32 = 4
# fp32 copies of the largest tensor while it grows: the source read in fp32, the copied
# (index_select) tensor, the split or noise result, the tensor handed to the writer.
GROW_COPIES = 4
# A learned operator's fit holds the grown model as its materialised fp32 weights, their
# gradients and the expansions' intermediates.
FIT_COPIES = 3
VERIFY_TOKENS = 2 * 16  # verification's random inputs: batch x seq (VerifyOptions' defaults)
OVERRIDE = "pass --no-preflight to try anyway"
GROWTH_FLAGS = ("width", "depth", "heads", "kv_heads", "ffn", "layers", "insert", "experts")
# Beside the tensors' bytes: config.json, the card, growth_map.json, the index, and each
# tensor's entry in a safetensors header.
FILES_BYTES, HEADER_BYTES = 1_000_000, 256


@dataclass(frozen=True)
class Size:
    """The grown model's tensors, counted from the dims."""

    params: int
    largest: int  # elements of the largest target tensor
    disk_bytes: int  # every tensor in the dtype it is written in, headers, the files written or copied beside them
    layer_params: int  # one layer's tensors
    outer_params: int  # the tensors outside the layers (embeddings, final norm, head)
    largest_whole: int = 0  # elements of the largest one whose rows the growth changes (never grown in row slices)
    largest_sliced_bytes: int = 0  # as stored, the largest one whose rows it leaves alone (grown in slices by copy)


def count(source: SourceModel, new: Dims, dtype: str = "source") -> Size:
    """The grown model's size: each tensor of ``source.specs()`` (what the plan grows; when
    upcycling, the experts' copies and the router too: modelgrow.upcycle.target_specs) in
    its target shape, a per-layer one times ``new.layers``. Equal to ``Plan.target_params``
    whenever a per-layer tensor has the same fixed sizes in every source layer (always, for
    the built-in layouts); otherwise the largest is counted for every layer."""
    cast = dtypes.target_dtype(dtype)
    layer = outer = largest = whole = sliced_bytes = 0
    disk = FILES_BYTES
    for spec, shape_of, copies in target_specs(source, new):
        infos = [source.info(spec, j) for j in (range(source.dims.layers) if spec.per_layer else [None])]
        numel = max(math.prod(shape_of(tuple(i.shape))) for i in infos)
        largest = max(largest, numel)
        itemsize = max(dtypes.output_dtype(i.dtype, cast).itemsize for i in infos)
        if any(len(i.shape) < 2 or shape_of(tuple(i.shape))[0] != i.shape[0] for i in infos):
            whole = max(whole, numel)
        else:
            sliced_bytes = max(sliced_bytes, numel * itemsize)
        numel *= copies  # one tensor per expert
        if spec.per_layer:
            layer += numel
        else:
            outer += numel
        disk += (numel * itemsize + HEADER_BYTES * copies) * (new.layers if spec.per_layer else 1)
    for f in source.checkpoint.tagalong_files():
        disk += _file_size(f)
    return Size(layer * new.layers + outer, largest, disk, layer, outer, whole, sliced_bytes)


def check_size(source: SourceModel, new: Dims, spec: Any) -> None:
    """Refuse an absurd target before anything is enumerated per layer (``spec``: the
    GrowthSpec, to name the flag)."""
    if new.layers > MAX_LAYERS:
        name = next((n for n in ("layers", "insert") if getattr(spec, n, None) is not None), "depth")
        raise UsageError(f"--{name} {getattr(spec, name)} gives {new.layers:,} layers, more than modelgrow grows: "
                         f"at most {MAX_LAYERS:,}")
    params = count(source, new).params
    if params > MAX_PARAMS:
        raise UsageError(f"{flags(spec)} gives {params:,} parameters, more than modelgrow grows: at most {MAX_PARAMS:,}")


def flags(spec: Any) -> str:
    """The growth flags given, as typed: "--width 1000x", "--width 2x with --depth 8x"."""
    given = [f"--{n.replace('_', '-')} {getattr(spec, n)}" for n in GROWTH_FLAGS if getattr(spec, n, None) is not None]
    return " with ".join(given) or "the source"


@dataclass(frozen=True)
class Estimate:
    """What a run needs and what the machine has (None: not known or not checked)."""

    params: int
    disk_bytes: int
    peak_memory_bytes: int
    free_disk_bytes: int | None
    available_memory_bytes: int | None
    disk_path: str | None  # where the free disk was measured (the output's parent)
    checked: bool  # compared with the free disk and memory (False with --no-preflight)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def problems(self) -> list[str]:
        out = []
        if self.free_disk_bytes is not None and self.disk_bytes > self.free_disk_bytes:
            out.append(f"the grown model needs {format_size(self.disk_bytes)} on disk, "
                       f"{format_size(self.free_disk_bytes)} free at {self.disk_path}")
        if self.available_memory_bytes is not None and self.peak_memory_bytes > self.available_memory_bytes:
            out.append(f"this run needs about {format_size(self.peak_memory_bytes)} of memory at its peak, "
                       f"{format_size(self.available_memory_bytes)} available")
        return out


def peak_memory(source: SourceModel, new: Dims, size: Size, *, operator: type, options: dict[str, Any],
                verify: bool) -> int:
    """A conservative estimate of a conversion's peak memory (bytes, host memory):

        operator state + max(grow, fit, verify)

    - operator state: ``operator.state_bytes`` (held for the whole run): the unit maps;
      a learned operator adds the source in fp32 and its own tensors four times over
      (values, gradients, AdamW's two moments);
    - grow: the tensors handed to the writing thread and not yet written (at most
      ``WRITE_AHEAD`` bytes, or one tensor when larger: checkpoint/planned.py; whatever
      ``--max-shard-size``) plus ``GROW_COPIES`` fp32 copies of the largest tensor grown
      whole (the last of them is the stored tensor). An operator that grows rows in
      slices (``grows_rows``: copy) grows a tensor whose rows the growth leaves alone (a
      vocabulary's embedding) into its stored dtype a slice of at most ``PART_BYTES`` at
      a time: that tensor as stored and the slice's copies;
    - fit (learned operators): the grown model materialised, ``FIT_COPIES`` x fp32;
    - verify (unless off; streamed, modelgrow.streamed): for each model, in fp32, the
      tensors outside the layers plus one layer, and every layer's output hidden state.

    Not counted: the fit's activations, the Python and torch runtime itself, and the
    ONNX export ``--onnx`` runs afterwards. A fit on a GPU (``--fit-device``) is still
    counted in host memory.
    """
    state = getattr(operator, "state_bytes", None)
    held = state(source, new, options) if state is not None else map_bytes(new)
    # Operators may not be imported here (a layer of their own): the base class's method is
    # known by name, and one defined elsewhere slices.
    method = getattr(operator, "grows_rows", None)
    slices = method is not None and method.__qualname__ != "Operator.grows_rows"
    whole = max(size.largest_whole, min(size.largest, PART_BYTES // FP32)) if slices else size.largest
    waiting = max(min(WRITE_AHEAD, size.disk_bytes), size.largest_sliced_bytes if slices else FP32 * whole)
    grow = waiting + GROW_COPIES * FP32 * whole
    fit = FIT_COPIES * FP32 * size.params if getattr(operator, "learned", False) else 0
    check = 0
    if verify:
        small, old = count(source, source.dims), source.dims
        weights = small.outer_params + small.layer_params + size.outer_params + size.layer_params
        hidden = VERIFY_TOKENS * (old.residual * old.layers + new.residual * new.layers)
        check = FP32 * (weights + hidden)
    return held + max(grow, fit, check)


class Preflight:
    """The check ``grow.convert`` hands ``make_plan``: called once with the target dims,
    it keeps the estimate (``self.estimate``) and, with ``check``, refuses a job that
    does not fit."""

    def __init__(self, source: SourceModel, spec: Any, operator: type, options: dict[str, Any], *, dtype: str,
                 verify: bool, dest: str | Path | None, check: bool = True):
        self.source, self.spec, self.operator, self.options = source, spec, operator, options
        self.dtype, self.verify, self.dest, self.check = dtype, verify, dest, check
        self.estimate: Estimate | None = None

    def __call__(self, new: Dims) -> None:
        size = count(self.source, new, self.dtype)
        peak = peak_memory(self.source, new, size, operator=self.operator, options=self.options, verify=self.verify)
        where = Path(self.dest).absolute().parent if self.dest is not None else None
        free = free_disk(where) if where is not None and self.check else None
        available = available_memory() if self.check else None
        self.estimate = Estimate(size.params, size.disk_bytes, peak, free, available,
                                 str(where) if where is not None else None, self.check)
        problems = self.estimate.problems()
        if problems:
            raise UsageError(f"{'; '.join(problems)}; {flags(self.spec)} is too large", hint=OVERRIDE)


# -- what the machine has ----------------------------------------------------------------


def free_disk(folder: Path) -> int | None:
    """Free bytes on the filesystem of ``folder`` (or of its nearest existing parent); None if unknown."""
    for place in (folder, *folder.parents):
        if place.is_dir():
            try:
                return shutil.disk_usage(place).free
            except OSError:
                return None
    return None


def available_memory() -> int | None:
    """Memory a new allocation can still get: /proc/meminfo's MemAvailable (else free
    pages from sysconf), capped by a cgroup v2 limit; None when none can be read."""
    found = _meminfo("MemAvailable")
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    room = _cgroup_room()
    return found if room is None else min(found, room)


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup v2 memory limit less the anonymous memory in use (page cache can be reclaimed)."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines() if line.strip())
        return max(0, int(limit) - int(stat.get("anon", 0)))
    except (OSError, ValueError):
        return None


def _file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
