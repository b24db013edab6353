"""The public Python API (modelgrow.api): the README's example runs as written, results
are typed and serialise to the report schemas, options are checked like the flags."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import modelgrow
import tiny
from modelgrow.demo import demo_checkpoint
from modelgrow.errors import UsageError, VerificationError

ROOT = Path(__file__).resolve().parents[1]


def schema(name: str) -> dict:
    return json.loads((ROOT / "schemas" / name).read_text())


def test_the_readme_example_runs(tmp_path, monkeypatch, one_thread):
    block = re.search(r"## Python API.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own documentation
    report = json.loads((tmp_path / "train-report.json").read_text())
    jsonschema.validate(report, schema("train-report.schema.json"))
    assert (tmp_path / "trained.onnx").is_file() and (tmp_path / "grown" / "config.json").is_file()


def test_convert_result_is_typed_and_matches_the_report_schema(tmp_path):
    result = modelgrow.convert(demo_checkpoint(), tmp_path / "g", width="2x", depth=3, seed=7, noise_mode="plain")
    assert isinstance(result, modelgrow.api.ConvertResult)
    assert result.exact is False and result.verified is False  # plain noise: inexact by design, checked anyway
    assert result.output == tmp_path / "g" and result.params[1] > result.params[0]
    assert result["operator"]["options"] == {"seed": 7, "noise": 0.01, "noise_mode": "plain"}
    jsonschema.validate(result.to_dict(), schema("report.schema.json"))
    assert json.loads(result.to_json()) == result.to_dict()


def test_dry_run_writes_nothing_and_needs_no_destination(tmp_path):
    result = modelgrow.convert(demo_checkpoint(), width="1.5x", dry_run=True)
    assert result.output is None and result["dry_run"] and result.exact
    with pytest.raises(UsageError, match="give -o/--output"):
        modelgrow.convert(demo_checkpoint(), width="2x")


@pytest.mark.parametrize("kwargs,message", [
    ({"width": "2x", "max_shard_sizes": "1GB"}, "--max-shard-sizes: not an option of the copy operator"),
    ({"width": "2x", "noise": -1}, "--noise must be a number >= 0, got -1"),
    ({"width": "2x", "operator": "ligo", "fit": {"steps": -2}}, "--fit-steps must be a whole number >= 0, got -2"),
])
def test_options_are_checked_like_flags(tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        modelgrow.convert(demo_checkpoint(), tmp_path / "g", **kwargs)
    assert not (tmp_path / "g").exists()


def test_convert_then_export_in_one_call(tmp_path, one_thread):
    result = modelgrow.convert(demo_checkpoint(), tmp_path / "g", width="2x", onnx=tmp_path / "g.onnx")
    assert result.onnx is not None and result.onnx.parity_passed and result.onnx.output == tmp_path / "g.onnx"


def test_verify_can_raise(tmp_path):
    src = tiny.gpt2(tmp_path / "a")
    other = tiny.gpt2(tmp_path / "b", seed=1)
    result = modelgrow.verify(src, other)
    assert not result.passed and json.loads(result.to_json())["max_abs_diff"] > 0
    with pytest.raises(VerificationError, match="outputs differ"):
        modelgrow.verify(src, other, check=True)
    with pytest.raises(UsageError, match="--batch must be a whole number in \\[1, 1024\\], got 0"):
        modelgrow.verify(src, other, batch=0)


def test_importing_modelgrow_loads_no_torch():
    code = "import sys, modelgrow; assert 'torch' not in sys.modules; print(sorted(modelgrow.API))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "convert" in out and "export" in out


def test_schemas_are_generated_from_the_options():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "write_schemas.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
