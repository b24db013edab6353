"""Fit quality: do 100 fit steps beat the copy solution on held-out text?

For a small pretrained GPT-2 (causal LM) and a small pretrained BERT (masked LM), both
byte-level and pretrained here on the Python standard library's source (the file-level
split of growth_quality.py: every 20th file held out):

1. grow each 2x wide and 2x deep with `copy` (exact) and with the learned operators
   `ligo` and `mango` (R = 4), fitting the learned ones for 100 steps on the training
   split at each learning rate asked for;
2. score every written checkpoint with transformers on the held-out files: the same
   fixed windows for every run (and, for BERT, the same fixed masks).

The copy solution computes the small model's function, so "below copy" means the fit
made the grown model better than the model it came from, on text it never saw.

    python benchmarks/fit_quality.py                       # d=128 sources, ~25 min on 2 cores
    python benchmarks/fit_quality.py --lrs 1e-4,3e-5,1e-5  # the fit learning-rate sweep
    python benchmarks/fit_quality.py --quick               # tiny sizes, ~1 min
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_data import MASK_ID, byte_ids, random_bert, random_gpt2, stdlib_corpus

from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec
from modelgrow.engine.objective import LMObjective
from modelgrow.trainer import TrainOptions, train

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    embd: int
    layers: int
    heads: int
    source_steps: int
    batch: int
    seq: int
    fit_steps: int
    corpus_bytes: int
    heldout_windows: int


FULL = Sizes(embd=128, layers=4, heads=4, source_steps=2000, batch=16, seq=64, fit_steps=100,
             corpus_bytes=4_000_000, heldout_windows=512)
QUICK = Sizes(embd=32, layers=2, heads=2, source_steps=300, batch=16, seq=64, fit_steps=30,
              corpus_bytes=400_000, heldout_windows=128)


def pretrain(kind: str, work: Path, sz: Sizes, data: dict, seed: int, log, given: Path | None = None) -> Path:
    """The small model, pretrained here once per workdir (the source-report marks it done)."""
    src, report = work / f"{kind}-source", work / f"{kind}-source-report.json"
    if given is not None:
        return given
    if report.exists():
        return src
    shutil.rmtree(src, ignore_errors=True)
    if kind == "gpt2":
        init = random_gpt2(work / f"{kind}-init", sz.embd, sz.layers, sz.heads, seed)
        extra, lr = {}, 3e-3
    else:  # post-LN BERT diverges at GPT-2's 3e-3
        init = random_bert(work / f"{kind}-init", sz.embd, sz.layers, sz.heads, seed)
        extra, lr = {"mask_token_id": MASK_ID}, 1e-3
    log(f"pretraining the {kind} source: d={sz.embd}, {sz.layers} layers, {sz.source_steps} steps")
    opts = TrainOptions(data=[str(data[kind]["train"])], val_data=[str(data[kind]["val"])], steps=sz.source_steps,
                        lr=lr, warmup=sz.source_steps // 20, batch_size=sz.batch, seq_len=sz.seq, seed=seed,
                        device="cpu", eval_every=0, **extra)
    train(init, src, opts, progress=False, report_path=report)
    return src


def heldout_windows(val_ids: np.ndarray, sz: Sizes, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val_ids) - sz.seq - 1, (sz.heldout_windows,), generator=gen).tolist()
    return torch.from_numpy(np.stack([val_ids[s:s + sz.seq + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def heldout_loss(checkpoint: Path, kind: str, windows: torch.Tensor, seed: int) -> float:
    """Mean loss per predicted token, by transformers, on fixed windows (and fixed masks)."""
    cls = transformers.AutoModelForCausalLM if kind == "gpt2" else transformers.AutoModelForMaskedLM
    model = cls.from_pretrained(checkpoint).eval()
    objective = LMObjective("causal_lm" if kind == "gpt2" else "masked_lm", MASK_ID + 1, MASK_ID)
    gen = torch.Generator().manual_seed(seed)
    total = count = 0.0
    for chunk in windows.split(32):
        batch = objective.batch(chunk, gen)
        logits = model(input_ids=batch["input_ids"]).logits
        total += float(objective.loss_sum(logits, batch))
        count += batch["count"]
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, about a minute")
    ap.add_argument("--workdir", type=Path, help="keep sources and checkpoints here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/fit_quality[-quick].json)")
    ap.add_argument("--lrs", default=None, help="comma-separated fit learning rates (default: the fit's own default)")
    ap.add_argument("--models", default="gpt2,bert", help="which sources: gpt2, bert or both")
    ap.add_argument("--operators", default="ligo,mango", help="learned operators to fit")
    ap.add_argument("--gpt2-source", type=Path, default=None,
                    help="use this pretrained GPT-2 instead of pretraining one (growth_quality.py's source in its "
                         "--workdir is the same model: same sizes, corpus split and schedule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --quick, else 2)")
    args = ap.parse_args()
    sz = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads or (1 if args.quick else min(2, os.cpu_count() or 1)))
    out = args.out or HERE / "results" / ("fit_quality-quick.json" if args.quick else "fit_quality.json")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="modelgrow-fitq-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)
    lrs = [None] if args.lrs is None else [float(x) for x in args.lrs.split(",")]

    train_txt, val_txt = stdlib_corpus(work / "corpus", sz.corpus_bytes)
    data = {"gpt2": {"train": train_txt, "val": val_txt},
            "bert": {"train": byte_ids(train_txt, work / "corpus" / "train.npy"),
                     "val": byte_ids(val_txt, work / "corpus" / "val.npy")}}
    val_ids = np.frombuffer(val_txt.read_bytes(), dtype=np.uint8)
    windows = heldout_windows(val_ids, sz, args.seed + 123)
    spec = GrowthSpec(width="2x", depth="2x")
    rows = []
    for kind in args.models.split(","):
        src = pretrain(kind, work, sz, data, args.seed, log, args.gpt2_source if kind == "gpt2" else None)
        extra = {"mask_token_id": MASK_ID} if kind == "bert" else {}
        score = functools.partial(heldout_loss, kind=kind, windows=windows, seed=args.seed + 7)
        rows.append({"model": kind, "run": "source (small model)", "heldout": score(src)})
        dst = work / f"{kind}-copy"
        shutil.rmtree(dst, ignore_errors=True)
        convert(src, dst, spec, operator_options={"noise": 0.01, "noise_mode": "exact", "seed": args.seed},
                verify=False, progress=False)
        copy_loss = score(dst)
        rows.append({"model": kind, "run": "copy (exact)", "heldout": copy_loss})
        log(f"{kind}: source {rows[-2]['heldout']:.4f}, copy {copy_loss:.4f}")
        for op in args.operators.split(","):
            for lr in lrs:
                dst = work / f"{kind}-{op}-{lr}"
                shutil.rmtree(dst, ignore_errors=True)
                fit = {"data": [str(data[kind]["train"])], "steps": sz.fit_steps, "batch_size": sz.batch,
                       "seq_len": sz.seq, "seed": args.seed, "device": "cpu", **extra}
                if lr is not None:
                    fit["lr"] = lr
                opts = {"seed": args.seed, **({"rank": 4} if op == "mango" else {})}
                report = convert(src, dst, spec, operator=op, operator_options=opts, fit_options=fit,
                                 verify=False, progress=False)["fit"]
                loss = score(dst)
                rows.append({"model": kind, "run": op, "lr": report["lr"], "heldout": loss, "vs_copy": loss - copy_loss,
                             "fit_eval": report["eval"], "drift": report["drift"]["relative"],
                             "fit_step_s": report["step_s"], "operator_params": report["operator_params"]})
                log(f"{kind} {op} lr {report['lr']:g}: held-out {loss:.4f} ({loss - copy_loss:+.4f} vs copy), "
                    f"fit windows {report['eval']['before']:.4f} -> {report['eval']['after']:.4f}")

    result = {
        "benchmark": "fit_quality", "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}",
        "command": "python benchmarks/fit_quality.py" + (" --quick" if args.quick else "")
                   + (f" --lrs {args.lrs}" if args.lrs else ""),
        "gpt2_source": str(args.gpt2_source) if args.gpt2_source else "pretrained in this run",
        "sizes": sz.__dict__, "rows": rows, "wall_s": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    log(f"wrote {out}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def table(result: dict) -> str:
    lines = ["| model | run | fit lr | held-out loss | vs copy | fit windows: before → after | operator drift |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "fit_eval" not in r:
            lines.append(f"| {r['model']} | {r['run']} | – | {r['heldout']:.4f} | | | |")
            continue
        e = r["fit_eval"]
        lines.append(f"| {r['model']} | {r['run']} | {r['lr']:g} | {r['heldout']:.4f} | {r['vs_copy']:+.4f} | "
                     f"{e['before']:.4f} → {e['after']:.4f} | {r['drift']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
