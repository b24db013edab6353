"""The third-party plugin in plugins/modelgrow-nanogpt, installed and exercised as a
distribution: found through its entry point, listed by `modelgrow plugins` with its
distribution name and version, growing a non-Hugging-Face checkpoint exactly.

CI installs the plugin next to modelgrow before running the tests:
``python -m pip install --no-deps --no-build-isolation -e plugins/modelgrow-nanogpt``.
Where it is not installed, these tests build and install it themselves, without
touching the environment: ``pip install --target`` into a temporary folder that is put
on sys.path (entry points are read from the ``.dist-info`` there). Either way the
plugin is found only through its entry point.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from modelgrow import plugins
from modelgrow.cli import main
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SRC = ROOT / "plugins" / "modelgrow-nanogpt"
DIST, VERSION = "modelgrow-nanogpt", "0.1.0"


def _installed() -> bool:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(ep.group == "modelgrow" for ep in dist.entry_points)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The folder holding the installed plugin when the tests installed it (else None)."""
    if _installed():
        yield None
        return
    root = tmp_path_factory.mktemp("nanogpt")
    # Build from a copy: setuptools leaves build/ and *.egg-info beside the sources.
    src = shutil.copytree(PLUGIN_SRC, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    # Build with the setuptools already installed (fast, offline); an environment
    # without one (Python 3.12+ venvs) lets pip fetch it in an isolated build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", *isolation, "--no-compile",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"installing the plugin failed:\n{result.stdout}\n{result.stderr}"
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    plugins.reset()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m == "modelgrow_nanogpt" or m.startswith("modelgrow_nanogpt.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        plugins.reset()


@pytest.fixture
def fresh(monkeypatch):
    """Entry-point plugins load again under this test's environment, and after it."""
    plugins.reset()
    yield monkeypatch
    monkeypatch.undo()
    plugins.reset()


def nanogpt_checkpoint(folder: Path, *, bias: bool = True, seed: int = 0) -> Path:
    """A nanoGPT-style checkpoint: nanoGPT names, tied head stored once, model_args config.
    Norm gains and biases are random so a growth that mishandled them would show."""
    from modelgrow_nanogpt.model import GPT

    args = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32, "vocab_size": 80, "bias": bias, "dropout": 0.0}
    torch.manual_seed(seed)
    model = GPT(**{k: v for k, v in args.items() if k != "dropout"})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = ".ln_" in name and name.endswith("weight")
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen) if gain else 0.1 * torch.randn(p.shape, generator=gen))
    folder.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_args": args}))
    return folder


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Run a checkpoint with the plugin's own module, independently of modelgrow verify."""
    from safetensors.torch import load_file

    from modelgrow_nanogpt.model import GPT

    args = json.loads((folder / "config.json").read_text())["model_args"]
    model = GPT(n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"], block_size=args["block_size"],
                vocab_size=args["vocab_size"], bias=args["bias"], eps=args.get("norm_eps", 1e-5))
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the tied head, stored once
    with torch.no_grad():
        return model.eval()(ids)["logits"]


def test_plugins_command_lists_the_distribution_and_survives_a_broken_one(site, tmp_path):
    """One real process: entry points as installed, plus a plugin that raises on import
    (a throwaway .dist-info on PYTHONPATH). The CLI lists both and exits 0."""
    broken = tmp_path / "broken"
    info = broken / "exploding_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exploding-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[modelgrow]\nexploding = exploding_plugin\n")
    (broken / "exploding_plugin.py").write_text("raise RuntimeError('this plugin is broken on purpose')\n")
    env = dict(os.environ)
    env.pop("MODELGROW_PLUGINS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site or ""), str(broken), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, "-c", "from modelgrow.cli import main; main()", "plugins"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"nanogpt  [{DIST} {VERSION}]" in out
    assert "architectures: nanogpt" in out.split(f"[{DIST}")[1]
    assert "exploding  FAILED to load: RuntimeError: this plugin is broken on purpose" in out
    assert re.search(r"architectures: bert, deit, .*gpt2, .*llama", out)  # the built-ins are all still there


def test_a_plugin_failing_while_registering_is_listed_in_a_fresh_process(site, tmp_path):
    """The module imports, its hook raises: a fresh `modelgrow plugins` (nothing warmed
    before it) lists it as FAILED and still lists the built-ins."""
    folder = tmp_path / "late"
    info = folder / "late_failure-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: late-failure\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[modelgrow]\nlate = late_failure\n")
    (folder / "late_failure.py").write_text(
        "from modelgrow.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_operators(register):\n    raise ValueError('cannot register today')\n")
    env = dict(os.environ)
    env.pop("MODELGROW_PLUGINS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site or ""), str(folder), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, "-m", "modelgrow", "plugins"], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "late  FAILED to load: register_operators: ValueError: cannot register today" in result.stdout
    assert "operators: copy" in result.stdout
    listed = subprocess.run([sys.executable, "-m", "modelgrow", "plugins", "--json"], env=env, capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    failures = json.loads(listed.stdout)["failures"]
    assert [f["name"] for f in failures] == ["late"], failures


def test_describe_plugins_names_distribution_and_version(site, fresh):
    rows = {r["name"]: r for r in plugins.describe_plugins()}
    assert rows["nanogpt"]["distribution"] == DIST and rows["nanogpt"]["version"] == VERSION
    assert rows["nanogpt"]["architectures"] == ["nanogpt"]
    assert rows["nanogpt"]["hooks"] == ["register_architectures"]


@pytest.mark.parametrize("value,loaded", [("", False), ("someone-else", False), (DIST, True), ("modelgrow_nanogpt", True)])
def test_env_var_restricts_entry_point_plugins(site, fresh, value, loaded):
    fresh.setenv(plugins.ENV_VAR, value)
    assert ("nanogpt" in plugins.get_architectures()) is loaded
    assert "gpt2" in plugins.get_architectures()  # built-ins are not entry points: always there
    assert ("nanogpt" in {r["name"] for r in plugins.describe_plugins()}) is loaded


@pytest.mark.parametrize(
    "spec,bias",
    [(GrowthSpec(width="2x", depth="2x"), True), (GrowthSpec(width="1.5x", depth="3"), True), (GrowthSpec(width="3x", depth="3"), False)],
    ids=["2x-2x", "1.5x-3-lemon", "3x-3-nobias"],
)
def test_grows_a_nanogpt_checkpoint_exactly(site, fresh, tmp_path, spec, bias):
    src = nanogpt_checkpoint(tmp_path / "src", bias=bias)
    report = convert(src / "model.safetensors", tmp_path / "grown", spec, operator_options={"noise": 0.01}, progress=False)
    assert report["plan"]["architecture"] == "nanogpt"
    assert report["promise"]["exact"] and report["verify"]["passed"], report["verify"]
    assert report["verify"]["max_abs_diff"] < 1e-4
    args = json.loads((tmp_path / "grown" / "config.json").read_text())["model_args"]
    # Nested config keys ("model_args.n_embd") are read and written in place.
    assert args["n_embd"] == report["plan"]["target"]["residual"] and args["n_layer"] == report["plan"]["target"]["layers"]
    assert args["n_head"] == args["n_embd"] // 8 and args["vocab_size"] == 80 and args["bias"] is bias
    if spec.width == "1.5x":  # LEMON: eps x s, from the layout's eps_default (1e-5)
        assert args["norm_eps"] == pytest.approx(1e-5 * 2 / 3)
    ids = torch.randint(0, 80, (2, 24), generator=torch.Generator().manual_seed(5))
    assert (_logits(src, ids) - _logits(tmp_path / "grown", ids)).abs().max().item() < 1e-4


def test_cli_convert_and_verify_through_the_plugin(site, fresh, tmp_path):
    src = nanogpt_checkpoint(tmp_path / "src")
    runner = CliRunner()
    grown = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "big"), "--width", "2x", "--depth", "3", "-q"])
    assert grown.exit_code == 0, grown.output
    checked = runner.invoke(main, ["verify", str(src), str(tmp_path / "big"), "--json"])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.output)["passed"]
    inspected = runner.invoke(main, ["inspect", str(tmp_path / "big"), "--json"])
    assert json.loads(inspected.output)["architecture"] == "nanogpt"


def test_ffn_size_cannot_be_chosen_without_a_config_key(site, fresh, tmp_path):
    src = nanogpt_checkpoint(tmp_path / "src")
    result = CliRunner().invoke(main, ["convert", str(src), "--dry-run", "--width", "2x", "--ffn", "300"])
    assert result.exit_code == 2 and "no FFN size" in result.output


# -- the whole pipeline through a plugin architecture (runtime contract only) -------------


def _pattern_ids(path: Path) -> Path:
    """Token ids with structure a few steps can learn (a repeating ramp over the vocabulary)."""
    import numpy as np

    np.save(path, np.tile(np.arange(80, dtype=np.int32), 60))
    return path


def test_fit_train_and_export_through_the_plugin(site, fresh, tmp_path):
    """convert -> verify -> LiGO fit -> train (full-rank, ReLoRA) -> ONNX export with parity,
    through modelgrow's public API: the plugin implements build_module and nothing else."""
    import modelgrow

    src = nanogpt_checkpoint(tmp_path / "src")
    data = _pattern_ids(tmp_path / "ids.npy")
    grown = modelgrow.convert(src, tmp_path / "grown", width="2x", depth="2x")
    assert grown.exact and grown.verified

    fitted = modelgrow.convert(src, tmp_path / "fitted", width="2x", operator="ligo",
                               fit={"data": [data], "steps": 8, "lr": 1e-3, "seq_len": 16, "batch_size": 4,
                                    "device": "cpu"})
    fit = fitted["fit"]
    assert fit["task"] == "causal_lm" and len(fit["loss_curve"]) == 8
    assert fit["eval"]["after"] < fit["eval"]["before"], fit["eval"]

    common = {"data": [data], "steps": 12, "lr": 3e-3, "seq_len": 16, "batch_size": 4, "device": "cpu",
              "eval_every": 0, "val_fraction": 0.2}
    full = modelgrow.train(tmp_path / "grown", tmp_path / "trained", **common)
    before, after = full.val_loss
    assert after < before, (before, after)
    low = modelgrow.train(tmp_path / "grown", tmp_path / "relora", relora=True, rank=4, relora_every=6,
                          restart_warmup=2, **common)
    assert low["restarts"] == 1 and low["trainable_params"] < full["trainable_params"]
    assert low.val_loss[1] < low.val_loss[0]

    exported = modelgrow.export(tmp_path / "trained", tmp_path / "trained.onnx")
    assert exported.parity_passed and exported["outputs"] == ["logits"]
    assert exported.output == tmp_path / "trained.onnx" and exported.output.is_file()


def test_cli_export_through_the_plugin(site, fresh, tmp_path):
    src = nanogpt_checkpoint(tmp_path / "src")
    result = CliRunner().invoke(main, ["export", str(src), "-o", str(tmp_path / "m.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the summary went to stderr
    assert report["parity"]["passed"] and report["source"]["architecture"] == "nanogpt"
