"""`modelgrow train --lr-schedule`: rewarm (the schedule every run had) and continue (issue #17).

- rewarm gives exactly the learning rates it gave before the option existed;
- continue takes its first step at the source's final learning rate, never rises above
  it and falls monotonically towards --min-lr-ratio x that rate; a typed --warmup warms
  up to it, a typed --lr replaces it, ReLoRA's restarts re-warm to its current value;
- the source's final rate is --source-final-lr, else the last learning_rate in a Hugging
  Face trainer_state.json beside SOURCE; with neither, one line, exit 2;
- a run records the schedule, its peak rate and where that came from in its report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from modelgrow.cli import main
from modelgrow.errors import InputError, UsageError
from modelgrow.train_options import TRAINER_STATE, TrainOptions, recorded_final_lr

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "schemas" / "train-report.schema.json").read_text())


def _opts(**given) -> TrainOptions:
    return TrainOptions.parse({"data": ["x"], **given})


def _curve(o: TrainOptions) -> list[float]:
    """The learning rate of every step, as the loop computes it (lr x the schedule)."""
    s = o.schedule()
    return [o.lr * s(step) for step in range(o.steps)]


def _trainer_state(folder: Path, rates: list, *, step0: int = 100) -> Path:
    """A trainer_state.json as Hugging Face's Trainer writes it: a log every 100 steps,
    then the end-of-training summary (no learning_rate in it)."""
    logs = [{"epoch": 0.1 * i, "grad_norm": 1.5, "learning_rate": lr, "loss": 3.0 - 0.1 * i, "step": step0 * (i + 1)}
            for i, lr in enumerate(rates)]
    logs.append({"epoch": 1.0, "step": step0 * len(rates), "total_flos": 1e12, "train_loss": 2.5, "train_runtime": 9.0})
    state = {"best_metric": None, "epoch": 1.0, "global_step": step0 * len(rates), "log_history": logs,
             "logging_steps": step0, "max_steps": step0 * len(rates), "train_batch_size": 8}
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    return folder / TRAINER_STATE


# -- the schedules' values ---------------------------------------------------------------------

# The rates the one schedule gave before --lr-schedule existed (computed then, at these steps).
REWARM = [
    ({"steps": 20}, {0: 0.0005, 1: 0.001, 3: 0.0009931634888554937, 6: 0.00089471999940354,
                     11: 0.00055, 19: 0.0001068365111445064}),
    ({"steps": 50, "warmup": 7, "min_lr_ratio": 0.2, "lr": 3e-3},
     {0: 0.00042857142857142855, 5: 0.0025714285714285713, 6: 0.003, 9: 0.0029872120416901326,
      25: 0.002103520058870017, 49: 0.0006032012596037381}),
    ({"steps": 40, "relora": True, "relora_every": 10, "restart_warmup": 2},
     {0: 0.00025, 3: 0.001, 9: 0.0009578385041664925, 10: 0.0, 11: 0.00044735999970177,
      13: 0.0008681980515339464, 39: 0.0001017123858587145}),
    ({"steps": 40, "relora": True, "relora_every": 12, "full_rank_steps": 6},
     {0: 0.00025, 5: 0.0009982876141412856, 6: 0.0, 10: 0.0009397114317029974, 11: 0.0009186184199300463,
      25: 0.0004335314297038656, 39: 0.0001017123858587145}),
]


@pytest.mark.parametrize("given,rates", REWARM, ids=[str(g) for g, _ in REWARM])
def test_rewarm_is_the_schedule_runs_had_before(given, rates):
    for o in (_opts(**given), _opts(**given, lr_schedule="rewarm")):  # the default, and typed
        curve = _curve(o)
        assert {s: curve[s] for s in rates} == pytest.approx(rates, rel=1e-12, abs=0)
        assert o.lr_plan()["name"] == "rewarm" and o.source_final_lr is None


def test_continue_starts_at_the_source_rate_and_falls_to_the_floor():
    o = _opts(steps=50, lr_schedule="continue", source_final_lr=3e-4)
    curve = _curve(o)
    assert curve[0] == 3e-4 and max(curve) == 3e-4  # no warmup, no spike
    assert all(a > b for a, b in zip(curve, curve[1:]))  # strictly falling
    floor = 3e-4 * 0.1
    assert min(curve) > floor and curve[-1] == pytest.approx(floor, rel=1e-2)
    assert o.schedule().describe() == "no warmup, cosine to 0.1 x lr"
    # --min-lr-ratio sets the floor as a fraction of the start, as for rewarm.
    assert _curve(_opts(steps=50, lr_schedule="continue", source_final_lr=3e-4, min_lr_ratio=0.5))[-1] == \
        pytest.approx(1.5e-4, rel=1e-2)


def test_continue_with_a_typed_warmup_warms_up_to_its_start_then_decays():
    o = _opts(steps=40, lr_schedule="continue", source_final_lr=3e-4, warmup=4)  # BENCHMARKS.md 1's continued run
    curve = _curve(o)
    assert curve[:4] == pytest.approx([7.5e-5, 1.5e-4, 2.25e-4, 3e-4]) and max(curve) == curve[3]
    assert all(a >= b for a, b in zip(curve[3:], curve[4:]))


def test_relora_restarts_rewarm_to_the_continued_schedule():
    o = _opts(steps=40, lr_schedule="continue", source_final_lr=3e-4, relora=True, relora_every=10,
              restart_warmup=2)
    plain = _curve(_opts(steps=40, lr_schedule="continue", source_final_lr=3e-4))
    curve = _curve(o)
    assert o.warmup == 0 and curve[0] == 3e-4
    assert [s for s, lr in enumerate(curve) if lr == 0.0] == [10, 20, 30]
    for merge in (10, 20, 30):  # half way up, then back on the curve the plain run follows
        assert curve[merge + 1] == pytest.approx(plain[merge + 2] / 2) and curve[merge + 2] == plain[merge + 2]
    assert max(curve) == 3e-4


# -- options: derived defaults and refusals ----------------------------------------------------

DERIVED = [  # given -> (lr, warmup) in effect
    ({}, (1e-3, 100)),
    ({"lr_schedule": "continue", "source_final_lr": 3e-4}, (3e-4, 0)),
    ({"lr_schedule": "continue", "source_final_lr": 3e-4, "lr": 5e-4}, (5e-4, 0)),  # a typed --lr is the start
    ({"lr_schedule": "continue", "lr": 5e-4}, (5e-4, 0)),  # ... and needs no record
    ({"lr_schedule": "continue", "source_final_lr": 3e-4, "warmup": 20}, (3e-4, 20)),  # a typed warmup is honoured
    ({"lr_schedule": "continue", "source_final_lr": 3e-4, "relora": True, "relora_every": 30}, (3e-4, 0)),
]


@pytest.mark.parametrize("given,expected", DERIVED, ids=[str(g) for g, _ in DERIVED])
def test_derived_defaults_follow_the_schedule_and_never_contradict_what_was_typed(given, expected):
    o = _opts(**given)
    assert (o.lr, o.warmup) == pytest.approx(expected)
    assert o.model_fields_set == {"data", *given}
    assert (o.as_dict()["lr"], o.as_dict()["warmup"]) == pytest.approx(expected)  # what the report records


def test_derived_defaults_follow_a_later_change_of_schedule():
    o = _opts(steps=200)
    o.lr_schedule = "continue"
    assert o.warmup == 0 and o.lr_plan()["peak_lr_from"] is None  # not known until train reads it
    o.source_final_lr = 2e-4
    assert o.lr == 2e-4 and o.lr_plan()["peak_lr_from"] == "--source-final-lr"
    back = _opts(steps=200, lr_schedule="continue", lr=5e-4)
    back.lr_schedule = "rewarm"
    assert (back.lr, back.warmup) == (5e-4, 20)  # the typed --lr stays, the warmup is rewarm's again


@pytest.mark.parametrize("given,message", [
    ({"source_final_lr": 3e-4}, "--source-final-lr sets where --lr-schedule continue starts, not rewarm"),
    ({"lr_schedule": "continue", "source_final_lr": 0}, "--source-final-lr must be a number in (0, 1e+30], got 0"),
    ({"lr_schedule": "continue", "source_final_lr": math.nan}, "--source-final-lr must be"),
    ({"lr_schedule": "cosine"}, "--lr-schedule must be one of rewarm, continue, got 'cosine'"),
])
def test_contradicting_or_impossible_values_are_refused(given, message):
    with pytest.raises(UsageError) as caught:
        _opts(**given)
    assert message in str(caught.value)


# -- where the source's final rate comes from ---------------------------------------------------


def test_the_final_rate_is_read_from_a_trainer_state_beside_source(tmp_path):
    _trainer_state(tmp_path, [5e-5, 4e-5, 2.5e-5])
    lr, where = recorded_final_lr(tmp_path)
    assert lr == 2.5e-5 and TRAINER_STATE in where and "step 300" in where
    o = _opts(lr_schedule="continue").with_source_lr(tmp_path)
    assert o.lr == o.source_final_lr == 2.5e-5 and o.warmup == 0
    assert o.lr_plan() == {"name": "continue", "peak_lr": 2.5e-5, "peak_lr_from": where, "warmup": 0,
                           "floor_lr": 2.5e-6, "source_final_lr": 2.5e-5}
    # A typed --lr or --source-final-lr is used as it is: the file is not read.
    (tmp_path / TRAINER_STATE).write_text("{broken")
    for given, origin in (({"lr": 1e-4}, "--lr"), ({"source_final_lr": 1e-4}, "--source-final-lr")):
        o = _opts(lr_schedule="continue", **given)
        assert o.with_source_lr(tmp_path) is o and o.lr == 1e-4 and o.lr_plan()["peak_lr_from"] == origin
    assert _opts().with_source_lr(tmp_path).lr == 1e-3  # rewarm never reads it


@pytest.mark.parametrize("content,error,message", [
    (None, UsageError, "nothing beside SOURCE records it (no trainer_state.json in"),
    ("{broken", InputError, "not readable as JSON"),
    ({"global_step": 5}, InputError, "no log_history list"),
    ({"log_history": [{"loss": 2.0, "step": 5}]}, UsageError, "logs no learning_rate"),
    ({"log_history": [{"learning_rate": 0.0, "step": 900}]}, UsageError, "learning_rate at step 900 is 0"),
    ({"log_history": [{"learning_rate": "3e-4", "step": 9}]}, InputError, "is '3e-4', not a learning rate"),
    ({"log_history": [{"learning_rate": 10**400, "step": 9}]}, InputError, "not a learning rate"),
    ('{"log_history": [{"learning_rate": NaN}]}', InputError, "is nan, not a learning rate"),
])
def test_no_usable_record_is_one_line_naming_what_to_pass(tmp_path, content, error, message):
    if content is not None:
        (tmp_path / TRAINER_STATE).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(error) as caught:
        _opts(lr_schedule="continue").with_source_lr(tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "--source-final-lr" in str(caught.value) or "--lr" in str(caught.value)


# -- the command --------------------------------------------------------------------------------


def _ids(path: Path) -> Path:
    np.save(path, np.random.default_rng(0).integers(0, 96, 2000).astype(np.int32))
    return path


TINY = ["--steps", "4", "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1", "--device", "cpu", "--quiet"]


@pytest.mark.usefixtures("one_thread")
def test_continue_without_a_recorded_rate_is_one_line_exit_2(tmp_path):
    src, data = tiny.gpt2(tmp_path / "grown", layers=1), _ids(tmp_path / "ids.npy")
    for extra, message in ((["--lr-schedule", "continue"], "pass --source-final-lr LR"),
                           (["--source-final-lr", "3e-4"], "--source-final-lr sets where --lr-schedule continue")):
        result = CliRunner().invoke(main, ["train", str(src), "--data", str(data), *TINY, *extra,
                                           "-o", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("one_thread")
def test_a_continued_run_starts_at_the_rate_recorded_beside_source(tmp_path):
    src, data = tiny.gpt2(tmp_path / "grown", layers=1), _ids(tmp_path / "ids.npy")
    _trainer_state(src, [6e-4, 3e-4])
    report_path = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["train", str(src), "--data", str(data), *TINY, "--lr-schedule", "continue",
                                       "-o", str(tmp_path / "out"), "--report", str(report_path), "--save-every", "2"])
    assert result.exit_code == 0, result.output
    r = json.loads(report_path.read_text())
    jsonschema.validate(r, SCHEMA)
    lr = r["lr_curve"]
    assert lr[0] == 3e-4 and all(a > b for a, b in zip(lr, lr[1:])) and lr[-1] > 3e-5
    assert r["warmup"] == 0 and r["schedule"] == "no warmup, cosine to 0.1 x lr"
    assert r["options"]["lr_schedule"] == "continue" and r["options"]["lr"] == r["options"]["source_final_lr"] == 3e-4
    plan = r["lr_schedule"]
    assert plan["name"] == "continue" and plan["peak_lr"] == 3e-4 and TRAINER_STATE in plan["peak_lr_from"]
    assert "step 200" in plan["peak_lr_from"]

    # A resume takes the rate from the step folder's options: the record is not read again.
    (src / TRAINER_STATE).unlink()
    resumed = tmp_path / "resumed.json"
    result = CliRunner().invoke(main, ["train", str(src), "--data", str(data), *TINY, "-o", str(tmp_path / "again"),
                                       "--resume", str(tmp_path / "out-checkpoints" / "step-2"), "--report", str(resumed)])
    assert result.exit_code == 0, result.output
    again = json.loads(resumed.read_text())
    assert again["lr_curve"] == lr and again["lr_schedule"]["peak_lr_from"] == "the step folder's options"


def test_convert_carries_the_source_rate_into_the_growth_map_for_continue(tmp_path):
    from modelgrow.grow import convert
    from modelgrow.growth_map import GROWTH_MAP
    from modelgrow.plan import GrowthSpec

    src = tiny.gpt2(tmp_path / "src", layers=1)
    _trainer_state(src, [6e-4, 2e-4])
    convert(src, tmp_path / "grown", GrowthSpec(width="2x"), verify=False, progress=False)
    recorded = json.loads((tmp_path / "grown" / GROWTH_MAP).read_text())["source_final_lr"]
    assert recorded["lr"] == 2e-4 and "step 200" in recorded["from"]
    o = _opts(lr_schedule="continue").with_source_lr(tmp_path / "grown")
    assert o.lr == 2e-4 and GROWTH_MAP in o.lr_plan()["peak_lr_from"]
    # A record convert cannot read is not the conversion's problem: no rate, no refusal.
    (src / TRAINER_STATE).write_text("{broken")
    convert(src, tmp_path / "plain", GrowthSpec(width="2x"), verify=False, progress=False)
    assert "source_final_lr" not in json.loads((tmp_path / "plain" / GROWTH_MAP).read_text())
    with pytest.raises(UsageError, match="and no rate in a growth_map.json"):
        _opts(lr_schedule="continue").with_source_lr(tmp_path / "plain")


def test_the_schedule_flags_sit_beside_the_rate_in_help():
    flags = [line.split()[0] for line in CliRunner().invoke(main, ["train", "--help"]).output.splitlines()
             if line.startswith("  --")]
    at = flags.index("--warmup")
    assert flags[at - 1:at + 3] == ["--lr", "--warmup", "--lr-schedule", "--source-final-lr"]
