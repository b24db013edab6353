"""`modelgrow layout draft`: a layout drafted from a checkpoint's config and tensor headers.

For every built-in family's tiny checkpoint the draft must say what the built-in layout
says, in the parts that decide growth: each tensor's axes, `in`, kind, `normalises` and
`runtime_scale`; the config keys; norm type, placement, eps key and gain offset; the tie's
head, embedding and norms; base_prefix; the per-layer config lists. Allowed to differ,
because a checkpoint cannot show them:

- tensors the tiny checkpoint does not store (Llama's optional biases, BERT's unused
  heads) are compared only where stored; the tied head, never stored, is compared by name;
- `optional` flags (the draft marks biases and the tied head optional), the description,
  `eps_default`, `ignore` lists, and classes other than the config's own (the draft
  guesses the base class from the name: Gemma3Model where transformers says
  Gemma3TextModel).

An unknown model (a Llama with every name and its model_type changed) gets a draft that
binds it, and growth through that draft is exact when checked in transformers.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import tiny
from modelgrow import plugins
from modelgrow.architecture import Architecture
from modelgrow.cli import main
from modelgrow.drafting import draft_layout
from modelgrow.grow import convert
from modelgrow.hookspecs import hookimpl
from modelgrow.layout import Layout, builtin_layout_paths
from modelgrow.plan import GrowthSpec
from test_families import causal_lm
from test_vision import vision

FAMILIES = ["gpt2", "llama", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2", "bert", "vit"]
BUILTIN = {p.stem: p for p in builtin_layout_paths()}


def build(family: str, folder):
    if family == "gpt2":
        return tiny.gpt2(folder)
    if family == "llama":
        return tiny.llama(folder)
    if family == "bert":
        return tiny.bert(folder)
    if family == "vit":
        return vision(folder)
    if family == "qwen3":
        config = transformers.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, vocab_size=96, max_position_embeddings=64)
        torch.manual_seed(0)
        return tiny.save(tiny.randomise(transformers.Qwen3ForCausalLM(config)), folder)
    return causal_lm(folder, family)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = build(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


def meaning(layout: Layout, names: set[str]) -> dict:
    """What decides growth, for the tensors in ``names``."""
    keep = {t.name for t in layout.tensors if t.name in names}
    return {
        "tensors": {t.name: (t.axes, t.in_axis, t.kind, tuple(n for n in t.normalises if n in keep), t.runtime_scale)
                    for t in layout.tensors if t.name in keep},
        "norm": (layout.norm_type, layout.norm_placement, layout.eps_key, layout.gain_offset),
        "config": (layout.config_keys, layout.config_also, layout.config_per_layer, layout.layer_index_keys,
                   layout.inputs, layout.ffn_default_multiple, layout.model_types),
        "base_prefix": layout.base_prefix,
        "tie": {k: v for k, v in (layout.tie or {}).items()},
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_matches_the_builtin_layout(checkpoint, family):
    folder = checkpoint(family)
    draft = draft_layout(folder)
    drafted = Layout.from_dict(draft.layout)
    builtin = Layout.from_file(BUILTIN[family])
    stored = set(load_file(folder / "model.safetensors"))
    names = {t.name for t in builtin.tensors if t.render(0) in stored}
    if builtin.tie:
        names.add(builtin.tie["head"])
    assert {t.name for t in drafted.tensors} == names
    assert meaning(drafted, names) == meaning(builtin, names)
    config = json.loads((folder / "config.json").read_text())
    cls = config["architectures"][0]
    assert drafted.classes[cls] == builtin.classes[cls] and drafted.default_class == cls
    assert not any("does not bind" in c for c in draft.checks), draft.checks
    assert draft.checks and all("\n" not in c for c in draft.checks)
    assert json.loads(draft.to_json()) == draft.layout


def test_draft_says_what_it_cannot_see(checkpoint):
    draft = draft_layout(checkpoint("gpt_neox"))
    checks = "\n".join(draft.checks)
    assert "attn*3" in checks and "use_parallel_residual" in checks and "norm.placement 'pre'" in checks
    assert "runtime_scale" in checks  # an embedding multiplier is invisible in weights
    gemma = "\n".join(draft_layout(checkpoint("gemma")).checks)
    assert "gain_offset 1 proposed" in gemma and "sqrt(hidden_size)" in gemma
    assert "'post'" in "\n".join(draft_layout(checkpoint("bert")).checks)


def test_gain_offset_is_measured_not_looked_up(checkpoint, tmp_path):
    """A Gemma checkpoint under an unknown model_type: the gains still say 1 + w; the
    embedding multiplier, known only by family, becomes a question."""
    folder = shutil.copytree(checkpoint("gemma"), tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "notgemma"}))
    draft = draft_layout(folder)
    assert draft.layout["norm"]["gain_offset"] == 1
    assert "runtime_scale" not in draft.layout["tensors"]["pre"][0]
    assert any("sqrt(hidden)" in c for c in draft.checks)


# -- an architecture nobody knows -----------------------------------------------------------

RENAMES = [("model.embed_tokens", "backbone.tok_embeddings"), ("model.layers.", "backbone.blocks."),
           ("model.norm", "backbone.final_norm"), ("self_attn.q_proj", "attn.wq"), ("self_attn.k_proj", "attn.wk"),
           ("self_attn.v_proj", "attn.wv"), ("self_attn.o_proj", "attn.wo"), ("input_layernorm", "attn_norm"),
           ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn.w1"), ("mlp.up_proj", "ffn.w3"),
           ("mlp.down_proj", "ffn.w2"), ("lm_head", "output")]


def renamed(name: str, back: bool = False) -> str:
    for old, new in RENAMES:
        name = name.replace(*((new, old) if back else (old, new)))
    return name


def mystery(tmp_path):
    """A tiny Llama whose model_type, class and every tensor name nobody knows."""
    src = tiny.llama(tmp_path / "llama")
    folder = tmp_path / "mystery"
    folder.mkdir()
    save_file({renamed(k): v for k, v in load_file(src / "model.safetensors").items()}, folder / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mystery",
                                                    "architectures": ["MysteryForCausalLM"]}))
    return src, folder


def test_unknown_model_is_refused_with_a_pointer_to_the_drafter(tmp_path):
    _, folder = mystery(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 3
    assert "modelgrow layout draft" in result.output and "schemas/LAYOUT.md" in result.output


def test_cli_drafts_a_layout_for_an_unknown_model_and_growth_through_it_is_exact(tmp_path):
    src, folder = mystery(tmp_path)
    out = tmp_path / "mystery.json"
    result = CliRunner().invoke(main, ["layout", "draft", str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    checks = [line for line in result.stderr.splitlines() if line.startswith("check: ")]
    assert len(checks) >= 3 and "Traceback" not in result.output
    layout = Layout.from_file(out)
    assert layout.name == "mystery" and layout.base_prefix == "backbone."
    assert layout.tensor("backbone.blocks.${layer}.attn.wk.weight").axes == (("kv",), ("residual",))
    assert layout.tensor("backbone.blocks.${layer}.ffn.w2.weight").axes == (("residual",), ("ffn",))
    assert out.read_text().count("\n") > len(layout.tensors)  # one tensor per line, like the built-in files

    printed = CliRunner().invoke(main, ["layout", "draft", str(folder)])  # no -o: the JSON on stdout
    assert printed.exit_code == 0 and json.loads(printed.stdout) == json.loads(out.read_text())

    class DraftPlugin:  # the draft, packaged the way LAYOUT.md says (a layout-only plugin)
        @hookimpl
        def register_architectures(self, register):
            register(Architecture(layout))

    plugin = DraftPlugin()
    plugins.load_plugins()
    plugins.pm.register(plugin, name="draft-plugin")
    try:
        report = convert(folder, tmp_path / "grown", GrowthSpec(width="2x", depth="2x"), verify=False, progress=False)
    finally:
        plugins.pm.unregister(plugin)
        plugins.reset()
    assert report["plan"]["architecture"] == "mystery" and report["promise"]["exact"], report["promise"]

    # Back to Llama names: transformers runs the grown model, which must compute what the source does.
    back = tmp_path / "back"
    back.mkdir()
    save_file({renamed(k, back=True): v for k, v in load_file(tmp_path / "grown" / "model.safetensors").items()},
              back / "model.safetensors")
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    (back / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    small = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    big, info = transformers.LlamaForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert big.config.hidden_size == 64 and big.config.num_hidden_layers == 4
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (small(input_ids=ids).logits - big.eval()(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path, checkpoint):
    out = tmp_path / "draft.json"
    out.write_text("mine")
    result = CliRunner().invoke(main, ["layout", "draft", str(checkpoint("llama")), "-o", str(out)])
    assert result.exit_code == 5 and "--overwrite" in result.output and out.read_text() == "mine"
    result = CliRunner().invoke(main, ["layout", "draft", str(checkpoint("llama")), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0 and Layout.from_file(out).name == "llama"


# -- bad input: one line, exit 3 ------------------------------------------------------------


def no_config(tmp_path, checkpoint):
    folder = shutil.copytree(checkpoint("llama"), tmp_path / "c")
    (folder / "config.json").unlink()
    return folder


def not_a_checkpoint(tmp_path, checkpoint):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    return path


def no_layers(tmp_path, checkpoint):
    folder = tmp_path / "flat"
    folder.mkdir()
    save_file({"embed.weight": torch.zeros(8, 4), "head.weight": torch.zeros(8, 4)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 1}))
    return folder


def no_sizes(tmp_path, checkpoint):
    folder = shutil.copytree(checkpoint("llama"), tmp_path / "s")
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    return folder


@pytest.mark.parametrize("make,says", [(no_config, "no config"), (not_a_checkpoint, "is not a .safetensors"),
                                       (no_layers, "no per-layer name pattern"), (no_sizes, "size key")])
def test_bad_input_is_one_line_and_exit_3(tmp_path, checkpoint, make, says):
    result = CliRunner().invoke(main, ["layout", "draft", str(make(tmp_path, checkpoint))])
    assert result.exit_code == 3, result.output
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1 and says in result.stderr, result.stderr
    assert "Traceback" not in result.output
