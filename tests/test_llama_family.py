"""More of the Llama family through layout data alone: Mistral, Qwen2, Qwen3.

No operator code knows these names. What they add to the vocabulary:
- Qwen2: required q/k/v biases without an output bias (plain layout data);
- Qwen2/Qwen3: ``layer_types``, a config list with one entry per layer, declared in
  ``config_per_layer`` so depth growth extends it along the depth map;
- Qwen3: q_norm/k_norm, RMSNorm gains over ``head_dim`` applied per head — the
  ``head_dim`` axis role, a size growth never changes (heads grow in number instead).
Each case is a tiny random model with randomised norm gains and biases, checked with
transformers (``from_pretrained``, no missing or unexpected keys) on random tokens.
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

VOCAB = 96


def causal_lm(folder, family, *, seed=0, **overrides):
    settings = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )
    settings.update(overrides)
    config = getattr(transformers, f"{family}Config")(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    return tiny.save(tiny.randomise(model, seed), folder)


def grow(tmp_path, family, spec, **overrides):
    """Grow a fresh tiny model; return the report, the max |logits difference| measured
    here with transformers, and the grown transformers model."""
    src = causal_lm(tmp_path / "src", family, **overrides)
    dest = tmp_path / "grown"
    report = convert(src, dest, spec, operator_options={"noise": 0.01, "noise_mode": "exact"}, verify=True, progress=False)
    diff, big = tiny.logits_gap(getattr(transformers, f"{family}ForCausalLM"), src, dest, VOCAB, low=0)
    return report, diff, big


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """Growth results shared by the tests of this module (each growth runs once)."""
    cache = {}

    def get(family, spec, **overrides):
        key = (family, spec, repr(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(family.lower())
            cache[key] = (*grow(folder, family, spec, **overrides), folder)
        return cache[key]

    return get


TWO = GrowthSpec(width="2x", depth="2x")
LEMON = GrowthSpec(width="1.5x", depth="3")
CASES = [
    ("Mistral", TWO, {}),
    ("Mistral", LEMON, {"tie_word_embeddings": True}),
    ("Qwen2", TWO, {}),
    ("Qwen2", LEMON, {"tie_word_embeddings": True}),
    ("Qwen3", TWO, {"head_dim": 16}),  # head_dim decoupled from hidden/heads
    ("Qwen3", LEMON, {"attention_bias": True, "tie_word_embeddings": True}),
]


@pytest.mark.parametrize(
    "family,spec,overrides", CASES, ids=[f"{f}-{s.width}-{s.depth}-{'-'.join(o) or 'plain'}" for f, s, o in CASES]
)
def test_exact_growth_matches_transformers(grown, family, spec, overrides):
    report, diff, big, _ = grown(family, spec, **overrides)
    assert report["plan"]["architecture"] == family.lower()
    assert report["promise"]["exact"]
    assert report["verify"]["passed"] and report["verify"]["max_abs_diff"] < 1e-4
    assert diff < 1e-4, diff
    assert big.config.hidden_size == report["plan"]["target"]["residual"]
    assert big.config.num_hidden_layers == report["plan"]["target"]["layers"]


def test_qwen3_per_head_norms_keep_head_dim(grown):
    report, _, big, tmp_path = grown("Qwen3", TWO, head_dim=16)
    assert (big.config.num_attention_heads, big.config.num_key_value_heads, big.config.head_dim) == (8, 4, 16)
    with safe_open(tmp_path / "grown" / "model.safetensors", "pt") as f, safe_open(tmp_path / "src" / "model.safetensors", "pt") as s:
        for layer, source_layer in ((0, 0), (1, 0), (2, 1)):  # 1 is layer 0's identity copy
            for name in ("q_norm", "k_norm"):
                grown = f.get_tensor(f"model.layers.{layer}.self_attn.{name}.weight")
                assert torch.equal(grown, s.get_tensor(f"model.layers.{source_layer}.self_attn.{name}.weight"))
                assert grown.shape == (16,)


def test_qwen2_biases_grow_with_heads(grown):
    *_, tmp_path = grown("Qwen2", TWO)
    with safe_open(tmp_path / "grown" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert tuple(f.get_slice("model.layers.0.self_attn.k_proj.bias").get_shape()) == (32,)  # 4 kv heads x 8
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_layer_types_follow_the_depth_map(tmp_path):
    """Mixed sliding/full attention: the inserted copy of a layer must keep its kind, or
    the grown model would attend differently (a short window makes that visible)."""
    types = ["full_attention", "sliding_attention"]
    report, diff, big = grow(tmp_path, "Qwen2", GrowthSpec(depth="5"), use_sliding_window=True, sliding_window=4, layer_types=types)
    written = json.loads((tmp_path / "grown" / "config.json").read_text())["layer_types"]
    source_of = [entry["source_layer"] for entry in report["plan"]["depth_map"]]
    assert written == [types[s] for s in source_of] and len(written) == 5
    assert big.config.layer_types == written
    assert diff < 1e-4 and report["verify"]["passed"]
