"""The command line as a user meets it: output, exit codes, JSON."""

from __future__ import annotations

import json

from click.testing import CliRunner

import tiny
from modelgrow.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_help_lists_commands():
    code, out = run("--help")
    assert code == 0
    for command in ("convert", "inspect", "verify", "demo", "plugins"):
        assert command in out
    assert "Exit codes" in out


def test_convert_prints_plan_and_writes(tmp_path):
    src = tiny.llama(tmp_path / "l")
    code, out = run("convert", src, "-o", tmp_path / "out", "--width", "2x", "--depth", "2x", "--report", tmp_path / "r.json")
    assert code == 0, out
    assert "residual" in out and "64" in out and "function-preserving: yes" in out
    assert "verify: grown model matches the source" in out
    assert json.loads((tmp_path / "r.json").read_text())["verify"]["passed"]


def test_dry_run_prints_plan_only(tmp_path):
    code, out = run("convert", tiny.gpt2(tmp_path / "g"), "--width", "2x", "--depth-mode", "stack", "--depth", "2x", "--dry-run")
    assert code == 0 and "function-preserving: no" in out and "stack" in out
    assert not (tmp_path / "out").exists()


def test_convert_without_output_is_a_usage_error(tmp_path):
    code, out = run("convert", tiny.gpt2(tmp_path / "g"), "--width", "2x")
    assert code == 2 and "--output" in out


def test_inspect(tmp_path):
    src = tiny.llama(tmp_path / "l")
    code, out = run("inspect", src)
    assert code == 0 and "llama (LlamaForCausalLM)" in out and "kv_heads=2" in out
    code, out = run("inspect", src, "--json", "--tensors")
    info = json.loads(out)
    assert info["dims"]["heads"] == 4 and info["tied_embeddings"] is False
    q = next(t for t in info["tensors"] if t["name"].endswith("layers.0.self_attn.q_proj.weight"))
    assert q["shape"] == [32, 32] and q["axes"] == "attn × residual"
    assert info["params"] == sum(__import__("math").prod(t["shape"]) for t in info["tensors"])


def test_verify_command_exit_codes(tmp_path):
    src = tiny.gpt2(tmp_path / "g")
    run("convert", src, "-o", tmp_path / "exact", "--width", "2x", "--depth", "2x", "--no-verify")
    run("convert", src, "-o", tmp_path / "stack", "--depth", "2x", "--depth-mode", "stack", "--no-verify")
    code, out = run("verify", src, tmp_path / "exact", "--json")
    assert code == 0 and json.loads(out)["passed"]
    code, out = run("verify", src, tmp_path / "stack")
    assert code == 4 and "differs from the source" in out


def test_plugins_lists_builtins():
    code, out = run("plugins", "--json")
    data = json.loads(out)
    builtin = {p["name"]: p for p in data["plugins"]}
    assert {"gpt2", "llama", "bert"} <= set(builtin["modelgrow.architectures.builtin"]["architectures"])
    assert "copy" in builtin["modelgrow.operators.copy"]["operators"]


def test_demo_grows_the_shipped_model(tmp_path):
    code, out = run("demo", "-o", tmp_path / "demo")
    assert code == 0, out
    assert "same continuation: yes" in out and "matches the source" in out
    assert (tmp_path / "demo" / "tokenizer.json").exists()


def test_no_verify_is_obeyed(tmp_path):
    """A two-way flag's "no" reaches the run (its default is decided by the command)."""
    src = tiny.gpt2(tmp_path / "src")
    code, out = run("convert", src, "-o", tmp_path / "out", "--width", "2x", "--no-verify", "--report", tmp_path / "r.json")
    assert code == 0, out
    assert "verify" not in json.loads((tmp_path / "r.json").read_text())
