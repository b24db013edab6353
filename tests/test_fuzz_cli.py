"""The command line under fuzzing: hostile configs, options, tokenizers, data and resume states.

CI runs a few dozen cases per family; the latest long run is recorded in FUZZING.md. The
other tests show that the harness catches what it hunts for, so a clean run means something.
"""

from __future__ import annotations

import json
import signal

import pytest

import fuzz_cli as fuzz

CI_CASES = 100


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    return fuzz.run(CI_CASES, seed=0, root=tmp_path_factory.mktemp("fuzz-cli"))


def test_every_case_ends_ok_or_refused_in_one_line(ci_run):
    s = ci_run
    assert s.failures == 0, json.dumps(s.failure_cases[:5], indent=2)
    assert s.cases == CI_CASES and s.ok + s.refused == CI_CASES
    assert set(s.families) == set(fuzz.FAMILIES) and min(s.families.values()) == CI_CASES // len(fuzz.FAMILIES)
    assert s.ok > 0 and s.refused > 0


def test_cases_are_reproducible(tmp_path):
    base = fuzz.Base(tmp_path, *(tmp_path / n for n in ("gpt2", "llama", "bert", "t.txt", "i.npy", "step")))
    for family, make in fuzz.FAMILIES.items():
        if family in ("config", "resume"):
            continue  # these copy the seed folders built by build_base
        cases = []
        for attempt in ("a", "b"):
            work = tmp_path / f"{family}-{attempt}"
            work.mkdir()
            rng, _ = fuzz.plan_case(5, 7, [family])
            case = make(rng, base, work)
            cases.append((case.what, [a.replace(str(work), "W") for a in case.args]))
        assert cases[0] == cases[1], family


@pytest.mark.parametrize("code, stderr, exc, why", [
    (0, "", None, None),
    (3, "error: x.json: bad value\n", None, None),
    (2, "Usage: modelgrow convert\nTry 'modelgrow convert -h'\n\nError: No such option\n", None, None),
    (1, "internal error: KeyError: 'x' (a modelgrow bug)\n", None, "exit 1"),
    (3, "error: one\nerror: two\n", None, "2 lines"),
    (4, "error: grown model differs\n", None, "exit 4"),
    (None, "", RuntimeError("boom"), "exception escaped"),
    (3, "Traceback (most recent call last):\n", None, "traceback"),
    (None, "", fuzz.Hang(), "slower than"),
])
def test_harness_classifies_each_ending(code, stderr, exc, why):
    got = fuzz.classify(code, stderr, exc, 0.1, 30)
    assert (got is None) if why is None else (why in got), got


def test_harness_stops_a_hang(tmp_path, monkeypatch):
    """A command stuck in a Python loop is stopped at the deadline and counted."""
    import time

    def stuck(*args, **kwargs):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(fuzz.CliRunner, "invoke", stuck)
    code, _, _, exc = fuzz._invoke(["inspect", "x"], deadline_s=0.3)
    assert code is None and isinstance(exc, fuzz.Hang)
    assert signal.getsignal(signal.SIGALRM) is not fuzz._alarm  # put back
