"""`modelgrow train`: continue training a (grown) checkpoint, full-rank or with ReLoRA.

One loop for both modes, on the runtime the LiGO fit pass uses (modelgrow.runtime:
batches and losses, device, bf16 autocast on CUDA, torchrun data parallelism with a
flat gradient all-reduce, rank 0 alone writes):

- AdamW over the trainable parameters (weight decay on matrices and embeddings, not on
  norms and biases); LR = lr × jagged_cosine(step): linear warmup then cosine to
  ``min_lr_ratio`` (full-rank), plus ReLoRA's drop to 0 and re-warm at every restart.
- ReLoRA (Lialin et al., ICLR 2024; modelgrow.relora): every per-layer matrix of the
  layout gets an adapter (A Kaiming from a generator seeded by (seed, restart), B zero,
  its weight frozen); embeddings, norms, the head and biases train fully.

  Restart timing (steps are 0-based): the schedule gives LR 0 at step k·c (k >= 1,
  c = relora_every). That step is taken -- its gradient enters the Adam moments, the
  weights do not move -- and right after it the adapters are merged into the frozen
  weights (fp32), A is redrawn from the generator for (seed, k), B is zeroed and the
  adapters' Adam moments are pruned (one joint magnitude mask; ratio >= 1 resets
  them). Steps k·c+1 ... k·c+restart_warmup re-warm the fresh adapters. This is the
  reference code's timing (merge after the update where step % c == 1, 1-based).
- Dropout: the model trains with its config's dropouts, the adapters with
  ``adapter_dropout`` on their branch only. Dropout masks come from a seed derived
  from (seed, rank, step), so a resumed run draws exactly the masks it would have.
- Validation: fixed windows, evenly spaced over a held-out split (``val_data``, or the
  last ``val_fraction`` of the token stream, never sampled for training), scored
  before the first step, every ``eval_every`` steps and after the last.
- Output: always a plain dense checkpoint in the input's format (modelgrow.train_state).
  ``save_every`` N writes ``OUT-checkpoints/step-N/`` (beside OUT, so that OUT itself
  still appears atomically and complete at the end): dense weights plus the state an
  exact resume needs. No step folder is written after the last step: OUT is the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__, corpus
from .checkpoint import CheckpointWriter, parse_size
from .errors import InputError, OutputError, UsageError
from .grow import _check_destination
from .relora import add_adapters, adapter_targets, jagged_cosine, prune_moments, remove_adapters
from .report import write_report
from .runtime import (
    lm_task, window_length,
    Dist, LMObjective, autocast, grad_norm, is_writer, load_data, mask_token_id, mean_loss,
    peak_memory, precision, prepare_device, resolve_device, sync_grads, tokenizer_file,
)
from .source import SourceModel, load_module, open_source
from . import train_state

# Options that do not change the trajectory: a resumed run may give other values.
RESUME_FREE = ("save_every", "plot", "device", "data", "val_data", "tokenizer")


@dataclass
class TrainOptions:
    """Every knob of a training run; all of them end up in the report."""

    data: list[str] | None = None
    val_data: list[str] | None = None  # None: the last val_fraction of data is held out
    val_fraction: float = 0.05
    steps: int = 1000
    lr: float = 1e-3
    warmup: int | None = None  # None: 10% of the steps, at most relora_every
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    batch_size: int = 16  # global: split across data-parallel ranks
    seq_len: int | None = None  # None: min(128, the model's positions)
    seed: int = 0
    device: str = "auto"
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    eval_every: int | None = None  # None: steps // 10 (0: only before and after)
    eval_batches: int = 8
    relora: bool = False
    rank: int = 128
    alpha: float = 32.0
    adapter_dropout: float = 0.1
    relora_every: int = 500
    restart_warmup: int = 50
    optimizer_prune: float = 0.9  # magnitude ratio of adapter moments zeroed; >= 1: full reset
    save_every: int | None = None
    tokenizer: str | None = None
    plot: str | None = None
    mask_rate: float = 0.15
    mask_token_id: int | None = None
    bin_dtype: str | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> TrainOptions:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown train option(s): {', '.join(unknown)}")
        given = {k: v for k, v in options.items() if v is not None}
        for key in ("data", "val_data"):
            if isinstance(given.get(key), (str, os.PathLike)):
                given[key] = [given[key]]
            if key in given:
                given[key] = [str(p) for p in given[key]] or None
        for key in ("tokenizer", "plot"):
            if key in given:
                given[key] = str(given[key])
        if "betas" in given:
            given["betas"] = tuple(float(b) for b in given["betas"])
        out = cls(**given)
        out.validate()
        return out

    def validate(self) -> None:
        def need(ok: bool, what: str, hint: str | None = None) -> None:
            if not ok:
                raise UsageError(what, hint=hint)

        def whole(value, minimum: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

        need(bool(self.data), "no training data given", "pass --data FILE (text, .npy or .bin ids)")
        need(whole(self.steps, 1), f"--steps must be a whole number >= 1, got {self.steps!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(whole(self.batch_size, 1), f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.seq_len is None or whole(self.seq_len, 1), f"--seq-len must be >= 1, got {self.seq_len}")
        need(self.warmup is None or whole(self.warmup, 0), f"--warmup must be >= 0, got {self.warmup}")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.weight_decay < 1, f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"--betas must be two numbers in [0, 1), got {self.betas}")
        need(self.eval_every is None or whole(self.eval_every, 0), f"--eval-every must be >= 0, got {self.eval_every}")
        need(whole(self.eval_batches, 0), f"--eval-batches must be >= 0, got {self.eval_batches}")
        need(self.save_every is None or whole(self.save_every, 1), f"--save-every must be >= 1, got {self.save_every}")
        need(0 < self.mask_rate < 1, f"mask_rate must be in (0, 1), got {self.mask_rate}")
        if not self.relora:
            return
        need(whole(self.rank, 1), f"--rank must be >= 1, got {self.rank}")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"--alpha must be positive, got {self.alpha}")
        need(0 <= self.adapter_dropout < 1, f"--adapter-dropout must be in [0, 1), got {self.adapter_dropout}")
        need(whole(self.relora_every, 1), f"--relora-every must be >= 1, got {self.relora_every}")
        need(whole(self.restart_warmup, 0) and self.restart_warmup < self.relora_every,
             f"--restart-warmup must be in [0, --relora-every), got {self.restart_warmup}")
        need(self.optimizer_prune >= 0, f"--optimizer-prune must be >= 0, got {self.optimizer_prune}")
        need(self.warmup is None or self.warmup <= self.relora_every,
             f"--warmup {self.warmup} is longer than --relora-every {self.relora_every}",
             "the first warmup must end before the first restart")

    @property
    def warmup_steps(self) -> int:
        default = self.steps // 10
        if self.relora:
            default = min(default, self.relora_every)
        return default if self.warmup is None else min(self.warmup, self.steps)

    @property
    def eval_interval(self) -> int:
        return self.steps // 10 if self.eval_every is None else self.eval_every

    @property
    def cycle(self) -> int | None:
        return self.relora_every if self.relora else None

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at 0-based ``step``."""
        return jagged_cosine(step, self.steps, self.warmup_steps, self.cycle, self.restart_warmup, self.min_lr_ratio)

    def restart_after(self, step: int) -> bool:
        """ReLoRA merges right after step k·relora_every (k >= 1): the one taken at LR 0."""
        return self.relora and step > 0 and step % self.relora_every == 0

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


def _seed(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def restart_generator(seed: int, restart: int) -> torch.Generator:
    """A's generator for a restart: the same on every rank, and on a resumed run."""
    return torch.Generator().manual_seed(_seed("relora-A", seed, restart))


def checkpoints_dir(dest: str | Path) -> Path:
    """Where --save-every writes: beside OUT, so OUT appears only when complete."""
    dest = Path(dest)
    return dest.parent / f"{dest.name}-checkpoints"


def train(checkpoint: str | Path, dest: str | Path, options: TrainOptions | dict[str, Any], *, overwrite: bool = False,
          resume: str | Path | None = None, progress: bool = True, report_path: str | Path | None = None,
          config_path: str | Path | None = None, max_shard_size: str | int = "2GB") -> dict[str, Any]:
    """Train the checkpoint at ``checkpoint`` and write the result to ``dest``; return the report.

    Every check (options, data, destination, resume state) runs before the first step.
    Under torchrun every rank trains; rank 0 alone writes.
    """
    started = time.perf_counter()
    opts = options if isinstance(options, TrainOptions) else TrainOptions.from_dict(options)
    opts.validate()
    dest = Path(dest)
    max_shard_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    with open_source(checkpoint, config_path) as source:
        _check_destination(source, dest)
        trainer = Trainer(source, opts, dest, resume=resume, overwrite=overwrite, report_path=report_path,
                          max_shard_bytes=max_shard_bytes)
        if not is_writer():
            return trainer.run(None, progress=False, started=started)  # a data-parallel helper rank
        with CheckpointWriter(dest, max_shard_bytes=max_shard_bytes, metadata=trainer.metadata(), overwrite=overwrite) as writer:
            report = trainer.run(writer, progress=progress, started=started)
            files = writer.commit()
        report["output"] = {"path": str(dest), "params": source.param_count(),
                            "files": [{"name": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files]}
    if opts.plot:
        plot_curves(report, opts.plot)
        report["plot"] = opts.plot
    report["wall_s"] = time.perf_counter() - started
    write_report(report, report_path)
    return report


class Trainer:
    """A prepared run: options checked, data loaded and split, resume state read."""

    def __init__(self, source: SourceModel, options: TrainOptions, dest: Path, *, resume=None, overwrite=False,
                 report_path=None, max_shard_bytes: int = 2_000_000_000):
        self.source, self.options, self.dest = source, options, dest
        self.max_shard_bytes = max_shard_bytes
        o = options
        self.arch, self.config = source.arch, source.config
        self.dist = Dist.from_env()
        self.task = lm_task(self.arch, self.config, "training", "train the ...ForCausalLM / ...ForMaskedLM checkpoint")
        self.seq_len = window_length(o.seq_len, source.dims.positions, o.batch_size, self.dist.world, "")
        if o.relora:
            self._check_rank()
        for path, what in ((o.plot, "--plot"), (report_path, "--report")):
            if path is not None and not Path(path).parent.is_dir():
                raise OutputError(f"{what}: folder {Path(path).parent} does not exist", path=path)
        if o.plot:
            _require_matplotlib()
        self._load_data()
        self._fingerprints: dict | None = None
        self.resume_from = train_state.find_state(resume) if resume is not None else None
        self.state = self._check_resume() if self.resume_from else None
        if o.save_every and not self.state and not overwrite and checkpoints_dir(dest).exists():
            raise OutputError("exists; pass --overwrite to replace its step folders, or --resume from one",
                              path=checkpoints_dir(dest))

    # -- checks before any step -------------------------------------------------------

    def _check_rank(self) -> None:
        """Adapters must be low-rank: r below both sides of every adapted matrix."""
        targets = adapter_targets(self.source.layout)
        if not targets:
            raise UsageError(f"--relora: the {self.source.layout.name} layout names no per-layer matrices to adapt")
        sides = [min(self.source.checkpoint.info(b.name).shape) for b in self.source.bound()
                 if b.spec.per_layer and b.spec.kind == "param" and b.spec.in_axis is not None and len(b.spec.axes) == 2]
        if sides and self.options.rank >= min(sides):
            raise UsageError(
                f"--rank {self.options.rank} is not below the smallest adapted matrix side ({min(sides)}): "
                "the adapters would hold at least as many parameters as the matrices",
                hint=f"use --rank < {min(sides)}, or train full-rank without --relora",
            )

    def _load_data(self) -> None:
        o, vocab = self.options, self.source.dims.vocab
        self.tokenizer = tokenizer_file(o.tokenizer, self.source)
        data = load_data(o.data, vocab=vocab, config=self.config, tokenizer=self.tokenizer, bin_dtype=o.bin_dtype)
        need = self.seq_len + 1
        if o.val_data:
            self.train_data = data
            self.val_data = load_data(o.val_data, vocab=vocab, config=self.config, tokenizer=self.tokenizer,
                                      bin_dtype=o.bin_dtype)
            self.val_source = "val_data"
        elif o.val_fraction > 0:
            # The tail, at least one window's worth; the sampler never sees it.
            held = max(math.ceil(len(data) * o.val_fraction), need)
            cut = len(data) - held
            self.train_data = corpus.TokenData(data.tokens[:cut], vocab, data.sources, data.tokenizer)
            self.val_data = corpus.TokenData(data.tokens[cut:], vocab, data.sources, data.tokenizer)
            self.val_source = f"last {held:,} of {len(data):,} tokens (val_fraction {o.val_fraction:g})"
        else:
            self.train_data, self.val_data, self.val_source = data, None, None
        names = ", ".join(s["path"] for s in data.sources)
        if len(self.train_data) < need:
            raise InputError(
                f"{names}: {len(self.train_data):,} training tokens (after holding out validation), but one window "
                f"needs {need:,} (seq_len + 1)", hint="give more data, a smaller --seq-len or --val-data")
        if self.val_data is not None and len(self.val_data) < need:
            raise InputError(f"validation data: {len(self.val_data):,} tokens, but one window needs {need:,}",
                                    hint="give more --val-data or a smaller --seq-len")
        mask_id = mask_token_id(o.mask_token_id, self.tokenizer, "train") if self.task == "masked_lm" else None
        self.objective = LMObjective(self.task, vocab, mask_id, o.mask_rate)

    def fingerprints(self) -> dict:
        """What a resume checks the data against; hashed once (big data takes seconds)."""
        if self._fingerprints is None:
            self._fingerprints = {"train": train_state.fingerprint(self.train_data.tokens),
                                  "val": train_state.fingerprint(self.val_data.tokens) if self.val_data is not None else None}
        return self._fingerprints

    def _check_resume(self) -> dict:
        state = train_state.read_state(self.resume_from)
        where = self.resume_from / train_state.STATE_DIR / train_state.STATE_JSON
        mine, theirs = self.options.as_dict(), state.get("options", {})
        differ = [k for k in mine if k not in RESUME_FREE and mine[k] != theirs.get(k)]
        if differ:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine[k]!r} now" for k in differ[:4])
            raise UsageError(f"--resume {self.resume_from}: the run was started with other options ({shown})",
                             hint="resume with the options of the interrupted run")
        if state.get("fingerprints") != self.fingerprints():
            raise UsageError(f"--resume {self.resume_from}: the training or validation tokens differ from the interrupted run's",
                             hint="give the same --data/--val-data (and tokenizer)")
        if state.get("seq_len") != self.seq_len or state.get("source_params") != self.source.param_count():
            raise UsageError(f"--resume {self.resume_from}: it was saved for another model or sequence length", path=where)
        step = state.get("step")
        if not isinstance(step, int) or not 0 < step < self.options.steps:
            raise UsageError(f"--resume {self.resume_from}: it is at step {step} of {self.options.steps}")
        return state

    def metadata(self) -> dict[str, str]:
        # Without the options that only say where extras go: a resumed run writes the
        # same bytes as an uninterrupted one.
        options = {k: v for k, v in self.options.as_dict().items() if k not in ("save_every", "plot")}
        return {"modelgrow.version": __version__, "modelgrow.source": str(self.source.path),
                "modelgrow.train": json.dumps(options, sort_keys=True)}

    def settings(self) -> dict:
        o = self.options
        schedule = f"linear warmup, cosine to {o.min_lr_ratio:g} x lr"
        if o.relora:
            schedule += f"; LR 0 at every {o.relora_every}th step, then re-warm over {o.restart_warmup}"
        return {
            "mode": "relora" if o.relora else "full-rank", "task": self.task, "warmup": o.warmup_steps,
            "eval_every": o.eval_interval, "seq_len": self.seq_len, "per_rank_batch": o.batch_size // self.dist.world,
            "world_size": self.dist.world, "schedule": schedule, "optimizer": "AdamW",
            "weight_decay_applies_to": "parameters with dim >= 2 (matrices, embeddings, adapters)",
            "tokenizer": self.tokenizer,
        }

    # -- the run ---------------------------------------------------------------------------

    def run(self, writer: CheckpointWriter | None, *, progress: bool, started: float) -> dict:
        device = resolve_device(self.options.device, self.dist.local_rank, self.dist.world)
        prepare_device(device)
        self.dist.start(device)
        try:
            # Dropout reseeds the global generators every step: keep the caller's streams.
            with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
                return self._run(device, writer, progress and self.dist.rank == 0, started)
        finally:
            self.dist.stop()

    def _run(self, device: torch.device, writer, show: bool, started: float) -> dict:
        o, dist = self.options, self.dist
        module = self.arch.prepare_for_training(load_module(self.source).to(device), self.config)
        weights = train_state.WeightMap(self.source, module)
        total_params = sum(p.numel() for _, p in weights.named)
        adapters = add_adapters(module, self.source.layout, o.rank, o.alpha, o.adapter_dropout,
                                restart_generator(o.seed, 0)) if o.relora else []
        key_of = {id(p): k for k, p in weights.named}
        named = [(k, p) for k, p in weights.named if p.requires_grad]
        for a in adapters:
            base = key_of[id(a.base.weight)]
            named += [(f"{base}:lora_A", a.lora_A), (f"{base}:lora_B", a.lora_B)]
        trainable = [p for _, p in named]
        groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]  # norms, biases
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        sampler = corpus.WindowSampler(self.train_data, self.seq_len, o.seed)
        mask_gen = torch.Generator().manual_seed(o.seed + 3_000_017)
        val_set = self._val_set()
        h = {"loss_curve": [], "lr_curve": [], "grad_norm_curve": [], "val_curve": [], "restarts": [], "saved": []}
        start = 0
        if self.state is not None:
            start = self._restore(weights, adapters, named, optimizer, sampler, mask_gen, h)
        trainable_params = sum(p.numel() for p in trainable)

        def logits(batch):
            return self.arch.call(module, self.config, self.arch.model_inputs(self.config, batch))

        @torch.no_grad()
        def evaluate(done: int) -> None:
            if not val_set:
                return
            module.eval()  # no dropout while scoring
            with autocast(device):
                loss = mean_loss(dist, device, val_set, lambda b: self.objective.loss_sum(logits(b), b))
            module.train()
            h["val_curve"].append([done, loss])

        if show:
            tqdm.write(f"train ({'ReLoRA' if o.relora else 'full-rank'}): steps={o.steps}, lr={o.lr:g}, "
                       f"warmup={o.warmup_steps}, batch={o.batch_size}x{self.seq_len}, device={device} x{dist.world}, "
                       f"trainable={trainable_params:,} of {total_params:,} parameters", file=sys.stderr)
        module.train()
        if start == 0:
            evaluate(0)
        step_times: list[float] = []
        bar = tqdm(range(start, o.steps), desc="training", unit="step", disable=not show, leave=False,
                   initial=start, total=o.steps)
        for step in bar:
            t_step = time.perf_counter()
            torch.manual_seed(_seed("dropout", o.seed, dist.rank, step))
            batch = self.objective.batch(sampler.windows(o.batch_size), mask_gen)
            local = dist.local(batch, device)
            with autocast(device):
                loss = self.objective.loss_sum(logits(local), local) / batch["count"]
            loss.backward()
            sync_grads(dist, trainable)
            norm = torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip) if o.grad_clip > 0 else grad_norm(trainable)
            lr = o.lr * o.lr_factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(dist.sum_(loss.detach().double()))
            if not math.isfinite(value):
                raise UsageError(f"training diverged at step {step}: loss {value}",
                                 hint="lower --lr or lengthen --warmup; nothing was written")
            h["loss_curve"].append(value)
            h["lr_curve"].append(lr)
            h["grad_norm_curve"].append(float(norm))
            if o.restart_after(step):
                h["restarts"].append(self._restart(adapters, optimizer, step, len(h["restarts"]) + 1, device))
            step_times.append(time.perf_counter() - t_step)
            bar.set_postfix(loss=f"{value:.4f}")
            done = step + 1
            if done == o.steps or (o.eval_interval and done % o.eval_interval == 0):
                evaluate(done)
            if o.save_every and done % o.save_every == 0 and done < o.steps:
                self._save(done, weights, adapters, named, optimizer, sampler, mask_gen, h)
        bar.close()
        opt_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        if adapters:
            remove_adapters(module)  # merged in place: a dense model again
        if writer is not None:
            train_state.write_dense(writer, self.source, weights, [])
        loop_s = sum(step_times)
        steps_run = len(step_times)
        val = [v for _, v in h["val_curve"]]
        report = {
            "modelgrow_version": __version__,
            "command": "train",
            "source": {"path": str(self.source.path), "params": self.source.param_count(),
                       "files": [str(f) for f in self.source.checkpoint.files]},
            "options": o.as_dict(),
            **self.settings(),
            "device": str(device), "autocast": precision(device), "backend": dist.backend,
            "data": {"train": {**self.train_data.describe(), "tokens": len(self.train_data)},
                     "val": None if self.val_data is None else {"tokens": len(self.val_data), "from": self.val_source,
                                                                 "windows": len(val_set) * o.batch_size}},
            "steps": o.steps,
            "loss_curve": h["loss_curve"], "lr_curve": h["lr_curve"], "grad_norm_curve": h["grad_norm_curve"],
            "val_curve": h["val_curve"],
            "val_loss": {"before": val[0] if val and h["val_curve"][0][0] == 0 else None, "after": val[-1] if val else None},
            "tokens_seen": o.steps * o.batch_size * self.seq_len,
            "total_params": total_params,
            "trainable_params": trainable_params,
            "optimizer_state_bytes": opt_bytes,
            "restarts": len(h["restarts"]),
            "relora": self._relora_report(adapters, h["restarts"]) if o.relora else None,
            "saved": h["saved"],
            "resumed_from": {"path": str(self.resume_from), "step": start} if self.state else None,
            "step_times": step_times,
            "step_s": loop_s / steps_run if steps_run else None,
            "tokens_per_s": steps_run * o.batch_size * self.seq_len / loop_s if loop_s > 0 else None,
            "wall_s": time.perf_counter() - started,
            "peak_memory": peak_memory(device),
        }
        return report

    def _val_set(self) -> list[dict]:
        """Fixed global batches from windows evenly spaced over the held-out split."""
        o = self.options
        if self.val_data is None or o.eval_batches == 0:
            return []
        count, span = o.eval_batches * o.batch_size, self.seq_len + 1
        last = len(self.val_data) - span
        starts = torch.linspace(0, last, count, dtype=torch.float64).round().long().tolist() if count > 1 else [0]
        rows = torch.stack([torch.as_tensor(self.val_data.tokens[s:s + span].astype("int64")) for s in starts])
        gen = torch.Generator().manual_seed(o.seed + 2_000_003)  # masked LM: fixed masks
        return [self.objective.batch(rows[i:i + o.batch_size], gen) for i in range(0, count, o.batch_size)]

    def _restart(self, adapters, optimizer, step: int, k: int, device: torch.device) -> dict:
        """Merge, redraw A for restart k, zero B, prune the adapters' moments."""
        for a in adapters:
            a.merge()
        gen = restart_generator(self.options.seed, k)
        for a in adapters:
            a.redraw(gen)
        prune_moments(optimizer, [p for a in adapters for p in (a.lora_A, a.lora_B)], self.options.optimizer_prune)
        digest = hashlib.sha256()
        for a in adapters:
            digest.update(a.lora_A.detach().cpu().numpy().tobytes())
        mine = torch.tensor(list(digest.digest()), dtype=torch.int64, device=device)
        hashes = [bytes(t.cpu().tolist()).hex() for t in self.dist.gather(mine)]
        if len(set(hashes)) != 1:  # replicas would silently train different models
            raise RuntimeError(f"ReLoRA restart {k}: ranks drew different A matrices ({hashes})")
        return {"restart": k, "after_step": step, "a_sha256": hashes}

    def _relora_report(self, adapters, restarts) -> dict:
        o = self.options
        return {
            "rank": o.rank, "alpha": o.alpha, "scale": o.alpha / o.rank, "adapter_dropout": o.adapter_dropout,
            "every": o.relora_every, "restart_warmup": o.restart_warmup, "optimizer_prune": o.optimizer_prune,
            "adapters": len(adapters), "adapter_params": sum(a.lora_A.numel() + a.lora_B.numel() for a in adapters),
            "merge_timing": "after the step taken at LR 0 (0-based steps k*every, k >= 1): merge in fp32, "
                            "redraw A from (seed, k), zero B, prune the adapters' Adam moments",
            "restarts": restarts,
        }

    # -- step checkpoints and resume -----------------------------------------------------

    def _save(self, done, weights, adapters, named, optimizer, sampler, mask_gen, h) -> None:
        folder = checkpoints_dir(self.dest) / f"step-{done}"
        h["saved"].append(str(folder))
        if self.dist.rank != 0:
            return  # every rank holds the same state; rank 0 writes it
        tensors = {f"param/{k}": p.detach().float() for k, p in weights.named}
        for name, p in named:
            if ":lora_" in name:
                tensors[f"adapter/{name}"] = p.detach()
            state = optimizer.state.get(p)
            if state:
                tensors[f"exp_avg/{name}"] = state["exp_avg"]
                tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"]
                tensors[f"adam_step/{name}"] = state["step"]
        tensors["rng/windows"] = sampler.generator.get_state()
        tensors["rng/masks"] = mask_gen.get_state()
        state = {
            "format": train_state.STATE_FORMAT, "version": train_state.STATE_VERSION, "step": done,
            "options": self.options.as_dict(), "fingerprints": self.fingerprints(), "seq_len": self.seq_len,
            "source": str(self.source.path), "source_params": self.source.param_count(), "world_size": self.dist.world,
            "history": {k: v for k, v in h.items() if k != "saved"},
        }
        checkpoints_dir(self.dest).mkdir(exist_ok=True)
        train_state.save_step(folder, self.source, weights, adapters, tensors, state,
                              max_shard_bytes=self.max_shard_bytes, metadata=self.metadata())

    def _restore(self, weights, adapters, named, optimizer, sampler, mask_gen, h) -> int:
        tensors = train_state.read_tensors(self.resume_from)
        where = self.resume_from / train_state.STATE_DIR / train_state.STATE_TENSORS

        def get(key: str, like: torch.Tensor | None = None) -> torch.Tensor:
            if key not in tensors:
                raise InputError(f"training state lacks {key!r}", path=where)
            t = tensors[key]
            if like is not None and t.shape != like.shape:
                raise InputError(f"training state {key!r} is {list(t.shape)}, the run needs {list(like.shape)}", path=where)
            return t

        with torch.no_grad():
            for k, p in weights.named:
                p.copy_(get(f"param/{k}", p))
            for name, p in named:
                if ":lora_" in name:
                    p.copy_(get(f"adapter/{name}", p))
                if f"adam_step/{name}" in tensors:
                    optimizer.state[p] = {"step": get(f"adam_step/{name}").clone(),
                                          "exp_avg": get(f"exp_avg/{name}", p).to(p.device, p.dtype),
                                          "exp_avg_sq": get(f"exp_avg_sq/{name}", p).to(p.device, p.dtype)}
        sampler.generator.set_state(get("rng/windows"))
        mask_gen.set_state(get("rng/masks"))
        history = self.state["history"]
        for key in ("loss_curve", "lr_curve", "grad_norm_curve", "val_curve", "restarts"):
            h[key] = list(history.get(key, []))
        return int(self.state["step"])


# -- the plot ---------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         hint="pip install 'modelgrow[plot]'") from None


def plot_curves(report: dict, path: str | Path) -> None:
    """Train and validation loss against steps done, ReLoRA merges marked; PNG, atomically."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    train = report["loss_curve"]
    ax.plot(range(len(train)), train, lw=0.8, alpha=0.8, label="train (per step)")
    if report["val_curve"]:
        xs, ys = zip(*report["val_curve"])
        ax.plot(xs, ys, "o-", lw=1.5, ms=3, label="validation (held out)")
    for i, r in enumerate((report.get("relora") or {}).get("restarts", [])):
        ax.axvline(r["after_step"] + 1, color="grey", ls=":", lw=1, label="ReLoRA merge" if i == 0 else None)
    ax.set_xlabel("steps done")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"modelgrow train ({report['mode']}): {Path(report['source']['path']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write the plot: {exc.strerror or exc}", path=path) from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


__all__ = ["TrainOptions", "train", "Trainer", "plot_curves", "checkpoints_dir", "restart_generator"]
