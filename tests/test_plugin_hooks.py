"""The plugin API, tested the way datasette tests its own: meta-tests keep the hooks,
their tests and their documentation in step, and every hook is exercised by a plugin
registered in process (``pm.register`` / ``pm.unregister``).

- every hook in modelgrow.hookspecs has a ``test_hook_<name>`` here and a heading in
  docs/plugins.md;
- every built-in layout (and the example plugin's) validates against the schema;
- every role and every field of the schema is documented in schemas/LAYOUT.md;
- a layout that does not validate is refused with the file, the JSON path and the reason.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from modelgrow import hookspecs, plugins
from modelgrow.architectures.hf import HFArchitecture
from modelgrow.cli import main
from modelgrow.errors import LayoutError
from modelgrow.hookspecs import hookimpl
from modelgrow.layout import Layout, builtin_layout_paths, layout_schema

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"
LAYOUT_DOC = ROOT / "schemas" / "LAYOUT.md"
PLUGIN_LAYOUTS = sorted((ROOT / "plugins").glob("*/*/*.json"))


def hook_names() -> list[str]:
    return sorted(name for name, fn in vars(hookspecs).items() if hasattr(fn, "modelgrow_spec"))


@pytest.fixture
def registered():
    """Register plugins for one test; unregister them and forget their failures after."""
    added = []

    def register(plugin, name):
        plugins.load_plugins()
        plugins.pm.register(plugin, name=name)
        added.append(plugin)
        return plugin

    try:
        yield register
    finally:
        for plugin in added:
            plugins.pm.unregister(plugin)
        plugins.reset()


@pytest.fixture
def demo(tmp_path):
    """The small GPT-2 that ships with modelgrow, as a folder we may edit."""
    folder = Path(str(resources.files("modelgrow.data.demo")))
    return Path(shutil.copytree(folder, tmp_path / "demo", ignore=shutil.ignore_patterns("__init__.py", "__pycache__")))


def toy_layout(name: str = "toy-gpt2") -> Layout:
    """The GPT-2 layout under another name, matched by a model_type nobody else uses."""
    data = json.loads((ROOT / "modelgrow" / "layouts" / "gpt2.json").read_text())
    data.update(name=name, match={"model_types": [name]})
    return Layout.from_dict(data, source=f"<{name}>")


# -- meta-tests --------------------------------------------------------------------------


def test_hookspecs_are_found():
    assert hook_names() == ["claim_checkpoint", "register_architectures", "register_operators"]


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_test(hook):
    assert callable(globals().get(f"test_hook_{hook}")), f"write test_hook_{hook} in {__file__}"


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented(hook):
    headings = re.findall(r"^#{2,4}\s+`?([\w.]+)`?\s*$", DOCS.read_text(), flags=re.MULTILINE)
    assert hook in headings, f"docs/plugins.md needs a heading '### {hook}'"


@pytest.mark.parametrize("path", builtin_layout_paths() + PLUGIN_LAYOUTS, ids=lambda p: p.name)
def test_every_layout_validates(path):
    data = json.loads(path.read_text())
    jsonschema.Draft202012Validator(layout_schema()).validate(data)
    layout = Layout.from_file(path)  # schema + cross-reference rules
    assert layout.name == data["name"]


def test_builtin_layout_names_are_unique_and_all_registered():
    names = [json.loads(p.read_text())["name"] for p in builtin_layout_paths()]
    assert len(names) == len(set(names))
    assert {"vit", "deit", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2", "mixtral", "qwen2_moe", "qwen3_moe"} <= set(names)
    assert set(names) <= set(plugins.get_architectures())


def schema_roles() -> list[str]:
    pattern = layout_schema()["$defs"]["role"]["pattern"]
    groups = re.findall(r"\(([a-z_|]+)\)", pattern)
    assert len(set(groups)) == 1, "the two role alternations in the pattern must agree"
    return groups[0].split("|")


@pytest.mark.parametrize("role", schema_roles())
def test_every_role_is_documented(role):
    assert re.search(rf"^\| `{role}` \|", LAYOUT_DOC.read_text(), flags=re.MULTILINE), f"LAYOUT.md: add `{role}` to the roles table"


def schema_fields() -> list[str]:
    """Every property name and enum value anywhere in the schema."""
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            found.update(node.get("properties", {}))
            found.update(v for v in node.get("enum", []) if isinstance(v, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(layout_schema())
    return sorted(found)


@pytest.mark.parametrize("field", schema_fields())
def test_every_schema_field_is_documented(field):
    text = LAYOUT_DOC.read_text()
    assert f"`{field}`" in text or f'`"{field}"`' in text, f"LAYOUT.md does not document `{field}`"


def _bad_layouts():
    good = json.loads((ROOT / "modelgrow" / "layouts" / "llama.json").read_text())

    def edit(fn):
        data = copy.deepcopy(good)
        fn(data)
        return data

    return [
        ("unknown role", edit(lambda d: d["tensors"]["layer"][1].update(axes=["attn", "hidden"])),
         "$.tensors.layer[1].axes[1]", "'hidden' does not match"),
        ("unknown field", edit(lambda d: d.update(colour="blue")),
         "$", "'colour' was unexpected"),
        ("missing size key", edit(lambda d: d["config_keys"].pop("heads")),
         "$.config_keys", "'heads' is a required property"),
        ("image inputs without sizes", edit(lambda d: d.update(inputs={"kind": "image"})),
         "$.inputs", "'image_size' is a required property"),
        ("in beyond the axes", edit(lambda d: d["tensors"]["layer"][1].update({"in": 2})),
         "$.tensors.layer[model.layers.${layer}.self_attn.q_proj.weight]", "'in' is 2 but the tensor has 2 axes"),
        ("tie to nothing", edit(lambda d: d["tie"].update(head="lm_head.weights")),
         "$.tie.head", "'lm_head.weights' is not a tensor of this layout"),
        ("config_also without a key", edit(lambda d: d.update(config_also={"ffn": ["d_ff"]}) or d["config_keys"].pop("ffn")),
         "$.config_also.ffn", "has no entry in config_keys"),
    ]


@pytest.mark.parametrize("data,where,reason", [c[1:] for c in _bad_layouts()], ids=[c[0] for c in _bad_layouts()])
def test_invalid_layout_is_refused_with_file_path_and_reason(tmp_path, data, where, reason):
    path = tmp_path / "vendor" / "mymodel.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    with pytest.raises(LayoutError) as info:
        Layout.from_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: layout ")
    assert f" at {where}: " in message and reason in message
    assert "\n" not in message


def test_unreadable_layout_is_refused_with_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",')
    with pytest.raises(LayoutError, match=r"broken\.json: layout is not valid JSON"):
        Layout.from_file(path)


def test_a_plugin_with_a_bad_layout_is_reported_not_fatal(tmp_path, registered):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "match": {}, "norm": {"type": "batchnorm", "placement": "pre"},
                               "config_keys": {}, "tensors": {"layer": []}}))

    class BadLayoutPlugin:
        @hookimpl
        def register_architectures(self, register):
            register(HFArchitecture(Layout.from_file(bad)))

    registered(BadLayoutPlugin(), "bad-layout-plugin")
    assert "gpt2" in plugins.get_architectures()  # everyone else still works
    failure = next(f for f in plugins.failures() if f.name == "bad-layout-plugin")
    assert str(bad) in failure.error and "layout does not validate at $" in failure.error
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0
    assert "bad-layout-plugin  FAILED to load: register_architectures: LayoutError:" in result.output


# -- one test per hook ---------------------------------------------------------------------


def test_hook_register_architectures(registered, demo):
    class ToyPlugin:
        @hookimpl
        def register_architectures(self, register):
            register(HFArchitecture(toy_layout()))

    registered(ToyPlugin(), "toy-plugin")
    assert "toy-gpt2" in plugins.get_architectures()
    listed = CliRunner().invoke(main, ["plugins", "--json"])
    row = next(r for r in json.loads(listed.output)["plugins"] if r["name"] == "toy-plugin")
    assert row["architectures"] == ["toy-gpt2"] and row["hooks"] == ["register_architectures"]
    assert row["distribution"].startswith("registered in process")

    config = json.loads((demo / "config.json").read_text())
    (demo / "config.json").write_text(json.dumps({**config, "model_type": "toy-gpt2"}))
    inspected = CliRunner().invoke(main, ["inspect", str(demo), "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["architecture"] == "toy-gpt2"


def test_hook_claim_checkpoint(registered, demo):
    asked = []

    class ClaimPlugin:
        @hookimpl
        def register_architectures(self, register):
            register(HFArchitecture(toy_layout()))

        @hookimpl
        def claim_checkpoint(self, config, tensor_names, architectures):
            asked.append((config.get("model_type"), len(tensor_names), sorted(architectures)))
            if config.get("toy_claim") and "transformer.wte.weight" in tensor_names:
                return "toy-gpt2"
            return None  # let the others (finally the built-in rule) decide

    registered(ClaimPlugin(), "claim-plugin")

    def architecture():
        result = CliRunner().invoke(main, ["inspect", str(demo), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["architecture"]

    assert architecture() == "gpt2"  # declined: the built-in rule answers
    config = json.loads((demo / "config.json").read_text())
    (demo / "config.json").write_text(json.dumps({**config, "toy_claim": True}))
    assert architecture() == "toy-gpt2"  # claimed before the built-in rule, same model_type
    assert asked[0][0] == "gpt2" and asked[0][1] > 0 and {"gpt2", "toy-gpt2"} <= set(asked[0][2])

    (demo / "config.json").write_text(json.dumps({**config, "model_type": "nobody"}))
    result = CliRunner().invoke(main, ["inspect", str(demo)])
    assert result.exit_code == 3
    assert "no architecture plugin recognises this checkpoint" in result.output and "toy-gpt2" in result.output


def docs_operator_example() -> dict:
    """The operator example in docs/plugins.md, executed: the docs cannot rot."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL) if "class ZeroPad" in b)
    namespace: dict = {}
    exec(compile(block, str(DOCS), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_hook_register_operators(registered, demo, tmp_path):
    example = docs_operator_example()
    plugin = registered(type("ZeroPadPlugin", (), {"register_operators": staticmethod(example["register_operators"])}),
                        "zeropad-plugin")
    assert plugins.get_operators()["zeropad"] is example["ZeroPad"]
    runner = CliRunner()

    listed = runner.invoke(main, ["plugins"])
    assert "zeropad-plugin  [registered in process" in listed.output
    assert "operators: zeropad" in listed.output.split("zeropad-plugin")[1]

    out = tmp_path / "grown"
    report = tmp_path / "report.json"
    result = runner.invoke(main, ["convert", str(demo), "-o", str(out), "--operator", "zeropad", "--width", "2x",
                                  "--depth", "3", "--no-verify", "-q", "--report", str(report)])
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    assert written["operator"]["name"] == "zeropad"
    assert written["promise"]["exact"] is False and "zero padding" in written["promise"]["notes"]
    assert json.loads((out / "config.json").read_text())["n_embd"] == 128

    unknown = runner.invoke(main, ["convert", str(demo), "--dry-run", "--operator", "nope"])
    assert unknown.exit_code == 2 and "zeropad" in unknown.output  # the hint lists it
    assert plugin is not None


def test_an_operator_plugin_declares_its_own_flags(registered, demo, tmp_path):
    """The documented operator's option becomes a `convert` flag, with its help, and reaches it."""
    example = docs_operator_example()
    registered(type("ZeroPadPlugin", (), {"register_operators": staticmethod(example["register_operators"])}),
               "zeropad-plugin")
    runner = CliRunner()
    help_text = " ".join(runner.invoke(main, ["convert", "--help"]).output.split())
    assert "--fill FLOAT zeropad: Value of the new entries (0: zero padding). [default: 0.0]" in help_text
    assert "--rank INTEGER mango: Ring rank" in help_text  # built-in operators' flags come the same way

    out = tmp_path / "grown"
    result = runner.invoke(main, ["convert", str(demo), "-o", str(out), "--operator", "zeropad", "--width", "2x",
                                  "--fill", "0.25", "--no-verify", "-q"])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    grown = load_file(out / "model.safetensors")
    assert float(grown["transformer.h.0.ln_1.weight"][-1]) == 0.25  # a padded entry holds the fill
    refused = runner.invoke(main, ["convert", str(demo), "--dry-run", "--operator", "zeropad", "--fill", "inf"])
    assert refused.exit_code == 2 and "--fill must be a number" in refused.output
    foreign = runner.invoke(main, ["convert", str(demo), "--dry-run", "--operator", "zeropad", "--rank", "2"])
    assert foreign.exit_code == 2 and "--rank: not an option of the zeropad operator" in foreign.output


def test_an_operator_that_only_says_it_is_learned_is_refused(registered, demo, tmp_path):
    import torch

    from modelgrow.operators.base import Operator

    class Pretends(Operator):
        name = "pretends"
        learned = True

        def tensor(self, target):
            return torch.zeros(target.shape)

    class PretendsPlugin:
        @hookimpl
        def register_operators(self, register):
            register(Pretends)

    registered(PretendsPlugin(), "pretends-plugin")
    result = CliRunner().invoke(main, ["convert", str(demo), "-o", str(tmp_path / "out"), "--operator", "pretends",
                                       "--width", "2x"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "says it is learned but has no trainable tensors" in result.output
    assert not (tmp_path / "out").exists()
