"""What an output folder says about itself (issue #15): the dtype its weights are stored in
(`--dtype`), a model card (README.md) with the recipe, the exactness figure and the
command, and sources named by a Hugging Face Hub id, read from the local cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

import modelgrow
import tiny
from modelgrow.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def schema(name: str) -> dict:
    return json.loads((ROOT / "schemas" / name).read_text())


def dtypes_of(folder: Path) -> set[torch.dtype]:
    out = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            out |= {f.get_tensor(k).dtype for k in f.keys()}
    return out


def front_matter(card: str) -> list[str]:
    assert card.startswith("---\n"), card[:40]
    return card.split("---\n")[1].splitlines()


@pytest.fixture
def src(tmp_path):
    return tiny.gpt2(tmp_path / "src")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- --dtype ------------------------------------------------------------------------------------


def test_bf16_output_holds_bf16_tensors_verifies_and_loads(src, tmp_path):
    result = modelgrow.convert(src, tmp_path / "out", width="2x", depth="2x", dtype="bf16")
    out = tmp_path / "out"
    assert dtypes_of(out) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    report = result.report
    assert report["dtype"] == {"requested": "bf16", "source": ["float32"], "output": ["bfloat16"], "rounds": True,
                               "rounded_from": ["float32"]}
    assert result.exact and result.verified  # the growth is exact; verified to bf16's tolerance
    assert any("rounded once more" in note for note in report["promise"]["notes"])
    v = report["verify"]
    assert v["cast"]["dtype"] == "bfloat16" and 0 < v["cast"]["max_abs_diff"] <= v["tolerance"]
    jsonschema.validate(result.to_dict(), schema("report.schema.json"))
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_fp32_from_a_bf16_source_is_exact_to_fp32(tmp_path):
    src = tmp_path / "src16"
    transformers.GPT2LMHeadModel.from_pretrained(tiny.gpt2(tmp_path / "src")).to(torch.bfloat16).save_pretrained(src)
    result = modelgrow.convert(src, tmp_path / "out", width="2x", dtype="fp32")
    assert dtypes_of(tmp_path / "out") == {torch.float32}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    assert result.report["dtype"]["rounds"] is False and "cast" not in result.report["verify"]
    assert result.verified and result.report["verify"]["tolerance"] < 1e-3  # fp32's, not bf16's


@pytest.mark.parametrize("command", [["convert", "--width", "2x"], ["train", "--data", "x.npy"]])
def test_a_bad_dtype_is_one_line_exit_2(src, tmp_path, command):
    name, *rest = command
    result = CliRunner().invoke(main, [name, str(src), "-o", str(tmp_path / "out"), *rest, "--dtype", "fp8"])
    assert result.exit_code == 2, result.output
    assert result.output == "error: --dtype must be one of bf16, fp16, fp32, source, got 'fp8'\n"
    assert not (tmp_path / "out").exists()


def test_train_writes_the_dtype_asked_and_a_card(src, tmp_path, one_thread):
    np.save(tmp_path / "ids.npy", np.arange(400, dtype=np.int32) % 96)
    result = modelgrow.train(src, tmp_path / "t", data=[tmp_path / "ids.npy"], steps=2, seq_len=8, device="cpu",
                             dtype="bf16")
    assert dtypes_of(tmp_path / "t") == {torch.bfloat16}
    assert json.loads((tmp_path / "t" / "config.json").read_text())["dtype"] == "bfloat16"
    card = (tmp_path / "t" / "README.md").read_text()
    assert front_matter(card) == ["library_name: transformers", "tags:", "- modelgrow"]
    assert "trained with modelgrow" in card and "Not verified: training changes" in card
    assert "modelgrow train SOURCE -o OUTPUT --data ids.npy --steps 2 --seq-len 8 --device cpu --dtype bf16" in card
    assert str(tmp_path) not in card and result["card"] == {"file": "README.md", "from": "generated"}
    jsonschema.validate(result.to_dict(), schema("train-report.schema.json"))


# -- the model card -----------------------------------------------------------------------------


def test_the_card_has_front_matter_recipe_and_figure_and_no_path(src, tmp_path, monkeypatch):
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for out, spelling in (("a", str(src)), ("b", "./link")):
        modelgrow.convert(spelling, out, width="2x", depth="2x", noise=0)
    card = (tmp_path / "a" / "README.md").read_bytes()
    assert card == (tmp_path / "b" / "README.md").read_bytes()  # byte-identical for any spelling
    text = card.decode()
    assert front_matter(text) == ["library_name: transformers", "tags:", "- modelgrow"]  # no Hub id: no base_model
    assert "| residual | 32 | 64 |" in text and "| layers | 2 | 4 |" in text
    assert "operator: `copy` (noise=0.0, noise_mode=exact, seed=0)" in text
    assert "Function-preserving by construction: yes." in text and "Verified: on 2 × 16 random tokens" in text
    assert "modelgrow convert SOURCE -o OUTPUT --width 2x --depth 2x --noise 0.0" in text
    assert "modelgrow.convert('SOURCE', 'OUTPUT', width='2x', depth='2x', noise=0.0)" in text
    assert str(tmp_path) not in text and "link" not in text
    assert "README.md" in json.loads((tmp_path / "a" / ".modelgrow").read_text())["files"]


def test_the_source_card_is_replaced_unless_kept(src, tmp_path):
    (src / "README.md").write_text("---\nlicense: mit\n---\n# The small model\n")
    replaced = modelgrow.convert(src, tmp_path / "new", width="2x", verify=False)
    card = (tmp_path / "new" / "README.md").read_text()
    assert "The small model" not in card and "Not verified" in card and replaced["card"]["from"] == "generated"
    kept = modelgrow.convert(src, tmp_path / "kept", width="2x", verify=False, keep_card=True)
    assert (tmp_path / "kept" / "README.md").read_bytes() == (src / "README.md").read_bytes()
    assert kept["card"] == {"file": "README.md", "from": "source"}
    assert "README.md" not in kept["tagalong"]["copied"]  # a card, not a tag-along file


# -- Hub ids ------------------------------------------------------------------------------------


def hub_cache(root: Path, folder: Path, repo: str = "org/tiny") -> Path:
    """``folder`` as huggingface_hub caches a download: blobs, a snapshot of links, refs/main."""
    store = root / f"models--{repo.replace('/', '--')}"
    (store / "blobs").mkdir(parents=True)
    snapshot = store / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (store / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob}")
    (store / "refs").mkdir()
    (store / "refs" / "main").write_text(COMMIT)
    return root


def test_a_hub_id_resolves_from_the_cache_offline_and_grows(src, tmp_path, monkeypatch, no_network):
    (src / "README.md").write_text("# tiny\n")
    cache = hub_cache(tmp_path / "cache", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", "org/tiny", "-o", "out", "--width", "2x", "--no-verify",
                                       "--report", "r.json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["source"]["hub"] == {"id": "org/tiny", "revision": None, "commit": COMMIT}
    card = (tmp_path / "out" / "README.md").read_text()
    assert front_matter(card)[0] == "base_model: org/tiny" and "modelgrow convert org/tiny -o OUTPUT" in card
    assert "(commit `" + COMMIT + "`)" in card and str(tmp_path) not in card
    # A revision; the same weights as from the folder itself.
    pinned = modelgrow.convert(f"org/tiny@{COMMIT}", "pinned", width="2x", verify=False)
    assert pinned["source"]["hub"]["revision"] == COMMIT
    assert "base_model: org/tiny" in (tmp_path / "pinned" / "README.md").read_text()
    local = modelgrow.convert(src, "local", width="2x", verify=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    assert local["source"]["sha256"] == report["source"]["sha256"]


def test_a_local_folder_named_like_a_hub_id_wins(src, tmp_path, monkeypatch, no_network):
    (tmp_path / "org").mkdir()
    shutil.copytree(src, tmp_path / "org" / "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    result = modelgrow.convert("org/tiny", dry_run=True, width="2x")
    assert "hub" not in result["source"]


def test_an_uncached_hub_id_offline_is_one_line_exit_3(src, tmp_path, monkeypatch, no_network):
    cache = hub_cache(tmp_path / "cache", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    for source in ("org/missing", "org/tiny@v2"):
        result = CliRunner().invoke(main, ["convert", source, "-o", "out", "--width", "2x"])
        assert result.exit_code == 3, result.output
        lines = result.output.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith(f"error: {source}: is not a local path"), result.output
        assert "not in the cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "out").exists() and os.listdir(cache) == ["models--org--tiny"]
