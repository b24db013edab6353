"""No output path touches an input (issue #18): the cases a pipeline hit, refused before any
work with exit 5 and the input intact. The table runs the command in this process (click's
runner, in the project folder); the current-folder case and the report case run a real
`python -m modelgrow` process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def modelgrow(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODELGROW_PLUGINS": ""}
    return subprocess.run([sys.executable, "-m", "modelgrow", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def in_process(*args, cwd: Path):
    """The command run by click's test runner from ``cwd``: what a process would print and return."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from modelgrow.cli import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(here)
    return SimpleNamespace(returncode=result.exit_code, stderr=result.stderr, exception=result.exception)


@pytest.fixture
def project(tmp_path):
    """PROJ/src (a tiny GPT-2 with a tokenizer-like file), PROJ/ids.npy, PROJ/notes.txt."""
    proj = tmp_path / "proj"
    src = tiny.gpt2(proj / "src")
    (src / "special_tokens_map.json").write_text("{}")
    np.save(proj / "ids.npy", np.arange(400, dtype=np.int32) % 96)
    (proj / "notes.txt").write_text("mine\n")
    return proj


CASES = {
    "report over the source weights (dry run)": (
        ["convert", "{src}", "--dry-run", "--width", "2x", "--report", "{src}/model.safetensors"], "is a source weights file"),
    "onnx over the source weights": (
        ["convert", "{src}", "-o", "{proj}/out", "--width", "2x", "--onnx", "{src}/model.safetensors", "--overwrite"],
        "is a source weights file"),
    "output folder holding the source": (
        ["convert", "{src}", "-o", "{proj}", "--width", "2x", "--overwrite"], "holds the source checkpoint"),
    "output inside the source folder": (
        ["convert", "{src}", "-o", "{src}/grown", "--width", "2x"], "lies inside the source checkpoint"),
    "report inside the output folder": (
        ["convert", "{src}", "-o", "{proj}/out", "--width", "2x", "--report", "{proj}/out/config.json"],
        "lies inside the output folder"),
    "train report over the source config": (
        ["train", "{src}", "--data", "{proj}/ids.npy", "--steps", "2", "--seq-len", "8", "-o", "{proj}/t",
         "--report", "{src}/config.json"], "is the source config"),
    "train plot over the data": (
        ["train", "{src}", "--data", "{proj}/ids.npy", "--steps", "2", "--seq-len", "8", "-o", "{proj}/t",
         "--plot", "{proj}/ids.npy"], "is a data file"),
    "report over a file modelgrow did not write": (
        ["convert", "{src}", "--dry-run", "--width", "2x", "--report", "{proj}/notes.txt"], "modelgrow did not write it"),
}


@pytest.mark.parametrize("args,message", list(CASES.values()), ids=list(CASES))
def test_outputs_never_touch_inputs(project, args, message):
    before = tree(project)
    result = in_process(*[a.format(src=project / "src", proj=project) for a in args], cwd=project)
    assert result.returncode == 5, (result.stderr, result.exception)
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert tree(project) == before  # nothing written, nothing removed


def test_the_current_folder_is_refused_when_it_holds_the_source(project):
    result = modelgrow("convert", "src", "-o", project.resolve(), "--width", "2x", "--overwrite", cwd=project)
    assert result.returncode == 5 and "holds the source checkpoint" in result.stderr, result.stderr
    assert (project / "notes.txt").read_text() == "mine\n" and (project / "src" / "model.safetensors").is_file()


def test_a_report_modelgrow_wrote_is_replaced(project, tmp_path):
    report = tmp_path / "r.json"
    for width in ("2x", "3x"):
        result = modelgrow("convert", project / "src", "--dry-run", "--width", width, "--report", report, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["plan"]["target"]["residual"] == 96


def test_a_report_failing_after_the_commit_says_the_checkpoint_was_written(project, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from modelgrow import grow
    from modelgrow.cli import main
    from modelgrow.errors import OutputError

    def full_disk(report, path):
        raise OutputError("no space left writing the report", path=path)

    monkeypatch.setattr(grow, "write_report", full_disk)
    out, report = tmp_path / "out", tmp_path / "r.json"
    result = CliRunner().invoke(main, ["convert", str(project / "src"), "-o", str(out), "--width", "2x",
                                       "--report", str(report)])
    assert result.exit_code == 5 and f"{out} was written, but the report could not be" in result.output
    assert (out / "model.safetensors").is_file() and not report.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
