"""Growth quality, the headline benchmark: how much training does growth save?

1. Pretrain a small GPT-2-style byte-level model on the Python standard library's own
   source (a fixed file-level split: every 20th file is held out for validation).
2. Grow it 2x wide and 2x deep with every operator and mode: copy (exact: identity
   depth, cancelling noise), copy stack (whole-model order), LiGO, Mango; and start a
   randomly initialised model of the same target size (scratch, the baseline).
3. Train each with the same schedule and token budget (`modelgrow.train`).
4. Report the validation loss right after growth, the steps (and FLOPs, fit pass
   included) each run needs to reach scratch's final validation loss, the saving
   against scratch, and all validation curves in one plot.

    python benchmarks/growth_quality.py                 # the full table (~40 min on 2 cores)
    python benchmarks/growth_quality.py --quick         # < 3 min: CI runs this

FLOPs use the usual 6 x parameters x tokens per training token (forward + backward);
a fit step is counted at the same rate as a training step of the target model
(measured 1.15-1.65x, benchmarks/RESULTS-fit.md, so this slightly flatters LiGO and
Mango). The source's own pretraining is not charged to any run: growth starts from a
model someone already has.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from modelgrow import plugins
from modelgrow.demo import demo_checkpoint
from modelgrow.grow import convert
from modelgrow.describe import describe
from modelgrow.plan import GrowthSpec
from modelgrow.trainer import TrainOptions, train

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    embd: int
    layers: int
    heads: int
    source_steps: int
    source_lr: float
    budget: int  # training steps for every grown / scratch run
    lr: float
    warmup: int
    batch: int
    seq: int
    eval_every: int
    eval_batches: int
    fit_steps: int
    corpus_bytes: int


FULL = Sizes(embd=128, layers=4, heads=4, source_steps=2000, source_lr=3e-3, budget=2000, lr=1e-3, warmup=100,
             batch=16, seq=64, eval_every=50, eval_batches=8, fit_steps=100, corpus_bytes=4_000_000)
QUICK = Sizes(embd=32, layers=2, heads=2, source_steps=200, source_lr=3e-3, budget=120, lr=2e-3, warmup=10,
              batch=8, seq=32, eval_every=20, eval_batches=4, fit_steps=10, corpus_bytes=300_000)


def stdlib_corpus(folder: Path, limit: int) -> tuple[Path, Path]:
    """train.txt / val.txt from the standard library's .py files; every 20th file is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    train_text, val_text = [], []
    sizes = [0, 0]
    for i, path in enumerate(files):
        held = i % 20 == 0
        if sizes[held] >= (limit // 10 if held else limit):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        (val_text if held else train_text).append(text)
        sizes[held] += len(text)
    folder.mkdir(parents=True, exist_ok=True)
    for name, texts in (("train.txt", train_text), ("val.txt", val_text)):
        # Written aside and renamed: parallel --only runs on one workdir may be reading it.
        staged = folder / f".{name}.{os.getpid()}"
        staged.write_text("\n".join(texts), encoding="utf-8")
        os.replace(staged, folder / name)
    return folder / "train.txt", folder / "val.txt"


def random_gpt2(folder: Path, embd: int, layers: int, heads: int, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=embd, n_layer=layers, n_head=heads,
                                  n_inner=4 * embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=10, eos_token_id=10)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    shutil.copy(demo_checkpoint() / "tokenizer.json", folder / "tokenizer.json")  # byte-level
    return folder


def options(sz: Sizes, train_txt: Path, val_txt: Path, steps: int, lr: float, warmup: int, seed: int) -> TrainOptions:
    return TrainOptions(data=[str(train_txt)], val_data=[str(val_txt)], steps=steps, lr=lr, warmup=warmup,
                        batch_size=sz.batch, seq_len=sz.seq, eval_every=sz.eval_every, eval_batches=sz.eval_batches,
                        seed=seed, device="cpu")


def reach_step(curve: list[list[float]], target: float) -> float | None:
    """First step at which the validation loss is at or below ``target`` (linear
    interpolation between evaluations), or None if it never gets there."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l0 <= target:
            return s0
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return curve[-1][0] if curve and curve[-1][1] <= target else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, < 3 minutes (CI)")
    ap.add_argument("--workdir", type=Path, help="keep checkpoints here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/growth_quality[-quick].json)")
    ap.add_argument("--plot", type=Path, default=None, help="validation curves PNG (default beside the JSON)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None,
                    help="comma-separated run numbers (0=scratch .. 5=ReLoRA, 6=continued schedule) to compute now; the others are read from "
                         "--workdir if an earlier call computed them. Lets runs go in parallel processes.")
    ap.add_argument("--assemble", action="store_true",
                    help="compute nothing: build the table from the runs --workdir already holds")
    ap.add_argument("--source-only", action="store_true", help="pretrain the source into --workdir and stop (reused later)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --quick, else 2)")
    args = ap.parse_args()
    sz = QUICK if args.quick else FULL
    # Tiny models gain nothing from a second thread, and on a busy machine a thread
    # pool that waits for a core is many times slower than one thread.
    torch.set_num_threads(args.threads or (1 if args.quick else min(2, os.cpu_count() or 1)))
    name = "growth_quality-quick" if args.quick else "growth_quality"
    out = args.out or HERE / "results" / f"{name}.json"
    plot = args.plot or out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="modelgrow-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train_txt, val_txt = stdlib_corpus(work / "corpus", sz.corpus_bytes)
    log = lambda msg: print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)  # noqa: E731

    # 1. The small model, trained close to its capacity.
    src, src_report = work / "source", work / "source-report.json"
    if not src_report.exists():  # a kept --workdir reuses its pretrained source
        shutil.rmtree(src, ignore_errors=True)
        init = random_gpt2(work / "source-init", sz.embd, sz.layers, sz.heads, args.seed)
        log(f"pretraining the source: d={sz.embd}, {sz.layers} layers, {sz.source_steps} steps")
        train(init, src, options(sz, train_txt, val_txt, sz.source_steps, sz.source_lr, sz.warmup, args.seed),
              progress=False, report_path=src_report)
    source_report = json.loads(src_report.read_text())
    if args.source_only:
        log(f"source ready in {src}")
        return
    source_val = source_report["val_curve"][-1][1]
    log(f"source validation loss {source_val:.4f}")

    # 2. The grown starts, and scratch.
    operators = plugins.get_operators()
    spec = GrowthSpec(width="2x", depth="2x")
    fit = {"data": [str(train_txt)], "steps": sz.fit_steps, "batch_size": sz.batch, "seq_len": sz.seq, "seed": args.seed, "device": "cpu"}
    variants = [
        ("scratch", None, {}),
        ("copy (exact)", "copy", {"noise": 0.01, "noise_mode": "exact", "seed": args.seed}),
        ("copy stack", "copy", {"noise": 0.0, "seed": args.seed, "depth_mode": "stack"}),
        ("ligo", "ligo", {"seed": args.seed, "fit": fit}),
        ("mango", "mango", {"seed": args.seed, "rank": 4, "fit": fit}),
        # The same exact start trained with ReLoRA instead of full-rank (benchmark part 4).
        ("copy (exact) + ReLoRA", "copy", {"noise": 0.01, "noise_mode": "exact", "seed": args.seed, "relora": True}),
        # Not the shared schedule: the exact start continued the way the source ended
        # (its final LR, a short warmup only to fill Adam's moments), to show what the
        # shared schedule's re-warm costs a grown model.
        ("copy (exact), continued schedule", "copy", {"noise": 0.01, "noise_mode": "exact", "seed": args.seed,
                                                      "schedule": (sz.source_lr * 0.1, sz.warmup // 5)}),
    ]
    rows = []
    only = set() if args.assemble else None if args.only is None else {int(i) for i in args.only.split(",")}
    for index, (label, op, opts) in enumerate(variants):
        cached = work / f"row-{index}.json"
        if cached.exists():  # computed by an earlier (or parallel) call on this workdir
            rows.append(json.loads(cached.read_text()))
            continue
        if only is not None and index not in only:
            rows.append({"run": label, "missing": "not computed in this call"})
            continue
        start = work / f"start-{index}"
        fit_steps = 0
        opts = dict(opts)
        relora = opts.pop("relora", False)
        fit_opts = opts.pop("fit", None)
        depth_mode = opts.pop("depth_mode", "identity")
        lr, warmup = opts.pop("schedule", (sz.lr, sz.warmup))
        shutil.rmtree(start, ignore_errors=True)  # a run killed earlier may have left it
        if op is None:
            random_gpt2(start, 2 * sz.embd, 2 * sz.layers, 2 * sz.heads, args.seed + 1)
        elif op not in operators:
            rows.append({"run": label, "missing": f"operator {op!r} is not built yet"})
            log(f"{label}: skipped, operator not available")
            continue
        else:
            kwargs = {"fit_options": fit_opts} if fit_opts else {}
            convert(src, start, GrowthSpec(width=spec.width, depth=spec.depth, depth_mode=depth_mode), operator=op,
                    operator_options=opts, verify=False, progress=False, **kwargs)
            fit_steps = sz.fit_steps if fit_opts else 0
        log(f"{label}: training {sz.budget} steps")
        topts = options(sz, train_txt, val_txt, sz.budget, lr, warmup, args.seed)
        if relora:
            # ReLoRA's rule of thumb: about twice the full-rank learning rate; 3 restarts.
            topts = type(topts).parse(topts.model_dump(), relora=True, rank=max(8, sz.embd // 4),
                                      alpha=max(8, sz.embd // 4), lr=2 * sz.lr, relora_every=sz.budget // 3,
                                      restart_warmup=max(5, sz.budget // 30), adapter_dropout=0.0)
        shutil.rmtree(work / f"trained-{index}", ignore_errors=True)
        rep = train(start, work / f"trained-{index}", topts, progress=False)
        rows.append({"run": label, "operator": op, "fit_steps": fit_steps, "val_curve": rep["val_curve"],
                     "val_after_growth": rep["val_curve"][0][1], "final_val": rep["val_curve"][-1][1],
                     "wall_s": rep["wall_s"], "step_s": rep.get("step_s"), "relora": relora, "lr": lr, "warmup": warmup,
                     "trainable_params": rep["trainable_params"], "optimizer_state_bytes": rep["optimizer_state_bytes"],
                     "params": describe(start)["params"]})
        cached.write_text(json.dumps(rows[-1]) + "\n")

    # 3. Steps, FLOPs and savings against scratch's final validation loss.
    if only is not None and not args.assemble:
        log("computed the requested runs; run again without --only to assemble the table")
        return
    target_params = next(r["params"] for r in rows if "params" in r)
    scratch = rows[0]
    goal = scratch["final_val"]
    tokens_per_step = sz.batch * sz.seq
    for r in rows:
        if "missing" in r:
            continue
        step = reach_step(r["val_curve"], goal)
        r["steps_to_scratch_final"] = step
        r["flops_to_scratch_final"] = None if step is None else 6 * target_params * tokens_per_step * (step + r["fit_steps"])
        budget_flops = 6 * target_params * tokens_per_step * sz.budget
        r["saving_pct"] = None if step is None else 100 * (1 - r["flops_to_scratch_final"] / budget_flops)

    result = {
        "benchmark": "growth_quality", "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}",
        "command": "python benchmarks/growth_quality.py" + (" --quick" if args.quick else ""),
        "sizes": sz.__dict__, "source_val": source_val, "source_params": describe(src)["params"],
        "target_params": target_params, "scratch_final_val": goal, "rows": rows,
        "schedule": f"AdamW lr {sz.lr}, {sz.warmup} warmup steps, cosine to 10%, batch {sz.batch} x {sz.seq} bytes, "
                    f"{sz.budget} steps, the same for every run except 'continued schedule' "
                    f"(lr {sz.source_lr * 0.1:g}, {sz.warmup // 5} warmup steps)",
        "wall_s": time.perf_counter() - started,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    draw(result, plot)
    print(table(result))
    log(f"wrote {out} and {plot}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def table(result: dict) -> str:
    lines = [f"source val loss {result['source_val']:.4f} nats/byte; scratch final {result['scratch_final_val']:.4f}",
             "| run | val loss after growth | final val loss | steps to scratch's final | FLOPs to it | saving vs scratch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "missing" in r:
            lines.append(f"| {r['run']} | {r['missing']} | | | | |")
            continue
        step = "never" if r["steps_to_scratch_final"] is None else f"{r['steps_to_scratch_final']:.0f}"
        flops = "—" if r["flops_to_scratch_final"] is None else f"{r['flops_to_scratch_final']:.2e}"
        saving = "—" if r["saving_pct"] is None else f"{r['saving_pct']:.0f}%"
        fit = f" (+{r['fit_steps']} fit)" if r["fit_steps"] else ""
        lines.append(f"| {r['run']} | {r['val_after_growth']:.4f} | {r['final_val']:.4f} | {step}{fit} | {flops} | {saving} |")
    lines += ["", "| run | trainable parameters | optimizer state | step time |", "| --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "missing" not in r:
            lines.append(f"| {r['run']} | {r['trainable_params']:,} | {r['optimizer_state_bytes'] / 1e6:.1f} MB | {1000 * (r['step_s'] or 0):.0f} ms |")
    return "\n".join(lines)


def draw(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in result["rows"]:
        if "missing" in r:
            continue
        steps, losses = zip(*r["val_curve"])
        ax.plot(steps, losses, label=r["run"], lw=1.6)
    ax.axhline(result["source_val"], color="grey", ls=":", lw=1, label="source (small model)")
    ax.axhline(result["scratch_final_val"], color="black", ls="--", lw=0.8, label="scratch final")
    ax.set_xlabel("training step of the grown model")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("GPT-2 grown 2x wide, 2x deep: validation loss" + (" (quick)" if result["quick"] else ""))
    finite = [l for r in result["rows"] if "val_curve" in r for _, l in r["val_curve"] if math.isfinite(l)]
    if finite:
        ax.set_ylim(min(finite) - 0.05, min(max(finite), result["source_val"] + 1.5))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
