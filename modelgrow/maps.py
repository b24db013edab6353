"""Unit maps: which source unit each target unit copies, for every growable role.

A map is the Net2Net view of width growth: ``index[j]`` is the source unit that target
unit j copies (-1 for a padding unit, which copies nothing), and ``count[j]`` how many
target units copy that same source unit. Writers copy along a map; readers copy and
divide by ``count`` so the copies sum back to the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import Dims, split_role


@dataclass(frozen=True)
class AxisMap:
    index: torch.Tensor  # int64 [new]
    count: torch.Tensor  # float32 [new], 1 for padding units
    old_size: int

    @property
    def pad(self) -> torch.Tensor:
        return self.index < 0

    @property
    def is_identity(self) -> bool:
        n = self.index.numel()
        return n == self.old_size and bool((self.index == torch.arange(n)).all())

    @staticmethod
    def concat(maps: list[AxisMap]) -> AxisMap:
        """A fused axis (e.g. q|k|v): segment maps side by side, indices offset."""
        index, count, offset = [], [], 0
        for m in maps:
            index.append(torch.where(m.pad, m.index, m.index + offset))
            count.append(m.count)
            offset += m.old_size
        return AxisMap(torch.cat(index), torch.cat(count), offset)


def _with_counts(index: torch.Tensor, old: int) -> AxisMap:
    valid = index >= 0
    counts = torch.bincount(index[valid], minlength=old).to(torch.float32)
    count = torch.ones(index.numel(), dtype=torch.float32)
    count[valid] = counts[index[valid]]
    return AxisMap(index, count, old)


def circular(old: int, new: int) -> AxisMap:
    """Unit j copies unit j mod old (uniform when new is a multiple of old)."""
    return _with_counts(torch.arange(new) % old, old)


def padded(old: int, new: int) -> AxisMap:
    """k whole copies of every unit, then new - k*old padding units (LEMON)."""
    k = new // old
    index = torch.full((new,), -1, dtype=torch.int64)
    index[: k * old] = torch.arange(k * old) % old
    return _with_counts(index, old)


def heads(old_heads: int, new_heads: int, head_dim: int) -> AxisMap:
    """Whole heads are copied (head_dim fixed); the map acts on heads*head_dim units."""
    head = circular(old_heads, new_heads)
    index = (head.index[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return AxisMap(index, head.count.repeat_interleave(head_dim), old_heads * head_dim)


def identity(size: int) -> AxisMap:
    return AxisMap(torch.arange(size), torch.ones(size), size)


def map_bytes(new: Dims) -> int:
    """The most RoleMaps holds for a growth into ``new``: an int64 index and a float32
    count per target unit of every role, the head roles four times over (``attn*3``
    variants). For the pre-flight estimate (modelgrow.preflight)."""
    units = new.residual + 4 * (new.heads + new.kv_heads) * new.head_dim + new.ffn
    return 12 * (units + (new.expert_ffn or 0) + (new.shared_ffn or 0))


class _Lazy(dict):
    """A dict whose entries are made on first use (``maps.maps["ffn"]`` included): an
    operator that is built but never grows a tensor (``--dry-run``) allocates no map."""

    def __init__(self, makers: dict):
        super().__init__()
        self.makers = makers

    def __missing__(self, key):
        if key not in self.makers:
            raise KeyError(key)
        self[key] = value = self.makers[key]()
        return value

    def __contains__(self, key) -> bool:
        return key in self.makers or dict.__contains__(self, key)


class RoleMaps:
    """The maps for one growth: residual, attn (query heads), kv (key/value heads), ffn."""

    def __init__(self, old: Dims, new: Dims, norm_type: str, norm_placement: str):
        # Non-integer width is only exact with padding before pre-LN norms; for post-LN
        # we fall back to circular copies (the plan has already said "not exact").
        pad_ok = norm_placement == "pre"
        residual = padded if pad_ok else circular
        self.pad_value = "mean" if norm_type == "layernorm" else "zero"
        makers = {
            "residual": lambda: residual(old.residual, new.residual),
            "attn": lambda: heads(old.heads, new.heads, old.head_dim),
            "kv": lambda: heads(old.kv_heads, new.kv_heads, old.head_dim),
            "ffn": lambda: circular(old.ffn, new.ffn),
        }
        for role in ("expert_ffn", "shared_ffn"):  # mixture-of-experts FFNs with their own sizes
            if getattr(old, role) is not None:
                makers[role] = lambda role=role: circular(getattr(old, role), getattr(new, role))
        self.maps = _Lazy(makers)
        self._heads = {"attn": (old.heads, new.heads), "kv": (old.kv_heads, new.kv_heads)}
        self._head_dim = old.head_dim

    def role(self, role: str) -> AxisMap | None:
        """The map of one role; "attn*3" (heads of 3 x head_dim units) is made on first use."""
        if role not in self.maps:
            base, times = split_role(role)
            if times == 1 or base not in self._heads:
                return None
            self.maps[role] = heads(*self._heads[base], times * self._head_dim)
        return self.maps[role]

    def for_axis(self, roles: tuple[str, ...], size: int) -> AxisMap | None:
        """The map of one storage axis, or None when growth leaves the axis alone."""
        found = [self.role(r) for r in roles]
        if all(m is None for m in found):
            return None
        parts = []
        for r, m in zip(roles, found):
            if m is None:
                raise ValueError(f"fused axis mixes growable and fixed roles: {roles}")
            parts.append(m)
        m = parts[0] if len(parts) == 1 else AxisMap.concat(parts)
        if m.old_size != size:
            raise ValueError(f"axis of size {size} does not match roles {'|'.join(roles)} ({m.old_size})")
        return None if m.is_identity else m
