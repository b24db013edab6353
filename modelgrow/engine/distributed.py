"""Data parallelism under ``torchrun``: every rank draws the same *global* batch from the
same seeded generator and keeps its slice; losses are divided by the global token
count, so summing the gradients over ranks (one flat all-reduce) gives exactly the
one-process gradient. Only rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """Rank 0 of a torchrun launch (or a plain process) is the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    created: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ.get("RANK", "0")), world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def start(self, device: torch.device) -> None:
        if self.world <= 1:
            return
        import torch.distributed as dist

        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(self.backend)
            self.created = True

    def stop(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.created = False

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor, in rank order (on every rank)."""
        if self.world <= 1:
            return [tensor]
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(out, tensor)
        return out

    def part(self, rows: int) -> slice:
        per = rows // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def local(self, batch: dict, device: torch.device) -> dict:
        """This rank's rows of a global batch, on ``device``; plain values pass through."""
        part = self.part(batch["input_ids"].shape[0])
        return {k: (v[part].to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def sync_grads(dist: Dist, tensors: list[torch.Tensor]) -> None:
    """Sum gradients over ranks in one flat all-reduce (the loss is already /global)."""
    if dist.world <= 1:
        return
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.sum_(flat)
    offset = 0
    for t, g in zip(tensors, grads):
        n = g.numel()
        t.grad = flat[offset:offset + n].view_as(t)
        offset += n


def grad_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' global 2-norm (sharded ones included), without clipping."""
    grads = [t.grad.detach() for t in tensors if t.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
