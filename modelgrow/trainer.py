"""`modelgrow train`: continue training a (grown) checkpoint, full-rank or with ReLoRA.

One loop for both modes: the engine's (modelgrow.engine), shared with the fit pass
(batches and losses, device, bf16 autocast on CUDA, torchrun data parallelism with a
flat gradient all-reduce, rank 0 alone writes):

- AdamW over the trainable parameters (weight decay on matrices and embeddings, not on
  norms and biases); LR = lr × jagged_cosine(step): warmup (none for ``continue``, whose
  lr is the source's final rate) then cosine to ``min_lr_ratio``, plus ReLoRA's restarts.
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
  With ``full_rank_steps`` N > 0 the first N steps train every parameter (adapters
  idle), step N is the adapters' first, taken at LR 0, and merges follow at N + k·c.
  A merge that would leave fewer than c // 2 steps is skipped (engine.schedule).
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

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import corpus, seeding, signals, train_state
from .version import __version__
from .checkpoint import CheckpointWriter, parse_size
from .destination import check_destination
from .engine import state as step_state
from .engine.device import peak_memory, precision, prepare_device, resolve_device
from .engine.distributed import Dist, is_writer
from .engine.loop import Loop
from .engine.objective import LMObjective, lm_task, load_data, mask_token_id, mean_loss, tokenizer_file, window_length
from .errors import InputError, OutputError
from .growth_map import chosen_tensors
from .plots import plot_curves, require_matplotlib
from .relora import add_adapters, check_rank, relora_report, remove_adapters, restart, set_full_rank, switch_to_adapters
from .report import write_report
from .train_options import RESUME_FREE, RESUMED_PATHS, TrainOptions, checkpoints_dir, file_names, restart_generator
from .source import SourceModel, load_module, open_source

def train(checkpoint: str | Path, dest: str | Path, options: TrainOptions | dict[str, Any], *, overwrite: bool = False,
          resume: str | Path | None = None, progress: bool = True, report_path: str | Path | None = None,
          config_path: str | Path | None = None, max_shard_size: str | int = "2GB", dtype: str = "source",
          keep_card: bool = False, hub: dict | None = None) -> dict[str, Any]:
    """Train the checkpoint at ``checkpoint`` and write the result to ``dest``; return the report.

    Every check (options, data, destination, resume state) runs before the first step.
    Under torchrun every rank trains; rank 0 alone writes. ``dtype``: what the weights are
    stored as; ``hub``: the Hub id the source came from (for the report and the card).
    """
    started = time.perf_counter()
    opts = TrainOptions.parse(options)
    resume_from = step_state.find_state(resume) if resume is not None else None
    state = step_state.read_state(resume_from) if resume_from is not None else None
    if state is not None:
        opts = opts.resumed(state, resume_from)  # the step folder's options, unless given again
    opts.require_data()
    dest = Path(dest)
    max_shard_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    with open_source(checkpoint, config_path) as source:
        opts = opts.with_source_lr(source.checkpoint.root)  # --lr-schedule continue: where it starts
        check_destination(source, dest)
        trainer = Trainer(source, opts, dest, resume_from=resume_from, state=state, overwrite=overwrite,
                          report_path=report_path, max_shard_bytes=max_shard_bytes, dtype=dtype)
        if not is_writer():
            return trainer.run(None, progress=False, started=started)  # a data-parallel helper rank
        signals.expect(dest, report_path)
        if overwrite and state is None:  # the earlier run's step folders go with it: no resume continues them
            train_state.remove_earlier_steps(checkpoints_dir(dest), trainer.inputs())
        with CheckpointWriter(dest, max_shard_bytes=max_shard_bytes, metadata=trainer.metadata(), overwrite=overwrite) as writer:
            report = trainer.run(writer, progress=progress, started=started)
            train_state.describe_output(writer, report, source, opts, digest=trainer.metadata()["modelgrow.source_sha256"],
                                        dtype=dtype, max_shard_size=max_shard_size, keep_card=keep_card, hub=hub)
            with signals.committing(dest):
                files = writer.commit()
        report["output"] = {"path": str(dest), "params": source.param_count(),
                            "files": [{"name": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files]}
        # With "options": what `modelgrow run REPORT` needs to train it again (modelgrow.replay).
        report["train_run"] = {"config": str(config_path) if config_path is not None else None,
                               "max_shard_size": max_shard_size, "dtype": dtype, "keep_card": keep_card}
        report["cwd"] = os.getcwd()
    if opts.plot:
        plot_curves(report, opts.plot)
        report["plot"] = str(opts.plot)
    report["wall_s"] = time.perf_counter() - started
    write_report(report, report_path)
    if report_path is not None:
        signals.committed(report_path)
    return report


class Trainer:
    """A prepared run: options checked, data loaded and split, resume state read."""

    def __init__(self, source: SourceModel, options: TrainOptions, dest: Path, *, resume_from: Path | None = None,
                 state: dict | None = None, overwrite=False, report_path=None, max_shard_bytes: int = 2_000_000_000,
                 dtype: str = "source"):
        self.source, self.options, self.dest, self.dtype = source, options, dest, dtype
        self.max_shard_bytes = max_shard_bytes
        o = options
        self.arch, self.config = source.arch, source.config
        self.dist = Dist.from_env()
        self.task = lm_task(self.arch, self.config, "training", "train the ...ForCausalLM / ...ForMaskedLM checkpoint")
        self.seq_len = window_length(o.seq_len, source.dims.positions, o.batch_size, self.dist.world, "")
        if o.relora:
            check_rank(source, o.rank)
        for path, what in ((o.plot, "--plot"), (report_path, "--report")):
            if path is not None and not Path(path).parent.is_dir():
                raise OutputError(f"{what}: folder {Path(path).parent} does not exist", path=path)
        if o.plot:
            require_matplotlib()
        self.chosen = chosen_tensors(source, o.train)
        self._load_data()
        self._fingerprints: dict | None = None
        self._identity: list[dict] | None = None
        self.saved: list[str] = []  # step folders written
        self.resume_from, self.state = resume_from, state
        if state is not None:
            train_state.check_resume(resume_from, state, options=o, free=RESUME_FREE, fingerprints=self.fingerprints,
                                     seq_len=self.seq_len, params=source.param_count(), identity=self.source_identity)
        if o.save_every and not self.state and not overwrite and checkpoints_dir(dest).exists():
            raise OutputError("exists; pass --overwrite to replace its step folders, or --resume from one",
                              path=checkpoints_dir(dest))

    # -- checks before any step -------------------------------------------------------

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
        if self.val_data is not None:  # the scored windows are built up front: bounded by what the data holds
            self.val_data.check_eval(o.eval_batches, o.batch_size, self.seq_len, "--eval-batches", "the validation data")
        mask_id = mask_token_id(o.mask_token_id, self.tokenizer, "train", vocab) if self.task == "masked_lm" else None
        self.objective = LMObjective(self.task, vocab, mask_id, o.mask_rate)

    def fingerprints(self) -> dict:
        """What a resume checks the data against; hashed once (big data takes seconds)."""
        if self._fingerprints is None:
            self._fingerprints = {"train": step_state.fingerprint(self.train_data.tokens),
                                  "val": step_state.fingerprint(self.val_data.tokens) if self.val_data is not None else None}
        return self._fingerprints

    def source_identity(self) -> list[dict]:
        """What a resume checks the source against (names, sizes, headers, content samples)."""
        if self._identity is None:
            self._identity = step_state.source_identity(self.source.checkpoint.files)
        return self._identity

    def inputs(self) -> list[Path]:
        """Every file this run reads: an --overwrite must not delete any of them."""
        ckpt, o = self.source.checkpoint, self.options
        return [Path(p) for p in (*ckpt.files, ckpt.config_path, self.tokenizer, *(o.data or []), *(o.val_data or []))
                if p is not None]

    def metadata(self) -> dict[str, str]:
        # Without the options that only say where extras go: a resumed run writes the
        # same bytes as an uninterrupted one.
        # Data files by name, not path (as the card): the same bytes under any spelling of them.
        options = {k: file_names(v) if k in RESUMED_PATHS else v for k, v in self.options.as_dict().items()
                   if k not in ("save_every", "plot")}
        return {"modelgrow.version": __version__, "modelgrow.source_sha256": step_state.source_digest(self.source_identity()),
                "modelgrow.train": json.dumps(options, sort_keys=True)}

    def settings(self) -> dict:
        o = self.options
        schedule = o.schedule().describe()
        return {
            "mode": "relora" if o.relora else "full-rank", "task": self.task, "warmup": o.warmup_steps,
            "eval_every": o.eval_interval, "seq_len": self.seq_len, "per_rank_batch": o.batch_size // self.dist.world,
            "world_size": self.dist.world, "schedule": schedule, "lr_schedule": o.lr_plan(), "optimizer": "AdamW",
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
        if self.chosen is not None:  # --train new|PATTERN: the rest keep their bytes
            weights.check_whole(self.chosen, f"--train {o.train}")
            keep = {id(weights.param_of[n]) for n in self.chosen}
            for _, p in weights.named:
                p.requires_grad_(id(p) in keep)
        named = [(k, p) for k, p in weights.named if p.requires_grad]  # a warm start trains them all first
        adapters = add_adapters(module, self.source.layout, o.rank, o.alpha, o.adapter_dropout,
                                restart_generator(o.seed, 0)) if o.relora else []
        bases = {id(a.base.weight) for a in adapters}  # frozen while the adapters train
        key_of = {id(p): k for k, p in weights.named}
        named = [(k, p) for k, p in named if o.full_rank_steps or id(p) not in bases]
        for a in adapters:
            base = key_of[id(a.base.weight)]
            named += [(f"{base}:lora_A", a.lora_A), (f"{base}:lora_B", a.lora_B)]
        trainable = [p for _, p in named]
        groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]  # norms, biases
        val_set = self._val_set()
        restarts: list[dict] = []

        def loss_sum(batch):
            logits = self.arch.call(module, self.config, self.arch.model_inputs(self.config, batch))
            return self.objective.loss_sum(logits, batch)

        def evaluate() -> float | None:
            if not val_set:
                return None
            module.eval()  # no dropout while scoring
            loss = mean_loss(dist, device, val_set, loss_sum)
            module.train()
            return loss

        def before_step(step: int) -> None:
            torch.manual_seed(seeding.torch_seed("dropout", o.seed, dist.rank, step))
            if adapters and o.full_rank_steps and step == o.full_rank_steps:
                switch_to_adapters(adapters, loop.optimizer)

        def after_step(step: int) -> None:
            if loop.schedule.merges_after(step):
                restarts.append(self._restart(adapters, loop.optimizer, step, len(restarts) + 1, device))

        loop = Loop(options=o, groups=[g for g in groups if g["params"]], objective=self.objective,
                    sampler=corpus.WindowSampler(self.train_data, self.seq_len, o.seed),
                    mask_gen=torch.Generator().manual_seed(o.seed + 3_000_017), dist=dist, device=device,
                    loss_sum=loss_sum, schedule=o.schedule(), evaluate=evaluate, eval_every=o.eval_interval,
                    before_step=before_step, after_step=after_step, save_every=o.save_every,
                    save=lambda done: self._save(done, loop, weights, adapters, named, restarts))
        start = self._restore(loop, weights, adapters, named, restarts) if self.state is not None else 0
        set_full_rank(adapters, start < o.full_rank_steps)  # no-op without a warm start
        trainable_params = sum(p.numel() for p in trainable if id(p) not in bases)  # with adapters: once they train
        if show:
            tqdm.write(f"train ({'ReLoRA' if o.relora else 'full-rank'}): steps={o.steps}, lr={o.lr:g}, "
                       f"warmup={o.warmup_steps}, batch={o.batch_size}x{self.seq_len}, device={device} x{dist.world}, "
                       f"trainable={trainable_params:,} of {total_params:,} parameters", file=sys.stderr)
        module.train()
        h = loop.run(start=start, show=show)
        opt_bytes = loop.optimizer_state_bytes()
        if adapters:
            remove_adapters(module)  # merged in place: a dense model again
        if writer is not None:
            train_state.write_dense(writer, self.source, weights, [], self.dtype)
        loop_s = sum(h.step_times)
        steps_run = len(h.step_times)
        val = [v for _, v in h.val_curve]
        return {
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
            "loss_curve": h.loss_curve, "lr_curve": h.lr_curve, "grad_norm_curve": h.grad_norm_curve,
            "val_curve": h.val_curve,
            "val_loss": {"before": val[0] if val and h.val_curve[0][0] == 0 else None, "after": val[-1] if val else None},
            "tokens_seen": o.steps * o.batch_size * self.seq_len,
            "total_params": total_params,
            "trainable_params": trainable_params,
            "optimizer_state_bytes": opt_bytes,
            "restarts": len(restarts),
            "relora": relora_report(o, adapters, restarts) if o.relora else None,
            "saved": self.saved,
            "resumed_from": {"path": str(self.resume_from), "step": start} if self.state else None,
            "step_times": h.step_times,
            "step_s": loop_s / steps_run if steps_run else None,
            "tokens_per_s": steps_run * o.batch_size * self.seq_len / loop_s if loop_s > 0 else None,
            "wall_s": time.perf_counter() - started,
            "peak_memory": peak_memory(device),
        }

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
        digest = restart(adapters, optimizer, restart_generator(self.options.seed, k), self.options.optimizer_prune)
        mine = torch.tensor(list(digest), dtype=torch.int64, device=device)
        hashes = [bytes(t.cpu().tolist()).hex() for t in self.dist.gather(mine)]
        if len(set(hashes)) != 1:  # replicas would silently train different models
            raise RuntimeError(f"ReLoRA restart {k}: ranks drew different A matrices ({hashes})")
        return {"restart": k, "after_step": step, "a_sha256": hashes}

    # -- step checkpoints and resume -----------------------------------------------------

    def _save(self, done: int, loop: Loop, weights, adapters, named, restarts) -> None:
        folder = checkpoints_dir(self.dest) / f"step-{done}"
        self.saved.append(str(folder))
        if self.dist.rank != 0:
            return  # every rank holds the same state; rank 0 writes it
        tensors = {f"param/{k}": p.detach().float() for k, p in weights.named}
        tensors.update({f"adapter/{name}": p.detach() for name, p in named if ":lora_" in name})
        tensors.update(step_state.capture(named, loop.optimizer, self._generators(loop)))
        h = loop.history
        history = {"loss_curve": h.loss_curve, "lr_curve": h.lr_curve, "grad_norm_curve": h.grad_norm_curve,
                   "val_curve": h.val_curve, "restarts": restarts}
        state = {
            "format": step_state.STATE_FORMAT, "version": step_state.STATE_VERSION, "step": done,
            "options": self.options.as_dict(), "fingerprints": self.fingerprints(), "seq_len": self.seq_len,
            "source": str(self.source.path), "source_params": self.source.param_count(), "world_size": self.dist.world,
            "source_identity": self.source_identity(), "cwd": os.getcwd(), "history": history,
        }
        train_state.save_step(folder, self.source, weights, adapters, tensors, state,
                              max_shard_bytes=self.max_shard_bytes, metadata=self.metadata(), dtype=self.dtype)

    def _restore(self, loop: Loop, weights, adapters, named, restarts) -> int:
        saved = step_state.StateTensors(self.resume_from)
        with torch.no_grad():
            for k, p in weights.named:
                p.copy_(saved.get(f"param/{k}", p))
            for name, p in named:
                if ":lora_" in name:
                    p.copy_(saved.get(f"adapter/{name}", p))
        saved.restore(named, loop.optimizer, self._generators(loop))
        history = self.state["history"]
        h = loop.history
        h.loss_curve, h.lr_curve = list(history.get("loss_curve", [])), list(history.get("lr_curve", []))
        h.grad_norm_curve, h.val_curve = list(history.get("grad_norm_curve", [])), list(history.get("val_curve", []))
        restarts.extend(history.get("restarts", []))
        return int(self.state["step"])

    @staticmethod
    def _generators(loop: Loop) -> dict[str, torch.Generator]:
        return {"windows": loop.sampler.generator, "masks": loop.mask_gen}


__all__ = ["TrainOptions", "train", "Trainer", "plot_curves", "checkpoints_dir", "restart_generator"]
