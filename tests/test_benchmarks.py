"""The growth-quality benchmark's --quick mode runs in CI so the script cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_growth_quality_quick(tmp_path):
    out = tmp_path / "gq.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "growth_quality.py"), "--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["run"]: r for r in result["rows"]}
    assert {"scratch", "copy (exact)", "copy stack", "ligo", "mango", "copy (exact) + ReLoRA"} <= set(rows)
    # The exact growth starts exactly where the source ended; scratch starts near ln(256).
    assert abs(rows["copy (exact)"]["val_after_growth"] - result["source_val"]) < 1e-3
    assert abs(rows["scratch"]["val_after_growth"] - math.log(256)) < 0.5
    assert rows["copy stack"]["val_after_growth"] > result["source_val"] + 1e-3  # stacking is not exact
    assert rows["copy (exact) + ReLoRA"]["trainable_params"] < rows["copy (exact)"]["trainable_params"]
    for r in rows.values():
        assert all(math.isfinite(loss) for _, loss in r["val_curve"])
        assert r["val_curve"][0][0] == 0 and r["val_curve"][-1][0] == result["sizes"]["budget"]
    assert "| copy (exact) |" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
