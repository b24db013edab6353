"""`modelgrow train`: full-rank and ReLoRA continued training.

- on the shipped demo model, both modes lower the held-out loss; ReLoRA trains fewer
  parameters with less optimizer state, drops the LR to 0 at each merge, and its output
  is a plain dense checkpoint that transformers loads without leftovers, scoring what
  the report says;
- a run resumed from a --save-every step folder ends bit-identical to an uninterrupted one
  (with model and adapter dropout on, so the RNG is part of the state);
- a 2-process torchrun ReLoRA run redraws the same A on every rank and agrees with the
  1-process run on the same global batch;
- bad data and bad options are one-line errors before any step, with nothing written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import tiny
from modelgrow.cli import main
from modelgrow.demo import demo_checkpoint
from modelgrow.errors import UsageError
from modelgrow.trainer import TrainOptions, checkpoints_dir, train

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "schemas" / "train-report.schema.json").read_text())
# The demo model already converged on the standard library at lr 3e-4; 1e-4 keeps improving
# it within 60 steps (1e-3 first undoes some of that pretraining).
DEMO_RUN = ["--steps", "60", "--batch-size", "8", "--seq-len", "64", "--lr", "1e-4", "--eval-every", "20", "--device", "cpu"]
RELORA = {"relora": True, "rank": 8, "relora_every": 20, "restart_warmup": 5}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _val_windows(corpus: Path, seq_len: int, count: int) -> torch.Tensor:
    """The report's validation windows, rebuilt: byte-level ids, the last 5% held out."""
    ids = np.frombuffer(corpus.read_bytes(), dtype=np.uint8).astype(np.int64)  # byte-level: id == byte
    held = ids[len(ids) - max(int(np.ceil(len(ids) * 0.05)), seq_len + 1):]
    starts = torch.linspace(0, len(held) - seq_len - 1, count, dtype=torch.float64).round().long().tolist()
    return torch.from_numpy(np.stack([held[s:s + seq_len + 1] for s in starts]))


def _names_and_dtypes(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_full_rank_and_relora_lower_the_validation_loss_on_the_demo(tmp_path):
    corpus, demo = tiny.stdlib_corpus(tmp_path), demo_checkpoint()
    report_path, plot = tmp_path / "full.json", tmp_path / "loss.png"
    result = CliRunner().invoke(main, ["train", str(demo), "--data", str(corpus), *DEMO_RUN, "-o", str(tmp_path / "full"),
                                       "--report", str(report_path), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "trained 60 steps (full-rank)" in result.output
    full = json.loads(report_path.read_text())
    jsonschema.validate(full, SCHEMA)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and full["plot"] == str(plot)
    assert full["val_loss"]["after"] < full["val_loss"]["before"] - 0.005, full["val_curve"]
    assert [s for s, _ in full["val_curve"]] == [0, 20, 40, 60] and len(full["loss_curve"]) == 60
    assert full["trainable_params"] == full["total_params"] and full["restarts"] == 0 and min(full["lr_curve"]) > 0

    options = dict(data=[str(corpus)], steps=60, batch_size=8, seq_len=64, lr=1e-4, eval_every=20, device="cpu", **RELORA)
    rel = train(demo, tmp_path / "relora", options, progress=False, report_path=tmp_path / "relora.json")
    jsonschema.validate(json.loads((tmp_path / "relora.json").read_text()), SCHEMA)
    assert rel["val_loss"]["after"] < rel["val_loss"]["before"] - 0.005, rel["val_curve"]
    assert rel["trainable_params"] < full["trainable_params"] / 2
    assert rel["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 2
    # Merges right after the steps taken at LR 0 (20 and 40); the LR re-warms over 5 steps.
    lr = rel["lr_curve"]
    assert rel["restarts"] == 2 and [r["after_step"] for r in rel["relora"]["restarts"]] == [20, 40]
    assert lr[20] == lr[40] == 0.0 and lr[19] > 0 and 0 < lr[21] < lr[23] < lr[25]
    assert abs(lr[25] - full["lr_curve"][25]) < 1e-12  # back on the full-rank cosine

    # A plain dense checkpoint in the input's format: same names, dtypes and side files.
    out = tmp_path / "relora"
    assert _names_and_dtypes(out / "model.safetensors") == _names_and_dtypes(demo / "model.safetensors")
    assert (out / "config.json").read_bytes() == (demo / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (demo / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [".modelgrow", "README.md", "config.json", "model.safetensors",
                                                     "tokenizer.json"]
    model, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # transformers scores the merged weights exactly as the training loop did.
    windows = _val_windows(corpus, 64, 8 * 8)
    with torch.no_grad():
        logits = model.eval()(input_ids=windows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert abs(float(loss) - rel["val_loss"]["after"]) < 1e-4, (float(loss), rel["val_loss"])


def _ids(path: Path, n: int = 4000, vocab: int = 96) -> Path:
    np.save(path, np.random.default_rng(0).integers(0, vocab, n).astype(np.int32))
    return path


def test_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path):
    src = tiny.gpt2(tmp_path / "src")  # config dropouts 0.1: the dropout RNG must resume too
    options = dict(data=[str(_ids(tmp_path / "ids.npy"))], steps=12, batch_size=4, seq_len=16, eval_every=3, device="cpu",
                   relora=True, rank=4, relora_every=4, restart_warmup=1, adapter_dropout=0.1, save_every=5, lr=3e-3)
    whole = train(src, tmp_path / "a", options, progress=False)
    steps = checkpoints_dir(tmp_path / "a")
    assert sorted(p.name for p in steps.iterdir()) == ["step-10", "step-5"]
    # A step folder is a dense checkpoint plus safetensors/JSON state: nothing pickled.
    step5 = steps / "step-5"
    files = sorted(str(p.relative_to(step5)) for p in step5.rglob("*") if p.is_file())
    assert files == [".modelgrow", "config.json", "model.safetensors", "training_state/state.json",
                     "training_state/state.safetensors"]
    _, info = transformers.GPT2LMHeadModel.from_pretrained(step5, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = json.loads((step5 / "training_state" / "state.json").read_text())
    assert state["step"] == 5 and len(state["history"]["restarts"]) == 1

    resumed = train(src, tmp_path / "b", {**options, "save_every": None}, resume=step5, progress=False)
    assert resumed["resumed_from"] == {"path": str(step5), "step": 5}
    assert resumed["loss_curve"] == whole["loss_curve"] and resumed["val_curve"] == whole["val_curve"]
    assert resumed["relora"]["restarts"] == whole["relora"]["restarts"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # Given the checkpoints folder, the latest step is taken.
    latest = train(src, tmp_path / "c", options, resume=steps, progress=False)
    assert latest["resumed_from"]["step"] == 10 and latest["loss_curve"] == whole["loss_curve"]
    # A run with other options cannot continue from it.
    with pytest.raises(UsageError, match="other options"):
        train(src, tmp_path / "d", {**options, "lr": 1e-3}, resume=step5, progress=False)
    assert not (tmp_path / "d").exists()


def test_a_mask_id_outside_the_vocabulary_is_refused_before_training(tmp_path):
    """An id past the embedding's end would crash the lookup: refused up front, naming the value."""
    src = tiny.bert(tmp_path / "bert")
    data = _ids(tmp_path / "ids.npy")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    for bad in (vocab, 10**6):
        with pytest.raises(UsageError, match=f"mask token id {bad} is not one of the model's {vocab} token ids"):
            train(src, tmp_path / "out", dict(data=[str(data)], steps=2, batch_size=2, seq_len=16, mask_token_id=bad,
                                              device="cpu"), progress=False)
    assert not (tmp_path / "out").exists()


def test_masked_lm_trains_full_rank_and_relora(tmp_path):
    src = tiny.bert(tmp_path / "bert")
    data = _ids(tmp_path / "ids.npy")
    for extra in ({}, {"relora": True, "rank": 4, "relora_every": 2, "restart_warmup": 1}):
        r = train(src, tmp_path / f"out{len(extra)}", dict(data=[str(data)], steps=4, batch_size=4, seq_len=16,
                  mask_token_id=3, device="cpu", **extra), progress=False)
        assert r["task"] == "masked_lm" and len(r["loss_curve"]) == 4 and r["val_loss"]["after"] is not None
    names = _names_and_dtypes(tmp_path / "out4" / "model.safetensors")
    assert names == _names_and_dtypes(src / "model.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_OPTIONS = dict(steps=8, batch_size=4, seq_len=16, eval_batches=1, device="cpu", relora=True, rank=4, relora_every=3,
                    restart_warmup=1, adapter_dropout=0.0, lr=3e-3)
DIST_SCRIPT = f"""
import sys, torch
from modelgrow.trainer import train
src, data, out, report = sys.argv[1:5]
train(src, out, dict(data=[data], **{DIST_OPTIONS!r}), progress=False, report_path=report)
"""


def test_two_process_torchrun_relora_agrees_with_one_process(tmp_path):
    # No dropout anywhere (Llama has none by default, adapter dropout 0): two processes see
    # the same global batch as one. Not GPT-2: the true gradient of its key bias is exactly
    # zero (softmax ignores a per-query shift), so Adam turns its rounding noise into
    # lr-sized steps that differ with the summation order of one vs two processes.
    src = tiny.llama(tmp_path / "src")
    data = _ids(tmp_path / "ids.npy", 5000)
    one = train(src, tmp_path / "one", dict(data=[str(data)], **DIST_OPTIONS), progress=False)
    script = tmp_path / "train.py"
    script.write_text(DIST_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(src), str(data), str(tmp_path / "two"),
           str(tmp_path / "two.json")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["backend"] == "gloo" and two["restarts"] == one["restarts"] == 2
    for r1, r2 in zip(one["relora"]["restarts"], two["relora"]["restarts"]):
        assert len(r2["a_sha256"]) == 2 and len(set(r2["a_sha256"])) == 1  # every rank drew the same A
        assert r2["a_sha256"][0] == r1["a_sha256"][0]  # ... and the one process drew it too
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(src / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert worst < 1e-5 < moved, (worst, moved)
    assert np.allclose(one["loss_curve"], two["loss_curve"], atol=1e-5)


BAD = [
    ("missing data", ["--data", "{tmp}/nope.txt"], 3, "does not exist"),
    ("data name too long", ["--data", "{tmp}/" + "x" * 300], 3, "data file cannot be read: File name too long"),
    ("text without tokenizer", ["--data", "{tmp}/code.txt"], 3, "no tokenizer.json"),
    ("ids outside the vocab", ["--data", "{tmp}/big.npy"], 3, "token id 96"),
    ("too little data", ["--data", "{tmp}/short.npy"], 3, "training tokens"),
    ("zero steps", ["--data", "{tmp}/ids.npy", "--steps", "0"], 2, "--steps must be"),
    ("rank not low", ["--data", "{tmp}/ids.npy", "--relora", "--rank", "32"], 2, "--rank 32 is not below"),
    ("warmup past the first merge", ["--data", "{tmp}/ids.npy", "--relora", "--rank", "4", "--relora-every", "10",
                                     "--restart-warmup", "2", "--warmup", "20"], 2, "longer than --relora-every"),
    ("seq len", ["--data", "{tmp}/ids.npy", "--seq-len", "64"], 2, "positions"),
    ("no state to resume", ["--data", "{tmp}/ids.npy", "--resume", "{tmp}"], 3, "no training state"),
    ("report folder", ["--data", "{tmp}/ids.npy", "--report", "{tmp}/no/r.json"], 5, "does not exist"),
]


@pytest.mark.parametrize("args,code,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_cli_errors_come_before_any_step_and_write_nothing(tmp_path, args, code, message):
    src = tiny.gpt2(tmp_path / "src")  # no tokenizer.json beside it
    _ids(tmp_path / "ids.npy")
    np.save(tmp_path / "big.npy", np.full(100, 96, dtype=np.int32))
    np.save(tmp_path / "short.npy", np.zeros(20, dtype=np.int32))
    (tmp_path / "code.txt").write_text("def f(): pass\n" * 10)
    args = [a.format(tmp=tmp_path) for a in args]
    for flag, value in (("--steps", "3"), ("--seq-len", "16")):
        if flag not in args:
            args += [flag, value]
    result = CliRunner().invoke(main, ["train", str(src), *args, "--save-every", "1", "-o", str(tmp_path / "out")])
    assert result.exit_code == code, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists() and not checkpoints_dir(tmp_path / "out").exists()


def test_cli_refuses_an_existing_output_and_a_missing_matplotlib(tmp_path, monkeypatch):
    src = tiny.gpt2(tmp_path / "src")
    data = _ids(tmp_path / "ids.npy")
    (tmp_path / "out").mkdir()
    base = ["train", str(src), "--data", str(data), "--steps", "2", "--seq-len", "16", "--device", "cpu"]
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "out")])
    assert result.exit_code == 5 and "exists; pass --overwrite" in result.output, result.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "new"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "--plot needs matplotlib" in result.output and "modelgrow[plot]" in result.output
    assert not (tmp_path / "new").exists()


def test_options_defaults_follow_the_brief():
    o = TrainOptions(data=["x"], steps=2000, relora=True, relora_every=500)
    assert o.warmup_steps == 200 and o.eval_interval == 200 and o.lr == 1e-3 and o.weight_decay == 0.1
    assert TrainOptions(data=["x"], steps=20000, relora=True, relora_every=500).warmup_steps == 500  # capped
    assert [s for s in range(2000) if o.restart_after(s)] == [500, 1000, 1500]
    assert o.lr_factor(500) == 0.0 and o.lr_factor(499) > 0
    with pytest.raises(UsageError, match="unknown train option"):
        TrainOptions.from_dict({"data": ["x"], "stpes": 3})
