"""Exact copy growth, checked against Hugging Face transformers (the reference).

Every case builds a tiny random model with randomised norm gains and biases, grows it,
loads the result with ``from_pretrained`` (no missing or unexpected keys) and compares
the two models' outputs on random tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import tiny
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec

MAKERS = {
    "gpt2": lambda d, **kw: tiny.gpt2(d, **kw),
    "gpt2-untied": lambda d, **kw: tiny.gpt2(d, tie=False, **kw),
    "gpt2-base": lambda d, **kw: tiny.gpt2(d, head=False, **kw),
    # Attention scaled by 1/(layer index + 1): a block's function depends on where it sits.
    "gpt2-index-scaled": lambda d, **kw: tiny.gpt2(d, scale_attn_by_inverse_layer_idx=True, **kw),
    "llama-gqa": lambda d, **kw: tiny.llama(d, **kw),
    "llama-tied": lambda d, **kw: tiny.llama(d, tie=True, **kw),
    "llama-bias": lambda d, **kw: tiny.llama(d, bias=True, kv_heads=4, **kw),
    "llama-headdim": lambda d, **kw: tiny.llama(d, head_dim=16, **kw),
    "llama-base": lambda d, **kw: tiny.llama(d, head=False, **kw),
    "bert-mlm": lambda d, **kw: tiny.bert(d, **kw),
    "bert-base": lambda d, **kw: tiny.bert(d, mlm=False, **kw),
}


def load_hf(folder):
    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def grow_and_compare(tmp_path, maker, spec, **options):
    src = MAKERS[maker](tmp_path / "src")
    dest = tmp_path / "grown"
    report = convert(src, dest, spec, operator_options=options, verify=True, progress=False)
    small, _ = load_hf(src)
    big, info = load_hf(dest)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    a, b = outputs(small, ids), outputs(big, ids)
    b = b[..., : a.shape[-1]] if b.shape[-1] != a.shape[-1] else b  # hidden states: first copy
    return report, (a - b).abs().max().item(), big


EXACT_CASES = [
    ("gpt2", GrowthSpec(width="2x", depth="2x")),
    ("gpt2", GrowthSpec(width="3x", depth="3")),
    ("gpt2", GrowthSpec(width="1.5x", depth="3")),  # LEMON padding
    ("gpt2-untied", GrowthSpec(width="2x", depth="2x")),
    ("gpt2-base", GrowthSpec(width="2x", depth="2x")),
    ("gpt2-index-scaled", GrowthSpec(width="2x")),  # no block moves: still exact
    ("llama-gqa", GrowthSpec(width="2x", depth="2x")),
    ("llama-gqa", GrowthSpec(width="1.5x", depth="5")),
    ("llama-tied", GrowthSpec(width="2x", depth="2x")),
    ("llama-bias", GrowthSpec(width="2x", depth="2x", ffn="100")),
    ("llama-headdim", GrowthSpec(width="2x", depth="3")),
    ("llama-base", GrowthSpec(width="2x", depth="2x")),
    ("bert-mlm", GrowthSpec(width="2x")),
    ("bert-base", GrowthSpec(width="3x")),
]


@pytest.mark.parametrize("maker,spec", EXACT_CASES, ids=[f"{m}-{s.width}-{s.depth}" for m, s in EXACT_CASES])
def test_exact_growth_matches_transformers(tmp_path, maker, spec):
    report, diff, _ = grow_and_compare(tmp_path, maker, spec, noise=0.01, noise_mode="exact")
    assert report["promise"]["exact"]
    assert report["verify"]["passed"] and report["verify"]["max_abs_diff"] < 1e-4
    assert diff < 1e-4, diff


def test_growth_really_changes_sizes(tmp_path):
    report, _, big = grow_and_compare(tmp_path, "llama-gqa", GrowthSpec(width="2x", depth="2x"))
    cfg = big.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 8, 4)
    assert cfg.intermediate_size == 96 and cfg.head_dim == 8
    assert report["plan"]["target_params"] == sum(p.numel() for p in big.parameters())


@pytest.mark.parametrize(
    "maker,spec,why",
    [
        ("gpt2", GrowthSpec(width="2x", depth="2x", depth_mode="stack"), "stack"),
        ("llama-gqa", GrowthSpec(depth="2x", depth_mode="interleave"), "interleave"),
        ("bert-mlm", GrowthSpec(width="2x", depth="2x"), "post-LN"),
        ("llama-gqa", GrowthSpec(width="2x", heads="16", kv_heads="4"), "query groups"),
        ("gpt2-index-scaled", GrowthSpec(depth="2x"), "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_inexact_growth_says_so(tmp_path, maker, spec, why):
    report, diff, _ = grow_and_compare(tmp_path, maker, spec)
    assert not report["promise"]["exact"]
    assert any(why in note for note in report["promise"]["notes"])
    assert diff > 1e-3  # and indeed it is not exact
    assert not report["verify"]["passed"]


def test_plain_noise_is_recorded_and_not_exact(tmp_path):
    report, diff, _ = grow_and_compare(tmp_path, "gpt2", GrowthSpec(width="2x"), noise=0.05, noise_mode="plain")
    assert report["promise"]["noise"] is False and not report["promise"]["exact"]
    assert report["operator"]["options"]["noise_mode"] == "plain"
    assert diff > 1e-4


def test_exact_noise_breaks_symmetry(tmp_path):
    """Copies of a split input column must differ, or they would never diverge in training."""
    src = tiny.gpt2(tmp_path / "src")
    for noise, name in ((0.0, "quiet"), (0.01, "noisy")):
        convert(src, tmp_path / name, GrowthSpec(width="2x"), operator_options={"noise": noise}, progress=False)
    with safe_open(tmp_path / "quiet" / "model.safetensors", "pt") as q, safe_open(tmp_path / "noisy" / "model.safetensors", "pt") as n:
        wq, wn = q.get_tensor("transformer.h.0.mlp.c_fc.weight"), n.get_tensor("transformer.h.0.mlp.c_fc.weight")
    # c_fc is stored [in=residual, out]; rows r and r+32 are the two halves of one split.
    assert torch.equal(wq[:32], wq[32:])
    assert not torch.allclose(wn[:32], wn[32:])
    assert torch.allclose(wn[:32] + wn[32:], wq[:32] + wq[32:], atol=1e-6)


def test_tied_embeddings_written_once(tmp_path):
    src = tiny.gpt2(tmp_path / "src")
    convert(src, tmp_path / "grown", GrowthSpec(width="2x"), progress=False)
    with safe_open(tmp_path / "grown" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        metadata = f.metadata()
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert metadata["format"] == "pt" and metadata["modelgrow.operator"] == "copy"
    assert json.loads(metadata["modelgrow.plan"])["target"]["residual"] == 64


def test_identity_blocks_zero_only_residual_writers(tmp_path):
    src = tiny.llama(tmp_path / "src", bias=True)
    convert(src, tmp_path / "grown", GrowthSpec(depth="2x"), progress=False)
    with safe_open(tmp_path / "grown" / "model.safetensors", "pt") as f:
        inserted = "model.layers.1."  # layer 0 is source 0, layer 1 its identity copy
        for name in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"):
            assert not f.get_tensor(inserted + name).any(), name
        for name in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert f.get_tensor(inserted + name).any(), name
