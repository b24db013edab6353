"""Depth recipes (issue #15): SOLAR-style layer maps, LLaMA Pro identity blocks, the
growth map, and training only what growth added.

- ``--layers "0-5,2-7"`` on an 8-layer model is SOLAR's recipe in miniature (32 layers:
  two copies, the last 8 of one and the first 8 of the other removed, 48 layers): checked
  tensor by tensor against a construction written here from the description.
- ``--insert every:2`` is LLaMA Pro's spacing: an identity copy after every 2nd layer.
- ``train --train new`` then changes only those blocks: every other tensor keeps its bytes.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

import tiny
from modelgrow.cli import main
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    return tiny.llama(tmp_path_factory.mktemp("llama8") / "src", layers=8, tie=True)


def tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_solar_depth_up_scaling_is_the_described_model(llama8, tmp_path):
    report = convert(llama8, tmp_path / "solar", GrowthSpec(layers="0-5,2-7"), verify=True, progress=False)
    src, out = tensors(llama8), tensors(tmp_path / "solar")
    # SOLAR: the first copy keeps layers 0..L-1-m, the second m..L-1 (m = L/4), concatenated.
    order = list(range(0, 6)) + list(range(2, 8))
    expected = {k: v for k, v in src.items() if ".layers." not in k}
    for target, source in enumerate(order):
        prefix = f"model.layers.{source}."
        expected.update({k.replace(prefix, f"model.layers.{target}."): v for k, v in src.items() if k.startswith(prefix)})
    assert out.keys() == expected.keys()
    assert all(torch.equal(out[k], expected[k]) for k in out)
    big, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "solar", output_loading_info=True)
    assert big.config.num_hidden_layers == 12 and not any(info.values())
    # Never exact: the plan says why, and verify says by how much the output moved.
    promise = report["promise"]
    assert not promise["exact"] and any("2-5 run twice" in n for n in promise["notes"])
    assert report["verify"]["max_abs_diff"] > 1e-3 and not report["verify"]["passed"]
    assert report["plan"]["new_layers"] == list(range(6, 10))


def test_llama_pro_block_expansion_is_exact_and_marks_the_new_blocks(llama8, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(llama8), "-o", str(tmp_path / "pro"), "--insert", "every:4"])
    assert result.exit_code == 0, result.output
    assert "new layers: 4, 9 (growth_map.json" in result.output
    growth = json.loads((tmp_path / "pro" / "growth_map.json").read_text())
    assert growth["new_layers"] == [4, 9]
    assert [e["source_layer"] for e in growth["layers"]] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7]
    assert growth["tensors"]["model.layers.4.self_attn.o_proj.weight"] == {
        "source": "model.layers.3.self_attn.o_proj.weight", "layer": 4, "how": "zeroed", "new": True}
    assert growth["tensors"]["model.layers.4.self_attn.q_proj.weight"]["how"] == "copied"
    assert not growth["tensors"]["model.layers.5.mlp.up_proj.weight"]["new"]
    out = tensors(tmp_path / "pro")
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert not out[f"model.layers.9.{name}"].any()
    # The same recipe written as a layer map gives the same bytes.
    again = convert(llama8, tmp_path / "map", GrowthSpec(layers="0-3,3+,4-7,7+"), verify=True, progress=False)
    assert again["promise"]["exact"] and again["verify"]["max_abs_diff"] == 0.0
    for f in ("model.safetensors", "growth_map.json", "config.json"):
        digest = [hashlib.sha256((tmp_path / d / f).read_bytes()).hexdigest() for d in ("pro", "map")]
        assert digest[0] == digest[1], f


def test_train_new_changes_only_the_inserted_blocks(llama8, tmp_path):
    grown = tmp_path / "pro"
    convert(llama8, grown, GrowthSpec(insert="every:4", width="2x"), progress=False)
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 96, 4000).astype(np.int32))
    result = CliRunner().invoke(main, ["train", str(grown), "--data", str(tmp_path / "ids.npy"), "--train", "new",
                                       "--steps", "30", "--batch-size", "4", "--seq-len", "16", "--lr", "3e-3",
                                       "--eval-every", "0", "--device", "cpu", "-o", str(tmp_path / "trained"),
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    before, after = tensors(grown), tensors(tmp_path / "trained")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    new = {k for k in before if k.startswith(("model.layers.4.", "model.layers.9."))}
    assert changed and changed <= new
    assert {k for k in new if "o_proj" in k or "down_proj" in k} <= changed  # the zeroed writers woke up
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["options"]["train"] == "new"
    assert report["trainable_params"] == sum(before[k].numel() for k in new)
    assert report["val_loss"]["after"] < report["val_loss"]["before"]


BAD = [
    (["--layers", "0-8"], "layer 8 is out of range"),
    (["--layers", ""], "is not a layer"),
    (["--layers", "5-2"], "runs backwards"),
    (["--layers", "0-7", "--depth", "16"], "--depth 16 disagrees with the 8 layers"),
    (["--layers", "0-7", "--insert", "end"], "--layers and --insert both place layers"),
    (["--insert", "every:0"], "K must be a whole number"),
    (["--insert", "somewhere"], "is not every:K, end"),
    (["--layers", "0-7,7+", "--depth-mode", "stack"], "--depth-mode stack"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_layer_maps_are_one_line_exit_2_nothing_written(llama8, tmp_path, args, message):
    result = CliRunner().invoke(main, ["convert", str(llama8), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which,message", [("new", "growth_map.json"), ("nothing.*", "matches no tensor")])
def test_train_selection_errors_are_one_line(llama8, tmp_path, which, message):
    np.save(tmp_path / "ids.npy", np.zeros(500, dtype=np.int32))
    result = CliRunner().invoke(main, ["train", str(llama8), "--data", str(tmp_path / "ids.npy"), "--train", which,
                                       "--steps", "2", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_a_growth_that_grows_nothing_says_so(llama8, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(llama8), "-o", str(tmp_path / "same"), "--width", "1x", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "nothing grows: the output is a copy of the source" in result.output
