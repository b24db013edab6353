"""The fit pass: train a learned growth operator's own parameters on the target model's
real loss, then hand the operator back to the writer.

Shared by every learned operator (and meant to carry the later full training loop):

- the target module comes from the architecture plugin with its *parameters on the meta
  device* (buffers such as rotary tables stay real), so the big model's weights exist
  only once: as the tensors the operator materialises on every step, which are passed
  to ``torch.func.functional_call``;
- only the operator's tensors are optimised (AdamW, linear warmup then cosine decay,
  every setting explicit and recorded; LiGO's own code hid a 10k-step warmup behind
  a 100-step fit);
- the loss is the architecture's: causal LM, or masked LM (15%) for ``masked_lm``
  classes, or ``distill`` (KL to the small model's logits, on the same inputs);
- data parallel under ``torchrun``: every rank draws the same global batch from the
  same seeded generator and keeps its slice; the loss is normalised by the *global*
  token count, so all-reducing (summing) the gradients gives exactly the one-process
  gradient; only rank 0 writes.

Batches, losses, devices, precision and data parallelism live in modelgrow.runtime,
shared with `modelgrow train` (modelgrow.train).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import corpus
from .architecture import PrimaryOutput
from .errors import UsageError
from .operators.learned import LearnedOperator
from .runtime import (
    lm_task, window_length,
    LM_TASKS, Dist, LMObjective, autocast, grad_norm, is_writer, load_data, mask_token_id, mean_loss,
    peak_memory, precision, prepare_device, resolve_device, sync_grads, tokenizer_file, world_size,
)

OBJECTIVES = ("lm", "distill")


@dataclass
class FitOptions:
    """Every knob of the fit; all of them end up in the report."""

    data: list[str] | None = None
    steps: int = 100
    # Measured on held-out text (benchmarks/fit_quality.py, RESULTS-fit.md): LiGO fitted
    # 100 steps on a broad training split beat the copy solution most at 3e-5 (demo d=64
    # and d=128 sources alike); at 3e-4 Adam's per-entry steps on the dense expansion
    # matrices cost more than the gradient signal gives, and the held-out loss rose.
    lr: float = 3e-5
    warmup: int | None = None  # None: 10% of the steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # 0 by default: decay pulls the expansion matrices towards zero, i.e. away from the
    # copy solution the operator starts at, for no benefit in a 100-step fit.
    weight_decay: float = 0.0
    batch_size: int = 16  # global: split across data-parallel ranks
    seq_len: int | None = None  # None: min(128, the model's positions)
    seed: int = 0
    objective: str = "lm"
    device: str = "auto"
    tokenizer: str | None = None
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    eval_batches: int = 4  # fixed held-aside windows scored before and after the fit
    mask_rate: float = 0.15
    mask_token_id: int | None = None
    bin_dtype: str | None = None  # raw .bin ids: uint16/uint32 (default from the vocab size)
    save_operator: str | None = None  # write the fitted operator tensors (safetensors) here

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> FitOptions:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown fit option(s): {', '.join(unknown)}")
        given = {k: v for k, v in options.items() if v is not None}
        if isinstance(given.get("data"), (str, os.PathLike)):
            given["data"] = [given["data"]]
        if "data" in given:
            given["data"] = [str(p) for p in given["data"]] or None
        out = cls(**given)
        out.validate()
        return out

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UsageError(what)

        need(isinstance(self.steps, int) and self.steps >= 0, f"--fit-steps must be a whole number >= 0, got {self.steps!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"--fit-lr must be positive, got {self.lr}")
        need(self.batch_size >= 1, f"--fit-batch-size must be >= 1, got {self.batch_size}")
        need(self.seq_len is None or self.seq_len >= 1, f"--fit-seq-len must be >= 1, got {self.seq_len}")
        need(self.warmup is None or self.warmup >= 0, f"--fit-warmup must be >= 0, got {self.warmup}")
        need(0 <= self.weight_decay < 1, f"--fit-weight-decay must be in [0, 1), got {self.weight_decay}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 < self.mask_rate < 1, f"mask_rate must be in (0, 1), got {self.mask_rate}")
        need(self.eval_batches >= 0, f"eval_batches must be >= 0, got {self.eval_batches}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown --fit-objective {self.objective!r}", hint=f"choose one of {', '.join(OBJECTIVES)}")

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else min(self.warmup, self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for 0-based ``step``: linear warmup, then cosine."""
        warm = self.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- the target module without weights --------------------------------------------------


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules whose parameters live on the meta device (no memory) while buffers
    stay real: rotary tables and position ids are computed in constructors, and the
    forward pass needs their values; the parameters are supplied on every call."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_target_module(arch, config: dict, device: torch.device) -> nn.Module:
    with parameters_on_meta():
        module = arch.build_module(config)
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)
    # No dropout: 100 deterministic steps, identical on every rank.
    return arch.prepare_for_training(module, config).eval()


def module_names(module: nn.Module, names: list[str], prefix: str) -> dict[str, str]:
    """Checkpoint name -> module parameter name; every module parameter must be covered."""
    params = dict(module.named_parameters())  # tied parameters appear once
    out = {}
    for name in names:
        for cand in (name, prefix + name, name[len(prefix):] if prefix and name.startswith(prefix) else None):
            if cand is not None and cand in params:
                out[name] = cand
                break
        else:
            raise RuntimeError(f"tensor {name!r} has no place in a {type(module).__name__}")
    missing = sorted(set(params) - set(out.values()))
    if missing:
        raise RuntimeError(f"the operator does not produce {len(missing)} weights of {type(module).__name__}, e.g. {missing[0]!r}")
    return out


# -- the pass ---------------------------------------------------------------------------


def prepare_fit(op, options: dict[str, Any] | FitOptions | None) -> Fit:
    """Check the options and load the data now, before any output exists."""
    if not isinstance(op, LearnedOperator):
        raise UsageError(
            f"operator {op.name!r} says it is learned but has no trainable tensors to fit",
            hint="a learned operator subclasses modelgrow.operators.learned.LearnedOperator",
        )
    opts = options if isinstance(options, FitOptions) else FitOptions.from_dict(options)
    return Fit(op, opts)


class Fit:
    """A prepared fit: options checked and data loaded (errors come before any step)."""

    def __init__(self, op: LearnedOperator, options: FitOptions):
        self.op, self.options = op, options
        plan = op.plan
        self.plan, self.source, self.arch = plan, plan.source, plan.source.arch
        self.dist = Dist.from_env()
        info = self.arch.class_info(plan.config)
        self.task = info.get("task")
        self.data = None
        if options.steps == 0 and not options.data:
            return  # the operator stays at its initialisation; nothing to load
        if not options.data:
            raise UsageError(
                f"the {op.name} operator needs --fit-data to fit on",
                hint="give a text/.npy/.bin file, or --fit-steps 0 to write its copy initialisation",
            )
        lm_task(self.arch, plan.config, "fitting", "grow the ...ForCausalLM / ...ForMaskedLM checkpoint, or use --operator copy")
        self.seq_len = window_length(options.seq_len, plan.new.positions, options.batch_size, self.dist.world, "fit-")
        self.tokenizer = tokenizer_file(options.tokenizer, self.source)
        self.data = load_data(options.data, vocab=plan.new.vocab, config=plan.config, tokenizer=self.tokenizer,
                              bin_dtype=options.bin_dtype)
        self.data.require(self.seq_len)
        mask_id = mask_token_id(options.mask_token_id, self.tokenizer, "fit") if self.task == "masked_lm" else None
        self.objective = LMObjective(self.task, plan.new.vocab, mask_id, options.mask_rate,
                                     count_all=options.objective == "distill")

    # -- loss -----------------------------------------------------------------------

    def _logits(self, runner, weights, batch):
        inputs = self.arch.model_inputs(self.plan.config, batch)
        return torch.func.functional_call(runner, weights, (), inputs, tie_weights=True, strict=False)

    def _loss_sum(self, runner, weights, batch, teacher) -> torch.Tensor:
        logits = self._logits(runner, weights, batch).float()
        if self.options.objective == "distill":
            vocab = logits.shape[-1]
            with torch.no_grad():
                config = self.source.config
                ref = self.arch.call(teacher, config, self.arch.model_inputs(config, batch)).float()
            return F.kl_div(F.log_softmax(logits, -1).view(-1, vocab), F.log_softmax(ref, -1).view(-1, vocab),
                            log_target=True, reduction="sum")
        return self.objective.loss_sum(logits, batch)

    # -- run ------------------------------------------------------------------------

    def settings(self) -> dict:
        o = self.options
        return {
            "objective": o.objective, "task": self.task, "steps": o.steps, "lr": o.lr, "warmup": o.warmup_steps,
            "schedule": f"linear warmup, cosine to {o.min_lr_ratio:g} x lr", "min_lr_ratio": o.min_lr_ratio,
            "weight_decay": o.weight_decay, "optimizer": "AdamW", "betas": list(o.betas), "eps": o.eps,
            "grad_clip": o.grad_clip, "batch_size": o.batch_size, "per_rank_batch": o.batch_size // self.dist.world,
            "seq_len": self.seq_len, "seed": o.seed, "eval_batches": o.eval_batches,
            "mask_rate": o.mask_rate if self.task == "masked_lm" else None, "world_size": self.dist.world,
        }

    def run(self, progress: bool = True) -> dict:
        op, o = self.op, self.options
        if self.data is None:
            return {"operator": op.name, "steps": 0, "note": "no fit data: the operator is left at its initialisation"}
        started = time.perf_counter()
        device = resolve_device(o.device, self.dist.local_rank, self.dist.world)
        prepare_device(device)
        self.dist.start(device)
        try:
            return self._run(device, started, progress and self.dist.rank == 0)
        finally:
            self.dist.stop()

    def _run(self, device: torch.device, started: float, show: bool) -> dict:
        op, o = self.op, self.options
        op.to(device)
        module = build_target_module(self.arch, self.plan.config, device)
        names = module_names(module, [t.name for t in self.plan.targets], self.source.layout.base_prefix)
        runner = PrimaryOutput(self.arch, self.plan.config, module)  # its parameters: "model.<name>"
        teacher = None
        if o.objective == "distill":
            from .source import load_module

            teacher = load_module(self.source).to(device).eval()
        params = op.parameters()
        tensors = list(params.values())
        start_values = {k: v.detach().clone() for k, v in params.items()}
        groups: dict[float, list] = {}
        for name, t in params.items():
            groups.setdefault(op.lr_scale(name), []).append(t)
        optimiser = torch.optim.AdamW([{"params": ts, "lr": o.lr * scale} for scale, ts in groups.items()],
                                      lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, o.lr_factor)

        def weights() -> dict:
            # Materialised under autocast (bf16 matmuls on CUDA), handed over in fp32 so the
            # embeddings, norms and residual stream stay fp32 as in ordinary mixed precision.
            return {f"model.{names[k]}": v.float() for k, v in op.materialise().items()}

        # Separate seeded streams: the training windows, the eval windows, the MLM masks.
        train = corpus.WindowSampler(self.data, self.seq_len, o.seed)
        held = corpus.WindowSampler(self.data, self.seq_len, o.seed + 1_000_003)
        eval_gen = torch.Generator().manual_seed(o.seed + 2_000_003)
        eval_set = [self.objective.batch(held.windows(o.batch_size), eval_gen) for _ in range(o.eval_batches)]
        mask_gen = torch.Generator().manual_seed(o.seed + 3_000_017)

        @torch.no_grad()
        def evaluate() -> float | None:
            if not eval_set:
                return None
            with autocast(device):
                w = weights()
                return mean_loss(self.dist, device, eval_set, lambda local: self._loss_sum(runner, w, local, teacher))

        settings = self.settings()
        if show:
            tqdm.write(f"fit {op.name}: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
                       + f", device={device}, operator tensors={sum(t.numel() for t in tensors):,}", file=sys.stderr)
        before = evaluate()
        losses, grad_norms, lrs, step_times = [], [], [], []
        t_loop = time.perf_counter()
        bar = tqdm(range(o.steps), desc=f"fitting {op.name}", unit="step", disable=not show, leave=False)
        for step in bar:
            t_step = time.perf_counter()
            batch = self.objective.batch(train.windows(o.batch_size), mask_gen)
            local = self.dist.local(batch, device)
            with autocast(device):
                loss = self._loss_sum(runner, weights(), local, teacher) / batch["count"]
            loss.backward()
            sync_grads(self.dist, tensors)
            norm = torch.nn.utils.clip_grad_norm_(tensors, o.grad_clip) if o.grad_clip > 0 else grad_norm(tensors)
            lrs.append(o.lr * o.lr_factor(step))
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            value = float(self.dist.sum_(loss.detach().double()))
            losses.append(value)
            grad_norms.append(float(norm))
            step_times.append(time.perf_counter() - t_step)
            bar.set_postfix(loss=f"{value:.4f}")
        bar.close()
        loop_s = time.perf_counter() - t_loop
        op.fitted_steps = o.steps
        after = evaluate()
        report = {
            "operator": op.name,
            **settings,
            "device": str(device),
            "autocast": precision(device),
            "backend": self.dist.backend,
            "data": self.data.describe(),
            "operator_params": sum(t.numel() for t in tensors),
            "eval": {"batches": o.eval_batches, "windows": o.eval_batches * o.batch_size, "before": before, "after": after},
            "loss_curve": losses,
            "grad_norm_curve": grad_norms,
            "lr_curve": lrs,
            "step_times": step_times,
            "drift": _drift(op, params, start_values),
            "wall_s": time.perf_counter() - started,
            "step_s": loop_s / max(1, o.steps),
            "tokens_per_s": o.steps * o.batch_size * self.seq_len / loop_s if loop_s > 0 else None,
            "peak_memory": peak_memory(device),
        }
        if o.save_operator and self.dist.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, o.save_operator,
                      metadata={"modelgrow.operator": op.name, "modelgrow.fit_steps": str(o.steps)})
            report["saved_operator"] = o.save_operator
        return report


def _drift(op: LearnedOperator, params: dict, start: dict) -> dict:
    """How far the operator moved: ||θ − θ0|| / ||θ0|| per group, and the largest change."""
    groups: dict[str, list[float]] = {}
    biggest = 0.0
    for name, value in params.items():
        delta = (value.detach() - start[name]).double()
        g = groups.setdefault(op.param_group(name), [0.0, 0.0])
        g[0] += float(delta.square().sum())
        g[1] += float(start[name].double().square().sum())
        biggest = max(biggest, float(delta.abs().max())) if delta.numel() else biggest
    out = {k: {"relative": math.sqrt(d) / math.sqrt(s) if s > 0 else math.sqrt(d), "abs": math.sqrt(d)} for k, (d, s) in groups.items()}
    total_d, total_s = sum(v[0] for v in groups.values()), sum(v[1] for v in groups.values())
    return {"groups": out, "relative": math.sqrt(total_d / total_s) if total_s else 0.0, "max_abs": biggest}


# is_writer, resolve_device and world_size moved to modelgrow.runtime; still importable
# from here for existing callers.
__all__ = ["FitOptions", "Fit", "prepare_fit", "is_writer", "resolve_device", "world_size",
           "build_target_module", "parameters_on_meta", "OBJECTIVES", "LM_TASKS"]
