"""Weights made inside each block's forward, for passes whose model does not fit twice.

A learned growth operator's fit normally materialises every grown weight at once: the
whole target model in fp32, and its gradients. ``blockwise`` instead gives each block
(a transformer layer's submodule) a function that makes that block's weights, and runs
the block as ``torch.utils.checkpoint`` of "make the weights, run the block": the
forward keeps only the block's input, and the backward makes the weights again, runs the
block again and sends the gradients into whatever the weights were made from. At any
moment one block's weights (and their gradients) exist, at the price of making each
block's weights twice per pass and running its forward twice.

The module's own parameters of those blocks stay on the meta device; nothing here knows
what made the weights.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Weights = Callable[[], dict[str, torch.Tensor]]  # a block's parameter name (relative to it) -> tensor


@contextlib.contextmanager
def blockwise(module: nn.Module, blocks: dict[str, Weights]):
    """Within the context, the submodule at each path of ``blocks`` runs with the weights
    its function makes, made inside its forward (and again in the backward)."""
    inside = threading.local()  # the block's own call, from within its checkpointed function
    originals = {}
    for path, weights in blocks.items():
        block = module.get_submodule(path)
        originals[path] = block.__dict__.get("forward")
        block.forward = _checkpointed(block, type(block).forward.__get__(block), weights, inside)
    try:
        yield
    finally:
        for path, original in originals.items():
            block = module.get_submodule(path)
            del block.forward
            if original is not None:
                block.forward = original


def _checkpointed(block: nn.Module, forward, weights: Weights, inside: threading.local):
    def run(*args, **kwargs):
        inside.on = True
        try:
            return torch.func.functional_call(block, weights(), args, kwargs, strict=False)
        finally:
            inside.on = False

    def checkpointed_forward(*args, **kwargs):
        if getattr(inside, "on", False):  # functional_call calling the block: its real forward
            return forward(*args, **kwargs)
        if not torch.is_grad_enabled():  # scoring: nothing to recompute
            return run(*args, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward
