"""Peak memory of a LiGO fit of a >= 1B-parameter target: whole-model against block by block.

A GPT-2-shaped source (random weights; d=1024, 10 layers, vocabulary 50,257: 0.18B) is
grown 2x wide and 2x deep (1.11B) and LiGO is fitted for one optimiser step on random
token ids, once with ``materialise="whole"`` (every grown weight made once per step and
held, with its gradient) and once with ``"block"`` (each block's weights made inside its
forward and again in its backward). Each fit runs in a fresh process, so its peak RSS is
its own; the step time is the fit's own clock.

    python benchmarks/fit_memory.py [--quick] [--modes block,whole] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(width=1024, layers=10, vocab=50257, seq=64, batch=1)
QUICK = dict(width=64, layers=2, vocab=512, seq=16, batch=2)

CHILD = r"""
import json, resource, sys, time
import torch
from modelgrow.fit import prepare_fit
from modelgrow.operators.ligo import LiGOOperator
from modelgrow.plan import GrowthSpec, make_plan
from modelgrow.source import open_source
src, data, mode, seq, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
base = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
with open_source(src) as source:
    plan = make_plan(source, GrowthSpec(width="2x", depth="2x"))
    op = LiGOOperator(plan, noise=0.01)
    fit = prepare_fit(op, {"data": [data], "steps": 1, "batch_size": batch, "seq_len": seq, "eval_batches": 0,
                           "device": "cpu", "materialise": mode})
    report = fit.run(progress=False)
print(json.dumps({"rss": int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024, "import_rss": base,
                  "step_s": report["step_s"], "loss": report["loss_curve"][0], "target_params": plan.target_params(),
                  "operator_params": report["operator_params"]}))
"""


def make_source(folder: Path, shape: dict) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=shape["width"], n_layer=shape["layers"], n_head=shape["width"] // 64,
                                  vocab_size=shape["vocab"], n_positions=1024, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the test suite's mode)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--modes", default="block,whole", help="which --fit-materialise modes to run, comma-separated")
    a = ap.parse_args()
    shape = QUICK if a.quick else FULL
    import numpy as np

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = make_source(tmp / "src", shape)
        data = tmp / "ids.npy"
        np.save(data, np.random.default_rng(0).integers(0, shape["vocab"], 20_000).astype(np.int32))
        for mode in a.modes.split(","):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "src"), str(data), mode, str(shape["seq"]),
                                   str(shape["batch"])], capture_output=True, text=True)
            if proc.returncode:
                rows[mode] = {"failed": proc.returncode, "stderr": proc.stderr[-1500:]}
                continue
            rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shape": shape, "source_params": params,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    print(json.dumps(result, indent=2))
    print("| materialise | target | peak RSS | of which import | step |")
    print("| --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        if "failed" in r:
            print(f"| {mode} | – | failed (exit {r['failed']}) | – | – |")
        else:
            print(f"| {mode} | {r['target_params'] / 1e9:.2f}B | {r['rss'] / 1e9:.2f} GB | {r['import_rss'] / 1e9:.2f} GB "
                  f"| {r['step_s']:.1f} s |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
