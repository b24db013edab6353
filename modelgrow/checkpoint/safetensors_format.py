"""Validate a safetensors header before anything trusts its offsets.

Layout of a .safetensors file: an 8-byte little-endian u64 N, then N bytes of UTF-8
JSON, then the data buffer. The JSON maps tensor names to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the buffer) plus an optional
``__metadata__`` string->string map. The buffer must be covered exactly: no overlaps,
no holes, no trailing bytes.

The safetensors library checks most of this too, but a checkpoint is untrusted input
and we want a specific, one-line message naming the file before any byte is mapped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from modelgrow.errors import CheckpointError

# The safetensors library refuses larger headers too; this bounds how much we read and
# parse before knowing whether the file is sane.
MAX_HEADER_BYTES = 100_000_000

# Rank and per-dimension bounds: far beyond any real model, small enough that numel
# arithmetic stays meaningful for torch (int64 element counts).
MAX_RANK = 64
MAX_DIM = 2**62

# Integers longer than this cannot be a valid shape or offset; refusing them before
# int() runs avoids quadratic-time conversion of a hostile million-digit number.
_MAX_INT_DIGITS = 20

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    # Only present in newer torch builds; skipped below where missing.
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}

#: safetensors dtype string -> torch dtype, for every dtype this torch can represent.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and its [begin, end) range in the data buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Read and fully validate the header of one .safetensors file.

    Returns ``(tensors by name, __metadata__, data_start)`` where data_start is the file
    offset of the data buffer. Raises CheckpointError naming the file on any problem.
    """
    path = Path(path)

    def fail(message: str, hint: str | None = None) -> CheckpointError:
        return CheckpointError(message, path=path, hint=hint)

    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise fail(
                    f"file is truncated: {file_size} bytes, too short for the 8-byte header length"
                )
            header_len = int.from_bytes(prefix, "little")
            _check_header_len(header_len, file_size, prefix, fail)
            raw = f.read(header_len)
    except OSError as err:
        raise fail(f"cannot read file: {err.strerror or err}") from err
    if len(raw) != header_len:  # the file shrank while we were reading it
        raise fail(f"file is truncated: header needs {header_len} bytes, got {len(raw)}")

    header = _parse_json(raw, fail)
    buffer_len = file_size - 8 - header_len
    metadata = _check_metadata(header.pop("__metadata__", {}), fail)
    tensors = {
        name: _check_entry(name, entry, buffer_len, path, fail) for name, entry in header.items()
    }
    _check_coverage(tensors, buffer_len, fail)
    return tensors, metadata, 8 + header_len


def _check_header_len(header_len: int, file_size: int, prefix: bytes, fail) -> None:
    # A pickled checkpoint renamed to .safetensors fails here; say what it probably is.
    hint = None
    if prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80":
        hint = "this looks like a pickled PyTorch checkpoint, which modelgrow never loads"
    if header_len == 0:
        raise fail("header length is 0; not a safetensors file", hint)
    if header_len > MAX_HEADER_BYTES:
        raise fail(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit", hint)
    if header_len > file_size - 8:
        raise fail(
            f"header length {header_len} exceeds file size {file_size} "
            "(file is truncated or not a safetensors file)",
            hint,
        )


def _parse_json(raw: bytes, fail) -> dict:
    def parse_int(text: str) -> int:
        if len(text.lstrip("-")) > _MAX_INT_DIGITS:
            raise ValueError(f"integer with {len(text)} digits")
        return int(text)

    def reject_constant(text: str):
        raise ValueError(f"{text} is not valid JSON")

    def no_duplicates(pairs: list) -> dict:
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"duplicate key {key!r}")
            obj[key] = value
        return obj

    try:
        text = raw.decode("utf-8")
        header = json.loads(
            text,
            parse_int=parse_int,
            parse_constant=reject_constant,
            object_pairs_hook=no_duplicates,
        )
    except UnicodeDecodeError as err:
        raise fail(f"header is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except RecursionError:
        # Deeply nested arrays ([[[[...) exhaust the parser's stack; no real header nests.
        raise fail("header JSON is nested too deeply") from None
    except ValueError as err:  # includes json.JSONDecodeError
        raise fail(f"header is not valid JSON: {shorten(str(err))}") from None
    if not isinstance(header, dict):
        raise fail(f"header must be a JSON object, got {type(header).__name__}")
    return header


def _check_metadata(metadata: object, fail) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise fail("__metadata__ must be a map of strings to strings")
    return metadata


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is a subclass of int; true/false is not a size


def _check_entry(name: str, entry: object, buffer_len: int, path: Path, fail) -> TensorInfo:
    if not isinstance(entry, dict):
        raise fail(f"tensor {name!r} entry must be an object")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise fail(f"tensor {name!r} has unknown dtype {shorten(repr(code))}", f"known: {known}")
    dtype = SAFETENSORS_DTYPES[code]

    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise fail(
            f"tensor {name!r} shape {shorten(repr(shape))} must be a list of at most "
            f"{MAX_RANK} non-negative integers"
        )

    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise fail(f"tensor {name!r} data_offsets {shorten(repr(offsets))} must be [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise fail(f"tensor {name!r} data_offsets [{begin}, {end}] need 0 <= begin <= end")

    # Checked before the range, so a header that contradicts itself is reported as such
    # rather than as truncation.
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise fail(
            f"tensor {name!r} data_offsets [{begin}, {end}] do not match shape {shape} "
            f"of {code} ({expected} bytes)"
        )
    if end > buffer_len:
        raise fail(
            f"file is truncated: tensor {name!r} ends at byte {end} of the data buffer, "
            f"but only {buffer_len} bytes follow the header"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end, path)


def _check_coverage(tensors: dict[str, TensorInfo], buffer_len: int, fail) -> None:
    # Sorted by position, each tensor must start exactly where the previous one ended.
    position, previous = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end, t.name)):
        if info.begin < position:
            raise fail(
                f"tensors {previous.name!r} [{previous.begin}, {previous.end}] and "
                f"{info.name!r} [{info.begin}, {info.end}] overlap"
            )
        if info.begin > position:
            raise fail(f"bytes [{position}, {info.begin}) of the data buffer belong to no tensor")
        position, previous = info.end, info
    if position != buffer_len:
        raise fail(
            f"the data buffer has {buffer_len - position} trailing bytes that belong to no tensor"
        )


def shorten(text: str, limit: int = 80) -> str:
    """Keep hostile values from turning an error message into a wall of text."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
