"""Reports replayed (`modelgrow run REPORT.json`): the recipe that made a report's output,
and whether the replay made the same bytes.

Every command's report records what makes its output again: a convert report its
``options`` (growth, operator, convert and fit), a train
report its ``options`` and ``train_run``, an export report its ``options``, and each its
``cwd``, where its relative paths start. A `modelgrow run` report holds its recipe.
From these this module writes the recipe document (what a recipe file holds, read by
modelgrow.recipe) and, after the run, compares the files made with those the report
lists (name and sha256).

Options are written by their recipe keys (the flags without "--" and the group's prefix)
where they differ from their defaults (modelgrow.card.given, as the model card's command).
Side outputs are left out (SIDE_OUTPUTS): a replay makes the outputs again, not the
report, plot or step folders, which would land on the original's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import given
from .errors import InputError, UsageError
from .options import Options, flag_of

SIDE_OUTPUTS = ("report", "plot", "save-every", "onnx")


@dataclass
class Replay:
    """A report as a recipe document: the recipe, where its relative paths start, the files it made."""

    recipe: dict[str, Any]
    base: Path
    expected: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # stage -> [{name, sha256, ...}]


def is_report(doc: Any) -> bool:
    """Whether a JSON document is a modelgrow report (rather than a recipe written as JSON)."""
    return isinstance(doc, dict) and "modelgrow_version" in doc and isinstance(doc.get("command"), str)


def from_report(report: dict[str, Any], file: str) -> Replay:
    """The recipe that makes ``report``'s output again (``file``: the report's path, for messages)."""
    command = report["command"]
    if command == "run":
        return _run(report, file)
    build = {"convert": _convert, "train": _train, "export": _export}.get(command)
    if build is None:
        raise UsageError(f"is the report of `modelgrow {command}`, which writes no output to make again", path=file)
    try:
        recipe = build(report, file)
    except KeyError as err:
        raise InputError(f"is not a complete {command} report: it has no {err.args[0]!r}", path=file) from None
    files = (report.get("output") or {}).get("files")
    return Replay(recipe, Path(report.get("cwd") or os.getcwd()), {command: files} if files else {})


def differences(expected: list[dict[str, Any]], made: list[dict[str, Any]]) -> list[str]:
    """The file names whose sha256 differ (or that only one side has)."""
    want = {f["name"]: f["sha256"] for f in expected}
    got = {f["name"]: f["sha256"] for f in made}
    return sorted(name for name in want.keys() | got.keys() if want.get(name) != got.get(name))


# -- one report per command -----------------------------------------------------------------


def _convert(report: dict[str, Any], file: str) -> dict[str, Any]:
    from . import plugins
    from .fit import FitOptions
    from .grow import ConvertOptions
    from .plan import GrowthSpec

    options = _recorded(report, "options", file)
    op = report["operator"]
    section = keys(GrowthSpec, options.get("growth"), file, "convert")
    if op["name"] != "copy":
        section["operator"] = op["name"]
    try:
        kind = plugins.get_operator(op["name"])
    except UsageError as err:
        raise UsageError(f"was made by the operator {op['name']!r}, which no loaded plugin registers now",
                         path=file, hint=err.hint) from None
    section.update(keys(kind.Options, options.get("operator"), file, "convert"))
    section.update(keys(ConvertOptions, options.get("convert"), file, "convert"))
    recipe = {"source": _source(report), **_output(report), "convert": section}
    if options.get("fit"):
        recipe["fit"] = keys(FitOptions, options["fit"], file, "fit")
    return recipe


def _train(report: dict[str, Any], file: str) -> dict[str, Any]:
    from .train_options import TrainOptions, TrainRun

    section = {**_output(report), **keys(TrainOptions, report["options"], file, "train")}
    section.update(keys(TrainRun, _recorded(report, "train_run", file), file, "train"))
    return {"source": _source(report), "train": section}


def _export(report: dict[str, Any], file: str) -> dict[str, Any]:
    from .onnx_export import ExportOptions

    section = {**_output(report), **keys(ExportOptions, _recorded(report, "options", file), file, "export")}
    return {"source": report["source"]["path"], "export": section}


def _run(report: dict[str, Any], file: str) -> Replay:
    recipe = dict(report["recipe"])
    for name, section in recipe.items():
        if isinstance(section, dict):
            recipe[name] = {k: v for k, v in section.items() if k not in SIDE_OUTPUTS}
    expected = {name: stage["output"]["files"] for name, stage in (report.get("stages") or {}).items()
                if isinstance(stage, dict) and (stage.get("output") or {}).get("files")}
    return Replay(recipe, Path(file).absolute().parent, expected)


# -- helpers --------------------------------------------------------------------------------


def keys(model: type[Options], values: dict[str, Any] | None, file: str, section: str) -> dict[str, Any]:
    """``values`` (a report's options in effect) as recipe keys: those that differ from the defaults.

    An option that differs from its default but has no flag (set through the Python API)
    cannot be written in a recipe: that is refused rather than dropped.
    """
    try:
        options = model.parse(values or {})
    except UsageError as err:
        raise InputError(f"its {section} options do not hold: {err.problem}", path=file) from None
    for name, info in model.model_fields.items():
        value = getattr(options, name)
        if (not flag_of(info).cli or name in model.hidden) and value != info.default:
            raise UsageError(f"its {section} option {name}={value!r} has no recipe key (it has no flag: it was given "
                             "through the Python API)", path=file, hint="run it again from Python")
    return {key: plain(value) for name, value in given(options, plain=False).items()
            if (key := name.replace("_", "-")) not in SIDE_OUTPUTS}


def _recorded(report: dict[str, Any], key: str, file: str) -> dict[str, Any]:
    if not isinstance(report.get(key), dict):
        raise InputError(f"records no {key!r}: it was written by a modelgrow that did not record what makes its "
                         "output again", path=file, hint="make it again with this version, then replay that report")
    return report[key]


def _source(report: dict[str, Any]) -> str:
    """The source as it was typed: the Hub id (with its revision), else the path."""
    source = report["source"]
    hub = source.get("hub")
    if hub:
        return f"{hub['id']}@{hub['revision']}" if hub.get("revision") else hub["id"]
    return source["path"]


def _output(report: dict[str, Any]) -> dict[str, Any]:
    out = report.get("output")
    return {"output": out["path"]} if out else {}  # a dry run's report has none: -o gives it


def plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
