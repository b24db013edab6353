"""Nothing lost (issue #18), checkpoint layer: --overwrite replaces only modelgrow's own
output, a source pinned while it is read, staging clean-up by lock, a file set published
as one.

Real processes where the process boundary is the point: the CLI's exit code, a source
changed by another process during a convert, a live writer in what looks like another
PID namespace, kills between the renames of a file set. Children are synchronised by
pipes (they stop at a chosen point and wait), not by sleeping.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from modelgrow.checkpoint import CheckpointWriter, MARKER_NAME, check_replaceable, open_checkpoint, publish_file_set
from modelgrow.checkpoint.atomic import remove_stale_temps
from modelgrow.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_OUTPUT, CheckpointError, OutputError

GROW = ["--width", "2x", "--depth", "2x"]
CHANGED = "the source changed while it was read"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("MODELGROW_DEBUG", None)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny GPT-2 in several shards, and a same-shaped one with other values."""
    root = tmp_path_factory.mktemp("sources")
    made = {}
    for name, seed in (("src", 0), ("mutant", 1)):
        plain = tiny.gpt2(root / f"{name}-plain", seed=seed)
        with open_checkpoint(plain) as ckpt, CheckpointWriter(root / name, max_shard_bytes=12_000) as writer:
            for tensor in ckpt.names():
                writer.add(tensor, ckpt.get(tensor))
            writer.copy_file(plain / "config.json")
            writer.commit()
        made[name] = root / name
    return made


def tree(folder: Path) -> dict[str, str] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".modelgrow-" in p.name)


def write(dest: Path, **kwargs) -> None:
    with CheckpointWriter(dest, **kwargs) as writer:
        writer.add("w", torch.ones(3))
        writer.write_json("config.json", {"model_type": "gpt2"})
        writer.commit()


# -- --overwrite replaces only what modelgrow wrote ------------------------------------------


def test_cli_overwrite_refuses_foreign_files_and_replaces_own_output(tmp_path, sharded):
    from click.testing import CliRunner

    from modelgrow.cli import main

    dest = tmp_path / "important"
    (dest / "sub").mkdir(parents=True)
    (dest / "thesis.txt").write_text("years of work")
    (dest / "sub" / "data.csv").write_text("1,2,3")
    before = tree(dest)
    proc = subprocess.run([sys.executable, "-m", "modelgrow", "convert", str(sharded["src"]), *GROW, "-o", str(dest),
                           "--overwrite", "-q", "--no-verify"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == EXIT_OUTPUT, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(dest) in line and "thesis.txt" in line and "sub/" in line and "modelgrow did not write" in line
    assert tree(dest) == before and leftovers(tmp_path) == []

    # modelgrow's own earlier output is replaced; once a user adds a file, it is not.
    args = ["convert", str(sharded["src"]), *GROW, "-q", "--no-verify", "-o"]
    out = tmp_path / "out"
    assert CliRunner().invoke(main, [*args, str(out)]).exit_code == EXIT_OK
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["written_by"] == "modelgrow" and marker["files"] == sorted(tree(out).keys() - {MARKER_NAME})
    result = CliRunner().invoke(main, [*args, str(out), "--overwrite"])
    assert result.exit_code == EXIT_OK, result.output
    grown = tree(out)
    (out / "notes.md").write_text("my evaluation")
    result = CliRunner().invoke(main, [*args, str(out), "--overwrite"])
    assert result.exit_code == EXIT_OUTPUT and "notes.md" in result.stderr and "model.safetensors" not in result.stderr
    assert tree(out) == {**grown, "notes.md": hashlib.sha256(b"my evaluation").hexdigest()}
    assert leftovers(tmp_path) == []

    import transformers  # the marker does not disturb loading

    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert model.config.n_embd == 64


def test_overwrite_accepts_absent_empty_and_own_folders_only(tmp_path):
    dest = tmp_path / "out"
    write(dest, overwrite=True)  # absent
    shutil.rmtree(dest)
    dest.mkdir()
    write(dest, overwrite=True)  # empty
    write(dest, overwrite=True, max_shard_bytes=4)  # modelgrow's own: replaced
    assert json.loads((dest / MARKER_NAME).read_text())["files"] == ["config.json", "model.safetensors"]

    # Without a (valid) marker, every file counts as foreign: an older modelgrow's output too.
    (dest / MARKER_NAME).unlink()
    with pytest.raises(OutputError, match=r"did not write: config.json, model.safetensors \(it has no valid") as err:
        write(dest, overwrite=True)
    assert err.value.exit_code == EXIT_OUTPUT
    (dest / MARKER_NAME).write_text('{"files": "config.json"}')
    with pytest.raises(OutputError, match=r"did not write: \.modelgrow, config.json"):
        check_replaceable(dest)

    # A file or folder added under one of modelgrow's own subfolders is found too.
    write(tmp_path / "step", overwrite=False)
    with CheckpointWriter(tmp_path / "step", overwrite=True) as writer:
        writer.add("w", torch.ones(1))
        (writer.finish() / "training_state").mkdir()
        (writer.finish() / "training_state" / "state.json").write_text("{}")
        writer.commit()
    check_replaceable(tmp_path / "step")
    (tmp_path / "step" / "training_state" / "mine.txt").write_text("x")
    (tmp_path / "step" / "empty").mkdir()
    with pytest.raises(OutputError, match=r"did not write: empty/, training_state/mine.txt; remove them"):
        write(tmp_path / "step", overwrite=True)

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "step")
    with pytest.raises(OutputError, match="is a symbolic link"):
        write(link, overwrite=True)
    assert leftovers(tmp_path) == []


def test_files_added_while_writing_are_refused_at_commit(tmp_path):
    dest = tmp_path / "out"
    write(dest)
    with pytest.raises(OutputError, match="did not write: late.txt"):
        with CheckpointWriter(dest, overwrite=True) as writer:
            writer.add("w", torch.zeros(3))
            (dest / "late.txt").write_text("written meanwhile")
            writer.commit()
    assert (dest / "late.txt").exists() and (dest / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_marker_is_deterministic(tmp_path):
    write(tmp_path / "a", metadata={"b": "2", "a": "1"})
    write(tmp_path / "b", metadata={"a": "1", "b": "2"})
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


# -- the source pinned while it is read ----------------------------------------------------------


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize("change", ["rewrite", "replace", "truncate", "remove", "config"])
def test_verify_unchanged_names_the_changed_file(tmp_path, sharded, change):
    src = tmp_path / "src"
    shutil.copytree(sharded["src"], src)
    with open_checkpoint(src) as ckpt:
        names = ckpt.names()
        first = ckpt.get(names[0])  # its shard is open from now on
        ckpt.verify_unchanged()
        shard = ckpt.info(names[0]).file
        mutant = sharded["mutant"] / shard.name
        if change == "rewrite":  # same size, same inode
            with open(shard, "r+b") as f:
                f.write(mutant.read_bytes())
        elif change == "replace":  # another checkpoint's file renamed over it
            shutil.copyfile(mutant, tmp_path / "new")
            os.replace(tmp_path / "new", shard)
            assert torch.equal(ckpt.get(names[0]), first)  # the open descriptor reads the pinned file
        elif change == "truncate":
            os.truncate(shard, shard.stat().st_size - 100)
        elif change == "remove":
            shard.unlink()
        else:
            shard = src / "config.json"
            shard.write_text(shard.read_text().replace('"n_layer": 2', '"n_layer": 3'))
        with pytest.raises(CheckpointError, match=CHANGED) as err:
            ckpt.verify_unchanged()
        assert err.value.exit_code == EXIT_BAD_INPUT and str(shard) in str(err.value)
        assert "\n" not in str(err.value)


def test_truncated_while_read_is_an_error_not_sigbus(tmp_path, sharded):
    src = tmp_path / "src"
    shutil.copytree(sharded["src"], src)
    with open_checkpoint(src) as ckpt:
        last = max(ckpt.names(), key=lambda n: (ckpt.info(n).file.name, ckpt.info(n).end))
        ckpt.get(ckpt.names()[0])
        os.truncate(ckpt.info(last).file, 100)
        with pytest.raises(CheckpointError, match=f"{CHANGED} .the file ends inside tensor '{last}'"):
            ckpt.get(last)


MUTATION_HELPER = r"""
import hashlib, inspect, json, os, random, shutil, sys
from pathlib import Path
cfg = json.loads(sys.argv[1])
import modelgrow.cli, modelgrow.grow, modelgrow.plugins
import transformers.models.gpt2.configuration_gpt2
modelgrow.plugins.load_plugins()
from modelgrow.cli import main
from modelgrow.checkpoint import Checkpoint, CheckpointWriter
# No verification pass: the trials are about the read (--no-verify is passed).

src, mutant, dest = Path(cfg["src"]), Path(cfg["mutant"]), Path(cfg["dest"])
pristine = src.with_name("pristine")
shutil.copytree(src, pristine)
argv = ["convert", str(src), "-o", str(dest), "-q", "--no-verify", *cfg["args"]]
# Until grow.py calls verify_unchanged() after the last read (writer.finish()) and before
# commit, the child does it there itself.
SHIM = "verify_unchanged" not in inspect.getsource(modelgrow.grow)
rng = random.Random(cfg["seed"])

def tree(folder):
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else None
    return None if files is None else {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

def child(stop, notify, wait):
    opened, gets = [], [0]
    real_init, real_get, real_finish, real_commit = (Checkpoint.__init__, Checkpoint.get,
                                                     CheckpointWriter.finish, CheckpointWriter.commit)
    def pause(point):
        if point == stop:
            os.write(notify, b"x")
            os.read(wait, 1)  # until the parent has changed the source
    def init(self, **kw):
        real_init(self, **kw)
        opened.append(self)
    def get(self, name, rows=None):
        gets[0] += 1
        pause(f"get{gets[0]}")
        return real_get(self, name, rows)
    def finish(self):
        pause("finish")
        staged = real_finish(self)
        if SHIM:
            for ckpt in opened:
                ckpt.verify_unchanged()
        return staged
    def commit(self):
        if SHIM:
            for ckpt in opened:
                ckpt.verify_unchanged()
        return real_commit(self)
    Checkpoint.__init__, Checkpoint.get, CheckpointWriter.finish, CheckpointWriter.commit = init, get, finish, commit
    err = os.open(cfg["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(err, 2)
    code = 98
    try:
        main(argv, prog_name="modelgrow")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        if stop == "count":
            os.write(notify, str(gets[0]).encode())
        os._exit(code)

def run(stop, mutate=None):
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r1); os.close(w2)
        child(stop, w1, r2)
    os.close(w1); os.close(r2)
    got = os.read(r1, 64)
    if got and mutate:
        mutate()
        os.write(w2, b"g")
    _, status = os.waitpid(pid, 0)
    os.close(r1); os.close(w2)
    return got, status

def restore():
    shutil.rmtree(src, ignore_errors=True)
    if src.with_name("aside").exists():
        shutil.rmtree(src.with_name("aside"))
    shutil.copytree(pristine, src)
    if dest.exists():
        shutil.rmtree(dest)

got, status = run("count")
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, open(cfg["stderr"]).read()
out = {"gets": int(got), "reference": tree(dest), "shim": SHIM, "trials": []}
shards = sorted(p.name for p in src.glob("*.safetensors"))
for i in range(cfg["trials"]):
    restore()
    mode = ["rewrite", "replace", "truncate", "swap"][i % 4]
    stop = "finish" if i % 3 == 2 else f"get{rng.randint(1, out['gets'] - 1)}"
    shard = src / rng.choice(shards)
    size = shard.stat().st_size
    cut = rng.randint(0, size - 1)
    def mutate():
        if mode == "rewrite":
            with open(shard, "r+b") as f:
                f.write((mutant / shard.name).read_bytes())
        elif mode == "replace":
            shutil.copyfile(mutant / shard.name, src / "incoming")
            os.replace(src / "incoming", shard)
        elif mode == "truncate":
            os.truncate(shard, cut)
        else:  # another run replaced the whole source folder
            os.rename(src, src.with_name("aside"))
            shutil.copytree(mutant, src)
    got, status = run(stop, mutate)
    out["trials"].append({
        "i": i, "mode": mode, "stop": stop, "shard": shard.name, "paused": bool(got),
        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "stderr": open(cfg["stderr"]).read(), "dest": tree(dest),
        "leftovers": sorted(n for n in os.listdir(dest.parent) if ".modelgrow-" in n),
    })
print(json.dumps(out))
"""


def test_source_changed_during_convert_fails_with_nothing_written(tmp_path, sharded):
    src = tmp_path / "src"
    shutil.copytree(sharded["src"], src)
    cfg = {"src": str(src), "mutant": str(sharded["mutant"]), "dest": str(tmp_path / "out"), "args": GROW,
           "stderr": str(tmp_path / "stderr.txt"), "trials": 12, "seed": 0}
    helper = subprocess.run([sys.executable, "-c", MUTATION_HELPER, json.dumps(cfg)], capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert helper.returncode == 0, helper.stderr[-3000:]
    out = json.loads(helper.stdout)
    assert out["gets"] > 10 and out["reference"]
    modes = set()
    for t in out["trials"]:
        assert t["paused"], t  # the change happened mid-read, or after the last read
        assert t["signal"] is None, t  # no SIGBUS
        if t["code"] == EXIT_OK:  # only the complete right output would do
            assert t["dest"] == out["reference"], t
            continue
        assert t["code"] == EXIT_BAD_INPUT, t
        lines = t["stderr"].strip().split("\n")
        assert len(lines) == 1 and CHANGED in lines[0] and str(src) in lines[0], t
        assert t["dest"] is None and t["leftovers"] == [], t
        modes.add(t["mode"])
    # Every trial changes the source before the commit, so every one must fail.
    assert [t["i"] for t in out["trials"] if t["code"] != EXIT_BAD_INPUT] == []
    assert modes == {"rewrite", "replace", "truncate", "swap"} and len(out["trials"]) >= 12


# -- staging clean-up by lock ----------------------------------------------------------------------


LIVE_WRITER = r"""
import os, subprocess, sys
from pathlib import Path
import torch
dead = int(sys.argv[2])
os.getpid = lambda: dead  # names as a writer in another PID namespace would write them
from modelgrow.checkpoint import CheckpointWriter
from modelgrow.checkpoint.atomic import write_file_atomically
dest = Path(sys.argv[1])
with CheckpointWriter(dest) as writer:
    writer.add("w", torch.ones(3))
    def content(tmp):
        tmp.write_bytes(b"report")
        print(writer.finish(), tmp, flush=True)
        sys.stdin.readline()
    write_file_atomically(dest.with_name("report.json"), content)
    writer.commit()
"""


def test_live_writer_survives_clean_up_from_another_process(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dest, report = tmp_path / "out", tmp_path / "report.json"
    children = []
    for _ in range(2):
        children.append(subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(dest), dead.stdout.strip()],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV))
    live, killed = children
    staged = [Path(p) for child in children for p in child.stdout.readline().split()]
    assert len(staged) == 4 and all(f"-{dead.stdout.strip()}-" in p.name and p.exists() for p in staged)

    # Their pid is dead here: a pid check would delete both. The locks keep them.
    remove_stale_temps(dest)
    remove_stale_temps(report)
    assert all(p.exists() for p in staged)

    killed.kill()
    killed.wait()
    remove_stale_temps(dest)
    remove_stale_temps(report)
    assert [p.exists() for p in staged] == [True, True, False, False]

    live.communicate("\n", timeout=120)
    assert live.returncode == 0
    assert tree(dest)["model.safetensors"] and report.read_bytes() == b"report"
    assert leftovers(tmp_path) == []


# -- a file set published as one ---------------------------------------------------------------------


def make_set(folder: Path, tag: str, data_name: str) -> tuple[Path, Path, bytes]:
    data = (tag * 1000).encode()
    graph = json.dumps({"data": data_name, "sha256": hashlib.sha256(data).hexdigest()}).encode()
    folder.mkdir(exist_ok=True)
    (folder / data_name).write_bytes(data)
    (folder / "m.onnx").write_bytes(graph)
    return folder / "m.onnx", folder / data_name, graph


def consistent_set(folder: Path) -> tuple[bytes, str] | None:
    """(graph bytes, data name) if the graph names a data file holding what it says, else None."""
    graph = (folder / "m.onnx").read_bytes()
    named = json.loads(graph)
    data = folder / named["data"]
    assert data.exists() and hashlib.sha256(data.read_bytes()).hexdigest() == named["sha256"], (graph, os.listdir(folder))
    return graph, named["data"]


OPS = ("rename", "replace", "unlink", "fsync")


def publish_in_child(folder: Path, old: str | None, new: str, kill_at: int) -> int:
    """Publish the new set in a forked child killed before its ``kill_at``-th file operation."""
    pid = os.fork()
    if pid == 0:
        try:
            calls = [0]
            for op in OPS:
                real = getattr(os, op)

                def wrapped(*args, _real=real, **kwargs):
                    calls[0] += 1
                    if calls[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*args, **kwargs)

                setattr(os, op, wrapped)
            staging = folder / ".staging"
            graph, data, _ = make_set(staging, "new", new)
            publish_file_set([(data, folder / new), (graph, folder / "m.onnx")],
                             obsolete=[folder / old] if old and old != new else [])
            os._exit(3)  # finished: there were fewer than kill_at operations
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("old, new", [("m.onnx.data", "m.onnx.1.data"), ("m.onnx.1.data", "m.onnx.data"),
                                      (None, "m.onnx.data")])
def test_file_set_killed_at_every_step_is_old_or_new(tmp_path, old, new):
    outcomes = set()
    for kill_at in range(1, 30):
        folder = tmp_path / f"k{kill_at}"
        folder.mkdir()
        old_set = make_set(folder, "old", old)[2] if old else None
        status = publish_in_child(folder, old, new, kill_at)
        if os.WIFEXITED(status):
            # 3: finished without reaching operation number kill_at, so every step was a kill point
            assert os.WEXITSTATUS(status) == 3, status
            assert consistent_set(folder)[1] == new
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        if not (folder / "m.onnx").exists():
            assert old is None  # a first publication killed before its switch: nothing yet
            outcomes.add("none")
            continue
        graph, data_name = consistent_set(folder)
        assert graph == old_set or data_name == new
        outcomes.add("old" if graph == old_set else "new")
    assert status is not None and os.WIFEXITED(status)
    assert outcomes == ({"old", "new"} if old else {"none", "new"})


def test_file_set_refuses_to_change_a_file_the_old_set_may_read(tmp_path):
    graph, data, before = make_set(tmp_path, "old", "m.onnx.data")
    staged = tmp_path / "s"
    new_graph, new_data, _ = make_set(staged, "new", "m.onnx.data")
    with pytest.raises(ValueError, match="exists with other content"):
        publish_file_set([(new_data, data), (new_graph, graph)])
    assert graph.read_bytes() == before and consistent_set(tmp_path)
