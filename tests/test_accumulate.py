"""Gradient accumulation (``--accumulate``, ``--fit-accumulate``) in the engine's loop.

- training with 2 micro-batches per step follows the 1-micro-batch run: the same loss
  curve and weights up to fp32 rounding (no dropout: Llama has none);
- a LiGO fit with 2 micro-batches ends at the same operator tensors and loss curve;
- the fit materialises the grown weights once per optimiser step, not per micro-batch;
- a per-process batch smaller than ``accumulate`` is one line, exit 2, nothing written.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

import tiny
from modelgrow.cli import main
from modelgrow.errors import UsageError
from modelgrow.fit import FitOptions, prepare_fit
from modelgrow.operators.ligo import LiGOOperator
from modelgrow.plan import GrowthSpec, make_plan
from modelgrow.source import open_source
from modelgrow.train_options import TrainOptions
from modelgrow.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 96, 3000).astype(np.int32)


def _save_ids(path, ids) -> str:
    np.save(path, ids)
    return str(path)


def test_training_with_two_micro_batches_matches_one_batch(tmp_path, ids):
    src = tiny.llama(tmp_path / "src", layers=1)
    options = dict(data=[_save_ids(tmp_path / "ids.npy", ids)], steps=3, batch_size=4, seq_len=16, eval_batches=1,
                   lr=3e-3, device="cpu")
    one = train(src, tmp_path / "one", options, progress=False)
    two = train(src, tmp_path / "two", {**options, "accumulate": 2}, progress=False)
    assert one["options"]["accumulate"] == 1 and two["options"]["accumulate"] == 2
    assert np.allclose(one["loss_curve"], two["loss_curve"], rtol=1e-5, atol=0), (one["loss_curve"], two["loss_curve"])
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(src / "model.safetensors")
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert worst < 1e-5 and moved > 1e-3, (worst, moved)


def _fit(src, ids_path, **options):
    """A LiGO fit in this process: the operator's tensors before and after, the report and
    how many times the operator materialised the grown weights."""
    with open_source(src) as source:
        op = LiGOOperator(make_plan(source, GrowthSpec(width="2x")), noise=0.01)
        fit = prepare_fit(op, {"data": [ids_path], "steps": 3, "batch_size": 4, "seq_len": 16, "eval_batches": 1,
                               "lr": 1e-3, "device": "cpu", **options})
        start = {k: v.detach().clone() for k, v in op.parameters().items()}
        calls = []
        materialise = op.materialise
        op.materialise = lambda: calls.append(1) or materialise()  # counts calls on this instance
        report = fit.run(progress=False)
    return start, op.parameters(), report, len(calls)


def test_a_fit_with_micro_batches_matches_one_batch_and_materialises_once_per_step(tmp_path, ids):
    src, data = tiny.llama(tmp_path / "src", layers=1), _save_ids(tmp_path / "ids.npy", ids)
    start, a, r1, calls1 = _fit(src, data)
    _, b, r2, _ = _fit(src, data, accumulate=2)
    assert r1["accumulate"] == 1 and r2["accumulate"] == 2
    assert np.allclose(r1["loss_curve"], r2["loss_curve"], rtol=1e-5, atol=0), (r1["loss_curve"], r2["loss_curve"])
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert worst < 1e-6 < 1e-4 < moved, (worst, moved)
    # Once per step (3) plus the two scores (before and after); 4 micro-batches do not add any.
    _, _, r4, calls4 = _fit(src, data, accumulate=4)
    assert calls1 == calls4 == 3 + 2, (calls1, calls4)
    assert len(r4["loss_curve"]) == 3 and abs(r4["loss_curve"][0] - r1["loss_curve"][0]) < 1e-5


CASES = [
    ("train", ["train", "{src}", "--data", "{ids}", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
               "--accumulate", "3"], "--accumulate 3 needs at least 3 windows per process, but --batch-size 2 gives only 2"),
    ("fit", ["convert", "{src}", "--width", "2x", "--operator", "ligo", "--fit-data", "{ids}", "--fit-steps", "2",
             "--fit-seq-len", "16", "--fit-batch-size", "2", "--fit-accumulate", "4"],
     "--fit-accumulate 4 needs at least 4 windows per process, but --fit-batch-size 2 gives only 2"),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_batch_too_small_to_split_is_one_line_exit_2(tmp_path, ids, args, message):
    src, data = tiny.llama(tmp_path / "src", layers=1), _save_ids(tmp_path / "ids.npy", ids)
    args = [a.format(src=src, ids=data) for a in args]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()


def test_the_split_is_per_process_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert TrainOptions.parse({"batch_size": 8, "accumulate": 4}).accumulate == 4
    with pytest.raises(UsageError, match="gives 2 per process over 2 processes"):
        TrainOptions.parse({"batch_size": 4, "accumulate": 3})
    with pytest.raises(UsageError, match="--fit-accumulate 2 .* --fit-batch-size 2 gives 1 per process"):
        FitOptions.parse({"batch_size": 2, "accumulate": 2})
    with pytest.raises(UsageError, match="--accumulate must be a whole number >= 1, got 0"):
        TrainOptions.parse({"accumulate": 0})
