"""onnxruntime CPU latency against PyTorch eager for a grown model (information only).

Grows the shipped demo GPT-2 2x wide and 2x deep, then grows that again (a model of a
size where matrix work dominates), exports both with `modelgrow export` (which checks
parity) and reports the best-of-N single-thread forward latency of each runtime,
measured side by side in one process.

    python benchmarks/onnx_latency.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from modelgrow.demo import demo_checkpoint
from modelgrow.onnx_export import export_onnx
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = demo_checkpoint()
        for i, spec in enumerate((GrowthSpec(width="2x", depth="2x"), GrowthSpec(width="4x", depth="4x"))):
            grown = tmp / f"grown-{i}"
            report = convert(src, grown, spec, verify=False, progress=False)
            exported = export_onnx(grown, tmp / f"grown-{i}.onnx")
            lat = exported["latency"]
            worst = max(r["max_abs_diff"] for r in exported["parity"]["shapes"])
            rows.append({"growth": f"{spec.width}/{spec.depth}", "params": report["output"]["params"], **lat, "parity_max_abs_diff": worst})
    print("| grown demo | parameters | batch × seq | onnxruntime | PyTorch eager | ratio | parity max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['growth']} | {r['params']:,} | {r['batch']}×{r['seq']} | {r['onnxruntime_ms']:.2f} ms | "
              f"{r['pytorch_ms']:.2f} ms | {r['ratio']:.2f}x | {r['parity_max_abs_diff']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
