"""Plugin loading: built-ins and entry points share one pluggy manager.

Entry-point plugins (group ``modelgrow``) are loaded once, lazily. ``MODELGROW_PLUGINS``
restricts them to a comma-separated list of distribution names (empty: load none). A
plugin that fails to import or to register is recorded and reported by
``modelgrow plugins``; it never takes the rest of the tool down.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import LayoutError, UsageError

ENTRY_POINT_GROUP = "modelgrow"
ENV_VAR = "MODELGROW_PLUGINS"

# Built-in features are plugins of the same system (they dogfood the hooks).
DEFAULT_PLUGINS = (
    "modelgrow.architectures.builtin",
    "modelgrow.operators.copy",
    "modelgrow.operators.ligo",
    "modelgrow.operators.mango",
)

pm = pluggy.PluginManager("modelgrow")
pm.add_hookspecs(hookspecs)


@dataclass
class PluginFailure:
    name: str
    error: str


@dataclass
class _State:
    loaded: bool = False
    failures: list[PluginFailure] = field(default_factory=list)
    distributions: dict = field(default_factory=dict)  # plugin name -> importlib Distribution


_state = _State()


def load_plugins() -> None:
    if _state.loaded:
        return
    _state.loaded = True
    allowed = os.environ.get(ENV_VAR)
    allow = None if allowed is None else {_normalise(n) for n in allowed.split(",") if n.strip()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else ep.name
        if allow is not None and _normalise(dist) not in allow and _normalise(ep.name) not in allow:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            _state.distributions[ep.name] = ep.dist
        except Exception as exc:  # noqa: BLE001 - any plugin bug is reported, not raised
            _state.failures.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}"))
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)


def _normalise(name: str) -> str:
    # Distribution names compare as pip does (PEP 503): "modelgrow_nanogpt" == "modelgrow-nanogpt".
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def reset() -> None:
    """Forget the entry-point plugins and recorded failures; the next call loads them again.

    For tests and long-lived processes (after installing a plugin or changing
    MODELGROW_PLUGINS). Built-ins and plugins registered directly with ``pm.register``
    stay registered.
    """
    for name in list(_state.distributions):
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
    _state.loaded = False
    _state.failures.clear()
    _state.distributions.clear()


def failures() -> list[PluginFailure]:
    load_plugins()
    return list(_state.failures)


def _collect(hook_name: str) -> dict:
    """Call a callback-style hook plugin by plugin, so one broken plugin is isolated."""
    load_plugins()
    found: dict = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        for item in _registered_by(impl.plugin_name, impl.function, hook_name):
            found.setdefault(item.name, item)
    return found


def _registered_by(plugin_name: str, hook, hook_name: str) -> list:
    """What one plugin's callback hook registers; a plugin that raises is recorded as failed."""
    items: list = []
    try:
        hook(register=items.append)
    except Exception as exc:  # noqa: BLE001 - any plugin bug is reported, not raised
        _record_failure(plugin_name, f"{hook_name}: {type(exc).__name__}: {exc}")
        return []
    return items


def _record_failure(name: str, error: str) -> None:
    if not any(f.name == name and f.error == error for f in _state.failures):
        _state.failures.append(PluginFailure(name, error))


def get_architectures() -> dict:
    return _collect("register_architectures")


def get_operators() -> dict:
    return _collect("register_operators")


def get_operator(name: str):
    operators = get_operators()
    if name not in operators:
        raise UsageError(f"unknown operator '{name}'", hint=f"choose one of: {', '.join(sorted(operators))}")
    return operators[name]


def claim(config: dict, tensor_names: list[str], path=None):
    """The Architecture that claims a checkpoint, or a clear error naming the file."""
    architectures = get_architectures()
    name = pm.hook.claim_checkpoint(config=config, tensor_names=tensor_names, architectures=architectures)
    if name is None:
        kind = config.get("model_type") or (config.get("architectures") or ["?"])[0]
        raise LayoutError(
            f"no architecture plugin recognises this checkpoint (model_type {kind!r})",
            path=path,
            hint=f"known: {', '.join(sorted(architectures))}; see `modelgrow plugins`. For another architecture, "
                 "`modelgrow layout draft CHECKPOINT` drafts a layout to check and package as a plugin "
                 "(guide: schemas/LAYOUT.md)",
        )
    return architectures[name]


def describe_plugins() -> list[dict]:
    """What `modelgrow plugins` prints: each plugin, where it comes from, what it adds."""
    load_plugins()
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        dist = _state.distributions.get(name)
        hooks = sorted(impl.name for impl in pm.get_hookcallers(plugin) or [])
        registered = {"architectures": [], "operators": []}
        for hook, key in (("register_architectures", "architectures"), ("register_operators", "operators")):
            if hasattr(plugin, hook):
                registered[key] = sorted(i.name for i in _registered_by(name, getattr(plugin, hook), hook))
        rows.append(
            {
                "name": name,
                "distribution": _origin(name, plugin, dist),
                "version": dist.version if dist else (_own_version() if name in DEFAULT_PLUGINS else getattr(plugin, "__version__", "")),
                "hooks": hooks,
                **registered,
            }
        )
    return rows


def _origin(name: str, plugin, dist) -> str:
    """Where a plugin comes from: its distribution, modelgrow itself, or the running
    program (registered with ``pm.register``, as tests and notebooks do)."""
    if dist is not None:
        return dist.metadata["Name"]
    if name in DEFAULT_PLUGINS:
        return "modelgrow (built-in)"
    return f"registered in process ({getattr(plugin, '__module__', None) or getattr(plugin, '__name__', '?')})"


def _own_version() -> str:
    from .version import __version__

    return __version__
