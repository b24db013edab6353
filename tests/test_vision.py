"""Vision transformers (ViT, DeiT): exact copy growth checked against transformers.

The layouts are data only; what this exercises in the vocabulary is the image input
kind, [1,1,D] tokens and [1,P,D] position tables ("one"/"positions" axes), the Conv2d
patch projection (channels and pixels are read, its output channels are residual
writers), classifier heads that keep their label count ("labels"), optional tensors
(pooler, mask token) and a config key that repeats the hidden size (pooler_output_size).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

import tiny
from modelgrow.cli import main
from modelgrow.grow import convert
from modelgrow.plan import GrowthSpec

LABELS = 5


def vision(folder, family="ViT", cls="ViTForImageClassification", *, seed=0, **build):
    config = getattr(transformers, f"{family}Config")(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        image_size=16, patch_size=4, num_channels=3, num_labels=LABELS,
    )
    torch.manual_seed(seed)
    return tiny.save(tiny.randomise(getattr(transformers, cls)(config, **build), seed), folder)


def load_hf(folder, **build):
    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model, info = cls.from_pretrained(folder, output_loading_info=True, **build)
    return model.eval(), info


def run(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels)


def grow(tmp_path, family, cls, spec, build=None):
    build = build or {}
    src = vision(tmp_path / "src", family, cls, **build)
    dest = tmp_path / "grown"
    report = convert(src, dest, spec, operator_options={"noise": 0.01, "noise_mode": "exact"}, verify=True, progress=False)
    small, _ = load_hf(src, **build)
    big, info = load_hf(dest, **build)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    pixels = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    return report, small, big, run(small, pixels), run(big, pixels)


TWO = GrowthSpec(width="2x", depth="2x")
LEMON = GrowthSpec(width="1.5x", depth="3")  # non-integer width: LEMON padding
CLASSIFIER_CASES = [
    ("ViT", "ViTForImageClassification", TWO),
    ("ViT", "ViTForImageClassification", LEMON),
    ("DeiT", "DeiTForImageClassification", GrowthSpec(width="3x", depth="3")),
    ("DeiT", "DeiTForImageClassificationWithTeacher", TWO),
    ("DeiT", "DeiTForImageClassificationWithTeacher", LEMON),
]


@pytest.mark.parametrize("family,cls,spec", CLASSIFIER_CASES, ids=[f"{c}-{s.width}-{s.depth}" for _, c, s in CLASSIFIER_CASES])
def test_image_classifier_grows_exactly(tmp_path, family, cls, spec):
    report, small, big, a, b = grow(tmp_path, family, cls, spec)
    assert report["promise"]["exact"]
    assert report["verify"]["passed"] and report["verify"]["output"] == "logits"
    # The class count is the label set, not a size growth may change.
    assert a.logits.shape == b.logits.shape == (3, LABELS)
    assert (a.logits - b.logits).abs().max().item() < 1e-4
    assert big.config.hidden_size == report["plan"]["target"]["residual"] == int(32 * float(spec.width[:-1]))
    assert big.config.num_hidden_layers == report["plan"]["target"]["layers"]


BASE_CASES = [("ViT", "ViTModel", LEMON), ("DeiT", "DeiTModel", TWO)]


@pytest.mark.parametrize("family,cls,spec", BASE_CASES, ids=[f"{c}-{s.width}-{s.depth}" for _, c, s in BASE_CASES])
def test_base_model_grows_exactly_with_pooler(tmp_path, family, cls, spec):
    report, small, big, a, b = grow(tmp_path, family, cls, spec)
    assert report["verify"]["passed"] and report["verify"]["output"] == "last_hidden_state"
    width = a.last_hidden_state.shape[-1]
    # The first copy of the residual holds the original units (tokens: CLS [DIST] patches).
    assert (a.last_hidden_state - b.last_hidden_state[..., :width]).abs().max().item() < 1e-4
    # The pooler grows with the width, and so does pooler_output_size in the config.
    assert big.config.pooler_output_size == big.config.hidden_size
    assert b.pooler_output.shape[-1] == big.config.hidden_size
    assert (a.pooler_output - b.pooler_output[..., :width]).abs().max().item() < 1e-4


def test_optional_mask_token_and_missing_pooler(tmp_path):
    """ViTModel(add_pooling_layer=False, use_mask_token=True): constructor flags that no
    config records, so the tensors are optional and verify must cope with either."""
    build = {"add_pooling_layer": False, "use_mask_token": True}
    report, _, big, a, b = grow(tmp_path, "ViT", "ViTModel", GrowthSpec(width="2x", depth="2x"), build)
    assert report["verify"]["passed"]
    with safe_open(tmp_path / "grown" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        mask = f.get_tensor("embeddings.mask_token")
    assert not any("pooler" in n for n in names)
    assert mask.shape == (1, 1, 64)
    assert (a.last_hidden_state - b.last_hidden_state[..., :32]).abs().max().item() < 1e-4


def test_vision_tensor_shapes(tmp_path):
    src = vision(tmp_path / "src", "DeiT", "DeiTForImageClassificationWithTeacher")
    convert(src, tmp_path / "grown", GrowthSpec(width="2x"), operator_options={"noise": 0}, progress=False)
    with safe_open(tmp_path / "grown" / "model.safetensors", "pt") as f, safe_open(src / "model.safetensors", "pt") as s:
        shape = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        patch = f.get_tensor("deit.embeddings.patch_embeddings.projection.weight")
        patch0 = s.get_tensor("deit.embeddings.patch_embeddings.projection.weight")
    assert shape["deit.embeddings.cls_token"] == (1, 1, 64)
    assert shape["deit.embeddings.distillation_token"] == (1, 1, 64)
    assert shape["deit.embeddings.position_embeddings"] == (1, 16 + 2, 64)
    assert shape["deit.embeddings.patch_embeddings.projection.weight"] == (64, 3, 4, 4)
    assert shape["cls_classifier.weight"] == shape["distillation_classifier.weight"] == (LABELS, 64)
    assert shape["cls_classifier.bias"] == (LABELS,)
    # Output channels are copied whole (a writer); the image channels are not split.
    assert torch.equal(patch[:32], patch0) and torch.equal(patch[32:], patch0)


def test_cli_plan_for_a_model_without_vocabulary(tmp_path):
    src = vision(tmp_path / "src")
    result = CliRunner().invoke(main, ["convert", str(src), "--dry-run", "--width", "2x", "--depth", "2x"])
    assert result.exit_code == 0, result.output
    assert "vit (ViTForImageClassification)" in result.output
    assert "vocab" not in result.output and "function-preserving: yes" in result.output


def test_example_inputs_are_images():
    from modelgrow import plugins

    arch = plugins.get_architectures()["vit"]
    config = {"model_type": "vit", "image_size": [16, 24], "num_channels": 1, "hidden_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}
    inputs = arch.example_inputs(config, 2, 99, torch.Generator().manual_seed(0))
    assert list(inputs) == ["pixel_values"] and inputs["pixel_values"].shape == (2, 1, 16, 24)
