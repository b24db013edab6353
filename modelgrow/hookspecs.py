"""The hooks a modelgrow plugin can implement. Each is documented in docs/plugins.md."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("modelgrow")
hookimpl = pluggy.HookimplMarker("modelgrow")


@hookspec
def register_architectures(register):
    """Register architectures: call ``register(architecture)`` with an
    :class:`modelgrow.architecture.Architecture` (usually built from a JSON layout)."""


@hookspec
def register_operators(register):
    """Register growth operators: call ``register(operator_class)`` with a subclass of
    :class:`modelgrow.operators.base.Operator` (its ``name`` is the ``--operator`` value)."""


@hookspec(firstresult=True)
def claim_checkpoint(config, tensor_names, architectures):
    """Return the name of the architecture (one of ``architectures``, a dict of name to
    Architecture) that should read a checkpoint with this ``config`` dict and these
    ``tensor_names``, or None to let other plugins decide. The first answer wins."""
