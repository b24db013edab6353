"""The pre-flight (modelgrow.preflight): a job that cannot fit is refused before anything
is allocated or listed per layer, in one line with the figures (exit 2).

- absurd targets (--width 1000x of the demo: 98 billion parameters, 393 GB; --ffn
  200000000; --depth 100000000x) are refused at once, from the dims alone: each of these
  took minutes and gigabytes, or grew without bound, before. They run in a subprocess
  with a timeout, so a regression fails instead of hanging the suite;
- --no-preflight lets a job the check refuses run (the free disk and memory readers are
  replaced by small numbers: a check of the decision, the work itself is real);
- --dry-run runs every check the real run does and prints the estimate;
- the estimate's parameter count is the real run's, exactly;
- train: --eval-batches beyond what the held-out data holds is one line, exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import modelgrow
import tiny
from modelgrow import preflight
from modelgrow.cli import main
from modelgrow.errors import UsageError
from modelgrow.plan import GrowthSpec, make_plan
from modelgrow.source import open_source

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "modelgrow" / "data" / "demo"
SCHEMA = json.loads((REPO / "schemas" / "report.schema.json").read_text())

# Each absurd request through the real CLI, real disk and memory readers, in one process.
ABSURD = """
import json, sys
from click.testing import CliRunner
from modelgrow import preflight
from modelgrow.cli import main
out = {"memory": preflight.available_memory(), "disk": preflight.free_disk(__import__("pathlib").Path(sys.argv[2]))}
for name, args in json.loads(sys.argv[1]).items():
    r = CliRunner().invoke(main, args)
    out[name] = [r.exit_code, r.output]
print(json.dumps(out))
"""


def test_absurd_targets_are_refused_at_once_from_the_dims_alone(tmp_path):
    grown = tmp_path / "out"
    runs = {
        "width": ["convert", str(DEMO), "--width", "1000x", "-o", str(grown)],
        "ffn": ["convert", str(DEMO), "--ffn", "200000000", "--dry-run"],
        "depth": ["convert", str(DEMO), "--depth", "100000000x", "--dry-run"],
        "params": ["convert", str(DEMO), "--width", "100000x", "--dry-run", "--no-preflight"],
    }
    done = subprocess.run([sys.executable, "-c", ABSURD, json.dumps(runs), str(tmp_path)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder

    # 98,330,368,000 parameters, 393.3 GB in fp32; its peak: 16 bytes per element of the
    # 64,000 x 256,000 FFN matrix. Refused on whichever the machine lacks.
    code, message = out["width"]
    if (out["disk"] or 0) > 393.3e9 and (out["memory"] or 0) > 262.7e9:
        pytest.skip("this machine has room for --width 1000x of the demo")
    assert code == 2, message
    assert message.count("\n") == 1 and "--width 1000x is too large (pass --no-preflight to try anyway)" in message
    assert ("the grown model needs 393.3 GB on disk" in message or
            "this run needs about 262.7 GB of memory at its peak" in message), message

    code, message = out["ffn"]  # 51 billion parameters: refused here, estimated on a machine that has the room
    assert (code == 2 and "--ffn 200000000 is too large" in message) or (code == 0 and "estimate:" in message), message
    code, message = out["depth"]
    assert code == 2 and "--depth 100000000x gives 200,000,000 layers, more than modelgrow grows: at most 1,000,000" \
        in message, message
    code, message = out["params"]  # outright: --no-preflight does not lift it
    assert code == 2 and "--width 100000x gives 983,042,636,800,000 parameters" in message, message


def test_the_refusal_names_the_figures_it_compared(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "free_disk", lambda folder: 72 * 10**9)
    monkeypatch.setattr(preflight, "available_memory", lambda: 64 * 10**9)
    result = CliRunner().invoke(main, ["convert", str(DEMO), "--width", "1000x", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert line == (f"error: {DEMO}: the grown model needs 393.3 GB on disk, 72.0 GB free at {tmp_path}; this run needs "
                    "about 262.7 GB of memory at its peak, 64.0 GB available; --width 1000x is too large "
                    "(pass --no-preflight to try anyway)")
    assert list(tmp_path.iterdir()) == []


def test_no_preflight_lets_a_job_the_check_refuses_proceed(tmp_path, monkeypatch):
    src = tiny.gpt2(tmp_path / "src")
    monkeypatch.setattr(preflight, "free_disk", lambda folder: 1000)
    monkeypatch.setattr(preflight, "available_memory", lambda: 10**12)
    with pytest.raises(UsageError, match=r"needs 1\.\d MB on disk, 1\.0 KB free at .*--width 2x is too large"):
        modelgrow.convert(src, tmp_path / "out", width="2x")
    monkeypatch.setattr(preflight, "free_disk", lambda folder: None)  # unknown: not checked
    monkeypatch.setattr(preflight, "available_memory", lambda: 1000)
    with pytest.raises(UsageError, match=r"of memory at its peak, 1\.0 KB available; --width 2x is too large"):
        modelgrow.convert(src, tmp_path / "out", width="2x")
    assert not (tmp_path / "out").exists()

    grown = modelgrow.convert(src, tmp_path / "out", width="2x", preflight=False)
    assert grown.output is not None and (tmp_path / "out" / "model.safetensors").exists()
    assert grown.report["estimate"]["checked"] is False and grown.report["estimate"]["free_disk_bytes"] is None
    monkeypatch.setattr(preflight, "available_memory", lambda: None)  # unreadable: the memory check is skipped
    assert modelgrow.convert(src, tmp_path / "out2", width="2x").output is not None


def test_dry_run_checks_what_the_real_run_checks_and_prints_the_estimate(tmp_path):
    src = tiny.gpt2(tmp_path / "src")
    taken = tmp_path / "taken"
    taken.mkdir()
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(400, dtype=np.int32) % 96)
    runner = CliRunner()

    def dry(*args):
        return runner.invoke(main, ["convert", str(src), "--width", "2x", "--dry-run", *map(str, args)])

    cases = [
        (dry("-o", taken), 5, "exists; pass --overwrite"),
        (dry("-o", tmp_path / "no" / "such"), 5, f"does not exist (create it first (mkdir -p {tmp_path / 'no'})"),
        (dry("--operator", "ligo"), 2, "needs --fit-data"),
        (dry("--fit-data", ids), 2, "fit options are for learned operators"),
        (dry("--operator", "ligo", "--fit-data", tmp_path / "missing.npy"), 3, "does not exist"),
    ]
    for result, code, message in cases:
        assert result.exit_code == code and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy", "src", "taken"] and not any(taken.iterdir())

    report = tmp_path / "report.json"
    result = dry("-o", tmp_path / "out", "--operator", "ligo", "--fit-data", ids, "--report", report)
    assert result.exit_code == 0, result.output
    assert "estimate: " in result.output and " on disk, about " in result.output
    written = json.loads(report.read_text())
    jsonschema.validate(written, SCHEMA)
    estimate = written["estimate"]
    assert estimate["params"] == written["plan"]["target_params"] and estimate["checked"]
    assert estimate["disk_path"] == str(tmp_path) and estimate["free_disk_bytes"] > 0
    assert not (tmp_path / "out").exists()
    copy = modelgrow.convert(src, width="2x", dry_run=True).report["estimate"]
    assert estimate["peak_memory_bytes"] > copy["peak_memory_bytes"]  # the learned operator holds more


@pytest.mark.parametrize("make,growth", [
    (tiny.gpt2, dict(width="2x", depth="3")),
    (tiny.gpt2, dict(width="1.5x", ffn="3x", depth="2x", depth_mode="stack")),
    (lambda p: tiny.gpt2(p, tie=False), dict(heads="2x", width="2x", layers="0-1,1+,0")),
    (tiny.llama, dict(width="2x", kv_heads="4", depth="2x", depth_mode="interleave")),
    (tiny.bert, dict(width="2x", insert="every:1")),
])
def test_the_estimate_counts_what_the_plan_lists_exactly(tmp_path, make, growth):
    src = make(tmp_path / "src")
    with open_source(src) as source:
        plan = make_plan(source, GrowthSpec(**growth))
        size = preflight.count(source, plan.new)
        assert size.params == plan.target_params()
        assert size.largest == max(t.numel for t in plan.targets)
        assert preflight.count(source, source.dims).params == plan.source_params()


@pytest.mark.parametrize("make,growth,options", [
    (tiny.gpt2, dict(width="2x", depth="3"), {}),
    (tiny.llama, dict(width="1.5x", ffn="2x"), {"rank": 8}),
    (tiny.gpt2, dict(width="2x"), {"slot_grouping": "modules"}),
])
def test_the_learned_operators_state_estimate_bounds_their_tensors(tmp_path, make, growth, options):
    from modelgrow import plugins

    with open_source(make(tmp_path / "src")) as source:
        plan = make_plan(source, GrowthSpec(**growth))
        for name, given in (("ligo", {}), ("mango", options)):
            kind = plugins.get_operator(name)
            held = sum(t.numel() for t in kind(plan, **given).params.values())
            assert held <= kind.state_params(source, plan.new, given) <= held * 1.01


def test_the_estimate_is_the_real_runs_size(tmp_path):
    grown = modelgrow.convert(tiny.llama(tmp_path / "src"), tmp_path / "out", width="2x", depth="3", dtype="bf16")
    estimate, output = grown.report["estimate"], grown.report["output"]
    assert estimate["params"] == output["params"]
    written = sum(f["bytes"] for f in output["files"])
    assert written <= estimate["disk_bytes"] <= written + 2 * preflight.FILES_BYTES


def test_train_refuses_more_eval_batches_than_the_data_holds(tmp_path):
    src = tiny.gpt2(tmp_path / "src")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 96, 4000).astype(np.int32))
    result = CliRunner().invoke(main, ["train", str(src), "-o", str(tmp_path / "out"), "--data", str(ids),
                                       "--eval-batches", "10000000", "--seq-len", "8", "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --eval-batches 10,000,000 asks for 160,000,000 windows of 9 tokens, but "
                                     "the validation data holds 200 tokens, room for 22 without overlap: at most 64 "
                                     "batches (give a smaller --eval-batches)")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="the fit's eval_batches 100,000 asks for"):
        modelgrow.convert(src, tmp_path / "out", width="2x", operator="ligo",
                          fit={"data": [ids], "steps": 1, "eval_batches": 100_000, "seq_len": 8})
    assert not (tmp_path / "out").exists()
