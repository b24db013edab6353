"""Clean pipeline output (issue #19): one JSON document on stdout with --json or --report -,
reports into /dev/stdout and FIFOs without renaming over them, provenance made of content
(the same bytes whatever the source path's spelling), a torch-free `--help`, and option
values refused as usage errors (exit 2, one line)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

import modelgrow
import tiny
from modelgrow.checkpoint.atomic import write_file_atomically
from modelgrow.checkpoint.streams import stream_kind
from modelgrow.cli import main
from modelgrow.errors import OutputError

FAST = ["--width", "2x", "--no-verify"]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path):
    return tiny.gpt2(tmp_path / "src")


# -- --help and --version without torch --------------------------------------------------------


def test_help_and_version_import_no_torch():
    code = ("import sys\n"
            "from modelgrow.cli import main\n"
            "for args in (['--help'], ['--version']):\n"
            "    try:\n"
            "        main(args, prog_name='modelgrow')\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, done.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors', 'numpy'))\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "convert" in out.stdout and "modelgrow, version" in out.stdout


# -- option values ---------------------------------------------------------------------------


@pytest.mark.parametrize("args,flag", [
    (["verify", "{src}", "{src}", "--batch", "0"], "--batch"),
    (["verify", "{src}", "{src}", "--batch", "1000000000"], "--batch"),
    (["verify", "{src}", "{src}", "--seq", "-3"], "--seq"),
    (["convert", "{src}", "-o", "{out}", "--width", "2x", "--max-shard-size", "0"], "--max-shard-size"),
    (["convert", "{src}", "-o", "{out}", "--width", "2x", "--max-shard-size", "lots"], "--max-shard-size"),
    (["export", "{src}", "-o", "{out}.onnx", "--opset", "99"], "--opset"),
    (["export", "{src}", "-o", "{out}.onnx", "--opset", "17"], "--opset"),
])
def test_out_of_range_option_values_are_usage_errors(src, tmp_path, args, flag):
    result = CliRunner().invoke(main, [a.format(src=src, out=tmp_path / "out") for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} must be "), result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.onnx").exists()


# -- JSON on stdout ----------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--report", "-"], ["--json"], ["--json", "--report", "-"]])
def test_convert_json_goes_to_stdout_and_people_to_stderr(src, tmp_path, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", str(src), "-o", "out", "--width", "2x", *flags])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # exactly one JSON document
    assert report["command"] == "convert" and report["verify"]["passed"]
    assert "function-preserving: yes" in result.stderr and "wrote out" in result.stderr
    assert not (tmp_path / "-").exists()


def test_convert_dry_run_json_and_a_report_file_besides(src, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(src), "--width", "2x", "--dry-run", "--json",
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((tmp_path / "r.json").read_text())


def test_train_and_export_json(src, tmp_path, one_thread):
    np.save(tmp_path / "ids.npy", np.arange(400, dtype=np.int32) % 96)
    trained = CliRunner().invoke(main, ["train", str(src), "-o", str(tmp_path / "t"), "--data", str(tmp_path / "ids.npy"),
                                        "--steps", "2", "--seq-len", "8", "--report", "-"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["steps"] == 2 and "trained 2 steps" in trained.stderr
    exported = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "m.onnx"), "--no-check", "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["opset"] == 18 and "wrote" in exported.stderr


def test_report_into_dev_stdout_of_a_real_process(src, tmp_path):
    env = {**os.environ, "MODELGROW_PLUGINS": ""}
    run = subprocess.run([sys.executable, "-m", "modelgrow", "convert", str(src), "-o", str(tmp_path / "out"), *FAST,
                          "--report", "/dev/stdout"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["output"]["path"] == str(tmp_path / "out")
    assert "wrote" in run.stderr and os.path.islink("/dev/stdout")  # written into, not renamed over


# -- special report paths ----------------------------------------------------------------------


def test_a_fifo_report_is_written_into(src, tmp_path):
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    modelgrow.convert(src, tmp_path / "out", width="2x", verify=False, report=fifo)
    reader.join(timeout=60)
    assert json.loads(got[0])["command"] == "convert"
    assert stream_kind(fifo) == "device" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_socket_report_or_a_stream_output_is_refused(src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short socket path
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s.sock")
        result = CliRunner().invoke(main, ["convert", str(src), "-o", "out", *FAST, "--report", "s.sock"])
    assert result.exit_code == 2 and "is a socket" in result.output and result.output.count("\n") == 1
    result = CliRunner().invoke(main, ["convert", str(src), "-o", "-", *FAST])
    assert result.exit_code == 2 and "names a stream" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "-").exists()


def test_atomic_writes_never_rename_over_a_stream(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/stdout"), Path("-")):
        with pytest.raises(OutputError, match="names a stream or device"):
            write_file_atomically(path, "{}", what="the report")
    assert stream_kind(fifo) == "device" and os.path.islink("/dev/stdout")


# -- provenance made of content ----------------------------------------------------------------


def test_any_spelling_of_the_source_gives_byte_identical_output(src, tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    spellings = ["src", str(src), "./x/../src", "link"]
    reports = []
    for i, spelling in enumerate(spellings):
        result = modelgrow.convert(spelling, f"out{i}", width="2x", depth="2x", max_shard_size="40KB", verify=False,
                                   report=f"r{i}.json")
        reports.append(result.report)
    outputs = [digests(tmp_path / f"out{i}") for i in range(len(spellings))]
    assert len(outputs[0]) > 3 and ".modelgrow" in outputs[0]  # several shards, an index, the marker
    assert all(o == outputs[0] for o in outputs[1:])
    # No local path in what is published; the content digest links shards to the report.
    digest = reports[0]["source"]["sha256"]
    assert all(r["source"]["sha256"] == digest for r in reports)
    for name in outputs[0]:
        assert str(tmp_path).encode() not in (tmp_path / "out0" / name).read_bytes(), name
    shard = next(name for name in outputs[0] if name.endswith(".safetensors"))
    with safe_open(tmp_path / "out0" / shard, "pt") as f:
        assert f.metadata()["modelgrow.source_sha256"] == digest and "modelgrow.source" not in f.metadata()
    assert json.loads((tmp_path / "out0" / ".modelgrow").read_text())["metadata"]["modelgrow.source_sha256"] == digest


def test_trained_output_does_not_depend_on_the_source_spelling(src, tmp_path, monkeypatch, one_thread):
    np.save(tmp_path / "ids.npy", np.arange(400, dtype=np.int32) % 96)
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    options = dict(data=["ids.npy"], steps=2, seq_len=8, device="cpu")
    for out, spelling in (("a", str(src)), ("b", "link")):
        modelgrow.train(spelling, out, options)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        assert str(tmp_path) not in json.dumps(f.metadata()) and "modelgrow.source_sha256" in f.metadata()
