"""Tensors a pass optimises, sharded over torchrun processes with FSDP2.

Plain data parallelism keeps a whole copy of the optimised tensors, their gradients and
AdamW's two moments in every process. ``shard`` instead wraps the tensors in a module
that ``torch.distributed.fsdp.fully_shard`` splits along their first dimension: each
process holds its slice of them and of their optimiser state. Calling the module
gathers the whole tensors, hands them to ``make`` (which builds whatever the pass needs
from them, differentiably) and frees them again; the backward through what ``make``
built sums the gradients over the processes straight into each process's slice.

FSDP2 averages the gradients over the processes (a divide factor of 1, which would sum
them, needs a reduction gloo does not have). The engine divides every process's loss by
the global token count already (engine.distributed), so the one-process gradient is the
sum: the whole tensors reach ``make`` through an identity whose backward multiplies by
the number of processes, and the average of those is the sum.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ShardedTensors(nn.Module):
    """Named tensors as one FSDP2 unit; ``forward()`` is ``make(the whole tensors)``."""

    def __init__(self, tensors: dict[str, torch.Tensor], make: Callable[[dict[str, torch.Tensor]], object],
                 world: int = 1):
        super().__init__()
        self.names = list(tensors)
        self.tensors = nn.ParameterList(nn.Parameter(t.detach().clone()) for t in tensors.values())
        self.make, self.world = make, world

    def forward(self):
        return self.make({n: _Summed.apply(p, self.world) for n, p in zip(self.names, self.tensors)})

    def sharded(self) -> dict[str, torch.Tensor]:
        """The parameters the optimiser steps (each process's slices), by name."""
        return dict(zip(self.names, self.tensors))

    def gathered(self) -> dict[str, torch.Tensor]:
        """The whole tensors, on every process (a collective: every process calls it)."""
        return {n: p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
                for n, p in zip(self.names, self.tensors)}


def shard(tensors: dict[str, torch.Tensor], make, world: int, device: torch.device) -> ShardedTensors:
    """``tensors`` sharded over ``world`` processes (the default process group must exist)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    module = ShardedTensors(tensors, make, world)
    fully_shard(module, mesh=init_device_mesh(device.type, (world,)), reshard_after_forward=True)
    return module


class _Summed(torch.autograd.Function):
    """The identity, whose gradient is multiplied by ``world``: FSDP2's average becomes a sum."""

    @staticmethod
    def forward(ctx, tensor, world):
        ctx.world = world
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (clipping sharded tensors gives a distributed one)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
