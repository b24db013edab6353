"""The fit with each block's weights made inside its forward (``--fit-materialise block``).

- it follows the whole-model fit: the same loss curve and operator tensors to fp32
  rounding, on a model with absolute positions (GPT-2, tied head) and one with rotary
  positions and GQA (Llama), with depth growth too;
- the whole grown model is never made: ``materialise()`` is not called, and no more than
  one block's weights exist at a time;
- an operator that makes every layer in one computation (Mango) is refused in one line.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tiny
from modelgrow.cli import main
from modelgrow.fit import prepare_fit
from modelgrow.operators.ligo import LiGOOperator
from modelgrow.plan import GrowthSpec, make_plan
from modelgrow.source import open_source

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ids(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 96, 3000).astype(np.int32))
    return str(path)


def _fit(src, data, materialise):
    """A 3-step LiGO fit (2 micro-batches a step): the operator's tensors after it, its report,
    the layer of every layer tensor made, and how many tensors each layer has."""
    with open_source(src) as source:
        plan = make_plan(source, GrowthSpec(width="2x", depth="2x"))
        op = LiGOOperator(plan, noise=0.01)
        fit = prepare_fit(op, {"data": [data], "steps": 3, "batch_size": 4, "seq_len": 16, "eval_batches": 1,
                               "lr": 1e-3, "device": "cpu", "materialise": materialise, "accumulate": 2})
        made = []
        compute = op.compute

        def counted(target):
            if target.layer is not None:
                made.append(target.layer)
            return compute(target)

        op.compute = counted
        if materialise == "block":
            op.materialise = lambda: pytest.fail("the whole grown model was made")
        report = fit.run(progress=False)
        per_layer = Counter(t.layer for t in plan.targets if t.layer is not None)
    return op.parameters(), report, made, per_layer


@pytest.mark.parametrize("maker", [lambda d: tiny.gpt2(d, layers=2), lambda d: tiny.llama(d, layers=2)],
                         ids=["gpt2", "llama-gqa"])
def test_block_by_block_fit_follows_the_whole_model_fit(tmp_path, ids, maker):
    src = maker(tmp_path / "src")
    whole, r_whole, _, _ = _fit(src, ids, "whole")
    block, r_block, made, layers = _fit(src, ids, "block")
    assert r_block["materialise"] == "block" and r_whole["materialise"] == "whole"
    assert np.allclose(r_whole["loss_curve"], r_block["loss_curve"], rtol=1e-5, atol=0)
    assert r_whole["eval"]["after"] == pytest.approx(r_block["eval"]["after"], rel=1e-5)
    worst = max((whole[k] - block[k]).abs().max().item() for k in whole)
    assert worst < 1e-5, worst
    # Each block's tensors are made twice per micro-batch (forward, and again in the
    # backward): 3 steps x 2 micro-batches x 2, plus once for each of the two scores.
    assert Counter(made) == {layer: (3 * 2 * 2 + 2) * count for layer, count in layers.items()}


def test_an_operator_that_makes_every_layer_at_once_is_refused(tmp_path, ids):
    src = tiny.gpt2(tmp_path / "src", layers=1)
    result = CliRunner().invoke(main, ["convert", str(src), "--width", "2x", "--operator", "mango", "--fit-data", ids,
                                       "--fit-steps", "1", "--fit-materialise", "block", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "--fit-materialise block" in result.output and "mango" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_blocks_weights_stay_unmade_outside_their_forward(tmp_path, ids):
    """Between blocks, the target module's layer parameters are still on the meta device."""
    from modelgrow.engine import blockwise as bw

    src = tiny.llama(tmp_path / "src", layers=2)
    seen = []
    original = bw._checkpointed

    def spy(block, forward, weights, inside):
        inner = original(block, forward, weights, inside)

        def run(*args, **kwargs):
            if not getattr(inside, "on", False):  # called by the model, not by the block's own functional_call
                seen.append(all(p.device.type == "meta" for p in block.parameters()))
            return inner(*args, **kwargs)
        return run

    bw._checkpointed = spy
    try:
        _fit(src, ids, "block")
    finally:
        bw._checkpointed = original
    assert seen and all(seen)
    assert torch.is_grad_enabled()
