"""What a conversion costs, against the I/O floor, measured side by side in one run.

A GPT-2-small-sized checkpoint (random weights) is grown 2x wide and 2x deep with the
`copy` operator. Each measurement runs in a fresh subprocess so its peak resident
memory is its own:

- floor: read every input tensor and write tensors of the output's exact shapes and
  shard layout with safetensors, in one process: the least any converter must do;
- convert: `modelgrow convert --width 2x --depth 2x --no-verify` at two shard sizes.

    python benchmarks/conversion_cost.py [--embd 768 --layers 12] [--out RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = r"""
import json, sys, time, resource
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
src, grown, dest = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
t = time.perf_counter()
with safe_open(src / "model.safetensors", "pt") as f:
    total = sum(f.get_tensor(k).numel() for k in f.keys())   # read every input byte
index = grown / "model.safetensors.index.json"
shards = {}
if index.exists():
    for name, shard in json.loads(index.read_text())["weight_map"].items():
        shards.setdefault(shard, []).append(name)
else:
    shards["model.safetensors"] = None
dest.mkdir()
for shard, names in shards.items():
    with safe_open(grown / shard, "pt") as f:   # shapes only: the header, no data read
        keys = names or list(f.keys())
        shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in keys}
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    save_file({k: torch.ones(s, dtype=dtypes[d]) for k, (s, d) in shapes.items()}, dest / shard, metadata={"format": "pt"})
print(json.dumps({"s": time.perf_counter() - t, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child_rss(cmd: list[str]) -> tuple[float, int, str]:
    wrapper = (
        "import resource, runpy, sys, time, json;"
        "t=time.perf_counter();"
        f"sys.argv={cmd[2:]!r};"
        "code=0\n"
        "try:\n runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n code=e.code or 0\n"
        "sys.stderr.write(json.dumps({'s': time.perf_counter()-t, 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024, 'code': code})+'\\n')\n"
        "sys.exit(code)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env=env)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    if stats["code"]:
        raise SystemExit(f"failed: {cmd}\n{proc.stderr}")
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
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="modelgrow-bench-"))
    src = work / "src"
    params = make_source(src, args.embd, args.layers)
    in_bytes = (src / "model.safetensors").stat().st_size
    rows = []
    for shard in args.shards.split(","):
        out = work / f"grown-{shard}"
        shutil.rmtree(out, ignore_errors=True)
        report = work / "report.json"
        process_s, rss, _ = child_rss([sys.executable, "-m", "modelgrow", "convert", str(src), "-o", str(out),
                                       "--width", "2x", "--depth", "2x", "--no-verify", "-q", "--max-shard-size", shard,
                                       "--report", str(report)])
        # The conversion's own clock (after imports), comparable with the floor's.
        s = json.loads(report.read_text())["timings"]["total_s"]
        out_bytes = sum(p.stat().st_size for p in out.iterdir())
        floor_dest = work / f"floor-{shard}"
        shutil.rmtree(floor_dest, ignore_errors=True)
        floor_out = subprocess.run([sys.executable, "-c", FLOOR, str(src), str(out), str(floor_dest)],
                                   capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if floor_out.returncode:
            raise SystemExit(floor_out.stderr)
        floor = json.loads(floor_out.stdout.strip().splitlines()[-1])
        largest_shard = max(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append({
            "max_shard_size": shard, "convert_s": s, "convert_process_s": process_s, "floor_s": floor["s"], "time_ratio": s / floor["s"],
            "convert_rss": rss, "floor_rss": floor["rss"], "output_bytes": out_bytes, "largest_shard": largest_shard,
            "rss_over_output": rss / out_bytes, "shards": len(list(out.glob("*.safetensors"))),
        })
        shutil.rmtree(floor_dest, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "source_params": params, "input_bytes": in_bytes, "embd": args.embd, "layers": args.layers, "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"source: GPT-2 d={args.embd} L={args.layers}, {params:,} params, {in_bytes / 1e6:.0f} MB -> 2x/2x")
    print("| --max-shard-size | shards | convert | I/O floor | ratio | convert peak RSS | floor peak RSS | output | RSS / output |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['max_shard_size']} | {r['shards']} | {r['convert_s']:.1f} s | {r['floor_s']:.1f} s | {r['time_ratio']:.2f}x "
              f"| {r['convert_rss'] / 1e9:.2f} GB | {r['floor_rss'] / 1e9:.2f} GB | {r['output_bytes'] / 1e9:.2f} GB | {r['rss_over_output']:.2f} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
