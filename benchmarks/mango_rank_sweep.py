"""Rank sweep of the mango operator, and its materialisation cost at DeiT-B size.

    python benchmarks/mango_rank_sweep.py                 # both parts, rewrites RESULTS-mango.md
    python benchmarks/mango_rank_sweep.py --part demo     # the rank sweep only
    python benchmarks/mango_rank_sweep.py --part big      # the DeiT-S -> DeiT-B-sized cost only

Part "demo": the shipped byte-level GPT-2 (d=64, 2 layers) grown --width 2x --depth 2x
by mango at R = 1, 2, 4, 8 (plus option variants at the default rank), each fitted for
--steps steps on five Python stdlib modules. Reported per run: the fit's own eval loss
before the first step and after the last (fixed windows of the fit text), the loss of
the written checkpoint, run by transformers, on the demo's held-out stdlib files, the
fit's step time and the no-grad materialisation time (both the fastest of several: the
least disturbed on a shared machine), and the peak memory of one materialisation
(growth of the resident high-water mark in a fresh process). copy and ligo rows give
the reference points; rows at --high-lr show what rank buys when the cores move
further. Losses are nats per byte.

Part "big": a random ViT with DeiT-S's shape (hidden 384, 6 heads, FFN 1536, 12 layers)
grown --width 2x (DeiT-B's 768, 12 heads, FFN 3072, 12 layers). Each rank is measured
in a fresh process: time and peak RSS of building M1 and materialising every target
tensor without gradients (what `convert --fit-steps 0` and the final write do), and at
R = 4 one forward + backward of the materialisation as the fit runs it (checkpointed
chunks), which is the operator's share of a fit step's memory.

The tables go between the GENERATED markers of benchmarks/RESULTS-mango.md; the
written analysis around them is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS-mango.md"
BEGIN, END = "<!-- BEGIN GENERATED (mango_rank_sweep.py) -->", "<!-- END GENERATED -->"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
FIT_FILES = ["argparse.py", "dataclasses.py", "textwrap.py", "json/decoder.py", "collections/__init__.py"]


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def reset_peak() -> int:
    """Reset the kernel's resident high-water mark (Linux: write 5 to clear_refs) and
    return the current RSS; falls back to the process max RSS elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_rss() -> int:
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- demo sweep ------------------------------------------------------------------------


def heldout_windows(count: int, seq: int) -> torch.Tensor:
    from modelgrow.demo import demo_checkpoint

    info = json.loads((Path(demo_checkpoint()) / "training.json").read_text())
    text = "\n".join((STDLIB / f).read_text(encoding="utf-8") for f in info["corpus"]["heldout_files"]
                     if (STDLIB / f).is_file())
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # byte-level: id == byte
    gen = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(ids) - seq, (count,), generator=gen).tolist()
    # transformers shifts the labels itself: seq tokens give seq - 1 predictions.
    return torch.from_numpy(np.stack([ids[s:s + seq] for s in starts]))


@torch.no_grad()
def lm_loss(folder: Path, windows: torch.Tensor) -> float:
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    total = 0.0
    for batch in windows.split(16):
        total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
    return total / windows.shape[0]


def _exact_start(promise: dict) -> bool:
    # After a fit the promise is "fitted" (not exact by design); the start was exact
    # when every part of it held.
    return all(promise[k] for k in ("width", "heads", "depth", "noise"))


def materialise_time(source: Path, options: dict, repeats: int = 5) -> float:
    from modelgrow.operators.mango import MangoOperator
    from modelgrow.plan import GrowthSpec, make_plan
    from modelgrow.source import open_source

    with open_source(source) as s:
        op = MangoOperator(make_plan(s, GrowthSpec(width="2x", depth="2x")), **options)
        op._source_tensors()
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                op._cache = None
                t = time.perf_counter()
                op.materialise()
                times.append(time.perf_counter() - t)
    return min(times)


def peak_in_subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_demo(args) -> list[dict]:
    from modelgrow.demo import demo_checkpoint
    from modelgrow.grow import convert
    from modelgrow.plan import GrowthSpec

    demo = Path(demo_checkpoint())
    work = Path(tempfile.mkdtemp(prefix="mango-sweep-"))
    corpus = work / "fit.txt"
    corpus.write_text("\n".join((STDLIB / f).read_text(encoding="utf-8") for f in FIT_FILES), encoding="utf-8")
    windows = heldout_windows(args.heldout_windows, 128)
    fit = {"data": [str(corpus)], "steps": args.steps, "batch_size": args.batch, "seq_len": 128, "device": "cpu"}
    runs = [("copy", "copy", {}), ("ligo", "ligo", {})]
    runs += [(f"mango R={r}", "mango", {"rank": r}) for r in args.ranks]
    runs += [(f"mango R={args.variant_rank}, {k}={v}", "mango", {"rank": args.variant_rank, k: v})
             for k, v in (("ring_init", "echo"), ("ring_residual", "tied"), ("slot_grouping", "modules"))]
    # The default lr moves the cores little in 50 steps; a higher one shows what rank buys.
    runs += [(f"mango R={r}, lr {args.high_lr:g}", "mango", {"rank": r, "_lr": args.high_lr}) for r in args.high_lr_ranks]
    rows = []
    for label, operator, options in runs:
        options = dict(options)
        run_fit = dict(fit, lr=options.pop("_lr")) if "_lr" in options else fit
        out = work / label.replace(" ", "_").replace("=", "").replace(",", "")
        t0 = time.perf_counter()
        report = convert(demo, out, GrowthSpec(width="2x", depth="2x"), operator=operator,
                         operator_options={"noise": 0.0 if operator == "copy" else 0.01, **options},
                         fit_options=None if operator == "copy" else run_fit, verify=False, progress=False)
        row = {"run": label, "wall_s": time.perf_counter() - t0, "heldout": lm_loss(out, windows),
               "params": report["operator"]["options"].get("params"), "exact_start": _exact_start(report["promise"])}
        if "fit" in report:
            f = report["fit"]
            # The fastest step is the least disturbed by other work on a shared machine.
            row.update(before=f["eval"]["before"], after=f["eval"]["after"], step_s=statistics.median(f["step_times"]),
                       step_min_s=min(f["step_times"]))
        if operator == "mango":
            opts = report["operator"]["options"]
            row.update(order=opts["contraction_order"], macs=opts["contraction_macs"], channels=len(opts["channels"]))
            row["materialise_s"] = materialise_time(demo, {"noise": 0.01, **options})
            row["materialise_peak"] = peak_in_subprocess(["--measure", json.dumps({"source": str(demo), "width": "2x",
                                                                                   "depth": "2x", "options": options})])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# -- DeiT-S -> DeiT-B size ---------------------------------------------------------------


def make_deit_small(folder: Path) -> Path:
    import transformers

    cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                 image_size=224, patch_size=16, num_labels=1000)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


def measure(spec: dict) -> dict:
    """In this (fresh) process: peak RSS growth of building M1 and materialising once."""
    from modelgrow.operators.mango import MangoOperator
    from modelgrow.plan import GrowthSpec, make_plan
    from modelgrow.source import open_source

    torch.set_num_threads(spec.get("threads", 2))
    with open_source(spec["source"]) as s:
        plan = make_plan(s, GrowthSpec(width=spec.get("width"), depth=spec.get("depth")))
        op = MangoOperator(plan, **spec.get("options", {}))
        base = reset_peak()
        t0 = time.perf_counter()
        op._source_tensors()
        t1 = time.perf_counter()
        if spec.get("backward"):
            weights = op.materialise()
            loss = sum(w.float().square().mean() for w in weights.values())
            t2 = time.perf_counter()
            loss.backward()
        else:
            with torch.no_grad():
                weights = op.materialise()
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        opts = op.describe_options()
        return {"rank": op.rank, "build_m1_s": t1 - t0, "materialise_s": t2 - t1, "backward_s": t3 - t2 if spec.get("backward") else None,
                "peak_growth_bytes": peak_rss() - base, "base_rss_bytes": base, "target_params": plan.target_params(),
                "ring_target_bytes": 4 * sum(w.numel() for w in weights.values()), "order": opts["contraction_order"],
                "macs": opts["contraction_macs"], "chunk": opts["chunk"], "modes": opts["modes"],
                "ring_params": opts["ring_params"], "threads": torch.get_num_threads()}


def run_big(args) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="mango-big-"))
    src = make_deit_small(work / "deit-s")
    rows = []
    for rank, backward in [(r, False) for r in args.big_ranks] + [(4, True)]:
        spec = {"source": str(src), "width": "2x", "options": {"rank": rank}, "backward": backward, "threads": args.threads}
        row = peak_in_subprocess(["--measure", json.dumps(spec)])
        row["backward"] = backward
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# -- the results file ----------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def render(data: dict) -> str:
    demo, big, meta = data.get("demo"), data.get("big"), data["meta"]
    lines = [BEGIN, "", f"Generated by `python benchmarks/mango_rank_sweep.py`: {meta}", ""]
    if demo:
        d = data["demo_settings"]
        lines += [f"### Demo GPT-2 (d 64→128, 2→4 layers), {d['steps']} fit steps × batch {d['batch']} × 128 bytes", "",
                  "| run | operator params | exact start | fit eval: step 0 | after fit | held-out (transformers) "
                  "| fit step | materialise | materialise peak | contraction |",
                  "| --- | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in demo:
            cells = [r["run"], f"{r['params']:,}" if r.get("params") else "–", "yes" if r["exact_start"] else "no"]
            fitted = "step_s" in r
            cells += [f"{r['before']:.4f}" if fitted else "–", f"{r['after']:.4f}" if fitted else "–", f"{r['heldout']:.4f}",
                      (f"{r['step_min_s'] * 1000:.0f} ms (median {r['step_s'] * 1000:.0f})" if "step_min_s" in r
                       else f"{r['step_s'] * 1000:.0f} ms (median)") if fitted else "–"]
            if "materialise_s" in r:
                cells += [f"{r['materialise_s'] * 1000:.1f} ms", mib(r["materialise_peak"]["peak_growth_bytes"]),
                          f"{r['order']}, {r['macs'] / 1e9:.2f} GMAC, {r['channels']} ch"]
            else:
                cells += ["–", "–", "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Held-out: {d['heldout_windows']} windows of 128 bytes from the demo's held-out stdlib files "
                  "(seeded). Fit eval: the fit's own 4 × batch windows of the fit text, before the first step and after "
                  "the last. copy = the small model's function (no fit). Fit step: the fastest of the 50 (median in brackets). Materialise: no-grad, every target tensor, "
                  "fastest of 5; its peak is the resident high-water mark's growth in a fresh process (page-granular; memory freed earlier and reused is not counted).", ""]
    if big:
        lines += ["### DeiT-S → DeiT-B size (ViT 384→768, 12 layers, 6→12 heads, FFN 1536→3072), random weights", "",
                  "| rank | pass | ring params | order | multiply-adds | chunk | build M1 | materialise | backward "
                  "| peak RSS growth | grown tensors |",
                  "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in big:
            backward = "–" if r["backward_s"] is None else f"{r['backward_s']:.1f} s"
            lines.append(
                f"| {r['rank']} | {'forward + backward' if r['backward'] else 'no grad'} | {r['ring_params'] / 1e6:.2f}M "
                f"| {r['order']} | {r['macs'] / 1e12:.2f}e12 | {r['chunk']} | {r['build_m1_s']:.1f} s "
                f"| {r['materialise_s']:.1f} s | {backward} "
                f"| {gib(r['peak_growth_bytes'])} | {gib(r['ring_target_bytes'])} |")
        lines += ["", "Peak RSS growth: the kernel's resident high-water mark (VmHWM, reset just before) minus the RSS before the pass (Python, torch and the "
                  "operator's cores already loaded); grown tensors: fp32 size of all target tensors.", ""]
    # The raw rows, so a run of one part can re-render the other's table unchanged.
    lines += [f"<!-- data: {json.dumps(data)} -->", END]
    return "\n".join(lines)


def previous_data() -> dict:
    if not RESULTS.exists():
        return {}
    text = RESULTS.read_text(encoding="utf-8")
    if "<!-- data: " not in text:
        return {}
    return json.loads(text.split("<!-- data: ", 1)[1].split(" -->", 1)[0])


def write_results(block: str) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else f"# mango: rank sweep and cost\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text += "\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["demo", "big", "all"], default="all")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--variant-rank", type=int, default=4)
    parser.add_argument("--big-ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--high-lr", type=float, default=1e-3)
    parser.add_argument("--high-lr-ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heldout-windows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS-mango.md alone")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    torch.set_num_threads(args.threads)
    data = previous_data()
    if args.part in ("demo", "all"):
        data["demo"] = run_demo(args)
        data["demo_settings"] = {"steps": args.steps, "batch": args.batch, "heldout_windows": args.heldout_windows}
    if args.part in ("big", "all"):
        data["big"] = run_big(args)
    data["meta"] = (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, {args.threads} torch threads "
                    f"(shared machine), torch {torch.__version__}, Python {platform.python_version()}")
    block = render(data)
    print(block)
    if not args.no_write:
        write_results(block)


if __name__ == "__main__":
    main()
