"""Reading and writing config.json keys, where a dotted key walks nested objects."""

from __future__ import annotations

from typing import Any

_MISSING = object()


def _lookup(config: dict, key: str) -> Any:
    if key in config:
        return config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def config_get(config: dict, key: str) -> Any:
    """``config[key]``, where a dotted key ("model_args.n_embd") walks nested objects.

    A literal key wins over the dotted path, so configs whose keys contain dots still work.
    """
    value = _lookup(config, key)
    return None if value is _MISSING else value


def config_has(config: dict, key: str) -> bool:
    return _lookup(config, key) is not _MISSING


def config_set(config: dict, key: str, value: Any) -> None:
    """Set ``key`` (dotted: nested) in place, creating intermediate objects if needed."""
    if key in config or "." not in key:
        config[key] = value
        return
    node = config
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


__all__ = ["config_get", "config_has", "config_set"]
