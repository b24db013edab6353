"""The families people grow today, through layout data alone: Gemma 1/2/3, Phi-3,
GPT-NeoX (Pythia), OLMo 2 — and the Qwen3 q/k-norm promise at non-integer widths.

What each adds to the layout vocabulary (schemas/LAYOUT.md):
- Gemma: norm gains stored as 1 + w (``norm.gain_offset``) and an embedding multiplied
  by sqrt(hidden) at run time (``runtime_scale``), tied head included;
- Gemma 2/3, OLMo 2: norms on a sublayer's output before the residual add
  (``output_norm_weight``): an identity block zeroes their gain, not the projection;
- Gemma 3, Qwen3: per-head q/k norms, OLMo 2: q/k norms over all heads together
  (``inner_norm_weight``): at padded widths their inputs take sqrt(s) so that the shared,
  scaled eps changes nothing;
- Phi-3: fused qkv under grouped-query attention and fused gate_up (``attn|kv|kv``,
  ``ffn|ffn``), GPT-NeoX: q, k, v stored per head (``attn*3``), parallel residual.

Every case is a tiny random model with randomised norm gains and biases, checked in
transformers (from_pretrained, no missing or unexpected keys) on random tokens.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open

import tiny
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec

VOCAB = 96
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)

# family -> (config class, model class, architecture name, config overrides)
FAMILIES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8,
                                                              "num_hidden_layers": 3, "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None, "rotary_pct": 0.5}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                                            "shared_expert_intermediate_size": 40}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                                            "head_dim": 8}),
}
DENSE = dict(FAMILIES)
FAMILIES.update(MOE)


def causal_lm(folder, family, *, seed=0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    settings = {k: v for k, v in {**BASE, **extra, **overrides}.items() if v is not None}
    config = getattr(transformers, config_cls)(**settings)
    torch.manual_seed(seed)
    model = tiny.randomise(getattr(transformers, model_cls)(config), seed)
    if family.startswith("gemma"):  # gains are 1 + w: random gains around 1, as the other families get
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p -= 1.0
    return tiny.save(model, folder)


def grow(folder, family, spec, **overrides):
    """Grow a fresh tiny model: the report, the max |logits difference| measured here with
    transformers, and the grown model."""
    src = causal_lm(folder / "src", family, **overrides)
    dest = folder / "grown"
    report = convert(src, dest, spec, operator_options={"noise": 0.01, "noise_mode": "exact"}, verify=True, progress=False)
    diff, big = tiny.logits_gap(getattr(transformers, FAMILIES[family][1]), src, dest, VOCAB, low=1)
    return report, diff, big


TWO = GrowthSpec(width="2x", depth="2x")
CASES = [(family, TWO, {}) for family in FAMILIES] + [
    ("gemma", TWO, {"tie_word_embeddings": False}),
    ("phi3", TWO, {"tie_word_embeddings": True}),
    ("gpt_neox", TWO, {"use_parallel_residual": False, "tie_word_embeddings": True}),
    ("olmo2", TWO, {"tie_word_embeddings": True}),
    ("gemma", GrowthSpec(width="1.5x", depth="3"), {}),
    ("gemma3_text", GrowthSpec(width="1.5x", heads="6", kv_heads="3"), {}),
    ("phi3", GrowthSpec(width="1.5x", depth="3"), {}),
    ("gpt_neox", GrowthSpec(width="1.5x", depth="3"), {}),
    ("mixtral", GrowthSpec(width="1.5x", depth="3"), {"tie_word_embeddings": True}),
    ("qwen2_moe", GrowthSpec(width="1.5x", depth="3"), {}),
    ("qwen3_moe", GrowthSpec(width="1.5x", depth="3"), {"tie_word_embeddings": True}),
]


@pytest.mark.parametrize("family,spec,overrides", CASES,
                         ids=[f"{f}-{s.width}-{s.depth}-{'-'.join(o) or 'plain'}" for f, s, o in CASES])
def test_exact_growth_matches_transformers(tmp_path, family, spec, overrides):
    report, diff, big = grow(tmp_path, family, spec, **overrides)
    assert report["plan"]["architecture"] == family
    assert report["promise"]["exact"], report["promise"]
    assert report["verify"]["passed"] and report["verify"]["max_abs_diff"] < 1e-5, report["verify"]
    assert diff < 1e-5, diff
    assert big.config.hidden_size == report["plan"]["target"]["residual"]
    assert big.config.num_hidden_layers == report["plan"]["target"]["layers"]


def test_qwen3_small_qk_activations_stay_exact_at_a_padded_width(tmp_path):
    """Qwen3's per-head q/k norms share rms_norm_eps with the residual norms, whose eps a
    padded width multiplies by s. With q/k activations small enough for eps to matter, the
    growth was promised exact and failed its own check (0.04-0.34); the q/k projections now
    take sqrt(s), so the norms see exactly the eps they had."""
    config = transformers.Qwen3Config(**{**BASE, "head_dim": 8, "rms_norm_eps": 1e-3})
    torch.manual_seed(0)
    model = tiny.randomise(transformers.Qwen3ForCausalLM(config), 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p *= 0.01  # q and k mean squares ~1e-4, below the eps
    src = tiny.save(model, tmp_path / "src")
    report = convert(src, tmp_path / "grown", GrowthSpec(width="1.5x"), verify=True, progress=False)
    assert report["promise"]["exact"] and any("sqrt(s)" in n for n in report["promise"]["notes"])
    assert report["verify"]["passed"] and report["verify"]["max_abs_diff"] < 1e-5, report["verify"]
    grown = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert grown["rms_norm_eps"] == pytest.approx(1e-3 * 32 / 48)
    with safe_open(tmp_path / "src" / "model.safetensors", "pt") as s, \
            safe_open(tmp_path / "grown" / "model.safetensors", "pt") as g:
        small, big = s.get_tensor("model.layers.0.self_attn.q_proj.weight"), g.get_tensor("model.layers.0.self_attn.q_proj.weight")
    # The first 32 input columns copy the source's (k = 1), scaled by sqrt(s); the 16 padding columns read zeros.
    torch.testing.assert_close(big[:32, :32], small * (32 / 48) ** 0.5, rtol=0, atol=2e-3 * small.abs().max().item())


def test_olmo2_full_width_qk_norms_are_not_promised_at_uneven_head_counts(tmp_path):
    """OLMo 2 normalises q and k over all heads together: 4 -> 6 heads changes their mean
    square, so a 1.5x width is reported not exact (and the check measures how far)."""
    src = causal_lm(tmp_path / "src", "olmo2")
    report = convert(src, tmp_path / "grown", GrowthSpec(width="1.5x"), verify=True, progress=False)
    assert not report["promise"]["exact"] and not report["promise"]["heads"]
    assert any("normalises all heads together" in n for n in report["promise"]["notes"]), report["promise"]
    assert report["verify"]["max_abs_diff"] > 1e-3  # the check agrees: the function moved


def test_identity_blocks_zero_output_norm_gains_not_the_projections(tmp_path):
    """Behind an output norm, the norm's gain is what adds to the residual: an inserted
    Gemma 2 block keeps o_proj/down_proj and stores gain 0 as -1 (gains are 1 + w)."""
    src = causal_lm(tmp_path / "src", "gemma2")
    report = convert(src, tmp_path / "grown", GrowthSpec(depth="2x"), verify=True, progress=False)
    assert report["promise"]["exact"] and report["verify"]["max_abs_diff"] == 0.0
    layer = "model.layers.1."  # layer 0's identity copy
    with safe_open(tmp_path / "grown" / "model.safetensors", "pt") as g, \
            safe_open(tmp_path / "src" / "model.safetensors", "pt") as s:
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
            assert torch.equal(g.get_tensor(f"{layer}{norm}.weight"), torch.full((32,), -1.0))
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            assert torch.equal(g.get_tensor(f"{layer}{proj}.weight"), s.get_tensor(f"model.layers.0.{proj}.weight"))


def test_gemma3_layer_types_derived_by_transformers_are_written_out(tmp_path):
    """A config without layer_types (transformers derives them from the sliding-window
    pattern) would get a new pattern at the new depth: the grown config states the
    inserted layers' kinds explicitly, following the depth map."""
    src = causal_lm(tmp_path / "src", "gemma3_text", num_hidden_layers=3, sliding_window_pattern=2)
    config_path = src / "config.json"
    config = json.loads(config_path.read_text())
    expected = config.pop("layer_types")
    config["sliding_window_pattern"] = 2
    config_path.write_text(json.dumps(config))
    assert transformers.Gemma3TextConfig(**config).layer_types == expected
    report = convert(src, tmp_path / "grown", GrowthSpec(depth="6"), verify=True, progress=False)
    written = json.loads((tmp_path / "grown" / "config.json").read_text())["layer_types"]
    assert written == [expected[e["source_layer"]] for e in report["plan"]["depth_map"]]
    assert report["verify"]["passed"] and report["verify"]["max_abs_diff"] == 0.0


@pytest.mark.parametrize("family,width", [("gpt_neox", "2x"), ("gemma3_text", "1.5x"), ("olmo2", "2x")])
def test_learned_operators_start_exact_on_the_new_words(tmp_path, family, width):
    """LiGO's copy start goes through the same factors (fused per-head qkv, gain offsets,
    output and inner norms), so it is exact wherever the copy operator is."""
    src = causal_lm(tmp_path / "src", family)
    report = convert(src, tmp_path / "grown", GrowthSpec(width=width, depth="2x"), operator="ligo",
                     verify=True, progress=False, fit_options={"steps": 0})
    assert report["promise"]["exact"] and report["verify"]["passed"] and report["verify"]["max_abs_diff"] < 1e-5


SLOW_EXPORTS = os.environ.get("MODELGROW_SLOW_TESTS") != "1"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grown_models_export_to_onnx_with_parity(tmp_path, family):
    """torch.export takes 17-53 s per family on two cores; GPT-NeoX (its own attention
    code, per-head fused qkv) always runs, the others with MODELGROW_SLOW_TESTS=1 (experts
    in transformers' batched form are exported in CI by test_upcycling's Qwen2-MoE)."""
    if family != "gpt_neox" and SLOW_EXPORTS:
        pytest.skip("set MODELGROW_SLOW_TESTS=1 to export every family")
    pytest.importorskip("onnxruntime")
    import modelgrow

    src = causal_lm(tmp_path / "src", family)
    convert(src, tmp_path / "grown", TWO, verify=False, progress=False)
    result = modelgrow.export(tmp_path / "grown", tmp_path / "grown.onnx")
    assert result.parity_passed and result["parity"]["max_abs_diff"] <= 1e-4, dict(result)


def test_llama3_rope_scaling_is_carried_through_unchanged(tmp_path):
    """Llama 3.1/3.2 configs scale RoPE ("llama3" type); head_dim never changes, so the
    settings stay as they are and the growth stays exact."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    config = transformers.LlamaConfig(**{**BASE, "rope_scaling": rope, "tie_word_embeddings": True})
    torch.manual_seed(0)
    src = tiny.save(tiny.randomise(transformers.LlamaForCausalLM(config), 0), tmp_path / "src")
    before = json.loads((src / "config.json").read_text())
    report = convert(src, tmp_path / "grown", TWO, verify=True, progress=False)
    after = json.loads((tmp_path / "grown" / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in before else "rope_scaling"
    assert after[key] == before[key] and after[key]["rope_type"] == "llama3"
    assert report["promise"]["exact"] and report["verify"]["passed"] and report["verify"]["max_abs_diff"] < 1e-5


def test_moe_growth_writes_per_expert_tensors_and_zeroes_every_expert_in_identity_blocks(tmp_path):
    """The router reads the residual stream (split like any reader), each expert grows as a
    dense FFN, and an identity block zeroes every expert's writer and the shared expert's."""
    src = causal_lm(tmp_path / "src", "qwen2_moe")
    report = convert(src, tmp_path / "grown", TWO, verify=True, progress=False)
    assert report["plan"]["target"]["experts"] == 4
    assert (report["plan"]["source"]["expert_ffn"], report["plan"]["target"]["expert_ffn"]) == (24, 48)
    assert report["plan"]["target"]["shared_ffn"] == 80
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert (config["moe_intermediate_size"], config["shared_expert_intermediate_size"]) == (48, 80)
    with safe_open(tmp_path / "grown" / "model.safetensors", "pt") as g:
        names = set(g.keys())
        assert tuple(g.get_slice("model.layers.0.mlp.gate.weight").get_shape()) == (4, 64)
        for e in range(4):
            assert not g.get_tensor(f"model.layers.1.mlp.experts.{e}.down_proj.weight").any()
        assert not g.get_tensor("model.layers.1.mlp.shared_expert.down_proj.weight").any()
    assert "model.layers.3.mlp.experts.3.up_proj.weight" in names


@pytest.mark.parametrize("command", ["fit"])
def test_moe_commands_not_supported_yet_are_one_line(tmp_path, command):
    """transformers fuses a MoE block's experts into one parameter, and a learned operator's
    fit addresses one stored tensor at a time: refused, exit 2, nothing written. (train
    reaches the experts through views of the fused parameter: tests/test_upcycling.py.)"""
    from click.testing import CliRunner
    import numpy as np
    from modelgrow.cli import main

    src = causal_lm(tmp_path / "src", "mixtral")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(1, VOCAB, 2000).astype(np.int32))
    args = {"train": ["train", str(src), "--data", str(tmp_path / "ids.npy"), "--steps", "2", "-o", str(tmp_path / "out")],
            "fit": ["convert", str(src), "--width", "2x", "--operator", "ligo", "--fit-data", str(tmp_path / "ids.npy"),
                    "--fit-steps", "2", "-o", str(tmp_path / "out")]}[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "not supported yet" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
