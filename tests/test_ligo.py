"""The LiGO operator and the fit pass.

- before any step LiGO materialises the copy operator's ``--noise 0`` output, tensor by
  tensor (GPT-2, Llama with GQA, BERT; integer and padded widths);
- its symmetry-breaking noise keeps the function exact (verify passes with 0 steps);
- a 30-step fit on Python source lowers the shipped demo model's loss on that text below
  the copy solution's, measured by transformers on the written checkpoints (held-out
  text: tests/test_benchmarks.py runs benchmarks/fit_quality.py --quick);
- a 2-process torchrun (gloo) fit agrees with the 1-process fit on the same global batch;
- bad data fails before any step, and nothing is written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

import tiny
from modelgrow.cli import main
from modelgrow.demo import demo_checkpoint
from modelgrow.errors import InputError, UsageError
from modelgrow.grow import convert
from modelgrow.operators.copy import CopyOperator
from modelgrow.operators.ligo import LiGOOperator
from modelgrow.plan import GrowthSpec, make_plan
from modelgrow.source import open_source

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


INIT_CASES = [
    ("gpt2", lambda d: tiny.gpt2(d), GrowthSpec(width="2x", depth="2x")),
    ("gpt2-pad-stack", lambda d: tiny.gpt2(d, tie=False), GrowthSpec(width="1.5x", depth="3", depth_mode="stack")),
    ("llama-gqa", lambda d: tiny.llama(d), GrowthSpec(width="2x", depth="2x")),
    ("llama-gqa-pad-tied", lambda d: tiny.llama(d, tie=True), GrowthSpec(width="1.5x", depth="5")),
    ("bert", lambda d: tiny.bert(d), GrowthSpec(width="2x", depth="3")),
]


@pytest.mark.parametrize("maker,spec", [c[1:] for c in INIT_CASES], ids=[c[0] for c in INIT_CASES])
def test_initialisation_is_the_copy_solution(tmp_path, maker, spec):
    with open_source(maker(tmp_path / "src")) as source:
        plan = make_plan(source, spec)
        copy, ligo = CopyOperator(plan, noise=0.0), LiGOOperator(plan, noise=0.0)
        for target in plan.targets:
            a, b = copy.tensor(target), ligo.tensor(target)
            assert a.shape == b.shape, target.name
            assert torch.allclose(a, b, rtol=0, atol=1e-6 * max(1.0, a.abs().max().item())), target.name
        # With symmetry-breaking noise the tensors differ, but only inside the readers' splits.
        noisy = LiGOOperator(plan, noise=0.01)
        assert any(not torch.equal(copy.tensor(t), noisy.tensor(t)) for t in plan.targets)


def test_exact_noise_keeps_the_function_and_zero_steps_need_no_data(tmp_path):
    src = tiny.llama(tmp_path / "src")
    report = convert(src, tmp_path / "out", GrowthSpec(width="2x", depth="2x"), operator="ligo",
                     operator_options={"noise": 0.01, "noise_mode": "exact"}, fit_options={"steps": 0},
                     verify=True, progress=False)
    assert report["promise"]["exact"] and report["verify"]["passed"], report["verify"]
    assert report["fit"]["steps"] == 0
    with pytest.raises(UsageError, match="needs --fit-data"):
        convert(src, tmp_path / "out2", GrowthSpec(width="2x"), operator="ligo", progress=False)
    assert not (tmp_path / "out2").exists()


def _lm_loss(folder: Path, windows: torch.Tensor) -> float:
    model, info = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return float(model.eval()(input_ids=windows, labels=windows).loss)


def test_fit_beats_the_copy_solution_on_the_demo(tmp_path):
    corpus = tiny.stdlib_corpus(tmp_path)
    demo = demo_checkpoint()
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(main, [
        "convert", str(demo), "--width", "2x", "--depth", "2x", "--operator", "ligo", "--fit-data", str(corpus),
        "--fit-steps", "30", "--fit-batch-size", "8", "--fit-seq-len", "128", "--device", "cpu",
        "-o", str(tmp_path / "ligo"), "--report", str(report_path), "--no-verify",
    ])
    assert result.exit_code == 0, result.output
    assert "fit: 30 steps of lm (causal_lm)" in result.output
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, json.loads((REPO / "schemas" / "report.schema.json").read_text()))
    fit = report["fit"]
    assert len(fit["loss_curve"]) == 30 and fit["lr"] == 3e-5 and fit["warmup"] == 3
    assert fit["eval"]["after"] < fit["eval"]["before"] - 0.01, fit["eval"]
    assert 0 < fit["drift"]["relative"] < 0.5 and fit["peak_memory"]["bytes"] > 0
    assert report["promise"]["fitted"] and not report["promise"]["exact"]

    convert(demo, tmp_path / "copy", GrowthSpec(width="2x", depth="2x"), operator_options={"noise": 0.0},
            verify=False, progress=False)
    ids = np.frombuffer(corpus.read_bytes(), dtype=np.uint8).astype(np.int64)  # byte-level: id == byte
    gen = torch.Generator().manual_seed(123)
    starts = torch.randint(0, len(ids) - 128, (16,), generator=gen).tolist()
    windows = torch.from_numpy(np.stack([ids[s:s + 128] for s in starts]))
    copy_loss, ligo_loss = _lm_loss(tmp_path / "copy", windows), _lm_loss(tmp_path / "ligo", windows)
    assert ligo_loss < copy_loss - 0.01, (copy_loss, ligo_loss)


def test_masked_lm_and_distill_objectives_run(tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(4, 96, 3000).astype(np.int32))
    bert = convert(tiny.bert(tmp_path / "bert"), tmp_path / "bert-out", GrowthSpec(width="2x"), operator="ligo",
                   fit_options={"data": [ids], "steps": 3, "batch_size": 4, "seq_len": 16, "mask_token_id": 3},
                   verify=False, progress=False)
    assert bert["fit"]["task"] == "masked_lm" and len(bert["fit"]["loss_curve"]) == 3
    gpt = convert(tiny.gpt2(tmp_path / "gpt2"), tmp_path / "gpt2-out", GrowthSpec(width="2x", depth="3", depth_mode="stack"),
                  operator="ligo", fit_options={"data": [ids], "steps": 6, "batch_size": 4, "seq_len": 16,
                                                "objective": "distill"},
                  verify=False, progress=False)
    fit = gpt["fit"]
    assert fit["objective"] == "distill" and fit["eval"]["before"] > 0  # stacking is inexact: KL > 0
    assert fit["eval"]["after"] < fit["eval"]["before"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_SCRIPT = """
import sys, torch
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec
src, data, out, saved, materialise, accumulate = sys.argv[1:7]
report = convert(src, out, GrowthSpec(width="2x", depth="2x"), operator="ligo", operator_options={"noise": 0.01},
                 fit_options={"data": [data], "steps": 6, "batch_size": 4, "seq_len": 16, "eval_batches": 1,
                              "device": "cpu", "save_operator": saved, "materialise": materialise,
                              "accumulate": int(accumulate)}, verify=False, progress=False)
fit = report["fit"]
print("FIT", torch.distributed.get_rank() if torch.distributed.is_initialized() else 0, fit["sharded"],
      fit["operator_params"], fit["operator_params_local"], flush=True)
"""


@pytest.mark.parametrize("materialise, accumulate", [("whole", 1), ("block", 2)])
def test_two_process_torchrun_agrees_with_one_process(tmp_path, materialise, accumulate):
    """FSDP2 over two gloo processes ends at the one-process operator: with the grown
    model made whole, and made block by block over micro-batches (each block reads the
    gathered operator in its forward and backward, the gradients reduce-scattered once)."""
    src = tiny.gpt2(tmp_path / "src")
    data = tmp_path / "ids.npy"
    np.save(data, np.random.default_rng(0).integers(0, 96, 5000).astype(np.int32))
    script = tmp_path / "fit.py"
    script.write_text(DIST_SCRIPT)
    # One process, in this interpreter (same code path with world size 1).
    convert(src, tmp_path / "one", GrowthSpec(width="2x", depth="2x"), operator="ligo", operator_options={"noise": 0.01},
            fit_options={"data": [data], "steps": 6, "batch_size": 4, "seq_len": 16, "eval_batches": 1,
                         "device": "cpu", "save_operator": str(tmp_path / "one.safetensors"),
                         "materialise": materialise, "accumulate": accumulate},
            verify=False, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(src), str(data), str(tmp_path / "two"),
           str(tmp_path / "two.safetensors"), materialise, str(accumulate)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    # FSDP2: each process held and stepped its own slice of the operator (about half).
    fits = [line.split()[1:] for line in run.stdout.splitlines() if line.startswith("FIT")]
    assert len(fits) == 2 and all(sharded == "True" for _, sharded, _, _ in fits), run.stdout
    total, parts = int(fits[0][2]), [int(f[3]) for f in fits]
    assert sum(parts) == total and max(parts) < 0.6 * total, fits
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max((one[k] - _initial_operator(src)[k]).abs().max().item() for k in one)
    assert worst < 1e-5 < moved, (worst, moved)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _initial_operator(src: Path) -> dict:
    with open_source(src) as source:
        return dict(LiGOOperator(make_plan(source, GrowthSpec(width="2x", depth="2x")), noise=0.01).parameters())


@pytest.mark.parametrize("kind", ["ligo", "mango"])
def test_an_operator_made_again_is_where_it_started(tmp_path, kind):
    """A fit measures its drift against the operator made again from its plan, options
    and seed (it keeps no copy while it runs): that must be its start, bit for bit,
    noise included."""
    from modelgrow import plugins

    src = tiny.gpt2(tmp_path / "src")
    with open_source(src) as source:
        op = plugins.get_operator(kind)(make_plan(source, GrowthSpec(width="2x", depth="2x")), noise=0.01, seed=3)
        start, again = op.parameters(), op.initial_parameters()
        assert again.keys() == start.keys() and len(start) > 3
        assert all(torch.equal(again[k], v) and again[k] is not v for k, v in start.items())
        other = plugins.get_operator(kind)(make_plan(source, GrowthSpec(width="2x", depth="2x")), noise=0.01, seed=4)
        assert not all(torch.equal(other.parameters()[k], v) for k, v in start.items())  # the seed matters


def _write(path: Path, data) -> Path:
    if isinstance(data, np.ndarray):
        np.save(path, data)
    else:
        path.write_bytes(data)
    return path


BAD_DATA = [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", b"", "empty"),
    ("binary.txt", b"\xff\xfe\x00abc", "not UTF-8"),
    ("short.npy", np.arange(10, dtype=np.int32), "needs 17"),
    ("big-ids.npy", np.full(100, 96, dtype=np.int32), "token id 96"),
    ("negative.npy", np.full(100, -1, dtype=np.int64), "negative"),
    ("floats.npy", np.zeros(100, dtype=np.float32), "not integer"),
    ("odd.bin", b"\x01\x02\x03", "whole number of uint16"),
    ("text-no-tokenizer.txt", b"def f(): pass\n" * 10, "no tokenizer.json"),
]


@pytest.mark.parametrize("name,data,message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_fails_before_any_step(tmp_path, name, data, message):
    src = tiny.gpt2(tmp_path / "src")  # no tokenizer.json beside it
    path = tmp_path / name if data is None else _write(tmp_path / name, data)
    with pytest.raises(InputError, match=message):
        convert(src, tmp_path / "out", GrowthSpec(width="2x"), operator="ligo",
                fit_options={"data": [path], "steps": 5, "seq_len": 16, "batch_size": 2}, progress=False)
    assert not (tmp_path / "out").exists()


def test_fit_options_are_refused_by_analytic_operators_and_checked(tmp_path):
    src = tiny.gpt2(tmp_path / "src")
    with pytest.raises(UsageError, match="learned operators"):
        convert(src, tmp_path / "out", GrowthSpec(width="2x"), fit_options={"steps": 3}, progress=False)
    with pytest.raises(UsageError, match="positions"):
        convert(src, tmp_path / "out", GrowthSpec(width="2x"), operator="ligo",
                fit_options={"data": [tmp_path], "steps": 1, "seq_len": 64}, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_diverged_fit_is_blamed_on_the_fit_not_the_source(tmp_path):
    """One step at an absurd rate leaves a finite loss but Inf weights: exit 2 naming the fit."""
    src = tiny.gpt2(tmp_path / "src")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 96, 2000).astype(np.int32))
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "out"), "--width", "2x",
                                       "--operator", "ligo", "--fit-data", str(ids), "--fit-steps", "1",
                                       "--fit-lr", "1e30", "--fit-warmup", "0", "--fit-seq-len", "16",
                                       "--fit-batch-size", "2"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "its fit diverged" in line and "lower --fit-lr" in line
    assert not (tmp_path / "out").exists()
