"""Every config.json value checked before a module is built (modelgrow.config_check).

A value transformers or torch would refuse (a NaN, a dropout of 1.5, an unknown
activation, a pad token beyond the vocabulary, a patch grid that does not tile the
image, a negative norm epsilon, ...) is bad input: exit 3, one line naming config.json
and the key, nothing written. Each case mutates a tiny real checkpoint's config and runs
``modelgrow convert SRC -o OUT --width 2x`` in-process.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner

import tiny
from modelgrow import plugins
from modelgrow.cli import main
from modelgrow.config_check import COMMON_ACTIVATIONS, MAX_ENTRIES, MAX_LABELS, build_error, check_config, first_line
from modelgrow.errors import CheckpointError, InputError
from modelgrow.source import load_module, open_source
from test_families import BASE, FAMILIES

NAN, INF = float("nan"), float("inf")


def vit(folder):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=16, patch_size=4, num_channels=3, num_labels=5)
    torch.manual_seed(0)
    return tiny.save(tiny.randomise(transformers.ViTForImageClassification(config)), folder)


def mixtral(folder):
    config = transformers.MixtralConfig(**BASE, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return tiny.save(tiny.randomise(transformers.MixtralForCausalLM(config)), folder)


BUILD = {"llama": tiny.llama, "gpt2": tiny.gpt2, "bert": tiny.bert, "vit": vit, "mixtral": mixtral}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One tiny checkpoint per family, built on first use and shared by the module."""
    root = tmp_path_factory.mktemp("sources")
    built = {}

    def get(family):
        if family not in built:
            built[family] = BUILD[family](root / family)
        return built[family]

    return get


def convert_with(sources, tmp_path, family, edit):
    """Run convert on a copy of ``family``'s checkpoint with ``edit`` merged into its
    config; return (exit code, output lines, the output folder)."""
    src = shutil.copytree(sources(family), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(edit)
    (src / "config.json").write_text(json.dumps(config))  # NaN/Infinity as JSON's extensions; \ud800 escaped
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--width", "2x"])
    return result.exit_code, result.output.strip().splitlines(), out


# (family, edit merged into config.json, what the one line must name)
CASES = {
    # every number finite, at any depth
    "nan": ("llama", {"rope_theta": NAN}, "'rope_theta' is NaN"),
    "inf-nested": ("llama", {"quantization": {"scales": [1.0, INF]}}, "'quantization.scales[1]' is Infinity"),
    "minus-inf": ("gpt2", {"layer_norm_epsilon": -INF}, "'layer_norm_epsilon' is -Infinity"),
    # no lone surrogates, in values or keys
    "surrogate-value": ("llama", {"name_or_path": "model\ud800"}, "'name_or_path'"),
    "surrogate-key": ("gpt2", {"x\udc00": 1}, "x\\udc00"),
    # probabilities in [0, 1]
    "dropout": ("llama", {"attention_dropout": 1.5}, "'attention_dropout'"),
    "pdrop": ("gpt2", {"resid_pdrop": -0.1}, "'resid_pdrop'"),
    "dropout-prob": ("bert", {"attention_probs_dropout_prob": 2}, "'attention_probs_dropout_prob'"),
    "dropout-nested": ("llama", {"text_config": {"hidden_dropout": 7}}, "'text_config.hidden_dropout'"),
    # norm epsilons above 0 (a negative one used to exit 4, blaming the growth)
    "rms-eps": ("llama", {"rms_norm_eps": -1.0}, "'rms_norm_eps'"),
    "ln-eps": ("bert", {"layer_norm_eps": -1e-5}, "'layer_norm_eps'"),
    "ln-epsilon": ("gpt2", {"layer_norm_epsilon": 0}, "'layer_norm_epsilon'"),
    # activations transformers knows
    "hidden-act": ("llama", {"hidden_act": "nope"}, "'hidden_act'"),
    "activation-function": ("gpt2", {"activation_function": "gelu_nope"}, "'activation_function'"),
    # token ids within the vocabulary (96 tokens)
    "pad-id": ("llama", {"pad_token_id": 96}, "'pad_token_id'"),
    "bos-negative": ("gpt2", {"bos_token_id": -97}, "'bos_token_id'"),
    "eos-list": ("llama", {"eos_token_id": [0, 500]}, "'eos_token_id[1]'"),
    "sep-id": ("bert", {"sep_token_id": 1000}, "'sep_token_id'"),
    "decoder-start": ("llama", {"decoder_start_token_id": 96}, "'decoder_start_token_id'"),
    "pad-id-nested": ("llama", {"text_config": {"vocab_size": 10, "pad_token_id": 10}}, "'text_config.pad_token_id'"),
    # sizes are positive integers (the layout's config_keys and inputs, and a few more)
    "ffn-zero": ("llama", {"intermediate_size": 0}, "'intermediate_size'"),
    "layers-float": ("llama", {"num_hidden_layers": 2.5}, "'num_hidden_layers'"),
    "embd-negative": ("gpt2", {"n_embd": -32}, "'n_embd'"),
    "positions-huge": ("llama", {"max_position_embeddings": 2**40}, "'max_position_embeddings'"),
    "channels": ("vit", {"num_channels": 0}, "'num_channels'"),
    "patch": ("vit", {"patch_size": -4}, "'patch_size'"),
    # divisibility transformers relies on
    "heads": ("gpt2", {"n_head": 5}, "'n_embd' is 32 but must be divisible by n_head=5"),
    "kv-heads": ("llama", {"num_key_value_heads": 3},
                 "'num_attention_heads' is 4 but must be divisible by num_key_value_heads=3"),
    "image-grid": ("vit", {"image_size": 18}, "'image_size' is 18 but must be divisible by patch_size=4"),
    # experts
    "experts-per-token": ("mixtral", {"num_experts_per_tok": 5},
                          "'num_experts_per_tok' is 5 but must be at most num_local_experts=4"),
    # RoPE
    "rope-theta": ("llama", {"rope_theta": 0}, "'rope_theta'"),
    "rope-factor": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "'rope_scaling.factor'"),
    "rope-type": ("llama", {"rope_parameters": {"rope_type": "nope", "rope_theta": 10000.0}}, "'rope_parameters.rope_type'"),
    "rope-type-legacy": ("llama", {"rope_scaling": {"type": "nope", "factor": 2.0}}, "'rope_parameters.rope_type'"),
    # absurd sizes, refused at once
    "num-labels": ("llama", {"num_labels": 1e6}, "'num_labels'"),
    "id2label": ("vit", {"id2label": {str(i): f"L{i}" for i in range(MAX_LABELS + 1)}}, "'id2label'"),
    "keys": ("gpt2", {f"k{i}": 0 for i in range(MAX_ENTRIES + 1)}, f"more than {MAX_ENTRIES:,} keys"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_config_value_is_bad_input_on_one_line(sources, tmp_path, case):
    family, edit, names = CASES[case]
    code, lines, out = convert_with(sources, tmp_path, family, edit)
    assert code == 3, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and "config.json" in line and names in line, line
    assert "modelgrow bug" not in line and "Traceback" not in line
    assert not out.exists()


def test_a_module_transformers_cannot_build_is_bad_input_on_one_line(sources, tmp_path, monkeypatch):
    """What the table does not know, transformers or torch refuse when the module is
    built: the first line of their message (no C++ stack), exit 3, nothing written."""
    def refuse(self, config, *args, **kwargs):
        raise RuntimeError("shape '[-1, 3]' is invalid\nException raised from view at aten/src/ATen/native/View.cpp:42 "
                           "(most recent call first):\nframe #0: c10::Error::Error()")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", refuse)
    code, lines, out = convert_with(sources, tmp_path, "llama", {})
    assert code == 3 and len(lines) == 1, lines
    assert "LlamaForCausalLM" in lines[0] and "config.json" in lines[0] and "is invalid" in lines[0], lines
    assert "frame #0" not in lines[0] and "View.cpp" not in lines[0]
    assert not out.exists()
    with open_source(sources("llama")) as source:  # train, export, demo: the file is named
        with pytest.raises(InputError, match=str(source.checkpoint.config_path)):
            load_module(source)


def test_first_line_keeps_the_reason_and_drops_stacks():
    err = ValueError("Validation error for field 'x':\n    TypeError: expected bool\n\nTraceback (most recent call last):")
    assert first_line(err) == "ValueError: Validation error for field 'x': TypeError: expected bool"
    assert first_line(KeyError("nope")) == "KeyError: 'nope'"
    assert len(first_line(RuntimeError("x" * 1000))) == 240
    assert isinstance(build_error("X", NotImplementedError()), NotImplementedError)
    assert isinstance(build_error("X", TypeError("bad")), InputError)


def family_configs():
    """Each built-in family's tiny config, as transformers writes it (every default in)."""
    configs = {}
    for family, (config_cls, _, extra) in FAMILIES.items():
        configs[family] = getattr(transformers, config_cls)(**{k: v for k, v in {**BASE, **extra}.items() if v is not None})
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        configs[family] = transformers.AutoConfig.for_model(family, **BASE)
    configs["gpt2"] = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=96,
                                              bos_token_id=0, eos_token_id=0)
    configs["bert"] = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, vocab_size=96)
    for family in ("vit", "deit"):
        configs[family] = transformers.AutoConfig.for_model(family, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            intermediate_size=48, image_size=16, patch_size=4,
                                                            id2label={i: f"L{i}" for i in range(21843)})  # ImageNet-22k
    return configs


def test_every_familys_valid_config_passes():
    archs = plugins.get_architectures()
    configs = family_configs()
    missing = {name for name in archs if name not in configs and hasattr(archs[name], "hf_config")}
    assert not missing, f"no tiny config for {missing}"
    for family, config in configs.items():
        check_config(json.loads(config.to_json_string(use_diff=False)), "config.json", archs[family])
        check_config(json.loads(config.to_json_string()), "config.json", archs[family])
    legacy = {**json.loads(configs["phi3"].to_json_string()), "rope_scaling": {"type": "su", "short_factor": [1.0] * 4,
              "long_factor": [1.0] * 4, "original_max_position_embeddings": 32}}  # Phi-3's old name for longrope
    legacy.pop("rope_parameters", None)
    check_config(legacy, "config.json", archs["phi3"])
    assert archs["phi3"].config_problem(legacy) is None
    # Old Llama conversions ship pad_token_id -1: torch counts it from the end, and so does the check.
    check_config({**json.loads(configs["llama"].to_json_string()), "pad_token_id": -1}, "config.json", archs["llama"])


def test_checked_keys_follow_the_layout():
    """A plugin's layout keeps its sizes under model_args (nanoGPT): those keys are the
    sizes checked, dotted, and its token ids are read against its own vocab_size."""
    nanogpt = plugins.get_architectures()["nanogpt"]
    args = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 96, "block_size": 32, "norm_eps": 1e-5}
    check_config({"model_args": args}, "config.json", nanogpt)
    for edit, key in (({"n_layer": 0}, "model_args.n_layer"), ({"n_head": 5}, "model_args.n_embd"),
                      ({"norm_eps": -1.0}, "model_args.norm_eps"), ({"eos_token_id": 96}, "model_args.eos_token_id")):
        with pytest.raises(CheckpointError, match=f"'{key}'"):
            check_config({"model_args": {**args, **edit}}, "config.json", nanogpt)
    # an activation name is transformers' to know: a module of a plugin's own may use another
    check_config({"model_args": {**args, "hidden_act": "my_gelu"}}, "config.json", nanogpt)


def test_the_activations_judged_without_transformers_are_ones_it_knows():
    """The usual names skip importing transformers.activations (seconds at every start):
    each must be one the installed transformers builds, or a bad name would pass."""
    from transformers.activations import ACT2FN

    assert COMMON_ACTIVATIONS <= set(ACT2FN), COMMON_ACTIVATIONS - set(ACT2FN)


def test_label_names_are_free_text():
    arch = plugins.get_architectures()["vit"]
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
                                    label2id={"attention_dropout": 0, "hidden_act": 1}, id2label={0: "attention_dropout",
                                                                                               1: "hidden_act"})
    check_config(json.loads(config.to_json_string()), "config.json", arch)
