"""`modelgrow train`: defaults derived from other options, late merges, full-rank warm start.

- every default that depends on another option (--warmup, --eval-every, --restart-warmup)
  is derived from it, recorded in the report's options, explained in --help, and never
  contradicts what was typed; a typed value that contradicts is one line, exit 2;
- no merge comes so late that its fresh adapters get fewer than relora_every // 2 steps;
- --full-rank-steps N: the first N steps are plain full-rank training (every parameter
  moves, bit for bit as without --relora), then the adapters take over and the loss
  keeps falling; a run resumed on either side of the switch ends identical.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import tiny
from modelgrow.cli import main
from modelgrow.engine.schedule import Schedule
from modelgrow.errors import UsageError
from modelgrow.trainer import TrainOptions, checkpoints_dir, train

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "schemas" / "train-report.schema.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _random_ids(path: Path, n: int = 4000) -> Path:
    np.save(path, np.random.default_rng(0).integers(0, 96, n).astype(np.int32))
    return path


def _text_ids(path: Path, n: int = 30_000) -> Path:
    """Real text as ids below the tiny models' vocabulary (96): printable ASCII - 32."""
    text = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    if not text.is_file():
        pytest.skip("the Python standard library's source is not available")
    raw = np.frombuffer(text.read_bytes()[:n], dtype=np.uint8).astype(np.int32) - 32
    np.save(path, np.clip(raw, 0, 95).astype(np.int32))
    return path


# -- derived defaults ---------------------------------------------------------------------

DERIVED = [  # given options -> (warmup, eval_every, restart_warmup)
    ({}, (100, 100, 50)),
    ({"steps": 90, "relora": True, "relora_every": 30}, (9, 9, 3)),
    ({"steps": 20000, "relora": True, "relora_every": 500}, (500, 2000, 50)),  # warmup capped at the first merge
    ({"steps": 1000, "relora": True, "relora_every": 5}, (5, 100, 1)),  # re-warm at least 1 step
    ({"steps": 1000, "relora": True, "relora_every": 1}, (1, 100, 0)),  # ... and below --relora-every
    ({"steps": 1000, "relora": True, "relora_every": 2000}, (100, 100, 50)),  # at most 50
    ({"steps": 1000, "relora": True, "relora_every": 100, "full_rank_steps": 40}, (40, 100, 10)),  # ends at the switch
    ({"steps": 1000, "relora": True, "relora_every": 30, "warmup": 7, "restart_warmup": 29}, (7, 100, 29)),  # typed
    ({"steps": 1000, "eval_every": 0, "restart_warmup": 0}, (100, 0, 0)),  # typed zeros are values too
]


@pytest.mark.parametrize("given,expected", DERIVED, ids=[str(d[0]) for d in DERIVED])
def test_every_derived_default_follows_its_options(given, expected):
    o = TrainOptions.parse({"data": ["x"], **given})
    assert (o.warmup, o.eval_every, o.restart_warmup) == expected
    assert {k: o.as_dict()[k] for k in ("warmup", "eval_every", "restart_warmup")} == dict(
        zip(("warmup", "eval_every", "restart_warmup"), expected))  # what a report records
    assert o.model_fields_set == {"data", *given}  # derived values are not taken for typed ones
    assert o.warmup_steps == min(expected[0], o.steps) and o.eval_interval == expected[1]


def test_derived_defaults_follow_later_changes():
    o = TrainOptions(data=["x"], steps=90, relora=True, relora_every=30)
    o.relora_every = 300  # derived again from the new value
    assert (o.warmup, o.restart_warmup) == (9, 30)
    o.steps = 10_000
    assert (o.warmup, o.eval_every) == (300, 1000)
    typed = TrainOptions(data=["x"], steps=90, relora=True, relora_every=30, restart_warmup=4)
    typed.relora_every = 60
    assert typed.restart_warmup == 4  # what was typed stays


def test_the_issue_command_runs_with_derived_warmups(tmp_path):
    # modelgrow train grown/ --data train.npy --steps 90 --relora --rank 8 --relora-every 30 -o out
    # failed with "--restart-warmup must be in [0, --relora-every), got 50".
    src, data = tiny.gpt2(tmp_path / "grown"), _random_ids(tmp_path / "train.npy")
    report_path = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["train", str(src), "--data", str(data), "--steps", "90", "--relora", "--rank", "8",
                                       "--relora-every", "30", "-o", str(tmp_path / "out"), "--report", str(report_path),
                                       "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1", "--device", "cpu",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    r = json.loads(report_path.read_text())
    jsonschema.validate(r, SCHEMA)
    opts = r["options"]
    assert (opts["warmup"], opts["eval_every"], opts["restart_warmup"], opts["full_rank_steps"]) == (9, 9, 3, 0)
    assert r["warmup"] == 9 and r["eval_every"] == 9 and r["relora"]["restart_warmup"] == 3
    lr = r["lr_curve"]
    assert [x["after_step"] for x in r["relora"]["restarts"]] == [30, 60]
    assert lr[30] == lr[60] == 0.0 and 0 < lr[31] < lr[33] and min(lr[61:]) > 0
    assert [s for s, _ in r["val_curve"]] == list(range(0, 91, 9))


def test_help_says_how_defaults_are_derived():
    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=400, max_content_width=400)
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip().startswith("--")}
    assert "--steps // 10" in lines["--warmup"] and "--relora-every" in lines["--warmup"]
    assert "--steps // 10" in lines["--eval-every"]
    assert "--relora-every // 10" in lines["--restart-warmup"] and "50" in lines["--restart-warmup"]
    assert "--relora-every // 2" in lines["--relora-every"]  # the late merge that is skipped
    assert "reference code" in lines["--optimizer-prune"] and "0.99" in lines["--optimizer-prune"]
    assert "full-rank" in lines["--full-rank-steps"] and "[default: 0]" in lines["--full-rank-steps"]


CONTRADICTIONS = [
    ("restart warmup a whole cycle", ["--relora", "--relora-every", "30", "--restart-warmup", "30"],
     "--restart-warmup must be in [0, --relora-every), got 30"),
    ("warmup past the first merge", ["--relora", "--relora-every", "30", "--warmup", "31"],
     "--warmup 31 is longer than --relora-every 30"),
    ("warmup past the switch", ["--relora", "--relora-every", "30", "--full-rank-steps", "10", "--warmup", "11"],
     "--warmup 11 is longer than --full-rank-steps 10"),
    ("warm start without relora", ["--full-rank-steps", "10"], "--full-rank-steps 10 needs --relora"),
    ("warm start the whole run", ["--relora", "--relora-every", "30", "--full-rank-steps", "90"],
     "--full-rank-steps must be below --steps (90), got 90"),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in CONTRADICTIONS], ids=[c[0] for c in CONTRADICTIONS])
def test_a_typed_value_that_contradicts_is_one_line_exit_2(tmp_path, args, message):
    src, data = tiny.gpt2(tmp_path / "src"), _random_ids(tmp_path / "ids.npy")
    result = CliRunner().invoke(main, ["train", str(src), "--data", str(data), "--steps", "90", "--rank", "8", *args,
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError):  # the API refuses the same values
        TrainOptions.parse({"data": ["x"], "steps": 90, "rank": 8, **_as_options(args)})


def _as_options(args: list[str]) -> dict:
    out, it = {}, iter(args)
    for flag in it:
        name = flag[2:].replace("-", "_")
        out[name] = True if flag == "--relora" else int(next(it))
    return out


# -- merge alignment --------------------------------------------------------------------------


def test_no_merge_leaves_its_adapters_fewer_than_half_a_cycle():
    assert Schedule(100, 10, 0.1, 30, 3).merges == (30, 60)  # 90 would leave 9 steps < 15
    assert Schedule(90, 9, 0.1, 30, 3).merges == (30, 60)
    assert Schedule(30, 3, 0.1, 8, 1, start=10).merges == (18,)  # 26 would leave 3 < 4
    for steps, cycle, start in ((1000, 7, 0), (1000, 100, 37), (64, 4, 0), (61, 20, 0), (50, 1, 5)):
        s = Schedule(steps, 0, 0.1, cycle, 1, start)
        assert all(steps - 1 - b >= cycle // 2 for b in s.merges)
        assert [b for b in range(steps) if s.merges_after(b)] == list(s.merges)
        zero = [b for b in range(steps) if s(b) == 0.0]
        assert zero == ([start] if start else []) + list(s.merges)  # the LR drops only where a merge (or switch) is
    o = TrainOptions(data=["x"], steps=100, relora=True, relora_every=30)
    assert [s for s in range(100) if o.restart_after(s)] == [30, 60] and o.lr_factor(90) > 0


# -- full-rank warm start ---------------------------------------------------------------------

WARM = dict(steps=30, batch_size=8, seq_len=16, eval_every=10, eval_batches=2, device="cpu", lr=3e-3, warmup=2,
            relora=True, rank=4, relora_every=8, full_rank_steps=10, adapter_dropout=0.0, save_every=10)


def test_full_rank_steps_train_everything_then_hand_over_to_adapters(tmp_path):
    src = tiny.llama(tmp_path / "src")  # no dropout: the full-rank phase matches plain training bit for bit
    data = str(_text_ids(tmp_path / "ids.npy"))
    report_path = tmp_path / "warm.json"
    warm = train(src, tmp_path / "warm", dict(data=[data], **WARM), progress=False, report_path=report_path)
    jsonschema.validate(json.loads(report_path.read_text()), SCHEMA)
    assert warm["options"]["full_rank_steps"] == 10 and warm["relora"]["full_rank_steps"] == 10
    assert "full-rank for 10 steps" in warm["schedule"]

    # The first 10 steps: every parameter moves, exactly as plain full-rank training moves it.
    start, step10 = load_file(src / "model.safetensors"), checkpoints_dir(tmp_path / "warm") / "step-10"
    after = load_file(step10 / "model.safetensors")
    assert all(not torch.equal(after[k], start[k]) for k in start), [k for k in start if torch.equal(after[k], start[k])]
    plain = {k: v for k, v in WARM.items() if k not in ("relora", "rank", "relora_every", "full_rank_steps")}
    full = train(src, tmp_path / "plain", dict(data=[data], **plain), progress=False)
    plain10 = load_file(checkpoints_dir(tmp_path / "plain") / "step-10" / "model.safetensors")
    assert all(torch.equal(after[k], plain10[k]) for k in after)
    assert warm["loss_curve"][:10] == full["loss_curve"][:10] and warm["lr_curve"][:10] == full["lr_curve"][:10]
    # The matrices carried Adam moments then; from the switch on only the adapters do.
    state10 = load_file(step10 / "training_state" / "state.safetensors")
    state20 = load_file(checkpoints_dir(tmp_path / "warm") / "step-20" / "training_state" / "state.safetensors")
    matrix = "model.layers.0.self_attn.q_proj.weight"
    assert f"exp_avg/{matrix}" in state10 and f"exp_avg/{matrix}:lora_A" not in state10
    assert f"exp_avg/{matrix}" not in state20 and f"exp_avg/{matrix}:lora_A" in state20

    # Then the adapters: the LR drops to 0 at the switch and at the one merge (18; 26 would
    # leave 3 steps), and the loss keeps falling.
    lr, loss, val = warm["lr_curve"], warm["loss_curve"], dict(warm["val_curve"])
    assert [s for s in range(30) if lr[s] == 0.0] == [10, 18] and lr[9] > 0
    assert [r["after_step"] for r in warm["relora"]["restarts"]] == [18]
    assert val[30] < val[20] < val[10], warm["val_curve"]
    assert np.mean(loss[25:]) < np.mean(loss[11:16]), loss
    assert warm["trainable_params"] < full["trainable_params"]  # counted as the adapters train


def test_a_warm_start_resumes_identically_on_either_side_of_the_switch(tmp_path):
    src = tiny.gpt2(tmp_path / "src")  # dropout 0.1: the RNG resumes too
    warm = {k: v for k, v in WARM.items() if k != "warmup"}  # derived: min(30 // 10, 10) = 3
    options = dict(data=[str(_random_ids(tmp_path / "ids.npy"))], **{**warm, "adapter_dropout": 0.1, "save_every": 5})
    whole = train(src, tmp_path / "a", options, progress=False)
    steps = checkpoints_dir(tmp_path / "a")
    for n in (10, 15):  # at the switch, and after it (the matrices' moments gone)
        out = tmp_path / f"from{n}"
        resumed = train(src, out, {**options, "save_every": None}, resume=steps / f"step-{n}", progress=False)
        assert resumed["loss_curve"] == whole["loss_curve"] and resumed["relora"]["restarts"] == whole["relora"]["restarts"]
        assert (out / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    # A step folder from before derived defaults were recorded (null there), or before an
    # option existed (absent: its default applied), still resumes.
    state = steps / "step-15" / "training_state" / "state.json"
    stored = json.loads(state.read_text())
    stored["options"].update(warmup=None, restart_warmup=None)  # both derived in this run
    del stored["options"]["optimizer_prune"]  # the default, 0.9
    state.write_text(json.dumps(stored))
    old = train(src, tmp_path / "old", {**options, "save_every": None}, resume=steps / "step-15", progress=False)
    assert old["loss_curve"] == whole["loss_curve"]
