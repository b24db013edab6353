"""The fit pass: train a learned growth operator's own tensors on the target model's
real loss, then hand the operator back to the writer.

- The target module comes from the architecture with its *parameters on the meta
  device* (buffers such as rotary tables stay real), so the big model's weights exist
  only once: as the tensors the operator materialises on every step, passed to
  ``torch.func.functional_call``. With ``accumulate`` micro-batches a step still
  materialises once (class Materialised).
- Only the operator's tensors are optimised, by the engine's loop (modelgrow.engine)
  that `modelgrow train` uses too: AdamW, linear warmup then cosine decay, every
  setting explicit and recorded (LiGO's own code hid a 10k-step warmup behind a
  100-step fit), torchrun data parallelism, bf16 autocast on CUDA.
- The loss is the architecture's task (causal LM, or masked LM for ``masked_lm``
  classes), or ``distill``: KL to the small model's logits on the same inputs.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import corpus
from .architecture import PrimaryOutput, block_path
from .engine.blockwise import blockwise
from .engine.sharding import shard
from .engine.device import peak_memory, precision, prepare_device, resolve_device
from .engine.distributed import Dist, is_writer, world_size
from .engine.loop import LoopOptions, Loop
from .engine.objective import LM_TASKS, LMObjective, lm_task, load_data, mask_token_id, mean_loss, tokenizer_file, \
    window_length
from .errors import InputError, UsageError
from .operators.learned import LearnedOperator
from .options import defaults, option

OBJECTIVES = ("lm", "distill")


# Measured on held-out text (benchmarks/fit_quality.py, RESULTS-fit.md): LiGO fitted 100
# steps on a broad training split beat the copy solution most at lr 3e-5; at 3e-4 Adam's
# per-entry steps on the dense expansion matrices cost more than the gradient signal
# gives, and the held-out loss rose. Weight decay 0: decay pulls the expansion matrices
# towards zero, away from the copy solution the operator starts at.
@defaults(lr=3e-5, weight_decay=0.0, eval_batches=4)
class FitOptions(LoopOptions):
    """Every knob of the fit; all of them end up in the report."""

    kind = "fit"
    prefix = "fit-"
    flags = {"tokenizer": "tokenizer", "device": "device"}
    hidden = ("min_lr_ratio", "seed", "grad_clip", "betas", "eval_batches")
    help_prefix = "(learned operators) "

    steps: int = option(100, "Optimiser steps of the fit.", ge=0, strict=True)
    objective: Literal["lm", "distill"] = option(
        "lm", "lm: the model's own loss (causal LM, or masked LM 15%); distill: KL to the small model's logits "
              "(zero at an exact start: for stack/interleave or post-LN growth).")
    materialise: Literal["whole", "block"] = option(
        "whole", "whole: the grown weights are made once per step and held (fastest); block: each block's weights "
                 "are made inside its forward and again in its backward (activation checkpointing), so the grown "
                 "model never exists whole in memory: for targets too large for that (an operator that makes tensors "
                 "one at a time, e.g. LiGO).")
    shard: bool = option(True, "Under torchrun, shard the operator's tensors and their AdamW state over the "
                               "processes (FSDP2) rather than hold a copy in each (with --fit-materialise whole).")
    save_operator: Path | None = option(None, "Write the fitted operator tensors (safetensors) here.", cli=False)


def prepare_fit(op, options: dict[str, Any] | FitOptions | None, *, read: bool = True) -> Fit:
    """Check the options and load the data now, before any output exists; ``read=False``
    (a dry run) checks that the data files exist without reading them."""
    if not isinstance(op, LearnedOperator):
        raise UsageError(
            f"operator {op.name!r} says it is learned but has no trainable tensors to fit",
            hint="a learned operator subclasses modelgrow.operators.learned.LearnedOperator",
        )
    options = FitOptions.parse(options)
    if options.materialise == "block" and not op.per_tensor:
        raise UsageError(f"--fit-materialise block makes each block's weights on their own, and the {op.name} operator "
                         "makes every layer's weights in one computation", hint="use --fit-materialise whole")
    return Fit(op, options, read=read)


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


# -- the pass ---------------------------------------------------------------------------


class Fit:
    """A prepared fit: options checked and data loaded (errors come before any step)."""

    def __init__(self, op: LearnedOperator, options: FitOptions, *, read: bool = True):
        self.op, self.options = op, options
        plan = op.plan
        self.plan, self.source, self.arch = plan, plan.source, plan.source.arch
        self.dist = Dist.from_env()
        # FSDP2 shards the operator when there are processes to shard over.
        self.sharding = options.shard and self.dist.world > 1
        self.task = self.arch.task(plan.config)
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
        if not read:
            for path in options.data:
                if not Path(path).is_file():
                    raise InputError("data file does not exist" if not Path(path).exists() else "is not a file", path=path)
        else:
            self.data = load_data(options.data, vocab=plan.new.vocab, config=plan.config, tokenizer=self.tokenizer,
                                  bin_dtype=options.bin_dtype)
            self.data.require(self.seq_len)
            self.data.check_eval(options.eval_batches, options.batch_size, self.seq_len, "the fit's eval_batches", "the fit data")
        mask_id = mask_token_id(options.mask_token_id, self.tokenizer, "fit", plan.new.vocab) if self.task == "masked_lm" else None
        self.objective = LMObjective(self.task, plan.new.vocab, mask_id, options.mask_rate,
                                     count_all=options.objective == "distill")

    def _loss_sum(self, runner, weights, batch, teacher) -> torch.Tensor:
        inputs = self.arch.model_inputs(self.plan.config, batch)
        logits = torch.func.functional_call(runner, weights, (), inputs, tie_weights=True, strict=False).float()
        if self.options.objective == "distill":
            vocab = logits.shape[-1]
            with torch.no_grad():
                config = self.source.config
                ref = self.arch.call(teacher, config, self.arch.model_inputs(config, batch)).float()
            return F.kl_div(F.log_softmax(logits, -1).view(-1, vocab), F.log_softmax(ref, -1).view(-1, vocab),
                            log_target=True, reduction="sum")
        return self.objective.loss_sum(logits, batch)

    def _blocks(self, runner: nn.Module, names: dict[str, str]) -> tuple[list, dict]:
        """The targets outside the layers, and each layer's block: its path in ``runner``
        and the function that makes its weights (engine.blockwise)."""
        op, by_layer, outside = self.op, {}, []
        for t in self.plan.targets:
            (outside if t.layer is None else by_layer.setdefault(t.layer, [])).append(t)
        blocks = {}
        for layer, targets in by_layer.items():
            keys = [f"model.{names[t.name]}" for t in targets]
            path = block_path(runner, keys)
            if path in blocks or path in ("", "model"):
                raise UsageError(f"--fit-materialise block: the layers of {self.source.path} do not each sit in a "
                                 "submodule of their own", hint="use --fit-materialise whole")
            local = {t.name: key[len(path) + 1:] for t, key in zip(targets, keys)}
            blocks[path] = lambda targets=targets, local=local: {local[t.name]: op.compute(t).float() for t in targets}
        return outside, blocks

    def settings(self) -> dict:
        o = self.options
        return {
            "objective": o.objective, "task": self.task, "steps": o.steps, "lr": o.lr, "warmup": o.warmup_steps,
            "schedule": o.schedule().describe(), "min_lr_ratio": o.min_lr_ratio,
            "weight_decay": o.weight_decay, "optimizer": "AdamW", "betas": list(o.betas), "eps": o.eps,
            "grad_clip": o.grad_clip, "batch_size": o.batch_size, "per_rank_batch": o.batch_size // self.dist.world,
            "accumulate": o.accumulate, "materialise": o.materialise, "sharded": self.sharding,
            "seq_len": self.seq_len, "seed": o.seed, "eval_batches": o.eval_batches,
            "mask_rate": o.mask_rate if self.task == "masked_lm" else None, "world_size": self.dist.world,
        }

    def run(self, progress: bool = True) -> dict:
        op = self.op
        if self.data is None:
            return {"operator": op.name, "steps": 0, "note": "no fit data: the operator is left at its initialisation"}
        started = time.perf_counter()
        device = resolve_device(self.options.device, self.dist.local_rank, self.dist.world)
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
        names = self.arch.parameter_names(module, [t.name for t in self.plan.targets])
        runner = PrimaryOutput(self.arch, self.plan.config, module)  # its parameters: "model.<name>"
        teacher = None
        if o.objective == "distill":
            from .source import load_module

            teacher = load_module(self.source).to(device).eval()

        # Materialised under autocast (bf16 matmuls on CUDA), handed over in fp32 so the
        # embeddings, norms and residual stream stay fp32 as in ordinary mixed precision.
        # Block by block: once per step what lies outside the blocks, each block in its forward.
        outside, blocks = self._blocks(runner, names) if o.materialise == "block" else (None, None)

        def weights() -> dict:
            if blocks:
                return {f"model.{names[t.name]}": op.compute(t).float() for t in outside}
            return {f"model.{names[k]}": v.float() for k, v in op.materialise().items()}

        sharded, gathered = None, None
        if self.sharding and blocks:  # the blocks read the operator on their own, every micro-batch
            sharded = shard(op.parameters(), GatheredOperator.hold, self.dist.world, device)
            gathered = GatheredOperator(sharded, op, weights)
        elif self.sharding:  # FSDP2: each process steps its slice; calling `sharded` gathers and materialises
            def make(whole: dict) -> dict:
                op.params = whole
                return weights()

            sharded = shard(op.parameters(), make, self.dist.world, device)
        made = gathered if gathered is not None else sharded if sharded is not None else weights
        trained = sharded.sharded() if sharded is not None else op.parameters()
        by_scale: dict[float, list] = {}
        for name, t in trained.items():
            by_scale.setdefault(op.lr_scale(name), []).append(t)
        grown = Materialised(made)

        # Separate seeded streams: the training windows, the eval windows, the MLM masks.
        held = corpus.WindowSampler(self.data, self.seq_len, o.seed + 1_000_003)
        eval_gen = torch.Generator().manual_seed(o.seed + 2_000_003)
        eval_set = [self.objective.batch(held.windows(o.batch_size), eval_gen) for _ in range(o.eval_batches)]

        @torch.no_grad()
        def evaluate() -> float | None:
            if not eval_set:
                return None
            w = made()
            return mean_loss(self.dist, device, eval_set, lambda local: self._loss_sum(runner, w, local, teacher))

        loop = Loop(options=o, groups=[{"params": ts, "lr_scale": scale} for scale, ts in by_scale.items()],
                    objective=self.objective, sampler=corpus.WindowSampler(self.data, self.seq_len, o.seed),
                    mask_gen=torch.Generator().manual_seed(o.seed + 3_000_017), dist=self.dist, device=device,
                    loss_sum=lambda local: self._loss_sum(runner, grown.leaves, local, teacher), schedule=o.schedule(),
                    name=f"fitting {op.name}", evaluate=evaluate, begin_step=grown.begin,
                    end_backward=grown.end if gathered is None else lambda: (grown.end(), gathered.end()),
                    summed=sharded is not None)
        settings = self.settings()
        if show:
            tqdm.write(f"fit {op.name}: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
                       + f", device={device}, operator tensors={sum(t.numel() for t in loop.tensors):,}", file=sys.stderr)
        with blockwise(runner, blocks) if blocks else contextlib.nullcontext():
            h = loop.run(show=show)
        if sharded is not None:
            op.params = sharded.gathered()  # whole again, on every process, for the writer
        params = op.parameters()
        op.fitted_steps = o.steps
        loop_s = sum(h.step_times)
        scores = [v for _, v in h.val_curve]
        operator_params = sum(t.numel() for t in loop.tensors)
        local_params = sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in loop.tensors)
        del loop  # its optimiser state, before the drift makes the starting tensors again
        report = {
            "operator": op.name,
            **settings,
            "device": str(device),
            "autocast": precision(device),
            "backend": self.dist.backend,
            "data": self.data.describe(),
            "operator_params": operator_params,
            "operator_params_local": local_params,  # what this process held and stepped: all, or its FSDP2 slice
            "eval": {"batches": o.eval_batches, "windows": o.eval_batches * o.batch_size,
                     "before": scores[0] if scores else None, "after": scores[-1] if scores else None},
            "loss_curve": h.loss_curve,
            "grad_norm_curve": h.grad_norm_curve,
            "lr_curve": h.lr_curve,
            "step_times": h.step_times,
            "drift": _drift(op, params, op.initial_parameters()),
            "wall_s": time.perf_counter() - started,
            "step_s": loop_s / max(1, o.steps),
            "tokens_per_s": o.steps * o.batch_size * self.seq_len / loop_s if loop_s > 0 else None,
            "peak_memory": peak_memory(device),
        }
        if o.save_operator and self.dist.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(o.save_operator),
                      metadata={"modelgrow.operator": op.name, "modelgrow.fit_steps": str(o.steps)})
            report["saved_operator"] = str(o.save_operator)
        return report


class Materialised:
    """The grown weights, materialised once per optimiser step (Loop's ``begin_step``)
    however many micro-batches the step runs.

    The micro-batches' forwards take detached leaf copies (``leaves``), so their
    gradients add up on the leaves and no micro-batch backpropagates through the
    operator; ``end`` (Loop's ``end_backward``) then sends the summed gradients through
    the materialisation once, onto the operator's tensors.
    """

    def __init__(self, materialise):
        self.materialise = materialise
        self.full: dict | None = None
        self.leaves: dict | None = None

    def begin(self) -> None:
        self.full = self.materialise()
        self.leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in self.full.items()}

    def end(self) -> None:
        full, leaves = self.full, self.leaves
        self.full = self.leaves = None  # the next step materialises afresh; free this one's graph after
        _send_back(full, leaves)


class GatheredOperator:
    """FSDP2 with block materialisation: once per optimiser step (as ``Materialised``'s
    ``materialise``) the operator's whole tensors are gathered from every process's
    slice and held as leaves of their own in ``op.params``, which each block reads inside
    its forward and again in its backward, in every micro-batch; their gradients add up
    there. ``end`` (after ``Materialised.end``) sends the sum back through the gather
    once: FSDP2 reduce-scatters it onto each process's slice."""

    def __init__(self, sharded, op: LearnedOperator, weights):
        self.sharded, self.op, self.weights = sharded, op, weights
        self.whole: dict | None = None

    @staticmethod
    def hold(whole: dict) -> tuple[dict, dict]:
        """Inside FSDP2's forward, while the gathered tensors exist (it frees them when the
        forward returns): them, to send the gradient back through, and copies to keep."""
        return whole, {k: v.detach().clone() for k, v in whole.items()}

    def __call__(self) -> dict:
        self.whole, copies = self.sharded()
        self.op.params = {k: v.requires_grad_(self.whole[k].requires_grad) for k, v in copies.items()}
        return self.weights()  # the tensors outside the blocks, made from those leaves

    def end(self) -> None:
        whole, self.whole = self.whole, None
        _send_back(whole, self.op.params)


def _send_back(full: dict, leaves: dict) -> None:
    """Backpropagate the gradients summed on ``leaves`` (detached copies of ``full``)
    through ``full``, once; the leaves let go of them."""
    pairs = [(full[k], leaf.grad) for k, leaf in leaves.items() if full[k].requires_grad and leaf.grad is not None]
    for leaf in leaves.values():
        leaf.grad = None
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], grad_tensors=[g for _, g in pairs])


def _drift(op: LearnedOperator, params: dict, start: dict) -> dict:
    """How far the operator moved: ||θ − θ0|| / ||θ0|| per group, and the largest change."""
    groups: dict[str, list[float]] = {}
    biggest = 0.0
    for name, value in params.items():
        begin = start.pop(name).detach().to(value.device)  # each starting tensor let go once counted
        delta = (value.detach() - begin).double()
        g = groups.setdefault(op.param_group(name), [0.0, 0.0])
        g[0] += float(delta.square().sum())
        g[1] += float(begin.double().square().sum())
        biggest = max(biggest, float(delta.abs().max())) if delta.numel() else biggest
    out = {k: {"relative": math.sqrt(d) / math.sqrt(s) if s > 0 else math.sqrt(d), "abs": math.sqrt(d)} for k, (d, s) in groups.items()}
    total_d, total_s = sum(v[0] for v in groups.values()), sum(v[1] for v in groups.values())
    return {"groups": out, "relative": math.sqrt(total_d / total_s) if total_s else 0.0, "max_abs": biggest}


__all__ = ["FitOptions", "Fit", "prepare_fit", "is_writer", "resolve_device", "world_size",
           "build_target_module", "parameters_on_meta", "OBJECTIVES", "LM_TASKS"]
