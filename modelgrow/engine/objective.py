"""The language-model objective and its data: causal or masked LM batches from token
windows, the loss summed over counted tokens, scores over fixed held-out batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import corpus
from ..errors import InputError, UsageError
from .distributed import Dist

LM_TASKS = ("causal_lm", "masked_lm")
MASK_TOKENS = ("[MASK]", "<mask>")


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


def mask_token_id(explicit: int | None, tokenizer: str | None, what: str, vocab: int) -> int:
    """The masked-LM mask id: given, or looked up in the tokenizer ([MASK] or <mask>).
    ``what`` is the pass asking ("fit" or "train"), for the message; the id must be one
    of the model's ``vocab`` ids (an embedding lookup past the end is a crash, not a loss)."""
    if explicit is not None:
        if not 0 <= int(explicit) < vocab:
            raise UsageError(f"the mask token id {explicit} is not one of the model's {vocab} token ids",
                             hint=f"give an id in [0, {vocab})")
        return int(explicit)
    if tokenizer:
        tok = corpus.load_tokenizer(tokenizer, tokenizer)
        for name in MASK_TOKENS:
            found = tok.token_to_id(name)
            if found is not None:
                if not 0 <= int(found) < vocab:
                    raise InputError(f"the tokenizer's {name} is id {found}, outside the model's {vocab} token ids",
                                     path=tokenizer, hint="use the tokenizer the model was trained with")
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
