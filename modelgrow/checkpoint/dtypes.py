"""The dtype a written checkpoint stores its weights in (``--dtype``).

Growth and training compute in fp32 whatever the choice; only the write casts. ``source``
keeps every tensor's stored dtype (a mixed-precision source stays mixed); ``bf16``,
``fp16`` and ``fp32`` cast every floating-point tensor (integer tensors never change).
config.json then names the new dtype under the key transformers reads.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, WithJsonSchema

NAMES = ("bf16", "fp16", "fp32", "source")
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
# The dtypes each one holds every value of, exactly (fp32 holds all bf16 and fp16 values).
_HOLDS = {torch.float32: {torch.float32, torch.bfloat16, torch.float16}, torch.bfloat16: {torch.bfloat16},
          torch.float16: {torch.float16}}
# transformers 5 writes "dtype"; 4.x wrote "torch_dtype" (5 still reads it).
CONFIG_KEYS = ("dtype", "torch_dtype")


def _dtype_name(value: Any) -> str:
    """A field check: one of NAMES (the long spellings bfloat16, float16, float32 accepted)."""
    text = str(value).strip().lower().removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
    name = _ALIASES.get(text, text)
    if name not in NAMES:
        raise ValueError("one of " + ", ".join(NAMES))
    return name


#: An option naming an output dtype; refused in one line (exit 2) unless it is one of NAMES.
DtypeName = Annotated[str, BeforeValidator(_dtype_name), WithJsonSchema({"enum": list(NAMES), "type": "string"})]


def target_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype ``name`` casts to; None for ``source`` (each tensor keeps its own)."""
    return None if name is None else TORCH.get(_dtype_name(name))


def output_dtype(stored: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """What a tensor stored as ``stored`` is written as."""
    return stored if target is None or not stored.is_floating_point else target


def rounds(stored: torch.dtype, target: torch.dtype | None) -> bool:
    """Whether casting ``stored`` values to ``target`` can change them."""
    out = output_dtype(stored, target)
    return out != stored and stored not in _HOLDS.get(out, {out})


def short(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


def describe(name: str, stored: set[torch.dtype]) -> dict[str, Any]:
    """The report's ``dtype`` section: what was asked, read and written, and whether it rounds."""
    target = target_dtype(name)
    floats = sorted((d for d in stored if d.is_floating_point), key=str)
    written = sorted({output_dtype(d, target) for d in stored}, key=str)
    rounding = [d for d in floats if rounds(d, target)]
    return {"requested": name, "source": [short(d) for d in sorted(stored, key=str)],
            "output": [short(d) for d in written], "rounds": bool(rounding),
            "rounded_from": [short(d) for d in rounding]}


def cast_note(section: dict[str, Any]) -> str | None:
    """The promise's line for a cast that rounds (None when it does not)."""
    if not section["rounds"]:
        return None
    to = short(TORCH[section["requested"]])
    return (f"weights cast from {', '.join(section['rounded_from'])} to {to}: every weight is rounded once more "
            f"after the (fp32) growth, so outputs agree to {to} precision, not fp32 round-off; verification uses "
            f"{to}'s tolerance")


def config_with_dtype(config: dict, name: str) -> dict:
    """``config`` naming the dtype ``name`` writes (unchanged for ``source``).

    The keys the source's config has are updated; with neither, transformers 5's
    ``dtype`` is added.
    """
    target = target_dtype(name)
    if target is None:
        return config
    out = dict(config)
    keys = [k for k in CONFIG_KEYS if k in out] or ["dtype"]
    for key in keys:
        out[key] = short(target)
    return out
