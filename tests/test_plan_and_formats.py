"""Growth plans, config rewriting, sharded input and output, reports."""

from __future__ import annotations

import json

import jsonschema
import pytest
import transformers

import tiny
from modelgrow.errors import UsageError
from modelgrow.grow import convert
from modelgrow.layout import _schema
from modelgrow.plan import GrowthSpec, _depth_map, make_plan, parse_amount
from modelgrow.source import open_source


@pytest.mark.parametrize(
    "text,current,expected",
    [("2x", 64, 128), ("1.5x", 64, 96), ("1024", 64, 1024), (" 3X ", 4, 12), (None, 7, 7)],
)
def test_parse_amount(text, current, expected):
    assert parse_amount(text, current, "units", "--width") == expected


@pytest.mark.parametrize("text", ["1.3x", "abc", "-2x", "2xx", "12.5"])
def test_parse_amount_refuses(text):
    with pytest.raises(UsageError):
        parse_amount(text, 64, "units", "--width")


def test_depth_maps():
    assert _depth_map(2, 4, "identity") == [(0, False), (0, True), (1, False), (1, True)]
    assert [s for s, _ in _depth_map(4, 6, "identity")] == [0, 1, 1, 2, 3, 3]
    assert _depth_map(2, 5, "stack") == [(0, False), (1, False), (0, True), (1, True), (0, True)]
    assert _depth_map(3, 3, "identity") == [(0, False), (1, False), (2, False)]


@pytest.mark.parametrize(
    "spec,message",
    [
        (GrowthSpec(width="0.5x"), "smaller than the source"),
        (GrowthSpec(depth="1"), "smaller than the source"),
        (GrowthSpec(width="36"), "not a multiple of head_dim"),
        (GrowthSpec(width="2x", heads="6"), "heads do not divide"),
        (GrowthSpec(kv_heads="2x"), "no separate key/value heads"),
        (GrowthSpec(depth_mode="sideways"), "unknown depth mode"),
    ],
)
def test_plan_refuses_impossible_specs(tmp_path, spec, message):
    with open_source(tiny.gpt2(tmp_path / "g")) as src:
        with pytest.raises(UsageError, match=message):
            make_plan(src, spec)


def test_gqa_groups_follow_heads(tmp_path):
    with open_source(tiny.llama(tmp_path / "l", heads=4, kv_heads=2)) as src:
        plan = make_plan(src, GrowthSpec(width="2x"))
        assert (plan.new.heads, plan.new.kv_heads, plan.new.head_dim) == (8, 4, 8)
        with pytest.raises(UsageError, match="transformers refuses"):
            make_plan(src, GrowthSpec(width="2x", heads="3x"))  # 12 heads do not divide 64


def test_gpt2_config_keys_rewritten(tmp_path):
    report = convert(tiny.gpt2(tmp_path / "g"), tmp_path / "out", GrowthSpec(width="2x", depth="3x"), progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_inner"]) == (64, 6, 8, 256)
    assert report["plan"]["source"]["ffn"] == 128  # n_inner null means 4 * n_embd


def test_lemon_padding_scales_eps(tmp_path):
    convert(tiny.gpt2(tmp_path / "g"), tmp_path / "out", GrowthSpec(width="1.5x"), progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["n_embd"] == 48 and cfg["layer_norm_epsilon"] == pytest.approx(1e-5 * 32 / 48)


def test_v4_rope_keys_survive(tmp_path):
    src = tiny.llama(tmp_path / "l")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 5000.0  # transformers v4 style
    (src / "config.json").write_text(json.dumps(cfg))
    convert(src, tmp_path / "out", GrowthSpec(width="2x"), verify=True, progress=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["rope_theta"] == 5000.0 and out["hidden_size"] == 64 and out["head_dim"] == 8
    grown = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert grown.config.rope_parameters["rope_theta"] == 5000.0


def test_sharded_input_and_output(tmp_path):
    src = tmp_path / "src"
    model = tiny.randomise(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=96, bos_token_id=0, eos_token_id=0)))
    tiny.save(model, src, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").exists()
    (src / "tokenizer.json").write_text("{}")  # tag-along files are carried over
    report = convert(src, tmp_path / "out", GrowthSpec(width="2x", depth="2x"), max_shard_size="100KB", verify=True, progress=False)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((out / s).stat().st_size < 100_000 + 10_000 for s in shards)
    assert (out / "tokenizer.json").read_text() == "{}"
    assert report["verify"]["passed"]
    grown, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_single_file_with_config_elsewhere(tmp_path):
    src = tiny.gpt2(tmp_path / "g")
    lone = tmp_path / "weights.safetensors"
    (src / "model.safetensors").rename(lone)
    report = convert(lone, tmp_path / "out", GrowthSpec(width="2x"), config_path=src / "config.json", verify=True, progress=False)
    assert report["verify"]["passed"]


def test_prefixless_gpt2_names_and_legacy_buffers(tmp_path):
    """The canonical GPT-2 file stores names without 'transformer.' and attention mask buffers."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tiny.gpt2(tmp_path / "g")
    tensors = load_file(src / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(bare, src / "model.safetensors", metadata={"format": "pt"})
    report = convert(src, tmp_path / "out", GrowthSpec(width="2x"), verify=True, progress=False)
    assert report["verify"]["passed"]
    with open_source(tmp_path / "out") as out:
        assert "h.0.attn.c_attn.weight" in out.checkpoint.names()
        assert "h.0.attn.bias" not in out.checkpoint.names()


def test_report_matches_schema_and_file(tmp_path):
    path = tmp_path / "report.json"
    report = convert(tiny.llama(tmp_path / "l"), tmp_path / "out", GrowthSpec(width="2x"), report_path=path, progress=False)
    on_disk = json.loads(path.read_text())
    jsonschema.validate(on_disk, _schema("report.schema.json"))
    assert on_disk["output"]["files"] == report["output"]["files"]
    names = {f["name"] for f in on_disk["output"]["files"]}
    assert {"model.safetensors", "config.json"} <= names


def test_dry_run_writes_nothing(tmp_path):
    report = convert(tiny.gpt2(tmp_path / "g"), tmp_path / "out", GrowthSpec(width="2x"), dry_run=True, report_path=tmp_path / "r.json")
    assert not (tmp_path / "out").exists()
    jsonschema.validate(report, _schema("report.schema.json"))
    assert report["plan"]["target_params"] > report["plan"]["source_params"]


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"architectures": 5}, "'architectures' must be a list"),
        ({"n_layer": 10**8}, "config says 100000000 layers"),
        ({"layer_norm_epsilon": "x"}, "transformers refuses the config"),
    ],
)
def test_hostile_config_values_are_bad_input(tmp_path, edit, message):
    from modelgrow.errors import CheckpointError

    src = tiny.gpt2(tmp_path / "g")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message) as err:
        open_source(src)
    assert "config.json" in str(err.value)
