"""Verification at the sizes people grow: a Llama-3.2-1B-shaped checkpoint grown 2x wide
(~4.4B parameters) and verified, with each step's wall time and peak resident memory.

The source has the real shapes (vocabulary 128,256, hidden 2,048, 16 layers, 32 query and
8 key/value heads, FFN 8,192, tied embeddings, bf16) and random weights. Each step runs in
a fresh process so that its peak RSS is its own (VmHWM: getrusage's ru_maxrss would
include the parent's peak, inherited across fork and exec):

- convert: `modelgrow convert SRC --width 2x --no-verify` (with `--deep`, also
  `--width 2x --depth 2x`, ~8.3B);
- the I/O floor of the same conversion (benchmarks/io_floor.py), for the time ratio;
- verify: `modelgrow verify SRC GROWN` (streamed: one block's weights in memory at a time);
- the whole-model check's weights alone, for comparison: both models in fp32 at once.

    python benchmarks/streamed_verify.py [--quick] [--deep] [--json OUT] [--out RESULTS.md]
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

import torch
from safetensors.torch import save_file

LLAMA_1B = dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192)
QUICK = dict(vocab=512, hidden=64, layers=4, heads=4, kv_heads=2, ffn=256)

CHILD = r"""
import json, resource, runpy, sys, time
t = time.perf_counter()
sys.argv = ["modelgrow", *sys.argv[1:]]
code = 0
try:
    from modelgrow.cli import main
    main(prog_name="modelgrow", standalone_mode=False)
except SystemExit as e:
    code = e.code or 0
print(json.dumps({"s": time.perf_counter() - t, "rss": int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024,
                  "code": code}), file=sys.stderr)
"""


def make_source(folder: Path, shape: dict, dtype=torch.bfloat16) -> int:
    """A Llama checkpoint of these shapes with random weights (written shard by shard)."""
    folder.mkdir(parents=True)
    d, hd = shape["hidden"], shape["hidden"] // shape["heads"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": shape["ffn"], "num_hidden_layers": shape["layers"],
              "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"], "head_dim": hd,
              "vocab_size": shape["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)

    def rand(*s):
        return (torch.randn(*s, generator=gen) * 0.02).to(dtype)

    weight_map, params = {}, 0
    shards = [{"model.embed_tokens.weight": rand(shape["vocab"], d), "model.norm.weight": torch.ones(d, dtype=dtype)}]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        kv = shape["kv_heads"] * hd
        shards.append({p + "input_layernorm.weight": torch.ones(d, dtype=dtype),
                       p + "post_attention_layernorm.weight": torch.ones(d, dtype=dtype),
                       p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                       p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                       p + "mlp.gate_proj.weight": rand(shape["ffn"], d), p + "mlp.up_proj.weight": rand(shape["ffn"], d),
                       p + "mlp.down_proj.weight": rand(d, shape["ffn"])})
    n = len(shards)
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        params += sum(t.numel() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return params


def run(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    stats["stdout"] = proc.stdout
    if stats["code"] != 0:
        raise SystemExit(f"{args[0]} failed ({stats['code']}): {proc.stderr[-2000:]}")
    return stats


def floor(src: Path, grown: Path, dest: Path, *more: str) -> dict:
    """benchmarks/io_floor.py on this conversion: read every input tensor, write the output's shapes
    (``--fsync``: and flush each file to disk, as convert does before it publishes)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("io_floor.py")), str(src), str(grown), str(dest),
                           *more], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the I/O floor failed: {proc.stderr[-2000:]}")
    shutil.rmtree(dest, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def grow_and_verify(work: Path, growth: list[str], params: int) -> dict:
    """Convert (a fresh process), the I/O floor of the same conversion, verify (another)."""
    grown = work / "grown"
    shutil.rmtree(grown, ignore_errors=True)
    report_path = work / "report.json"
    conv = run(["convert", str(work / "src"), "-o", str(grown), *growth, "--no-verify", "-q", "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    io = floor(work / "src", grown, work / "floor")
    synced = floor(work / "src", grown, work / "floor", "--fsync")
    ver = run(["verify", str(work / "src"), str(grown), "--json"])
    verdict = json.loads(ver["stdout"])
    target = report["plan"]["target_params"]
    out_bytes = sum(p.stat().st_size for p in grown.iterdir())
    largest_shard = max(p.stat().st_size for p in grown.glob("*.safetensors"))
    shutil.rmtree(grown, ignore_errors=True)
    return {
        "growth": " ".join(growth), "target_params": target, "output_bytes": out_bytes, "largest_shard": largest_shard,
        # The conversion's own clock (after imports) against the floor's (after its imports).
        "convert": {"s": report["timings"]["total_s"], "process_s": conv["s"], "rss": conv["rss"],
                    "open_s": report["timings"]["open_s"], "estimate": report["estimate"]},
        "floor": io, "time_ratio": report["timings"]["total_s"] / io["s"],
        "floor_fsync": synced, "fsync_ratio": report["timings"]["total_s"] / synced["s"],
        "verify": {"s": ver["s"], "rss": ver["rss"], "passed": verdict["passed"], "max_abs_diff": verdict["max_abs_diff"],
                   "peak_block_bytes": verdict.get("peak_block_bytes"),
                   "first_divergent_block": verdict.get("first_divergent_block")},
        "whole_model_weights_fp32": 4 * (params + target),
    }


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the test suite's mode)")
    ap.add_argument("--deep", action="store_true", help="also grow 2x wide and 2x deep (~8.3B at full size)")
    ap.add_argument("--out", type=Path, help="append a Markdown section here")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--work", type=Path, help="folder for the checkpoints (default: a temporary one)")
    a = ap.parse_args()
    shape = QUICK if a.quick else LLAMA_1B
    work = Path(tempfile.mkdtemp(dir=a.work))
    t = time.perf_counter()
    params = make_source(work / "src", shape)
    made = time.perf_counter() - t
    growths = [["--width", "2x"]] + ([["--width", "2x", "--depth", "2x"]] if a.deep else [])
    rows = [grow_and_verify(work, g, params) for g in growths]
    result = {"shape": shape, "source_params": params, "make_s": made, "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"}
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    gb = 1e9
    lines = [f"\n### Streamed verification: a {params / 1e9:.2f}B source ({result['date']})\n",
             "| growth | target | output | convert | of it: opening | I/O floor | **ratio** | floor + fsync | ratio to it "
             "| convert peak RSS | largest shard | verify | verify peak RSS | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        v = r["verify"]
        lines.append(f"| `{r['growth']}` | {r['target_params'] / 1e9:.2f}B | {r['output_bytes'] / gb:.1f} GB "
                     f"| {r['convert']['s']:.0f} s | {r['convert']['open_s']:.1f} s | {r['floor']['s']:.0f} s "
                     f"| **{r['time_ratio']:.2f}×** | {r['floor_fsync']['s']:.0f} s | {r['fsync_ratio']:.2f}× "
                     f"| {r['convert']['rss'] / gb:.2f} GB | {r['largest_shard'] / gb:.2f} GB | {v['s']:.0f} s "
                     f"| {v['rss'] / gb:.2f} GB | {'passed' if v['passed'] else 'FAILED'}, max |Δ| {v['max_abs_diff']:.3g} |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
