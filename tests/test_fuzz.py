"""The checkpoint reader under fuzzing: every mutated checkpoint is read or refused cleanly.

CI runs a few hundred cases; the latest 10,000-case run is recorded in FUZZING.md. The
other tests show that the harness itself catches what it hunts for (a crash, a message
that names no file, a slow case, a large allocation), so a clean run means something.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import fuzz_reader as fuzz
from modelgrow.checkpoint import open_checkpoint
from modelgrow.errors import CheckpointError, InputError

CI_CASES = 300


@pytest.fixture(scope="module")
def ci_run():
    return fuzz.run(CI_CASES, seed=0)


def test_every_case_is_read_or_refused_naming_the_file(ci_run):
    s = ci_run
    assert s.failures == 0, json.dumps(s.failure_cases[:5], indent=2)
    assert s.cases == CI_CASES and s.ok + s.refused == CI_CASES
    assert s.ok > 0 and s.refused > 0  # some mutations are harmless, most are not
    assert s.slowest_case_ms < s.deadline_ms
    assert s.max_peak_alloc_bytes < fuzz.PEAK_MULTIPLE * s.max_input_bytes + fuzz.PEAK_CONSTANT


def test_every_mutator_is_exercised(ci_run):
    assert set(ci_run.mutators) == {*fuzz.MUTATORS, "index"}


def test_cases_run_the_whole_convert_path(ci_run):
    # A NaN written into the data only shows when tensors are read and grown: the
    # non-finite check of the convert path refuses every one of them.
    assert ci_run.outcomes_by_mutator["nonfinite"]["ok"] == 0
    assert ci_run.outcomes_by_mutator["nonfinite"]["refused"] > 0


def test_cases_are_reproducible():
    seeds = fuzz.build_seeds()
    for case in (0, 17, 123):
        a = fuzz.plan_case(seeds, 5, case)[2]
        b = fuzz.plan_case(seeds, 5, case)[2]
        assert (a.file, a.blob, a.what) == (b.file, b.blob, b.what)
    assert fuzz.plan_case(seeds, 5, 1)[2].blob != fuzz.plan_case(seeds, 6, 1)[2].blob


# -- the harness catches what it hunts for ----------------------------------------------------


def crash(path):
    raise TypeError("unsupported operand")


def anonymous(path):
    raise InputError("something is wrong")  # names no file


def two_lines(path):
    raise InputError("first\nsecond", path=path)


def slow(path):
    time.sleep(0.05)


def over_the_limit(path) -> int:
    folder = path if path.is_dir() else path.parent
    size = sum(f.stat().st_size for f in folder.iterdir())
    return fuzz.PEAK_MULTIPLE * size + fuzz.PEAK_CONSTANT + 2**24


def hungry_python(path):
    bytearray(over_the_limit(path))  # the Python heap: tracemalloc sees it


def hungry_torch(path):
    # torch's allocator is invisible to tracemalloc; the resident-set measure sees it.
    torch.ones(over_the_limit(path), dtype=torch.uint8)


@pytest.mark.parametrize(
    "check, expected, deadline_ms",
    [(crash, "TypeError", 5000), (anonymous, "names neither", 5000), (slow, "deadline", 20),
     (hungry_python, "allocated", 5000), (hungry_torch, "allocated", 5000)],
    ids=["crash", "anonymous", "slow", "hungry_python", "hungry_torch"],
)
def test_harness_reports_failures(check, expected, deadline_ms):
    if check is hungry_torch and not fuzz._rss_resettable():
        pytest.skip("needs /proc/self/clear_refs (Linux) to measure non-Python memory")
    summary = fuzz.run(3, seed=0, check=check, deadline_ms=deadline_ms)
    assert summary.failures == 3
    assert all(expected in f["error"] for f in summary.failure_cases), summary.failure_cases


def test_harness_refuses_multi_line_messages():
    # ModelgrowError flattens its own message; a subclass that did not would be caught.
    class Sloppy(CheckpointError):
        def _format(self):
            return f"{self.path}:\n{self.problem}"

    def sloppy(path):
        raise Sloppy("bad", path=path)

    summary = fuzz.run(2, seed=0, check=sloppy)
    assert summary.failures == 2 and "spans lines" in summary.failure_cases[0]["error"]


def test_command_prints_summary(capsys):
    assert fuzz.main(["--cases", "25", "--seed", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cases"] == 25 and summary["failures"] == 0
    for key in ("ok", "refused", "slowest_case_ms", "max_peak_alloc_bytes", "command"):
        assert key in summary


def test_command_exits_non_zero_on_a_failure(capsys, monkeypatch):
    real = fuzz.run
    monkeypatch.setattr(fuzz, "run", lambda *a, **k: real(*a, **{**k, "check": crash}))
    assert fuzz.main(["--cases", "2"]) == 1
    out = capsys.readouterr().out
    assert "2 failures" in out and "TypeError" in out


# -- what the fuzzer found ----------------------------------------------------------------------


def test_index_naming_a_shard_too_long_for_the_filesystem(tmp_path):
    # Was an OSError (ENAMETOOLONG) from pathlib, i.e. an internal error, not bad input.
    (tmp_path / "config.json").write_text("{}")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "x" * 300 + ".safetensors"}}))
    with pytest.raises(CheckpointError, match="File name too long") as err:
        open_checkpoint(tmp_path)
    assert str(tmp_path) in str(err.value) and len(str(err.value)) < 400


def test_index_naming_a_non_safetensors_shard_blames_the_index(tmp_path):
    # Was "config.json: header length 7165896756295633531 exceeds the limit": the index,
    # the file actually wrong, went unnamed and config.json was blamed.
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "config.json"}}))
    with pytest.raises(CheckpointError, match="not a .safetensors file") as err:
        open_checkpoint(tmp_path)
    assert str(index) in str(err.value)
