"""Issue #18, signals and resumes: SIGTERM/SIGHUP unwind like SIGINT, messages after a
commit say what was written, `train --resume` checks its source and takes the stored
options, `--overwrite` takes an earlier run's step folders with it, and export's two
files are replaced as a pair.

Real `python -m modelgrow` processes where the process boundary is the point. Each pays
~3 s of imports on a busy 2-core machine, so they run several at a time, and a trial's
random delay starts once the process has installed its handlers (read from
/proc/PID/status): a signal during the interpreter's start-up kills it before modelgrow
has written anything, which tells nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from modelgrow import signals
from modelgrow.engine.state import STATE_DIR, STATE_JSON
from modelgrow.errors import OutputError, UsageError
from modelgrow.onnx_export import commit_pair, data_path
from modelgrow.train_options import TrainOptions, checkpoints_dir
from modelgrow.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("MODELGROW_DEBUG", None)
GROW = ["--width", "2x", "--depth", "2x", "--no-verify"]
TRAIN = ["--steps", "6", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--eval-every", "0"]
LEFTOVER = re.compile(r"\.modelgrow-(tmp|old)-")


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("signals")
    ids = root / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 96, 3000).astype(np.int32))
    return {"root": root, "src": tiny.gpt2(root / "src", embd=32, layers=2), "other": tiny.gpt2(root / "other", seed=1),
            "one_layer": tiny.gpt2(root / "one-layer", layers=1), "ids": ids}


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "modelgrow", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def handles(pid: int, signum: int) -> bool:
    """Whether the process has a handler installed for ``signum`` (SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(caught >> (signum - 1) & 1)


def wait_ready(proc: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if handles(proc.pid, signum):
            return True
        time.sleep(0.02)
    raise AssertionError("the command never installed its signal handlers")


def tree(folder: Path) -> dict[str, str] | None:
    if not folder.exists():
        return None
    if folder.is_file():
        return {folder.name: hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if LEFTOVER.search(p.name))


def one_line(stderr: str) -> str:
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# -- SIGTERM at random moments ------------------------------------------------------------------

# (command, trials, delay span in seconds after the handlers are installed): each span
# covers the command from its imports to a little past its commit on a busy 2-core
# machine (convert and train commit ~4 s in, export ~15 s), so kills land everywhere.
KINDS = [("convert", 9, 5.0), ("train", 9, 5.5), ("export", 2, 15.0)]
PARALLEL = 4


def command(kind: str, work: dict, out: Path) -> tuple[list, Path]:
    if kind == "convert":
        return ["convert", work["src"], "-o", out / "grown", *GROW], out / "grown"
    if kind == "train":
        return ["train", work["src"], "-o", out / "trained", "--data", work["ids"], *TRAIN, "--save-every", "3"], out / "trained"
    return ["export", work["one_layer"], "-o", out / "model.onnx", "--external-data", "--no-check"], out / "model.onnx"


def output_of(kind: str, dest: Path) -> dict | None:
    if kind == "export":
        return tree(dest) and {**tree(dest), **(tree(data_path(dest)) or {})}
    return tree(dest)


def reference(kind: str, work: dict, out: Path) -> Path:
    """What a command writes when left alone, computed here (outputs are deterministic)."""
    from modelgrow import api

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run
    try:
        if kind == "convert":
            api.convert(work["src"], out / "grown", width="2x", depth="2x", verify=False)
            return out / "grown"
        if kind == "export":
            api.export(work["one_layer"], out / "model.onnx", external_data=True, check=False)
            return out / "model.onnx"
        api.train(work["src"], out / "trained", data=[work["ids"]], steps=6, batch_size=2, seq_len=16, device="cpu",
                  eval_every=0, save_every=3)
        return out / "trained"
    finally:
        torch.set_num_threads(before)


def test_sigterm_at_random_moments_leaves_the_whole_output_or_nothing(work):
    rng = random.Random(18)
    plan = [(kind, rng.uniform(0, span)) for kind, count, span in KINDS for _ in range(count)]
    rng.shuffle(plan)
    waiting, running, finished = list(enumerate(plan)), [], []
    expected = {}
    while waiting or running:
        while waiting and len(running) < PARALLEL:
            i, (kind, delay) = waiting.pop(0)
            out = work["root"] / f"trial-{i}"
            out.mkdir()
            args, dest = command(kind, work, out)
            running.append({"i": i, "kind": kind, "delay": delay, "proc": start(*args), "out": out, "dest": dest,
                            "ready": None})
        for kind in ("convert", "train", "export"):  # meanwhile, here
            if kind not in expected:
                out = work["root"] / f"reference-{kind}"
                out.mkdir()
                dest = reference(kind, work, out)
                expected[kind] = output_of(kind, dest)
                if kind == "train":
                    expected["train-steps"] = tree(checkpoints_dir(dest))
                break
        time.sleep(0.01)
        for t in list(running):
            proc, now = t["proc"], time.monotonic()
            if proc.poll() is not None:
                t["stderr"] = proc.communicate()[1]
                running.remove(t)
                finished.append(t)
            elif t["ready"] is None:
                t["ready"] = now if handles(proc.pid, signal.SIGTERM) else None
            elif t["delay"] is not None and now - t["ready"] >= t["delay"]:
                proc.send_signal(signal.SIGTERM)
                t["delay"] = None  # sent
    outcomes = []
    for t in sorted(finished, key=lambda t: t["i"]):
        kind, proc, dest, err = t["kind"], t["proc"], t["dest"], t["stderr"]
        outcomes.append((kind, proc.returncode))
        what = f"trial {t['i']} ({kind}, SIGTERM {plan[t['i']][1]:.2f}s in): rc {proc.returncode}, {err[-300:]!r}"
        got = output_of(kind, dest)
        assert got in (None, expected[kind]), what
        assert leftovers(t["out"]) == [], what
        # -15: the command had finished and put the handlers back; the interpreter was exiting.
        assert proc.returncode in (0, 143) or (proc.returncode == -signal.SIGTERM and got and not err), what
        assert sorted(p.name for p in t["out"].iterdir()) <= sorted([dest.name, data_path(dest).name, f"{dest.name}-checkpoints"])
        if kind == "train" and checkpoints_dir(dest).exists():  # each step folder whole
            steps = tree(checkpoints_dir(dest))
            assert steps == {k: v for k, v in expected["train-steps"].items() if k.split("/")[0] in
                             {s.split("/")[0] for s in steps}}, what
        if proc.returncode == 143:  # one line, and true about what is there
            line = one_line(err)
            assert line.startswith("terminated by SIGTERM"), what
            assert ("after writing" in line) == (got is not None) == (str(dest) in line), what
    killed = [k for k, rc in outcomes if rc in (143, -signal.SIGTERM)]
    assert len(outcomes) >= 20 and len(killed) >= 10, outcomes
    assert {k for k in killed} == {k for k, _, _ in KINDS}, outcomes


def test_sighup_exits_129_and_sigint_130_leaving_nothing(work, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    hup = start("convert", work["src"], "-o", tmp_path / "a" / "grown", *GROW)
    intr = start("train", work["src"], "-o", tmp_path / "b" / "trained", "--data", work["ids"], *TRAIN)
    for proc, signum in ((hup, signal.SIGHUP), (intr, signal.SIGINT)):
        assert wait_ready(proc)
        time.sleep(0.3)  # inside the command's imports
        proc.send_signal(signum)
    _, err = hup.communicate(timeout=120)
    assert hup.returncode == 129 and one_line(err) == "terminated by SIGHUP: nothing was written", err
    _, err = intr.communicate(timeout=120)
    assert intr.returncode == 130 and one_line(err) == "interrupted: nothing was written", err
    for folder in ("a", "b"):
        assert list((tmp_path / folder).iterdir()) == []


def test_sigint_after_the_commit_says_what_was_written(work, tmp_path):
    """train writes OUT, then draws the plot and the report: interrupted between, it says so."""
    out, report, plot = tmp_path / "trained", tmp_path / "report.json", tmp_path / "curves.png"
    proc = start("train", work["src"], "-o", out, "--data", work["ids"], *TRAIN, "--report", report, "--plot", plot)
    wait_ready(proc)
    while not out.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")  # a very fast machine
    assert proc.returncode == 130, err
    assert one_line(err) == f"interrupted after writing {out}; {report} was not written", err
    assert (out / "model.safetensors").is_file() and not report.exists() and leftovers(tmp_path) == []


def test_signals_wait_for_a_commit_and_handlers_are_put_back():
    """A signal during committing() is raised when the block ends; the registry then knows the output."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(signals.Terminated) as caught:
        with signals.handled():
            signals.expect("out", "out.onnx")
            with signals.committing("out"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here: held back
                assert signals.written() == []
            raise AssertionError("the held signal was not raised")
    assert caught.value.signum == signal.SIGTERM and signals.exit_code(caught.value) == 143
    assert signals.message(caught.value) == "terminated by SIGTERM after writing out; out.onnx was not written"
    assert signal.getsignal(signal.SIGTERM) is before
    # Ignored signals stay ignored (nohup).
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals.handled():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_the_process_answers_signals_before_and_after_its_command():
    """Before the command: 128 + n and "nothing was written" at once (not click's "Aborted!", exit 1).
    After it has finished, all written: ignored, the exit status stays the command's own."""
    script = """if True:
        import os, signal, sys, time
        from modelgrow import signals
        signals.for_process()
        if sys.argv[1] == "after":
            with signals.handled():
                signals.expect("out")
                with signals.committing("out"):
                    pass
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except signals.Terminated as exc:
            print(exc.signum, signals.exit_code(exc), signals.message(exc))
            sys.exit(signals.exit_code(exc))
        print("finished")
    """
    before = subprocess.run([sys.executable, "-c", script, "before"], capture_output=True, text=True, env=ENV)
    # Exits from the handler itself: an exception could be swallowed by whatever is importing.
    assert before.returncode == 130 and before.stdout == "", before
    assert before.stderr.strip() == "interrupted: nothing was written", before
    after = subprocess.run([sys.executable, "-c", script, "after"], capture_output=True, text=True, env=ENV)
    assert after.returncode == 0 and after.stdout.strip() == "finished", after


def swallowed(signum: int) -> None:
    """A signal raised where a library catches everything (some import fallbacks do)."""
    try:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
    except BaseException:  # noqa: BLE001 - the library's mistake this test stands in for
        pass


def test_a_swallowed_signal_is_raised_again_before_anything_is_published(tmp_path):
    """The command carries on after a swallowed signal, but it publishes nothing and ends as the signal."""
    from modelgrow.checkpoint.atomic import write_file_atomically

    with pytest.raises(signals.Terminated) as caught:
        with signals.handled():
            swallowed(signal.SIGTERM)
            with signals.committing(tmp_path / "out"):
                (tmp_path / "out").mkdir()
    assert caught.value.signum == signal.SIGTERM and signals.written() == []
    assert not (tmp_path / "out").exists()
    with pytest.raises(KeyboardInterrupt):
        with signals.handled():
            swallowed(signal.SIGINT)
            write_file_atomically(tmp_path / "report.json", "{}")
    assert list(tmp_path.iterdir()) == []
    # A failure that follows the swallowed signal (a half-imported module) is reported as the signal.
    with pytest.raises(signals.Terminated):
        with signals.handled():
            swallowed(signal.SIGHUP)
            raise AttributeError("module 'numpy' has no attribute 'multiply'")
    # And a command that publishes nothing still ends as the signal, not as a success.
    with pytest.raises(signals.Terminated):
        with signals.handled():
            swallowed(signal.SIGHUP)


# -- export's two files --------------------------------------------------------------------------


def test_export_replaces_its_pair_so_a_kill_leaves_a_whole_one(tmp_path, monkeypatch):
    """Every rename of an --overwrite commit, stopped there: the graph always names complete data."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    def pair(folder: Path, value: float) -> Path:
        folder.mkdir(exist_ok=True)
        w = numpy_helper.from_array(np.full((64, 64), value, dtype=np.float32), "w")
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 64])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])], [w])
        onnx.save(helper.make_model(graph), str(folder / "m.onnx"), save_as_external_data=True,
                  location="m.onnx.data", size_threshold=0)
        return folder / "m.onnx"

    def value(dest: Path) -> float:  # onnx.load reads the data the graph names: it must be there, whole
        return float(numpy_helper.to_array(onnx.load(str(dest)).graph.initializer[0]).flat[0])

    def location(dest: Path) -> str:
        return onnx.load(str(dest), load_external_data=False).graph.initializer[0].external_data[0].value

    real = os.replace
    dest = pair(tmp_path / "d", 1.0)
    for attempt, new in enumerate([2.0, 3.0, 4.0]):  # three overwrites: the data name alternates
        for stop in range(5):
            staging = pair(tmp_path / f"s{attempt}-{stop}", new).parent
            count = [0]

            def replace(a, b):
                if count[0] == stop:
                    raise KeyboardInterrupt  # killed before this rename
                count[0] += 1
                real(a, b)

            monkeypatch.setattr(os, "replace", replace)
            try:
                used = commit_pair(staging, dest, external=True)
            except KeyboardInterrupt:
                used = None
            monkeypatch.setattr(os, "replace", real)
            if used is None:
                assert value(dest) == (1.0 if attempt == 0 else new - 1), (attempt, stop)  # the old pair, whole
                continue
            assert value(dest) == new and location(dest) == used.name
            assert sorted(p.name for p in dest.parent.iterdir()) == sorted(["m.onnx", used.name])
            break
        else:
            raise AssertionError("the commit never finished")
    assert location(dest) == "m.onnx.alt.data"  # 2.0 -> alt, 3.0 -> data, 4.0 -> alt


# -- train --resume and --overwrite ---------------------------------------------------------------


def options(work: dict, **more) -> dict:
    return {**dict(data=[str(work["ids"])], steps=6, batch_size=2, seq_len=16, device="cpu", eval_every=0, save_every=3),
            **more}


@pytest.fixture(scope="module")
def interrupted(work) -> Path:
    """A run with step-3 saved, as a killed run leaves it."""
    torch.set_num_threads(1)
    out = work["root"] / "run"
    train(work["src"], out, options(work, lr=3e-3, seed=7), progress=False)
    shutil.rmtree(out)
    shutil.rmtree(checkpoints_dir(out) / "step-6", ignore_errors=True)
    return checkpoints_dir(out) / "step-3"


def test_resume_refuses_another_source_of_the_same_size(work, interrupted, tmp_path):
    with pytest.raises(UsageError, match="another source checkpoint") as caught:
        train(work["other"], tmp_path / "out", {"data": [str(work["ids"])]}, resume=interrupted, progress=False)
    assert caught.value.exit_code == 2 and "give the SOURCE the interrupted run trained" in str(caught.value)
    assert not (tmp_path / "out").exists()
    state = json.loads((interrupted / STATE_DIR / STATE_JSON).read_text())
    assert [f["name"] for f in state["source_identity"]] == ["model.safetensors"]
    # The same checkpoint copied elsewhere is the same source.
    copy = shutil.copytree(work["src"], tmp_path / "copy")
    report = train(copy, tmp_path / "out", {}, resume=interrupted, progress=False)
    assert report["resumed_from"]["step"] == 3


@pytest.mark.parametrize("path, value, says", [
    (("cwd",), 1e-30, "cwd: Input should be a valid string"),
    (("step",), "3", "step: Input should be a valid integer"),
    (("history", "restarts"), True, "history.restarts"),
    (("history", "loss_curve"), [1.0], "one value per step"),
    (("options", "tokenizer"), [1, 2], "options do not hold"),
    (("options", "full_rank_steps"), float("nan"), "options do not hold: --full-rank-steps"),
])
def test_a_corrupt_state_file_is_bad_input_naming_it(work, interrupted, tmp_path, path, value, says):
    """state.json is input too: a wrong type or impossible value is exit 3 naming the file, not a crash."""
    from modelgrow.errors import InputError

    step = shutil.copytree(interrupted, tmp_path / "step-3")
    state = json.loads((step / STATE_DIR / STATE_JSON).read_text())
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (step / STATE_DIR / STATE_JSON).write_text(json.dumps(state))
    with pytest.raises(InputError) as caught:
        train(work["src"], tmp_path / "out", {}, resume=step, progress=False)
    assert caught.value.exit_code == 3 and says in str(caught.value) and str(step) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_resume_takes_the_stored_options_unless_given(work, interrupted, tmp_path):
    """`train SRC -o OUT --resume STEP`: data, lr, seed and steps come from the step folder."""
    from click.testing import CliRunner
    from modelgrow.cli import main

    result = CliRunner().invoke(main, ["train", str(work["src"]), "-o", str(tmp_path / "out"),
                                       "--resume", str(interrupted), "-q"])
    assert result.exit_code == 0, result.output
    assert TrainOptions.parse({}).lr != 3e-3 and TrainOptions.parse({}).seed != 7  # so they came from the folder
    whole = train(work["src"], tmp_path / "whole", options(work, lr=3e-3, seed=7, save_every=None), progress=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    # Given again, a trajectory option must agree; options that do not change it may differ.
    result = CliRunner().invoke(main, ["train", str(work["src"]), "-o", str(tmp_path / "x"), "--resume",
                                       str(interrupted), "--lr", "0.01"])
    assert result.exit_code == 2 and "other options (lr: 0.003 there, 0.01 now)" in result.output, result.output
    assert whole["options"]["lr"] == 3e-3


def test_overwrite_removes_the_earlier_runs_step_folders(work, tmp_path):
    out = tmp_path / "out"
    train(work["src"], out, options(work, steps=9, save_every=4), progress=False)  # step-4, step-8
    foreign = checkpoints_dir(out) / "notes.txt"
    foreign.write_text("mine")
    (checkpoints_dir(out) / "step-99").mkdir()  # not ours: no state.json
    train(work["src"], out, options(work, save_every=None), overwrite=True, progress=False)
    assert sorted(p.name for p in checkpoints_dir(out).iterdir()) == ["notes.txt", "step-99"]
    with pytest.raises(Exception, match="no training state"):
        train(work["src"], tmp_path / "again", options(work), resume=checkpoints_dir(out), progress=False)


def test_overwrite_never_deletes_a_step_folder_it_reads(work, tmp_path):
    out = tmp_path / "out"
    train(work["src"], out, options(work, steps=4, save_every=2), progress=False)
    step = checkpoints_dir(out) / "step-2"
    with pytest.raises(OutputError, match="holds") as caught:
        train(step, out, options(work, save_every=None), overwrite=True, progress=False)
    assert caught.value.exit_code == 5 and (step / "model.safetensors").is_file()
