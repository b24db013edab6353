"""What every training loop here shares: the LM objective, data loading, the device,
mixed precision, data parallelism and memory figures.

Used by the LiGO fit pass (modelgrow.fit) and by `modelgrow train` (modelgrow.train),
so both build batches, normalise losses and all-reduce gradients the same way:

- data parallel under ``torchrun``: every rank draws the same *global* batch from the
  same seeded generator and keeps its slice; losses are divided by the global token
  count, so summing the gradients over ranks (one flat all-reduce) gives exactly the
  one-process gradient; only rank 0 writes;
- on CUDA the forward pass runs under bf16 autocast with fp32 weights (ordinary mixed
  precision); on the CPU everything is fp32.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import corpus
from .errors import UsageError

LM_TASKS = ("causal_lm", "masked_lm")
MASK_TOKENS = ("[MASK]", "<mask>")


# -- distributed --------------------------------------------------------------------------


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
    grads = [t.grad.detach().norm() for t in tensors if t.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


# -- device and precision -----------------------------------------------------------------


def resolve_device(spec: str | None, local_rank: int = 0, world: int = 1) -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is available", hint="use --device cpu")
        if spec == "cuda":
            index = local_rank if world > 1 else torch.cuda.current_device()
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--device {spec!r} is not a device", hint="auto, cpu, cuda or cuda:N") from None
        if not 0 <= index < torch.cuda.device_count():
            raise UsageError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    raise UsageError(f"--device {spec!r} is not a device", hint="auto, cpu, cuda or cuda:N")


def prepare_device(device: torch.device) -> None:
    """Make ``device`` current and start its peak-memory count from here."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device):
    """bf16 matmuls on CUDA (weights stay fp32); nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def precision(device: torch.device) -> str | None:
    return "bf16" if device.type == "cuda" else None


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda max allocated"}
    # ru_maxrss is KiB on Linux (bytes on macOS): the whole process's high-water mark.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "kind": "process max RSS"}


# -- data and the language-model objective ------------------------------------------------


def lm_task(arch, config: dict, doing: str, hint: str) -> str:
    """The class's language-model task; fitting and training need logits to score."""
    info = arch.class_info(config)
    task = info.get("task")
    if info.get("output") != "logits" or task not in LM_TASKS:
        raise UsageError(
            f"{doing} needs a model class with a language-model head; {arch.class_name(config)} "
            f"outputs {info.get('output')} (task {task})",
            hint=hint,
        )
    return task


def window_length(requested: int | None, positions: int | None, batch_size: int, world: int, flag: str) -> int:
    """Tokens per training window (default min(128, positions)); the batch must split over ranks."""
    seq_len = requested or min(128, positions or 128)
    if positions and seq_len > positions:
        raise UsageError(f"--{flag}seq-len {seq_len} exceeds the model's {positions} positions")
    if batch_size % world:
        raise UsageError(f"--{flag}batch-size {batch_size} does not split over {world} processes")
    return seq_len


def tokenizer_file(explicit: str | None, source) -> str | None:
    """--tokenizer if given, else the checkpoint's own tokenizer.json."""
    if explicit:
        return str(explicit)
    found = corpus.default_tokenizer(source.checkpoint.root)
    return str(found) if found else None


def load_data(paths, *, vocab: int, config: dict, tokenizer: str | None, bin_dtype: str | None) -> corpus.TokenData:
    """Token data for a model: documents separated by its end-of-text id, when it has one."""
    eos = config.get("eos_token_id")
    return corpus.load_tokens(paths, vocab=vocab, tokenizer=tokenizer,
                              separator=eos if isinstance(eos, int) else None, bin_dtype=bin_dtype)


def mask_token_id(explicit: int | None, tokenizer: str | None, what: str) -> int:
    """The masked-LM mask id: given, or looked up in the tokenizer ([MASK] or <mask>).
    ``what`` is the pass asking ("fit" or "train"), for the message."""
    if explicit is not None:
        return int(explicit)
    if tokenizer:
        tok = corpus._load_tokenizer(tokenizer, tokenizer)
        for name in MASK_TOKENS:
            found = tok.token_to_id(name)
            if found is not None:
                return int(found)
    doing = {"fit": "fitting", "train": "training"}.get(what, what)
    raise UsageError(f"masked-LM {doing} needs the mask token's id, and the tokenizer has no [MASK]/<mask>",
                     hint=f"pass --tokenizer, or mask_token_id in the {what} options")


@dataclass
class LMObjective:
    """Batches and the summed loss of a language model's own task.

    causal_lm: predict every next token. masked_lm: BERT's recipe, ``mask_rate`` of the
    positions are picked, of those 80% become the mask id, 10% a random id, 10% stay.
    Losses are *sums*; the caller divides by the batch's global ``count``.
    """

    task: str
    vocab: int
    mask_id: int | None = None
    mask_rate: float = 0.15
    count_all: bool = False  # every position counts (a distillation loss over all tokens)

    def batch(self, windows: torch.Tensor, gen: torch.Generator) -> dict:
        """The global batch from [rows, seq + 1] windows: inputs, labels, global count."""
        if self.task == "causal_lm":
            ids, labels = windows[:, :-1], windows[:, 1:]
            return {"input_ids": ids, "labels": labels, "count": ids.numel()}
        ids = windows[:, :-1].clone()
        pick = torch.rand(ids.shape, generator=gen) < self.mask_rate
        if not pick.any():  # a loss over zero tokens is undefined
            pick.view(-1)[torch.randint(0, ids.numel(), (1,), generator=gen)] = True
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=gen)
        rand_ids = torch.randint(0, self.vocab, ids.shape, generator=gen)
        ids = torch.where(pick & (roll < 0.8), torch.full_like(ids, self.mask_id), ids)
        ids = torch.where(pick & (roll >= 0.8) & (roll < 0.9), rand_ids, ids)
        count = ids.numel() if self.count_all else int(pick.sum())
        return {"input_ids": ids, "labels": labels, "count": count}

    def loss_sum(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        logits = logits.float()
        vocab = logits.shape[-1]
        return F.cross_entropy(logits.view(-1, vocab), batch["labels"].reshape(-1), ignore_index=-100, reduction="sum")


def mean_loss(dist: Dist, device: torch.device, batches: list[dict], loss_sum) -> float | None:
    """Loss per counted token over fixed global batches; ``loss_sum(local_batch)``."""
    if not batches:
        return None
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        local = dist.local(batch, device)
        total[0] += loss_sum(local).double()
        total[1] += local["count"] / dist.world  # every rank adds its share of the global count
    dist.sum_(total)
    return float(total[0] / total[1])


__all__ = ["Dist", "LMObjective", "LM_TASKS", "lm_task", "window_length", "autocast", "grad_norm", "is_writer", "load_data", "mask_token_id",
           "mean_loss", "peak_memory", "precision", "prepare_device", "resolve_device", "sync_grads",
           "tokenizer_file", "world_size"]
