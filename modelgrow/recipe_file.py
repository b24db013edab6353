"""Recipe files read and checked (modelgrow.recipe runs them): a YAML document composed
with PyYAML's SafeLoader, every key's line kept, into a Recipe whose values are those the
command line would pass.

    source: models/small        # a path, or a Hugging Face Hub id org/name[@revision]
    output: out/grown           # where convert writes (its -o)
    convert: {width: 2x, depth: 2x, operator: ligo, dtype: bf16}
    fit: {data: corpus.txt, steps: 100}           # the --fit-* flags, without "fit-"
    train: {output: out/trained, data: ids.npy, steps: 1000}
    export: {output: out/model.onnx}

A section's keys are the flags of its command without "--" (an underscore may stand for
a dash), checked by the same option groups (modelgrow.options); a value is typed as the
flag's click type types it (``width: 64`` is "64", as ``--width 64`` gives). Relative
paths start at the recipe's folder. A malformed recipe is one line naming the file, the
line and the key (exit 2) before anything runs; a YAML syntax error names the line and
column; a key given twice is refused (PyYAML would keep the last).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from . import hub, plugins
from .errors import InputError, ModelgrowError, UsageError
from .options import Options, click_option, flag_of

SECTIONS = ("convert", "fit", "train", "export")
KEYS = ("source", "output", *SECTIONS)
INPUTS = ("config", "data", "val_data", "tokenizer", "resume")  # paths checked to exist before anything runs
ABOUT = {"source": "the checkpoint to start from (a path, or a Hugging Face Hub id)",
         "output": "the folder convert writes the grown checkpoint to"}


class RecipeError(UsageError):
    """A malformed recipe: one line naming the file, the line and the key (exit 2)."""


@dataclass
class Doc:
    """A recipe as read: its values by section and key, and the line of every key."""

    file: str
    base: Path  # where relative paths start
    values: dict[str, Any]
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)  # (section, key) -> line; (): the document's
    spelled: dict[tuple[str, ...], str] = field(default_factory=dict)  # as typed, for messages

    def error(self, where: tuple[str, ...], problem: str, hint: str | None = None,
              kind: type[ModelgrowError] = RecipeError) -> ModelgrowError:
        line = self.lines.get(where) or self.lines.get(where[:1]) or self.lines.get(())
        key = ".".join(self.spelled.get(where[:i + 1], part) for i, part in enumerate(where))
        return kind(f"{key}: {problem}" if key else problem, path=f"{self.file}:{line}" if line else self.file, hint=hint)


@dataclass
class Stage:
    name: str  # convert, train or export
    output: Path | None
    groups: dict[str, dict[str, Any]]  # option group -> field -> the value the command line would pass
    operator: str = "copy"


@dataclass
class Recipe:
    """A checked recipe: the source and the stages to run, in order."""

    file: str
    source: str | Path
    stages: list[Stage]
    expected: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # a replay: stage -> the report's files

    def to_dict(self) -> dict[str, Any]:
        """The recipe document, paths absolute (what the run report records)."""
        out: dict[str, Any] = {"source": str(self.source)}
        for s in self.stages:
            g = s.groups
            if s.name == "convert":
                if s.output is not None:
                    out["output"] = str(s.output)
                named = {"operator": s.operator} if s.operator != "copy" else {}
                out["convert"] = {**_keyed(g["growth"]), **named, **_keyed(g["operator"]), **_keyed(g["convert"])}
                if g["fit"]:
                    out["fit"] = _keyed(g["fit"])
            else:
                out[s.name] = {"output": str(s.output), **{k: v for group in g.values() for k, v in _keyed(group).items()}}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# -- reading --------------------------------------------------------------------------------


def read(path: Path) -> Doc:
    """Compose the YAML with SafeLoader, keeping every key's line; refuse duplicate keys."""
    file = str(path)
    loader = yaml.SafeLoader(text(path))
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError("is empty: a recipe is a mapping such as `source: ...` and `convert: {...}`", path=file)
        doc = Doc(file, path.absolute().parent, {}, {(): node.start_mark.line + 1})
        if not isinstance(node, yaml.MappingNode):
            raise doc.error((), f"a recipe is a mapping (source: ..., convert: ...), not {_kind(node)}")
        for key, value in _entries(loader, doc, node, ()):
            if key not in SECTIONS:
                doc.values[key] = loader.construct_object(value, deep=True)
            elif isinstance(value, yaml.MappingNode):
                doc.values[key] = {k: loader.construct_object(v, deep=True) for k, v in _entries(loader, doc, value, (key,))}
            elif value.tag == "tag:yaml.org,2002:null":
                doc.values[key] = {}
            else:
                raise doc.error((key,), f"must be a mapping of options, not {_kind(value)}")
        return doc
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise RecipeError(err.problem or "is not valid YAML", path=where, hint=err.context) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"is not valid YAML: {err}", path=file) from None
    finally:
        loader.dispose()


def text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("does not exist", path=path) from None
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", path=path) from None
    except OSError as err:
        raise InputError(f"cannot be read: {err.strerror or err}", path=path) from None


def _entries(loader: yaml.SafeLoader, doc: Doc, node: yaml.MappingNode, prefix: tuple[str, ...]):
    """(key, value node) of a mapping: keys as dashed names, each line noted, a repeated key refused."""
    for key_node, value in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else _kind(key_node)
            raise RecipeError(f"{'.'.join((*prefix, str(shown)))}: is not a name", path=f"{doc.file}:{line}",
                              hint="keys are option names such as width or max-shard-size")
        key = key_node.value.replace("_", "-")
        where = (*prefix, key)
        if where in doc.lines:
            raise RecipeError(f"{'.'.join((*prefix, key_node.value))}: given twice (first on line {doc.lines[where]})",
                              path=f"{doc.file}:{line}")
        doc.lines[where], doc.spelled[where] = line, key_node.value
        yield key, value


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    return f"the value {node.value!r}"


# -- checking -------------------------------------------------------------------------------


def check(doc: Doc, *, dry_run: bool = False) -> Recipe:
    """Check every key and value the way the commands check their flags; nothing runs."""
    v = doc.values
    for key in v:
        if key not in KEYS:
            raise doc.error((key,), "unknown key", _suggest(key, KEYS) or "a recipe has source, output, convert, fit, "
                                                                           "train and export")
    if v.get("source") is None:
        raise doc.error(("source",), f"missing: {ABOUT['source']}")
    if not any(name in v for name in ("convert", "train", "export")):
        raise doc.error((), "nothing to do: give convert, train or export")
    stages = []
    if "convert" in v:
        out = _path(doc, ("output",), v["output"]) if v.get("output") is not None else None
        if out is None and not dry_run:
            raise doc.error(("output",), f"missing: {ABOUT['output']}", "or run with --dry-run to only see the plan")
        stages.append(_convert(doc, v["convert"], v.get("fit") or {}, out))
    elif "fit" in v:
        raise doc.error(("fit",), "fits a learned operator while converting: add a convert section")
    elif "output" in v:
        raise doc.error(("output",), "is where convert writes, and there is no convert section",
                        "give train.output or export.output")
    for name in ("train", "export"):
        if name in v:
            stages.append(_stage(doc, name, dict(v[name])))
    return Recipe(doc.file, _source(doc, v["source"]), stages)


def _convert(doc: Doc, values: dict[str, Any], fit: dict[str, Any], output: Path | None) -> Stage:
    from .fit import FitOptions
    from .grow import ConvertOptions
    from .plan import GrowthSpec

    values = dict(values)
    if "output" in values:
        raise doc.error(("convert", "output"), "unknown option", "where convert writes is the top-level output")
    name = values.pop("operator", None) or "copy"
    if not isinstance(name, str):
        raise doc.error(("convert", "operator"), f"must be an operator's name, got {name!r}")
    try:
        kind = plugins.get_operator(name)
    except UsageError as err:
        raise doc.error(("convert", "operator"), err.problem, err.hint) from None
    operators = {n: op.Options for op in plugins.get_operators().values() for n in _fields(op.Options)}
    allowed = {**_of(GrowthSpec), **operators, **_of(kind.Options), **_of(ConvertOptions, skip=("dry_run",)), "operator": None}
    typed = _section(doc, "convert", values, allowed)
    for key in typed:
        if allowed[key] not in (GrowthSpec, ConvertOptions) and key not in kind.Options.model_fields:
            takes = ", ".join(k.replace("_", "-") for k in _fields(kind.Options))
            raise doc.error(("convert", key.replace("_", "-")), f"is not an option of the {name} operator",
                            f"it takes {takes}")
    groups = {"growth": _group(doc, "convert", GrowthSpec, typed), "operator": _group(doc, "convert", kind.Options, typed),
              "convert": _group(doc, "convert", ConvertOptions, typed), "fit": None}
    if fit:
        if not kind.learned:
            raise doc.error(("fit",), f"fits a learned operator, and {name} is not one", "e.g. operator: ligo")
        groups["fit"] = _group(doc, "fit", FitOptions, _section(doc, "fit", fit, _of(FitOptions)))
    return Stage("convert", output, groups, name)


def _stage(doc: Doc, name: str, values: dict[str, Any]) -> Stage:
    from .onnx_export import ExportOptions
    from .train_options import TrainOptions, TrainRun

    models = {"train": TrainOptions, "train_run": TrainRun} if name == "train" else {"export": ExportOptions}
    out = values.pop("output", None)
    output = _path(doc, (name, "output"), out) if out is not None else None
    if output is None:
        what = "the folder to write the trained checkpoint to" if name == "train" else "the .onnx file to write"
        raise doc.error((name, "output"), f"missing: {what}")
    typed = _section(doc, name, values, {k: m for m in models.values() for k, m in _of(m).items()})
    if name == "train" and not typed.get("data") and "resume" not in typed:
        raise doc.error((name, "data"), "missing: the training data (text, .npy or .bin ids)")
    return Stage(name, output, {group: _group(doc, name, m, typed) for group, m in models.items()})


def _fields(model: type[Options], skip: tuple[str, ...] = ()) -> list[str]:
    """The fields of ``model`` that are flags (and so recipe keys)."""
    return [n for n, f in model.model_fields.items() if flag_of(f).cli and n not in model.hidden and n not in skip]


def _of(model: type[Options], skip: tuple[str, ...] = ()) -> dict[str, type[Options]]:
    return {n: model for n in _fields(model, skip)}


def _section(doc: Doc, section: str, values: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """``values`` by field name, typed as the command line types its flags; unknown keys refused."""
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        where = (section, key)
        if name not in allowed:
            raise doc.error(where, "unknown option", _unknown(section, key, allowed))
        if value is None or allowed[name] is None:  # not given (the command line's default); output: the caller's
            continue
        out[name] = _typed(doc, where, allowed[name], name, value)
        if name in INPUTS:
            for path in out[name] if isinstance(out[name], list) else [out[name]]:
                if not os.path.lexists(path):
                    raise doc.error(where, f"{path} does not exist", kind=InputError)
    return out


def _unknown(section: str, key: str, allowed: dict[str, Any]) -> str:
    """What to say about an unknown key: the section it belongs to, a near spelling, or where to look."""
    name = key.replace("-", "_")
    if name == "dry_run":
        return "use `modelgrow run --dry-run`"
    elsewhere = [s for s in SECTIONS if s != section and _knows(s, name)]
    if elsewhere:
        return f"{key} is an option of {' and '.join(elsewhere)}"
    command = "convert" if section == "fit" else section
    return _suggest(key, [k.replace("_", "-") for k in allowed]) or f"see `modelgrow {command} --help`"


def _knows(section: str, name: str) -> bool:
    from .fit import FitOptions
    from .grow import ConvertOptions
    from .onnx_export import ExportOptions
    from .plan import GrowthSpec
    from .train_options import TrainOptions, TrainRun

    models = {"convert": (GrowthSpec, ConvertOptions, *(op.Options for op in plugins.get_operators().values())),
              "fit": (FitOptions,), "train": (TrainOptions, TrainRun), "export": (ExportOptions,)}[section]
    return any(name in _fields(m) for m in models)


def _typed(doc: Doc, where: tuple[str, ...], model: type[Options], name: str, value: Any) -> Any:
    """A YAML value as the flag's click type would give it (``width: 64`` as "64", paths resolved)."""
    option = click_option(model, name, model.model_fields[name])
    if isinstance(option.type, click.types.BoolParamType):
        if not isinstance(value, bool):
            raise doc.error(where, f"must be true or false, got {value!r}")
        return value
    if option.multiple:
        return [_scalar(doc, where, option.type, v) for v in (value if isinstance(value, list) else [value])]
    return _scalar(doc, where, option.type, value)


def _scalar(doc: Doc, where: tuple[str, ...], kind: click.ParamType, value: Any) -> Any:
    if isinstance(value, bool):
        return value  # the option group says what it wants instead
    if isinstance(kind, click.Path):
        return _path(doc, where, value)
    if isinstance(kind, click.types.FloatParamType) and isinstance(value, (int, str)):
        try:
            return float(value)  # YAML reads 3e-5 as a string (it wants 3.0e-5)
        except ValueError:
            return value
    if isinstance(kind, (click.types.StringParamType, click.Choice)) and isinstance(value, (int, float)):
        return str(value)
    return value


def _path(doc: Doc, where: tuple[str, ...], value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise doc.error(where, f"must be a path, got {value!r}")
    if value == "-":
        return Path(value)
    path = Path(value).expanduser()
    return path if path.is_absolute() else doc.base / path


def _source(doc: Doc, value: Any) -> str | Path:
    if not isinstance(value, str) or not value:
        raise doc.error(("source",), f"must be a path or a Hugging Face Hub id, got {value!r}")
    local = _path(doc, ("source",), value)
    return local if os.path.lexists(local) or hub.parse_hub_id(value) is None else value


def _group(doc: Doc, section: str, model: type[Options], typed: dict[str, Any]) -> dict[str, Any]:
    """The values of ``typed`` that belong to ``model``, checked by it; a problem names its key."""
    values = {k: v for k, v in typed.items() if k in model.model_fields}
    try:
        model.parse(values)
    except UsageError as err:
        hits = [(m.start(), name, flag) for name in values for flag in (model.flag(name),)
                if (m := re.search(re.escape(flag) + r"(?![\w-])", err.problem))]
        if not hits:
            raise doc.error((section,), err.problem, err.hint) from None
        at, name, flag = min(hits)
        problem = err.problem[len(flag):].lstrip() if at == 0 and err.problem[len(flag):].startswith(" must") else err.problem
        raise doc.error((section, name.replace("_", "-")), problem, err.hint) from None
    return values


def _suggest(key: str, choices) -> str | None:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else None


def _keyed(values: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_", "-"): plain(v) for k, v in values.items()}


def plain(value: Any) -> Any:
    """A value as JSON: paths as strings."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
