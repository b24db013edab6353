"""Recipe files (issue #15): `modelgrow run RECIPE.yaml` makes byte for byte what the same
commands make, `modelgrow run REPORT.json` makes a report's output again (same sha256), and
a malformed recipe is one line naming the file, the line and the key, exit 2, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from modelgrow.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative name, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def schema(name: str) -> dict:
    return json.loads((ROOT / "schemas" / name).read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a one-layer GPT-2 (``small``; one layer keeps the export quick) and ids."""
    folder = tmp_path_factory.mktemp("recipes")
    tiny.gpt2(folder / "small", layers=1)
    np.save(folder / "ids.npy", np.random.default_rng(0).integers(0, 96, 4000).astype(np.int32))
    return folder


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


# -- a recipe makes what the commands make ------------------------------------------------------


def test_a_convert_recipe_makes_the_cli_bytes_and_its_report_replays(work, tmp_path, monkeypatch):
    # Relative paths start at the recipe's folder, not at the working folder; underscores stand for dashes.
    recipe = write(tmp_path / "recipes", "grow.yaml", f"""\
# one file per run, kept in git
source: {work / 'small'}
output: ../out/recipe
convert:
  width: 2x
  depth: 2x
  noise: 0.02
  seed: 7
  max_shard_size: 60KB
  dtype: bf16
""")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(work)  # the command line's relative paths start here
    done = cli("run", recipe, "-q", "--report", tmp_path / "run.json")
    assert done.exit_code == 0, done.output
    made = cli("convert", "small", "-o", tmp_path / "out" / "cli", "--width", "2x", "--depth", "2x", "--noise", "0.02",
               "--seed", "7", "--max-shard-size", "60KB", "--dtype", "bf16", "-q", "--report", tmp_path / "convert.json")
    assert made.exit_code == 0, made.output
    ours, theirs = files(tmp_path / "out" / "recipe"), files(tmp_path / "out" / "cli")
    assert len([n for n in ours if n.endswith(".safetensors")]) > 1  # several shards
    assert ours == theirs

    run = json.loads((tmp_path / "run.json").read_text())
    assert run["command"] == "run" and run["recipe"]["convert"]["max-shard-size"] == "60KB"
    jsonschema.validate(run, schema("run-report.schema.json"))
    jsonschema.validate(run["stages"]["convert"], schema("report.schema.json"))
    report = json.loads((tmp_path / "convert.json").read_text())
    jsonschema.validate(report, schema("report.schema.json"))
    assert report["options"]["growth"]["width"] == "2x" and report["options"]["convert"]["max_shard_size"] == "60KB"

    # The report as a recipe: the same YAML a user would keep, then the same bytes again.
    shown = cli("run", tmp_path / "convert.json", "--print-recipe")
    assert shown.exit_code == 0 and "max-shard-size: 60KB" in shown.output and "noise: 0.02" in shown.output
    (tmp_path / "again").mkdir()
    again = cli("run", tmp_path / "convert.json", "--into", tmp_path / "again", "--report", tmp_path / "replay.json")
    assert again.exit_code == 0, again.output
    assert "files byte-identical to" in again.output
    assert files(tmp_path / "again" / "cli") == theirs
    assert json.loads((tmp_path / "replay.json").read_text())["replay"]["identical"] is True
    # So does the run's own report (its recipe, paths absolute), here as JSON on standard output.
    (tmp_path / "third").mkdir()
    third = cli("run", tmp_path / "run.json", "--into", tmp_path / "third", "-q", "--json")
    assert third.exit_code == 0, third.output
    assert json.loads(third.stdout)["replay"] == {"report": str(tmp_path / "run.json"), "identical": True,
                                                  "stages": {"convert": {"files": len(report["output"]["files"]), "differ": []}}}
    assert files(tmp_path / "third" / "recipe") == ours


# An ONNX export takes ~16 s here, twice in this test: CI runs convert and train, the export
# stage with MODELGROW_SLOW_TESTS=1 (the export's own determinism is tested in test_export).
EXPORT = os.environ.get("MODELGROW_SLOW_TESTS") == "1"


def test_convert_train_and_export_make_the_cli_bytes(work, tmp_path, monkeypatch):
    if EXPORT:
        pytest.importorskip("onnxruntime")
    export = "export: {output: ../out/model.onnx, check: false}\n" if EXPORT else ""
    recipe = write(tmp_path / "recipes", "all.yaml", f"""\
source: {work / 'small'}
output: ../out/grown
convert: {{width: 2x, depth: 2x, verify: false}}
train:
  output: ../out/trained
  data: {work / 'ids.npy'}
  steps: 2
  batch-size: 4
  seq_len: 16
  device: cpu
  relora: true
  rank: 4
  relora-every: 1
{export}""")
    for folder in ("out", "cli"):
        (tmp_path / folder).mkdir()
    done = cli("run", recipe, "-q", "--report", tmp_path / "run.json")
    assert done.exit_code == 0, done.output
    monkeypatch.chdir(work)
    theirs = tmp_path / "cli"
    for args in (["convert", "small", "-o", theirs / "grown", "--width", "2x", "--depth", "2x", "--no-verify", "-q"],
                 ["train", theirs / "grown", "-o", theirs / "trained", "--data", "ids.npy", "--steps", "2", "--batch-size",
                  "4", "--seq-len", "16", "--device", "cpu", "--relora", "--rank", "4", "--relora-every", "1", "-q"],
                 ["export", theirs / "trained", "-o", theirs / "model.onnx", "--no-check"])[: 3 if EXPORT else 2]:
        made = cli(*args)
        assert made.exit_code == 0, made.output
    out = tmp_path / "out"
    assert files(out / "grown") == files(theirs / "grown")
    assert files(out / "trained") == files(theirs / "trained")
    if EXPORT:
        assert (out / "model.onnx").read_bytes() == (theirs / "model.onnx").read_bytes()

    run = json.loads((tmp_path / "run.json").read_text())
    assert set(run["stages"]) == {"convert", "train", *(["export"] if EXPORT else [])}
    assert run["recipe"]["train"]["seq-len"] == 16
    jsonschema.validate(run, schema("run-report.schema.json"))
    train = run["stages"]["train"]
    jsonschema.validate(train, schema("train-report.schema.json"))
    assert train["train_run"]["max_shard_size"] == "2GB" and train["options"]["data"] == [str(work / "ids.npy")]


def test_a_fitted_ligo_report_replays_to_the_same_sha256(work, tmp_path, monkeypatch):
    monkeypatch.chdir(work)
    made = cli("convert", "small", "-o", tmp_path / "ligo", "--width", "2x", "--operator", "ligo", "--fit-data", "ids.npy",
               "--fit-steps", "2", "--fit-batch-size", "4", "--fit-seq-len", "16", "--device", "cpu", "--no-verify",
               "-q", "--report", tmp_path / "ligo.json")
    assert made.exit_code == 0, made.output
    report = json.loads((tmp_path / "ligo.json").read_text())
    assert report["fit"]["steps"] == 2 and report["options"]["fit"]["data"] == ["ids.npy"]
    monkeypatch.chdir(tmp_path)  # the report's cwd says where its relative paths start
    (tmp_path / "again").mkdir()
    again = cli("run", tmp_path / "ligo.json", "--into", tmp_path / "again", "--report", tmp_path / "replay.json")
    assert again.exit_code == 0, again.output
    replayed = json.loads((tmp_path / "replay.json").read_text())
    assert replayed["recipe"]["convert"]["operator"] == "ligo" and replayed["recipe"]["fit"]["steps"] == 2
    want = {f["name"]: f["sha256"] for f in report["output"]["files"]}
    got = {f["name"]: f["sha256"] for f in replayed["stages"]["convert"]["output"]["files"]}
    assert got == want
    # A report whose files no longer match says so: exit 4, outputs kept.
    report["output"]["files"][0]["sha256"] = "0" * 64
    (tmp_path / "tampered.json").write_text(json.dumps(report))
    (tmp_path / "third").mkdir()
    bad = cli("run", tmp_path / "tampered.json", "--into", tmp_path / "third")
    assert bad.exit_code == 4 and "the replay made other bytes" in bad.stderr and report["output"]["files"][0]["name"] in bad.stderr


# -- a malformed recipe: one line, file:line, the key; exit 2; nothing written -----------------------


MALFORMED = {
    "syntax": ("source: small\nconvert:\n  width: [2x\n", "bad.yaml:4:", None),
    "unknown key": ("source: small\noutput: out\nconvert:\n  widht: 2x\n", "bad.yaml:4: convert.widht: unknown option",
                    "did you mean width?"),
    "unknown section": ("source: small\noutput: out\nconver:\n  width: 2x\n", "bad.yaml:3: conver: unknown key",
                        "did you mean convert?"),
    "wrong section": ("source: small\noutput: out\nconvert:\n  steps: 3\n", "bad.yaml:4: convert.steps: unknown option",
                      "steps is an option of fit and train"),
    "bad value": ("source: small\noutput: out\nconvert:\n  width: 2x\n  dtype: bf17\n",
                  "bad.yaml:5: convert.dtype: must be one of bf16, fp16, fp32, source, got 'bf17'", None),
    "bad type": ("source: small\noutput: out\nconvert: {width: 2x}\ntrain:\n  output: t\n  data: ids.npy\n  steps: two\n",
                 "bad.yaml:7: train.steps: must be a whole number >= 1, got 'two'", None),
    "not a flag": ("source: small\noutput: out\nconvert:\n  verify: maybe\n",
                   "bad.yaml:4: convert.verify: must be true or false, got 'maybe'", None),
    "duplicate": ("source: small\noutput: out\nconvert:\n  width: 2x\n  depth: 2x\n  width: 3x\n",
                  "bad.yaml:6: convert.width: given twice (first on line 4)", None),
    "underscore duplicate": ("source: small\noutput: out\nconvert:\n  max-shard-size: 1MB\n  max_shard_size: 2MB\n",
                             "bad.yaml:5: convert.max_shard_size: given twice (first on line 4)", None),
    "dry-run key": ("source: small\noutput: out\nconvert:\n  dry-run: true\n", "bad.yaml:4: convert.dry-run: unknown option",
                    "use `modelgrow run --dry-run`"),
    "missing source": ("output: out\nconvert:\n  width: 2x\n", "bad.yaml:1: source: missing", None),
    "missing output": ("source: small\nconvert:\n  width: 2x\n", "bad.yaml:1: output: missing", "--dry-run"),
    "not a mapping": ("- source: small\n- convert: {}\n", "bad.yaml:1: a recipe is a mapping", None),
    "unsafe tag": ("source: !!python/object/apply:os.system ['touch pwned']\nconvert: {}\n", "bad.yaml:1:9:",
                   "could not determine a constructor"),
    "fit without a learned operator": ("source: small\noutput: out\nconvert: {width: 2x}\nfit: {steps: 2}\n",
                                       "bad.yaml:4: fit: fits a learned operator, and copy is not one", None),
    "operator option": ("source: small\noutput: out\nconvert: {width: 2x, rank: 4}\n",
                        "bad.yaml:3: convert.rank:", None),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_recipe_is_one_line_naming_the_key(work, tmp_path, monkeypatch, case):
    text, start, also = MALFORMED[case]
    folder = tmp_path / "w"
    write(folder, "bad.yaml", text)
    (folder / "small").symlink_to(work / "small")
    (folder / "ids.npy").symlink_to(work / "ids.npy")
    monkeypatch.chdir(folder)
    before = sorted(p.name for p in folder.iterdir())
    result = cli("run", "bad.yaml", "--report", "run.json")
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), lines
    assert also is None or also in lines[0], lines
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, nothing run


def test_a_missing_input_and_a_dry_run(work, tmp_path):
    recipe = write(tmp_path, "r.yaml", f"source: {work / 'small'}\nconvert: {{width: 2x}}\noutput: g\n"
                                       "train: {output: t, data: nowhere.npy}\n")
    result = cli("run", recipe)
    assert result.exit_code == 3 and f"r.yaml:4: train.data: {tmp_path / 'nowhere.npy'} does not exist" in result.stderr
    recipe = write(tmp_path, "d.yaml", f"source: {work / 'small'}\nconvert: {{width: 2x, depth: 2x}}\n")
    result = cli("run", recipe, "--dry-run")
    assert result.exit_code == 0 and "function-preserving: yes" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.yaml", "r.yaml"]


def test_a_continued_schedule_without_a_rate_is_refused_before_anything_is_written(work, tmp_path):
    """lr-schedule: continue needs the source's final rate; the recipe's source has none
    beside it, so even a dry run says so (exit 2) and nothing is written. With the
    Trainer's record beside a copy of the source, the same dry run passes."""
    text = ("source: SRC\nconvert: {width: 2x}\noutput: g\n"
            f"train: {{output: t, data: {work / 'ids.npy'}, steps: 4, lr-schedule: continue}}\n")
    recipe = write(tmp_path / "a", "r.yaml", text.replace("SRC", str(work / "small")))
    for extra in ((), ("--dry-run",)):
        result = cli("run", recipe, *extra)
        assert result.exit_code == 2, result.output
        line = result.stderr.strip().splitlines()
        assert len(line) == 1 and "r.yaml" in line[0] and "train (lr-schedule: continue)" in line[0]
        assert "source-final-lr" in line[0]
        assert sorted(p.name for p in recipe.parent.iterdir()) == ["r.yaml"]
    src = tmp_path / "src"
    src.mkdir()
    for f in (work / "small").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 9, "learning_rate": 2e-4}]}))
    recipe = write(tmp_path / "b", "r.yaml", text.replace("SRC", str(src)))
    result = cli("run", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
