"""What a conversion costs, against the I/O floor, measured side by side in one run.

A GPT-2-small-sized checkpoint (random weights) is grown 2x wide and 2x deep with the
`copy` operator. Each measurement runs in a fresh subprocess so its peak resident
memory is its own:

- floor (benchmarks/io_floor.py): read every input tensor and write tensors of the
  output's exact shapes and shard layout with safetensors, in one process: the least any
  converter must do; and the same floor with an fsync of each file, as modelgrow does;
- convert: `modelgrow convert --width 2x --depth 2x --no-verify` at two shard sizes.

Repeats are interleaved and the table gives medians.

    python benchmarks/conversion_cost.py [--embd 768 --layers 12] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = Path(__file__).with_name("io_floor.py")


# The CLI ends with os._exit (modelgrow.cli.run), so the child calls main() itself and
# reports its clock and peak RSS when main returns.
CHILD = r"""
import json, resource, sys, time
t = time.perf_counter()
code = 0
try:
    from modelgrow.cli import main
    main(args=sys.argv[1:], prog_name="modelgrow", standalone_mode=False)
except SystemExit as e:
    code = e.code or 0
print(json.dumps({"s": time.perf_counter() - t, "rss": int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024,
                  "code": code}), file=sys.stderr)
"""


def child_rss(args: list[str]) -> tuple[float, int, str]:
    """Run `modelgrow ARGS` in a fresh process: (seconds with imports, peak RSS, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    stats = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"code": proc.returncode or 1}
    if stats["code"]:
        raise SystemExit(f"failed: modelgrow {' '.join(args)}\n{proc.stderr[-3000:]}")
    return stats["s"], stats["rss"], proc.stdout


def make_source(folder: Path, embd: int, layers: int) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=embd, n_layer=layers, n_head=embd // 64)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shards", default="500MB,2GB", help="comma-separated --max-shard-size values")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the tables give medians")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="modelgrow-bench-"))
    src = work / "src"
    params = make_source(src, args.embd, args.layers)
    in_bytes = (src / "model.safetensors").stat().st_size
    runs = []
    # Interleaved: every repeat measures each shard size's convert, floor and floor+fsync in
    # turn, so a change of load hits all of them alike.
    for repeat in range(args.repeats):
        for shard in args.shards.split(","):
            runs.append({"repeat": repeat, "max_shard_size": shard, **measure(work, src, shard)})
    rows = []
    for shard in args.shards.split(","):
        mine = [r for r in runs if r["max_shard_size"] == shard]
        med = {k: statistics.median(r[k] for r in mine) for k in ("convert_s", "floor_s", "floor_fsync_s", "time_ratio",
                                                                 "fsync_ratio", "convert_rss", "floor_rss", "open_s",
                                                                 "ratio_after_open")}
        rows.append({"max_shard_size": shard, "shards": mine[0]["shards"], "output_bytes": mine[0]["output_bytes"],
                     "repeats": len(mine), "ratios": [r["time_ratio"] for r in mine], **med})
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "source_params": params, "input_bytes": in_bytes, "embd": args.embd, "layers": args.layers, "rows": rows,
        "runs": runs,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"source: GPT-2 d={args.embd} L={args.layers}, {params:,} params, {in_bytes / 1e6:.0f} MB -> 2x/2x; "
          f"medians of {args.repeats} interleaved repeats")
    print("| --max-shard-size | shards | convert | I/O floor | **ratio** (each repeat) | of convert: opening | ratio "
          "without it | floor + fsync | ratio to it | convert peak RSS | floor peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        each = ", ".join(f"{x:.2f}" for x in r["ratios"])
        print(f"| {r['max_shard_size']} | {r['shards']} | {r['convert_s']:.1f} s | {r['floor_s']:.1f} s "
              f"| **{r['time_ratio']:.2f}×** ({each}) | {r['open_s']:.1f} s | {r['ratio_after_open']:.2f}× "
              f"| {r['floor_fsync_s']:.1f} s | {r['fsync_ratio']:.2f}× "
              f"| {r['convert_rss'] / 1e9:.2f} GB | {r['floor_rss'] / 1e9:.2f} GB |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def floor(src: Path, grown: Path, dest: Path, *more: str) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    proc = subprocess.run([sys.executable, str(FLOOR), str(src), str(grown), str(dest), *more],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        raise SystemExit(proc.stderr)
    shutil.rmtree(dest, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(work: Path, src: Path, shard: str) -> dict:
    out = work / f"grown-{shard}"
    shutil.rmtree(out, ignore_errors=True)
    report = work / "report.json"
    process_s, rss, _ = child_rss(["convert", str(src), "-o", str(out),
                                   "--width", "2x", "--depth", "2x", "--no-verify", "-q", "--max-shard-size", shard,
                                   "--report", str(report)])
    # The conversion's own clock (after imports), comparable with the floor's.
    timings = json.loads(report.read_text())["timings"]
    s = timings["total_s"]
    opened = timings.get("open_s", 0.0)  # headers, and the config checked with transformers (its import)
    out_bytes = sum(p.stat().st_size for p in out.iterdir())
    plain = floor(src, out, work / f"floor-{shard}")
    synced = floor(src, out, work / f"floor-{shard}", "--fsync")
    row = {"convert_s": s, "convert_process_s": process_s, "floor_s": plain["s"], "time_ratio": s / plain["s"],
           "open_s": opened, "ratio_after_open": (s - opened) / plain["s"],
           "floor_fsync_s": synced["s"], "fsync_ratio": s / synced["s"], "convert_rss": rss, "floor_rss": plain["rss"],
           "output_bytes": out_bytes, "shards": len(list(out.glob("*.safetensors")))}
    shutil.rmtree(out, ignore_errors=True)
    return row


if __name__ == "__main__":
    main()
