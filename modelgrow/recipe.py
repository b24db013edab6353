"""Recipe files run: `modelgrow run RECIPE.yaml`, one file for a whole run (source,
growth, fit, training, export; read and checked by modelgrow.recipe_file), and
`modelgrow run REPORT.json`, a report replayed (modelgrow.replay).

The stages run in the order convert, train, export, each on the previous one's output,
through the public API (modelgrow.api) with the values the command line would pass, so
the outputs are byte for byte those of the same commands. A replay then compares the
files made with those its report lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from . import api, replay
from .errors import UsageError, VerificationError
from .recipe_file import Doc, Recipe, Stage, check, read, text
from .results import Result
from .version import __version__

INTO_KEYS = ("onnx", "report", "plot")  # side outputs that --into moves with the outputs


class RunResult(Result):
    """``modelgrow run``: every stage's report, the recipe, and a replay's comparison."""

    def check(self) -> None:
        """Raise VerificationError (exit 4) when a replay made other bytes than its report lists."""
        done = self.report.get("replay")
        if done and not done["identical"]:
            differ = "; ".join(f"{name}: {', '.join(s['differ'])}" for name, s in done["stages"].items() if s["differ"])
            raise VerificationError(f"the replay made other bytes than the report lists ({differ})", path=done["report"],
                                    hint="the new outputs are kept; another modelgrow, torch or source makes other bytes")


# -- loading --------------------------------------------------------------------------------


def load(path: str | Path, *, into: str | Path | None = None, dry_run: bool = False) -> Recipe:
    """Read and check a recipe file, or a report to replay (a .json file that is a modelgrow report).

    ``into``: a folder all outputs go into instead, each by its file name.
    """
    path, report = Path(path), None
    if path.suffix.lower() == ".json":
        try:
            report = json.loads(text(path))
        except ValueError:
            report = None  # a recipe written as JSON, or a syntax error: YAML says where
    if replay.is_report(report):
        again = replay.from_report(report, str(path))
        recipe = check(Doc(str(path), again.base, again.recipe), dry_run=dry_run)
        recipe.expected = again.expected
    else:
        recipe = check(read(path), dry_run=dry_run)
    if into is not None:
        move(recipe, Path(into).absolute())
    return recipe


def move(recipe: Recipe, into: Path) -> None:
    """Every output (and side output) into ``into``, by its name; two of one name are refused."""
    seen: dict[str, str] = {}

    def moved(path: Path | None, where: str) -> Path | None:
        if path is None or str(path) == "-":
            return path
        if path.name in seen:
            raise UsageError(f"--into {into}: {seen[path.name]} and {where} are both named {path.name}", path=recipe.file)
        seen[path.name] = where
        return into / path.name

    for s in recipe.stages:
        s.output = moved(s.output, "output" if s.name == "convert" else f"{s.name}.output")
        for group in filter(None, s.groups.values()):
            for key in INTO_KEYS:
                if key in group:
                    group[key] = moved(group[key], f"{s.name}.{key}")


# -- running --------------------------------------------------------------------------------


def run(recipe: Recipe, *, dry_run: bool = False, progress: bool = False, quiet: bool = False,
        echo: Callable[[str], Any] = click.echo, report: str | Path | None = None) -> RunResult:
    """Run the stages in order, each on the previous one's output; return the run's report.

    A dry run runs convert's (every check, the plan) and only checks the later stages'
    options. A replay compares the files made with those its report lists (``check()``).
    """
    out: dict[str, Any] = {"modelgrow_version": __version__, "command": "run", "recipe_file": recipe.file,
                           "recipe": recipe.to_dict(), "dry_run": dry_run, "stages": {}}
    _continued_rate(recipe)
    source: Any = recipe.source
    for stage in recipe.stages:
        if dry_run and stage.name != "convert":
            echo(f"{stage.name}: not run by a dry run (its options were checked)")
            continue
        if not quiet:
            echo(f"== {stage.name}: {source} -> {stage.output or '(dry run: no output)'}")
        result = RUNNERS[stage.name](stage, source, dry_run=dry_run, progress=progress)
        out["stages"][stage.name] = result.to_dict()
        say(stage.name, result, echo, quiet=quiet, dry_run=dry_run)
        if result.output is None and not dry_run:
            break  # a data-parallel helper rank: rank 0 writes
        source = result.output
    if recipe.expected and not dry_run:
        out["replay"] = _compare(recipe, out["stages"])
        done = out["replay"]
        if done["identical"]:
            echo(f"replay: {sum(s['files'] for s in done['stages'].values())} files byte-identical to {recipe.file}")
    result = RunResult(out)
    if report is not None:
        result.write(report)
    return result


def _continued_rate(recipe: Recipe) -> None:
    """A train stage on ``lr-schedule: continue`` without a rate must find the source's final
    rate beside the recipe's source (directly, or through the growth map convert writes from
    it): checked before any stage writes, so a dry run catches it too."""
    from .train_options import TrainOptions

    train = next((s for s in recipe.stages if s.name == "train"), None)
    if train is None or not isinstance(recipe.source, Path):
        return  # a Hub source is read where it is downloaded, by the stage itself
    root = recipe.source if recipe.source.is_dir() else recipe.source.parent
    try:
        TrainOptions.parse(train.groups["train"]).with_source_lr(root)
    except UsageError as err:
        raise UsageError(f"train (lr-schedule: continue): {err.problem}", path=recipe.file,
                         hint="add train.source-final-lr or train.lr to the recipe") from None


def _compare(recipe: Recipe, stages: dict[str, Any]) -> dict[str, Any]:
    checked = {}
    for name, files in recipe.expected.items():
        made = ((stages.get(name) or {}).get("output") or {}).get("files") or []
        checked[name] = {"files": len(files), "differ": replay.differences(files, made)}
    return {"report": recipe.file, "identical": not any(s["differ"] for s in checked.values()), "stages": checked}


def _convert_stage(stage: Stage, source, *, dry_run: bool, progress: bool):
    g = stage.groups
    run_options = {**g["convert"], **({"dry_run": True} if dry_run else {})}
    return api.convert(source, stage.output, g["growth"], operator=stage.operator, operator_options=g["operator"],
                       fit=g["fit"] or None, progress=progress, **run_options)


def _train_stage(stage: Stage, source, *, dry_run: bool, progress: bool):
    return api.train(source, stage.output, stage.groups["train"], progress=progress, **stage.groups["train_run"])


def _export_stage(stage: Stage, source, *, dry_run: bool, progress: bool):
    return api.export(source, stage.output, **stage.groups["export"])


RUNNERS = {"convert": _convert_stage, "train": _train_stage, "export": _export_stage}


def say(name: str, result, echo: Callable[[str], Any], *, quiet: bool = False, dry_run: bool = False) -> None:
    """What the stage's own command prints about it."""
    from .onnx_export import summary_lines
    from .summaries import convert_summary, format_train

    r = result.report
    if name == "train":
        echo(format_train(r))
        return
    if name == "export":
        echo("\n".join(summary_lines(r)))
        return
    for line, warning in convert_summary(r, result.output, quiet=quiet, show_plan=not quiet or dry_run):
        click.echo(line, err=True) if warning else echo(line)
    if result.onnx is not None:
        echo("\n".join(summary_lines(result.onnx.report)))
