"""Byte sizes as users type them ("2GB", "500 MiB") and as we print them."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Annotated

from pydantic import AfterValidator

from modelgrow.errors import UsageError

# Decimal units follow Hugging Face's max_shard_size ("5GB" = 5 * 1000**3); binary units
# are there for people who think in GiB. A bare "B", "K" or "G" is refused on purpose:
# mergekit's --out-shard-size reads "5B" as five *billion*, so guessing would bite.
_UNITS = {
    "": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """Parse "2GB", "1.5 GiB" or "1000000" into a whole number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UsageError(f"size must not be negative: {text}")
        return text
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        raise UsageError(
            f"cannot read size {text!r}",
            hint="use a number of bytes or a unit: KB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024), e.g. 2GB",
        )
    number, unit = match.groups()
    # Fraction, not float: "1.1GB" must be exactly 1_100_000_000 bytes.
    value = Fraction(number) * _UNITS[unit.lower()]
    if value.denominator != 1:
        raise UsageError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def _positive_size(value: str | int) -> str | int:
    """A field check: ``value`` reads as a size of at least one byte (kept as typed, for reports)."""
    try:
        size = parse_size(value)
    except UsageError:
        size = None
    if size is None or size < 1:
        raise ValueError("a size of at least 1 byte: a number of bytes or KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 2GB)")
    return value


#: An option holding a byte size ("2GB", 500000000): refused at parse time unless it reads as >= 1 byte.
ShardSize = Annotated[str | int, AfterValidator(_positive_size)]


def format_size(n: int) -> str:
    """Human-readable decimal size: 1536 -> "1.5 KB", 2_000_000_000 -> "2.0 GB"."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000
        # 999.96 would print as "1000.0 KB"; move up a unit instead.
        if value < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


# A tensor larger than this in fp32 is grown (Operator.grows_rows) or converted for
# verification in slices of rows of at most this size. A constant, not a memory reading:
# the slices, and so the noise drawn for each, must not depend on the machine.
PART_BYTES = 128 * 2**20


def row_parts(shape: tuple[int, ...], part_bytes: int = PART_BYTES) -> list[slice]:
    """Slices of the first dimension of a tensor of ``shape`` with at most ``part_bytes``
    of fp32 each (one slice when the tensor is no larger)."""
    rows = shape[0] if shape else 1
    row_bytes = 4 * (math.prod(shape[1:]) if len(shape) > 1 else 1)
    step = max(1, part_bytes // max(1, row_bytes))
    return [slice(a, min(rows, a + step)) for a in range(0, rows, step)] or [slice(0, 0)]
