"""ONNX export (modelgrow/onnx_export.py): every built-in architecture exports, onnxruntime
reproduces PyTorch on shapes other than the export example, and a failed check or a
missing dependency leaves nothing behind.

Each export costs several seconds of tracing, so every test that exports does so once
and checks as much as it can on that one file.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from modelgrow import onnx_export as export_mod
from modelgrow.cli import main
from modelgrow.errors import ModelgrowError, OutputError, UsageError, VerificationError
from modelgrow.onnx_export import EXAMPLE_SHAPE, MISSING_EXTRA, data_path, export_onnx
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec
from modelgrow.source import load_module, open_source

import tiny

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def gpt2_small(models) -> Path:
    # One layer: tracing time grows with the graph, and one block exercises every op.
    return tiny.gpt2(models / "gpt2", layers=1)


def _only(folder: Path) -> list[str]:
    """Everything in a folder, hidden temp folders included."""
    return sorted(p.name for p in folder.iterdir())


def _initializers(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))  # reads NAME.onnx.data beside it too
    return [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]


def _copies(arrays: list[np.ndarray], weight: np.ndarray) -> tuple[int, int]:
    """How many initializers hold ``weight`` as is, and how many hold its transpose."""
    same = sum(a.shape == weight.shape and np.array_equal(a, weight) for a in arrays)
    flipped = sum(a.shape == weight.T.shape and np.array_equal(a, weight.T) for a in arrays)
    return same, flipped


def _assert_parity(report: dict, output: str) -> None:
    parity = report["parity"]
    assert parity["passed"] and parity["output"] == output
    shapes = [(r["batch"], r["seq"]) for r in parity["shapes"]]
    assert len(shapes) >= 2 and tuple(EXAMPLE_SHAPE) not in shapes
    assert len({b for b, _ in shapes}) >= 2 and len({s for _, s in shapes}) >= 2
    for r in parity["shapes"]:
        assert r["shape"][:2] == [r["batch"], r["seq"]]
        assert 0 <= r["max_abs_diff"] <= r["tolerance"] <= 1e-4 * max(1.0, r["reference_max_abs"]) + 1e-12
    assert parity["max_abs_diff"] == max(r["max_abs_diff"] for r in parity["shapes"])
    lat = report["latency"]
    assert lat["onnxruntime_ms"] > 0 and lat["pytorch_ms"] > 0 and lat["ratio"] > 0


# -- GPT-2, grown, with external data -------------------------------------------------------


def test_grown_gpt2_exports_with_external_data(gpt2_small, models, tmp_path, monkeypatch):
    grown = models / "gpt2-grown"
    convert(gpt2_small, grown, GrowthSpec(width="2x", depth="2x"), progress=False)
    # Far below any real model: forces the weights out of the .onnx file.
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 1024)
    dest = tmp_path / "grown.onnx"
    report = export_onnx(grown, dest)

    assert report["output"]["external_data"] is True
    assert [f["name"] for f in report["output"]["files"]] == ["grown.onnx", "grown.onnx.data"]
    assert _only(tmp_path) == ["grown.onnx", "grown.onnx.data"]  # no staging folder left
    assert report["output"]["bytes"] == dest.stat().st_size + data_path(dest).stat().st_size
    assert all(len(f["sha256"]) == 64 for f in report["output"]["files"])
    assert report["opset"] == 18 and report["inputs"] == ["input_ids", "attention_mask"]
    assert report["outputs"] == ["logits"] and report["source"]["architecture"] == "gpt2"
    _assert_parity(report, "logits")

    # The graph is dynamic in batch and sequence, with the names we gave.
    model = onnx.load(str(dest), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {o.version for o in model.opset_import if o.domain == ""} == {18}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)

    # The tied embedding/head is stored once, neither duplicated nor kept transposed too.
    wte = load_file(grown / "model.safetensors")["transformer.wte.weight"].float().numpy()
    assert _copies(_initializers(dest), wte) == (1, 0)

    # onnxruntime loads the pair from the destination and runs a shape of its own.
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 96, size=(4, 13), dtype=np.int64)
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert logits.shape == (4, 13, 96) and np.isfinite(logits).all()


# -- BERT through the CLI ---------------------------------------------------------------------


def test_bert_exports_through_the_cli(models, tmp_path):
    src = tiny.bert(models / "bert", layers=1)
    dest, report_path = tmp_path / "bert.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(dest), "--json", "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(report_path.read_text())
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["output"]["external_data"] is False and not data_path(dest).exists()
    _assert_parity(report, "logits")
    # The MLM decoder is tied to the word embedding; the exporter's constant folding
    # leaves a transposed copy for the head, which the export undoes.
    emb = load_file(src / "model.safetensors")["bert.embeddings.word_embeddings.weight"].numpy()
    assert _copies(_initializers(dest), emb) == (1, 0)
    assert report["initializers"]["unfolded_transposes"] >= 1
    # No Python stacks (absolute paths of this machine) in the graph: only the exporter records them.
    graph = dest.read_bytes()
    assert b"stack_trace" not in graph and b"site-packages" not in graph and str(Path.cwd()).encode() not in graph

    # Again without --json: the human summary, and the destination now exists.
    again = CliRunner().invoke(main, ["export", str(src), "-o", str(dest), "--no-check"])
    assert again.exit_code == OutputError.exit_code
    assert "exists; pass --overwrite" in again.stderr and "Traceback" not in again.output


# -- Llama (GQA), grown, through convert --onnx -----------------------------------------------


def test_convert_onnx_grows_and_exports_llama_gqa(models, tmp_path):
    src = tiny.llama(models / "llama", heads=4, kv_heads=2, layers=1, tie=True)
    grown, dest = tmp_path / "grown", tmp_path / "grown.onnx"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(grown), "--width", "2x",
                                       "--depth", "2x", "-q", "--onnx", str(dest)])
    assert result.exit_code == 0, result.output
    config = json.loads((grown / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("parity:"))
    diff = float(re.search(r"max \|Δ logits\| = (\S+)", line).group(1))
    assert diff <= 1e-4 and "3×11" in line and "1×17" in line
    assert dest.is_file() and not data_path(dest).exists()
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]


# -- failures leave nothing -------------------------------------------------------------------


def test_a_mismatch_fails_and_writes_nothing(gpt2_small, tmp_path):
    # The parity check compares against a module with one weight changed: the file is
    # right, the reference is wrong, and the check must notice.
    with open_source(gpt2_small) as source:
        broken = load_module(source)
    with torch.no_grad():
        broken.transformer.ln_f.bias += 0.5
    dest = tmp_path / "out" / "model.onnx"
    dest.parent.mkdir()
    with pytest.raises(VerificationError) as err:
        export_onnx(gpt2_small, dest, reference=broken)
    message = str(err.value)
    assert "differs from PyTorch by" in message and "tolerance" in message and "\n" not in message
    assert err.value.exit_code == 4
    assert _only(dest.parent) == []


def test_missing_onnxruntime_is_a_usage_error(gpt2_small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(UsageError, match=re.escape(MISSING_EXTRA)):
        export_onnx(gpt2_small, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["export", str(gpt2_small), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == UsageError.exit_code
    assert MISSING_EXTRA in result.stderr
    # convert --onnx checks before growing, so nothing is grown either.
    result = CliRunner().invoke(main, ["convert", str(gpt2_small), "-o", str(tmp_path / "g"),
                                       "--width", "2x", "--onnx", str(tmp_path / "g.onnx")])
    assert result.exit_code == UsageError.exit_code
    assert _only(tmp_path) == []


def test_existing_destinations_are_refused(gpt2_small, tmp_path):
    dest = tmp_path / "m.onnx"
    data_path(dest).write_bytes(b"old")  # a stale data file alone is part of the artefact
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        export_onnx(gpt2_small, dest)
    assert data_path(dest).read_bytes() == b"old" and not dest.exists()
    with pytest.raises(OutputError, match="is a folder"):
        export_onnx(gpt2_small, tmp_path)


def test_unusable_onnx_names_are_one_line_before_any_work(gpt2_small, tmp_path, monkeypatch):
    """Found by the command-line fuzzer: an empty --onnx and a name too long for the file
    system were internal errors (exit 1)."""
    monkeypatch.chdir(tmp_path)
    for onnx in ("", "x" * 300 + ".onnx"):
        result = CliRunner().invoke(main, ["convert", str(gpt2_small), "-o", str(tmp_path / "out"), "--width", "2x",
                                           "--onnx", onnx])
        assert result.exit_code == OutputError.exit_code, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_old_opsets_are_refused_up_front(gpt2_small, tmp_path):
    # The exporter would quietly write opset 18 anyway.
    result = CliRunner().invoke(main, ["export", str(gpt2_small), "-o", str(tmp_path / "m.onnx"), "--opset", "17"])
    assert result.exit_code == UsageError.exit_code
    assert "--opset must be a whole number in [18, 25], got 17" in result.stderr
    assert _only(tmp_path) == []


def test_exporter_failures_are_one_line(capfd):
    class DataDependent(torch.nn.Module):
        def forward(self, *inputs):
            if inputs[0].sum() > 0:  # control flow on values: torch.export cannot trace it
                return inputs[0].float()
            return -inputs[0].float()

    example = {"input_ids": torch.ones(2, 8, dtype=torch.int64)}
    with pytest.raises(ModelgrowError) as err:
        export_mod._run_exporter(DataDependent(), example, ["input_ids"], "logits", 18)
    message = str(err.value)
    assert message.startswith("ONNX export failed: ") and "\n" not in message and "\x1b" not in message
    assert "data-dependent" in message.lower() or "guard" in message.lower(), message
    assert len(message) < 600
    out, err = capfd.readouterr()  # torch.export prints partial graphs on failure: kept quiet
    assert "GraphModule" not in out + err and "def forward" not in out + err


def test_summary_of_an_unchecked_external_export():
    report = {"parity": {"skipped": "--no-check"}, "opset": 18, "inputs": ["input_ids"], "outputs": ["logits"],
              "output": {"path": "m.onnx", "external_data": True, "bytes": 3000,
                         "files": [{"name": "m.onnx", "bytes": 1000}, {"name": "m.onnx.data", "bytes": 2000}]}}
    lines = export_mod.summary_lines(report)
    assert lines[0] == "parity: skipped (--no-check)"
    assert "m.onnx + m.onnx.data" in lines[-1] and "keep the two files together" in lines[-1]
