"""The command line: parses, calls the public API (modelgrow.api), prints.

Flags come from the option groups (modelgrow.options): each command is a few lines,
and a growth operator registered by a plugin gets its own flags on `convert`.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
from pathlib import Path

import click

from . import signals
from .version import __version__
from .cli_support import JSON_HELP, handle_errors, json_out as _json_out, show_progress as _progress
from .options import OptionsCommand, click_option, given, param_name, with_options

# The option groups are imported when their command runs or shows its own help (the
# lambdas below, OptionsCommand), so that `modelgrow --help` and `--version` start
# without torch.


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="modelgrow")
def main():
    """Grow a small pretrained transformer checkpoint into a larger one.

    Exit codes: 0 success, 1 internal error, 2 bad usage, 3 bad input,
    4 verification failed, 5 output could not be written; 129, 130, 143 stopped
    by SIGHUP, SIGINT, SIGTERM (nothing half-written is left).
    """


def run() -> None:
    """The ``modelgrow`` command: ``main`` with the signal handler kept for the whole process.

    A signal before the command starts exits 128 + its number with "nothing was written";
    one after the command has finished is ignored (see ``signals``). The process then
    ends without the interpreter's teardown: freeing torch's objects takes about a second,
    during which a signal would kill a finished command with no message and no clean exit.
    """
    signals.for_process()
    try:
        main(prog_name="modelgrow")
        code = 0
    except SystemExit as done:
        code = done.code
    except signals.Terminated as exc:
        click.echo(signals.message(exc), err=True)
        code = signals.exit_code(exc)
    _exit_now(code)


def _exit_now(code) -> None:
    """Exit as sys.exit(code) would, after atexit's work, without tearing the interpreter down."""
    if code is not None and not isinstance(code, int):
        click.echo(code, err=True)
        code = 1
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # a thread still working: let the interpreter wait for it
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter would run first; no public spelling
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left (`| head`): the command's status stands
            pass
    os._exit(code or 0)


# -- convert --------------------------------------------------------------------------------


def operator_fields() -> dict[str, tuple[type, list[str]]]:
    """Every option field of every registered operator: name -> (its group, operators)."""
    from . import plugins
    from .options import flag_of

    fields: dict[str, tuple[type, list[str]]] = {}
    for name, op in sorted(plugins.get_operators().items()):
        for field, info in op.Options.model_fields.items():
            if flag_of(info).cli:
                fields.setdefault(field, (op.Options, []))[1].append(name)
    return fields


class ConvertCommand(OptionsCommand):
    """`convert` with one flag per operator option, read from the operators registered now."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        fields = operator_fields()
        everyone = set().union(*(set(ops) for _, ops in fields.values())) if fields else set()
        extra = []
        for name, (model, ops) in fields.items():
            option = click_option(model, name, model.model_fields[name])
            if set(ops) != everyone:
                option.help = f"{', '.join(ops)}: {option.help}"
            extra.append(option)
        return params[:-1] + extra + params[-1:]  # help stays last


def _convert_groups():
    from .fit import FitOptions
    from .grow import ConvertOptions
    from .plan import GrowthSpec

    return GrowthSpec, FitOptions, ConvertOptions


@main.command(cls=ConvertCommand)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Folder to write the grown checkpoint to.")
@with_options(lambda: _convert_groups()[0])
@click.option("--operator", default="copy", show_default=True, help="Growth operator (see `modelgrow plugins`).")
@with_options(lambda: _convert_groups()[1])
@with_options(lambda: _convert_groups()[2])
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or plan table.")
@handle_errors
def convert(source, output, operator, as_json, quiet, **values):
    """Grow SOURCE (a .safetensors file, a sharded index, or a Hugging Face folder)."""
    from . import api
    from .summaries import convert_summary

    spec_group, fit_group, run_group = _convert_groups()
    operator_options = {name: values[param_name(model, name)] for name, (model, _) in operator_fields().items()
                        if values.get(param_name(model, name)) is not None}
    as_json = _json_out(as_json, values)
    echo = functools.partial(click.echo, err=as_json)  # with JSON on stdout, people read stderr
    run = given(values, run_group)
    result = api.convert(source, output, given(values, spec_group), operator=operator,
                         operator_options=operator_options, fit=given(values, fit_group) or None,
                         progress=_progress(quiet), **run)
    report = result.report
    for line, warning in convert_summary(report, result.output, quiet=quiet,
                                         show_plan=not quiet or (run.get("dry_run") and not as_json)):
        click.echo(line, err=True) if warning else echo(line)
    if result.onnx is not None:
        from .onnx_export import summary_lines

        echo("\n".join(summary_lines(result.onnx.report)))
    if as_json and (result.output is not None or report["dry_run"]):  # not on a data-parallel helper rank
        click.echo(result.to_json())


# -- train ----------------------------------------------------------------------------------


def _train_groups():
    from .train_options import TrainOptions, TrainRun

    return TrainOptions, TrainRun


@main.command("train", cls=OptionsCommand)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folder for the trained checkpoint: always dense, in SOURCE's format.")
@with_options(lambda: _train_groups()[0])
@with_options(lambda: _train_groups()[1])
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def train_command(source, output, as_json, quiet, **values):
    """Continue training SOURCE (e.g. a grown checkpoint), full-rank or with ReLoRA.

    Under torchrun every process trains its slice of the global batch; rank 0 writes.
    """
    from . import api
    from .summaries import format_train

    options, run = _train_groups()
    as_json = _json_out(as_json, values)
    result = api.train(source, output, given(values, options), progress=_progress(quiet), **given(values, run))
    if result.output is not None:  # rank 0
        click.echo(format_train(result.report), err=as_json)
        if as_json:
            click.echo(result.to_json())


# -- run --------------------------------------------------------------------------------------


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--into", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Write every output into this existing folder instead, each by its own name (to replay a report).")
@click.option("--dry-run", is_flag=True, help="Check the whole recipe, run convert's dry run (the plan), and stop.")
@click.option("--print-recipe", is_flag=True, help="Print the recipe as YAML (paths absolute; a report's too) and stop.")
@click.option("--report", type=click.Path(path_type=Path),
              help="Write the run's JSON report (every stage's) here; - (or /dev/stdout) prints it, like --json.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or plan table.")
@handle_errors
def run_command(recipe, into, dry_run, print_recipe, report, as_json, quiet):
    """Run RECIPE: a YAML file naming the source, convert, fit, train and export options.

    RECIPE may also be a report (REPORT.json of convert, train, export or run): its run
    is made again, and the files made must match the report's sha256 (exit 4 if not).
    """
    from . import recipe as recipes

    values = {"report": report}
    as_json = _json_out(as_json, values)
    plan = recipes.load(recipe, into=into, dry_run=dry_run)
    if print_recipe:
        click.echo(plan.to_yaml(), nl=False)
        return
    result = recipes.run(plan, dry_run=dry_run, progress=_progress(quiet), quiet=quiet,
                         echo=functools.partial(click.echo, err=as_json), report=values["report"])
    if as_json:
        click.echo(result.to_json())
    result.check()


# -- inspect, verify, export, demo, plugins ---------------------------------------------------


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.json, when not beside PATH.")
@click.option("--tensors", is_flag=True, help="List every tensor with its shape, dtype and axis roles.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def inspect(path, config_path, tensors, as_json):
    """Show a checkpoint's architecture, sizes, tensors and parameter count."""
    from . import api

    info = api.inspect(path, config=config_path, tensors=tensors)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"{info['path']}: {info['architecture']} ({info['class']}), {info['params']:,} parameters, "
               f"{info['dtype']}, {len(info['files'])} file(s), tied embeddings: {'yes' if info['tied_embeddings'] else 'no'}")
    click.echo("  " + ", ".join(f"{k}={v}" for k, v in info["dims"].items() if v is not None))
    for t in info.get("tensors", []):
        click.echo(f"  {t['name']:60} {str(t['shape']):>16} {t['dtype']:>8}  {t['axes']}")


def _verify_group():
    from .compare import VerifyOptions

    return VerifyOptions


@main.command(cls=OptionsCommand)
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("grown", type=click.Path(path_type=Path))
@with_options(lambda: _verify_group())
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (standard output holds only it).")
@handle_errors
def verify(source, grown, as_json, **values):
    """Run SOURCE and GROWN on the same random inputs and compare their outputs.

    Exits 4 when they differ by more than the tolerance.
    """
    from . import api
    from .summaries import format_verify

    result = api.verify(source, grown, **given(values, _verify_group()))
    click.echo(result.to_json() if as_json else format_verify(result.as_dict()))
    if not result.passed:
        err = result.failure(source, grown)
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Keep the grown demo model here.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@handle_errors
def demo(output, overwrite):
    """Grow the small GPT-2 shipped with modelgrow 2x wide and 2x deep, verify, and sample."""
    from .demo import run_demo

    run_demo(output, overwrite=overwrite, echo=click.echo, progress=_progress(False))


def _export_group():
    from .onnx_export import ExportOptions

    return ExportOptions


@main.command("export", cls=OptionsCommand)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The .onnx file to write; with external data OUTPUT.data goes beside it (keep the two together).")
@with_options(lambda: _export_group())
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@handle_errors
def export_command(source, output, as_json, **values):
    """Export SOURCE to ONNX (needs the onnx extra) and check it against PyTorch.

    Exits 4 when onnxruntime's outputs differ from PyTorch's; nothing is written then.
    """
    from . import api
    from .onnx_export import summary_lines

    as_json = _json_out(as_json, values)
    result = api.export(source, output, **given(values, _export_group()))
    click.echo("\n".join(summary_lines(result.report)), err=as_json)
    if as_json:
        click.echo(result.to_json())


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def plugins_command(as_json):
    """List loaded plugins, where they come from, and what they register."""
    from . import plugins

    rows, failed = plugins.describe_plugins(), plugins.failures()
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failures": [f.__dict__ for f in failed]}, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}  [{r['distribution']} {r['version']}]")
        for key in ("architectures", "operators"):
            if r[key]:
                click.echo(f"  {key}: {', '.join(r[key])}")
        click.echo(f"  hooks: {', '.join(r['hooks'])}")
    for f in failed:
        click.echo(f"{f.name}  FAILED to load: {f.error}")


# -- layout -----------------------------------------------------------------------------------


@main.group("layout")
def layout_group():
    """Architecture layouts: what every tensor of a checkpoint is (schemas/LAYOUT.md)."""


@layout_group.command("draft")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the layout JSON here (default, or -: standard output).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.json, when not beside CHECKPOINT.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@handle_errors
def layout_draft(checkpoint, output, config_path, overwrite):
    """Draft a layout for CHECKPOINT, an architecture no plugin knows.

    Reads config.json and every tensor's name and shape (and the norm gains' values).
    Standard error gets one `check:` line per thing the weights cannot show.
    """
    from . import api

    to_stdout = output is None or str(output) == "-"
    draft = api.draft_layout(checkpoint, None if to_stdout else output, config=config_path, overwrite=overwrite)
    if to_stdout:
        click.echo(draft.to_json(), nl=False)
    else:
        click.echo(f"wrote {output}", err=True)
    for line in draft.checks:
        click.echo(f"check: {line}", err=True)
