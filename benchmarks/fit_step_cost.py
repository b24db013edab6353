"""What one learned-operator fit step (LiGO or Mango) costs next to one plain training
step of the grown model.

A fit step materialises every target weight from the operator (depth mix, then the
width expansions), runs the target module with them through functional_call and
back-propagates into the operator's tensors only. A plain step trains the same target
module's own weights. Same batch, same loss (causal LM), same optimiser (AdamW + clip),
dropout off in both. The ratio fit/plain is the figure of merit (goal: <= 1.5x).

    python benchmarks/fit_step_cost.py                      # GPT-2 d=256 -> 512, 4 -> 8 layers
    python benchmarks/fit_step_cost.py --batch 4 --seq 128  # materialisation matters more
    python benchmarks/fit_step_cost.py --operator mango     # Mango at its default (auto) rank

Random weights and random token ids: cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from modelgrow import plugins
from modelgrow.fit import FitOptions, prepare_fit, resolve_device
from modelgrow.plan import GrowthSpec, make_plan
from modelgrow.source import open_source


def make_source(folder: Path, args) -> Path:
    cfg = transformers.GPT2Config(n_embd=args.width, n_layer=args.layers, n_head=args.width // 64, n_positions=1024,
                                  vocab_size=args.vocab, tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def plain_steps(plan, device, args) -> list[float]:
    """Train the grown model's own weights: the baseline a fit step is compared with."""
    arch = plan.source.arch
    module = arch.build_module(plan.config).to(device).train(False)
    params = [p for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.warmup + args.steps):
        parts = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
                 for _ in range(args.accumulate)]
        t = time.perf_counter()
        for ids in parts:  # micro-batches, as the fit's --fit-accumulate runs them
            with _autocast(device):
                logits = module(input_ids=ids[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1)) / args.accumulate
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    del module, opt
    return times[args.warmup:]


def fit_steps(plan, data: Path, device, args) -> tuple[list[float], dict]:
    op_options = {"noise": 0.01, **({"rank": args.rank} if args.operator == "mango" and args.rank else {})}
    op = plugins.get_operator(args.operator)(plan, **op_options)
    args.resolved_rank = op.describe_options().get("rank")  # the auto rank, resolved
    options = FitOptions(data=[str(data)], steps=args.warmup + args.steps, batch_size=args.batch * args.accumulate,
                         accumulate=args.accumulate, seq_len=args.seq, eval_batches=0, device=str(device))
    report = prepare_fit(op, options).run(progress=False)
    return report["step_times"][args.warmup:], report


def _autocast(device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--operator", default="ligo", choices=["ligo", "mango"])
    ap.add_argument("--rank", type=int, default=None, help="mango's ring rank [default: the operator's, auto]")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--grow-width", default="2x")
    ap.add_argument("--grow-depth", default="2x")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--accumulate", type=int, default=1,
                    help="micro-batches of --batch per optimiser step, in both (the fit materialises once per step)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="plain and fit alternate this many times (shared machines drift)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_source(tmp / "src", args)
        data = tmp / "ids.npy"
        np.save(data, np.random.default_rng(0).integers(0, args.vocab, 200_000).astype(np.int32))
        with open_source(src) as source:
            plan = make_plan(source, GrowthSpec(width=args.grow_width, depth=args.grow_depth))
            plain, fit = [], []
            for _ in range(args.rounds):
                plain += plain_steps(plan, device, args)
                times, report = fit_steps(plan, data, device, args)
                fit += times
    # The minimum is the least disturbed step on a shared machine; the median is shown too.
    p, f = min(plain), min(fit)
    result = {
        "source": plan.old.as_dict(), "target": plan.new.as_dict(), "target_params": plan.target_params(),
        "operator": args.operator, "rank": getattr(args, "resolved_rank", None) if args.operator == "mango" else None,
        "operator_params": report["operator_params"], "batch": args.batch, "seq": args.seq,
        "accumulate": args.accumulate, "tokens_per_step": args.batch * args.seq * args.accumulate, "device": str(device), "threads": torch.get_num_threads(),
        "plain_step_s": p, "fit_step_s": f, "ratio": f / p,
        "median_ratio": statistics.median(fit) / statistics.median(plain), "plain_steps_s": plain, "fit_steps_s": fit,
        "peak_memory": report["peak_memory"], "torch": torch.__version__, "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("steps_s")}, indent=2))
    print(f"| {args.operator} | d {plan.old.residual}->{plan.new.residual}, L {plan.old.layers}->{plan.new.layers}, vocab {plan.new.vocab} "
          f"| {args.batch}x{args.seq} | {device} x{torch.get_num_threads()} | {p:.2f} s | {f:.2f} s | {f / p:.2f}x "
          f"| {result['median_ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
