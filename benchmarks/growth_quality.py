"""Growth quality, the headline benchmark: how much training does growth save, over seeds?

Two blocks, each a small byte-level model pretrained on the Python standard library's own
source (every 20th file held out) and grown 2x wide and 2x deep: a causal LM (GPT-2) and
a masked LM (BERT). In each block, every start (scratch: a random model of the target
size; copy: exact, identity depth and cancelling noise; copy stack; LiGO and Mango, each
fitted on the training split) is trained by `modelgrow.train` under each schedule:

- rewarm: warm up to the block's peak rate again, then cosine to 10% (a fresh run's schedule);
- continue: start at the rate the source's training ended at, no warmup, cosine to 10% of it;
- short rewarm (copy only): a third of rewarm's peak after a fifth of its warmup;

plus ReLoRA with its full-rank warm start (`--full-rank-steps`) on the copy start. Every
row runs with several seeds; a seed changes everything random, the source included.
Reported per row: the validation loss right after growth and at the end, the steps and
compute needed to reach the same seed's scratch final loss, and the saving against
scratch (the fit charged at its measured step cost), as means with 95% intervals; and
each row's final loss minus copy's under the same schedule, paired by seed.

    python benchmarks/growth_quality.py              # the full run: 3 seeds, ~65 min on 2 cores
    python benchmarks/growth_quality.py --quick      # tiny sizes, 2 seeds: CI runs this

Compute is 6 x parameters x tokens per training step; scratch's is its whole budget.
The source's pretraining is not charged: growth starts from a model someone already has.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from growth_stats import draw, interval, summarise, table  # noqa: E402
from quality_data import MASK_ID, byte_ids, random_bert, random_gpt2, stdlib_corpus  # noqa: E402

from modelgrow.describe import describe  # noqa: E402
from modelgrow.grow import convert  # noqa: E402
from modelgrow.plan import GrowthSpec  # noqa: E402
from modelgrow.trainer import TrainOptions, train  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    embd: int  # the source's; the target is 2x wide and 2x deep
    layers: int
    heads: int
    source_steps: int
    budget: int  # training steps of every grown and scratch run
    warmup: int  # rewarm's warmup
    batch: int
    seq: int
    eval_every: int
    eval_batches: int
    fit_steps: int
    corpus_bytes: int
    relora_rank: int


FULL = Sizes(embd=32, layers=2, heads=2, source_steps=1200, budget=1200, warmup=100, batch=16, seq=64,
             eval_every=50, eval_batches=8, fit_steps=100, corpus_bytes=4_000_000, relora_rank=8)
QUICK = Sizes(embd=16, layers=1, heads=1, source_steps=100, budget=40, warmup=4, batch=8, seq=32,
              eval_every=10, eval_batches=2, fit_steps=4, corpus_bytes=200_000, relora_rank=4)

# Per block: the model family, the source's peak rate (post-LN BERT diverges at 3e-3) and
# rewarm's peak rate for the grown and scratch runs: the source's, a fresh run's schedule
# (for GPT-2, scratch ends 0.24 lower after 1,200 steps at 3e-3 than at 1e-3).
BLOCKS = {
    "causal LM (GPT-2)": {"kind": "gpt2", "source_lr": 3e-3, "lr": 3e-3,
                          "starts": ["scratch", "copy", "stack", "ligo", "mango"]},
    "masked LM (BERT)": {"kind": "bert", "source_lr": 1e-3, "lr": 1e-3, "starts": ["scratch", "copy", "ligo"]},
}
STARTS = {  # start -> (operator, operator options, depth mode, fitted)
    "copy": ("copy", {"noise": 0.01, "noise_mode": "exact"}, "identity", False),
    "stack": ("copy", {"noise": 0.0}, "stack", False),
    "ligo": ("ligo", {}, "identity", True),
    "mango": ("mango", {}, "identity", True),  # its rank: the smallest with an exact start
}
RELORA = "copy + ReLoRA (warm start), rewarm"
RANDOM = {"gpt2": random_gpt2, "bert": random_bert}  # a random model of a block's family
SHORT = "short rewarm"  # a third of rewarm's peak rate, a fifth of its warmup


def rows_of(block: dict) -> list[dict]:
    rows = []
    for start in block["starts"]:
        schedules = {"scratch": ("rewarm",), "stack": ("rewarm",), "copy": ("rewarm", "continue", SHORT)}
        for schedule in schedules.get(start, ("rewarm", "continue")):
            label = "scratch" if start == "scratch" else f"{start}, {schedule}"
            rows.append({"label": label, "start": start, "schedule": schedule, "relora": 0})
    if block["kind"] == "gpt2":
        # relora: the peak rate as a multiple of full-rank's (the paper's rule of thumb is 2x)
        rows.append({"label": RELORA, "start": "copy", "schedule": "rewarm", "relora": 1})
        rows.append({"label": "copy + ReLoRA (warm start, 2x rate), rewarm", "start": "copy", "schedule": "rewarm",
                     "relora": 2})
    return rows


class Paths:
    def __init__(self, work: Path, block: str, seed: int):
        self.tag = f"{BLOCKS[block]['kind']}-s{seed}"
        self.work = work

    def source(self) -> Path:
        return self.work / f"{self.tag}-source"

    def start(self, start: str) -> Path:
        return self.work / f"{self.tag}-start-{start}"

    def done(self, what: str) -> Path:  # a job's record; its presence marks the job done
        return self.work / f"{self.tag}-{what}.json"

    def run(self, label: str) -> Path:
        return self.done("run-" + "".join(c if c.isalnum() or c in "+-" else "_" for c in label))


def data_of(work: Path, kind: str) -> dict:
    corpus = work / "corpus"
    if kind == "gpt2":
        return {"train": corpus / "train.txt", "val": corpus / "val.txt", "extra": {}}
    return {"train": corpus / "train.npy", "val": corpus / "val.npy", "extra": {"mask_token_id": MASK_ID}}


def fit_options(sz: Sizes, data: dict, steps: int, seed: int) -> dict:
    return {"data": [str(data["train"])], "steps": steps, "batch_size": sz.batch, "seq_len": sz.seq, "seed": seed,
            "device": "cpu", **data["extra"]}


def loop_options(sz: Sizes, data: dict, steps: int, seed: int, **kw) -> TrainOptions:
    values = {**fit_options(sz, data, steps, seed), "val_data": [str(data["val"])], "eval_every": sz.eval_every,
              "eval_batches": sz.eval_batches}
    return TrainOptions(**{**values, **kw})


def make_source(work: Path, sz: Sizes, block: str, seed: int) -> None:
    p, b = Paths(work, block, seed), BLOCKS[block]
    shutil.rmtree(p.source(), ignore_errors=True)
    init = RANDOM[b["kind"]](work / f"{p.tag}-source-init", sz.embd, sz.layers, sz.heads, seed)
    opts = loop_options(sz, data_of(work, b["kind"]), sz.source_steps, seed, lr=b["source_lr"], warmup=sz.warmup)
    rep = train(init, p.source(), opts, progress=False)
    shutil.rmtree(init)
    p.done("source").write_text(json.dumps({"val": rep["val_curve"][-1][1], "final_lr": rep["lr_curve"][-1],
                                            "params": describe(p.source())["params"]}))


def make_start(work: Path, sz: Sizes, block: str, start: str, seed: int) -> None:
    p, b = Paths(work, block, seed), BLOCKS[block]
    shutil.rmtree(p.start(start), ignore_errors=True)
    record = {"fit_step_s": None}
    if start == "scratch":
        RANDOM[b["kind"]](p.start(start), 2 * sz.embd, 2 * sz.layers, 2 * sz.heads, seed + 1000)
    else:
        op, opts, depth_mode, fitted = STARTS[start]
        data = data_of(work, b["kind"])
        fit = {"fit_options": fit_options(sz, data, sz.fit_steps, seed)} if fitted else {}
        rep = convert(p.source(), p.start(start), GrowthSpec(width="2x", depth="2x", depth_mode=depth_mode),
                      operator=op, operator_options={**opts, "seed": seed}, verify=False, progress=False, **fit)
        if fitted:
            record = {"fit_step_s": rep["fit"]["step_s"], "fit_lr": rep["fit"]["lr"],
                      "operator_params": rep["fit"]["operator_params"]}
    p.done(f"start-{start}").write_text(json.dumps(record))


def train_row(work: Path, sz: Sizes, block: str, row: dict, seed: int) -> None:
    p, b = Paths(work, block, seed), BLOCKS[block]
    source = json.loads(p.done("source").read_text())
    start = json.loads(p.done(f"start-{row['start']}").read_text())
    if row["schedule"] == "continue":
        sched = {"lr_schedule": "continue", "source_final_lr": source["final_lr"]}
    elif row["schedule"] == SHORT:
        sched = {"lr": b["lr"] / 3, "warmup": sz.warmup // 5}
    else:
        sched = {"lr": b["lr"], "warmup": sz.warmup}
    if row["relora"]:  # a warm start, then 3 merges' worth
        warm = sz.budget // 6
        sched = {**sched, "lr": row["relora"] * sched["lr"], "relora": True, "rank": sz.relora_rank, "alpha": sz.relora_rank,
                 "full_rank_steps": warm, "relora_every": (sz.budget - warm) // 3, "adapter_dropout": 0.0}
    out = p.run(row["label"]).with_suffix(".trained")  # one per job: jobs of one seed run side by side
    shutil.rmtree(out, ignore_errors=True)
    rep = train(p.start(row["start"]), out, loop_options(sz, data_of(work, b["kind"]), sz.budget, seed, **sched),
                progress=False)
    shutil.rmtree(out, ignore_errors=True)
    fit_cost = start["fit_step_s"] / rep["step_s"] if start["fit_step_s"] else 1.0
    record = {"block": block, "row": row["label"], "seed": seed, "val_curve": rep["val_curve"],
              "val_after_growth": rep["val_curve"][0][1], "final_val": rep["val_curve"][-1][1],
              "source_val": source["val"], "source_final_lr": source["final_lr"],
              "lr_first": rep["lr_curve"][0], "lr_schedule": rep["options"]["lr_schedule"],
              "fit_steps": sz.fit_steps if start["fit_step_s"] else 0, "fit_cost": fit_cost,
              "step_s": rep["step_s"], "trainable_params": rep["trainable_params"],
              "optimizer_state_bytes": rep["optimizer_state_bytes"], **{k: start[k] for k in start if k != "fit_step_s"}}
    p.run(row["label"]).write_text(json.dumps(record))


def measure_fit_cost(work: Path, sz: Sizes, block: str, start: str, repeats: int = 3) -> dict:
    """What a fit step is charged: its time against a plain training step of the grown
    model, back to back in one process and one thread, nothing else running; medians of
    interleaved repeats. (Each run's own ratio, timed minutes apart while other runs
    shared the cores, scattered from 1.1x to 2.2x for the same operator.)"""
    p, b = Paths(work, block, 0), BLOCKS[block]
    op, opts, depth_mode, _ = STARTS[start]
    data = data_of(work, b["kind"])
    steps = max(5, sz.fit_steps // 4)
    grown, trained = work / f"{p.tag}-cost-{start}", work / f"{p.tag}-cost-trained"
    fit_s, train_s = [], []
    for _ in range(repeats):
        shutil.rmtree(grown, ignore_errors=True)
        rep = convert(p.source(), grown, GrowthSpec(width="2x", depth="2x", depth_mode=depth_mode), operator=op,
                      operator_options={**opts, "seed": 0}, verify=False, progress=False,
                      fit_options=fit_options(sz, data, steps, 0))
        fit_s.append(rep["fit"]["step_s"])
        shutil.rmtree(trained, ignore_errors=True)
        rep = train(grown, trained, loop_options(sz, data, steps, 0, lr=b["lr"], warmup=0, eval_every=0), progress=False)
        train_s.append(rep["step_s"])
    shutil.rmtree(grown, ignore_errors=True)
    shutil.rmtree(trained, ignore_errors=True)
    fit, plain = statistics.median(fit_s), statistics.median(train_s)
    return {"fit_step_s": fit, "train_step_s": plain, "ratio": fit / plain, "steps": steps, "repeats": repeats}


def _job(args: tuple) -> None:
    torch.set_num_threads(1)  # tiny models: one process per core beats a thread pool
    fn, rest = args[0], args[1:]
    {"source": make_source, "start": make_start, "train": train_row}[fn](*rest)


def run_phase(jobs: list[tuple], workers: int, log) -> None:
    if not jobs:
        return
    log(f"{len(jobs)} {jobs[0][0]} jobs on {workers} processes")
    if workers == 1:
        for job in jobs:
            _job(job)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for _ in pool.map(_job, jobs):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 2 seeds (CI)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per row (default: 3; 2 with --quick)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes, one thread each")
    ap.add_argument("--blocks", default="all", choices=["all", "causal", "masked"], help="which blocks to run")
    ap.add_argument("--workdir", type=Path, help="keep checkpoints and per-run records here; a rerun on the same "
                                                 "folder computes only what is missing (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: benchmarks/results/growth_quality[-quick].json)")
    ap.add_argument("--plot", type=Path, default=None, help="validation curves PNG (default beside the JSON)")
    args = ap.parse_args()
    if (args.seeds is not None and args.seeds < 1) or args.jobs < 1:
        ap.error("--seeds and --jobs must be at least 1")
    sz = QUICK if args.quick else FULL
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    blocks = [b for b in BLOCKS if args.blocks == "all" or b.startswith(args.blocks)]
    out = args.out or HERE / "results" / f"growth_quality{'-quick' if args.quick else ''}.json"
    plot = args.plot or out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="modelgrow-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    train_txt, val_txt = stdlib_corpus(work / "corpus", sz.corpus_bytes)
    byte_ids(train_txt, work / "corpus" / "train.npy")
    byte_ids(val_txt, work / "corpus" / "val.npy")
    todo = lambda jobs: [j for j in jobs if not j[-1].exists()]  # noqa: E731
    run_phase([j[:-1] for j in todo([("source", work, sz, b, s, Paths(work, b, s).done("source"))
                                     for b in blocks for s in seeds])], args.jobs, log)
    run_phase([j[:-1] for j in todo([("start", work, sz, b, st, s, Paths(work, b, s).done(f"start-{st}"))
                                     for b in blocks for st in BLOCKS[b]["starts"] for s in seeds])], args.jobs, log)
    runs = [(b, r, s) for b in blocks for r in rows_of(BLOCKS[b]) for s in seeds]
    record = lambda b, r, s: Paths(work, b, s).run(r["label"])  # noqa: E731
    # Fitted and ReLoRA runs are the longest: first, so that the last jobs are short.
    pending = sorted(todo([("train", work, sz, b, r, s, record(b, r, s)) for b, r, s in runs]),
                     key=lambda j: (not j[4]["relora"], j[4]["start"] not in ("ligo", "mango")))
    run_phase([j[:-1] for j in pending], args.jobs, log)
    costs: dict[tuple[str, str], dict] = {}
    torch.set_num_threads(1)
    for b in blocks:
        for start in (st for st in BLOCKS[b]["starts"] if st in STARTS and STARTS[st][3]):
            cached = work / f"{BLOCKS[b]['kind']}-fit-cost-{start}.json"
            if not cached.exists():
                log(f"{b}: {start}'s fit step against a plain step, nothing else running")
                cached.write_text(json.dumps(measure_fit_cost(work, sz, b, start)))
            costs[(b, start)] = json.loads(cached.read_text())

    result = {
        "benchmark": "growth_quality", "quick": args.quick, "seeds": len(seeds),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"Python {platform.python_version()}",
        "command": "python benchmarks/growth_quality.py" + (" --quick" if args.quick else ""),
        "sizes": asdict(sz), "blocks": [], "runs": [json.loads(record(b, r, s).read_text()) for b, r, s in runs],
    }
    starts = {(b, r["label"]): r["start"] for b in blocks for r in rows_of(BLOCKS[b])}
    for r in result["runs"]:  # every fitted run charged at its operator's measured cost
        cost = costs.get((r["block"], starts[(r["block"], r["row"])]))
        if cost is not None:
            r["fit_cost_in_run"], r["fit_cost"] = r["fit_cost"], cost["ratio"]
    for b in blocks:
        sources = [json.loads(Paths(work, b, s).done("source").read_text()) for s in seeds]
        scratch = [r["final_val"] for r in result["runs"] if r["block"] == b and r["row"] == "scratch"]
        result["blocks"].append({
            "name": b, "kind": BLOCKS[b]["kind"], "rows": rows_of(BLOCKS[b]), "budget": sz.budget,
            "fit_steps": sz.fit_steps, "source_lr": BLOCKS[b]["source_lr"], "rewarm_lr": BLOCKS[b]["lr"],
            "source_final_lr": sources[0]["final_lr"], "source_params": sources[0]["params"],
            "target_params": describe(Paths(work, b, seeds[0]).start("copy"))["params"],
            "source_val": interval([s["val"] for s in sources]), "scratch_final": interval(scratch),
            "fit_cost": {st: c for (blk, st), c in costs.items() if blk == b},
        })
    result["summary"] = summarise(result)
    result["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(result, indent=2) + "\n")
    draw(result, plot)
    print(table(result))
    log(f"wrote {out} and {plot}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
