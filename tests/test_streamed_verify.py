"""Streamed verification (issue #16): both models run one block's weights at a time,
with the same verdict as whole-model runs, and a failure names the first block that
departs from its source block.
"""

from __future__ import annotations

import json

import pytest
import torch

import test_families as families
import tiny
from modelgrow.compare import compare
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec
from modelgrow.source import load_module, open_source
from modelgrow.streamed import run_streamed

BUILDERS = {
    "gpt2": lambda folder: tiny.gpt2(folder),
    "llama": lambda folder: tiny.llama(folder, tie=True),
    "bert": lambda folder: tiny.bert(folder),
    **{name: (lambda folder, name=name: families.causal_lm(folder, name)) for name in families.FAMILIES},
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_streamed_runs_agree_with_whole_model_runs(tmp_path, family):
    """The streamed output equals the whole module's, and a growth's verdict and blocks hold."""
    src = BUILDERS[family](tmp_path / "src")
    with open_source(src) as source:
        inputs = source.arch.example_inputs(source.config, 2, 8, torch.Generator().manual_seed(0))
        whole = source.arch.call(load_module(source), source.config, inputs).float()
        run = run_streamed(source, inputs)
        assert torch.equal(run.output, whole)
        assert len(run.blocks) == source.dims.layers
        total = sum(source.checkpoint.info(b.name).numel * 4 for b in source.bound() if b.layer == 0)
        assert run.peak_block_bytes <= total  # one block at a time, never the whole model
    spec = GrowthSpec(width="2x", depth="2x")
    report = convert(src, tmp_path / "grown", spec, verify=True, progress=False)
    exact = report["promise"]["exact"]
    assert report["verify"]["passed"] == exact or family == "bert"
    blocks = report["verify"]["blocks"]
    assert [b["source_layer"] for b in blocks] == [e["source_layer"] for e in report["plan"]["depth_map"]]
    if exact:
        assert all(b["max_abs_diff"] <= b["tolerance"] for b in blocks)


def test_a_wrong_block_is_named(tmp_path):
    """A corrupted weight in grown block 2 (a copy of source block 1): verify fails, exit 4
    in the CLI, and says where the departure starts."""
    from safetensors.torch import load_file, save_file

    src = tiny.llama(tmp_path / "src", layers=2)
    convert(src, tmp_path / "grown", GrowthSpec(width="2x", depth="2x"), verify=True, progress=False)
    path = tmp_path / "grown" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.2.mlp.up_proj.weight"] *= 1.5
    save_file(tensors, path, metadata={"format": "pt"})
    with open_source(src) as s, open_source(tmp_path / "grown") as g:
        result = compare(s, g)
    assert not result.passed
    first = result.first_divergent()
    assert (first["layer"], first["source_layer"]) == (2, 1)
    assert all(b["max_abs_diff"] <= b["tolerance"] for b in result.blocks[:2])
    assert "block 2 (from source block 1) departs first" in str(result.failure(src, tmp_path / "grown"))
    assert json.loads(result.to_json())["first_divergent_block"]["layer"] == 2


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_a_large_vocabulary_runs_from_row_slices_to_the_same_output(tmp_path, family, monkeypatch):
    """With slices of 512 bytes every embedding and plain head is "large": the lookup and
    the logits are computed a slice of stored rows at a time, never from the whole fp32
    weight, and give the whole module's output; a growth still verifies that way."""
    from modelgrow import streamed
    from modelgrow.checkpoint import sizes

    src = BUILDERS[family](tmp_path / "src")
    monkeypatch.setattr(streamed, "row_parts", lambda shape: sizes.row_parts(shape, 512))
    with open_source(src) as source:
        inputs = source.arch.example_inputs(source.config, 2, 8, torch.Generator().manual_seed(0))
        whole = source.arch.call(load_module(source), source.config, inputs).float()
        reads, get = [], source.checkpoint.get
        source.checkpoint.get = lambda name, rows=None: reads.append((name, rows)) or get(name, rows)
        run = run_streamed(source, inputs)
        torch.testing.assert_close(run.output, whole, rtol=1e-5, atol=1e-5)
        heads = {"gpt2": "lm_head", "llama": "lm_head", "bert": "cls.predictions.decoder"}
        embeddings = {"gpt2": "transformer.wte", "llama": "model.embed_tokens", "bert": "bert.embeddings.word_embeddings"}
        assert {heads[family], embeddings[family]} <= set(run.sliced)
        table = next(b.name for b in source.bound() if b.name.endswith(embeddings[family].split(".")[-1] + ".weight"))
        vocab = source.checkpoint.info(table).shape[0]
        mine = [rows for name, rows in reads if name == table]
        assert mine and all(rows is not None and rows.stop - rows.start < vocab for rows in mine)
    report = convert(src, tmp_path / "grown", GrowthSpec(width="2x"), verify=True, progress=False)
    assert report["verify"]["passed"] == report["promise"]["exact"]
