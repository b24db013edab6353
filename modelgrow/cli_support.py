"""What every command of the command line (modelgrow.cli) shares: one line and an exit
code for an error, progress bars only on a terminal, the JSON report on standard output."""

from __future__ import annotations

import functools
import os
import sys
import traceback

import click

from . import signals
from .errors import EXIT_INTERNAL, ModelgrowError

JSON_HELP = "Print the JSON report to standard output (as --report - does); everything else goes to standard error."


def handle_errors(fn):
    """A user's mistake is one line on stderr and an exit code, never a traceback.

    While the command runs, SIGTERM and SIGHUP unwind it like SIGINT (staging removed):
    exit 143, 129 and 130, with a line that says what had been written.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with signals.handled():
                return fn(*args, **kwargs)
        except click.ClickException:
            raise  # click prints usage errors itself (exit code 2)
        except ModelgrowError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except (KeyboardInterrupt, signals.Terminated) as exc:
            click.echo(signals.message(exc), err=True)
            sys.exit(signals.exit_code(exc))
        except Exception as err:  # noqa: BLE001 - a bug: say so in one line, trace on request
            if os.environ.get("MODELGROW_DEBUG"):
                traceback.print_exc()
            click.echo(
                f"internal error: {type(err).__name__}: {' '.join(str(err).split())[:500]} "
                "(a modelgrow bug; set MODELGROW_DEBUG=1 for the traceback)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)

    return wrapper


def show_progress(quiet: bool) -> bool:
    """Progress bars: unless -q, and only on a terminal."""
    return not quiet and sys.stderr.isatty()


def json_out(as_json: bool, values: dict) -> bool:
    """Whether the report goes to standard output: --json, --report - or --report /dev/stdout.

    Then the command prints it once it is done (``values["report"]`` is dropped so the
    engine does not write it too), and all human output goes to standard error: standard
    output is one JSON document a pipeline can parse.
    """
    from .checkpoint.streams import stream_kind

    if values.get("report") is not None and stream_kind(values["report"]) == "stdout":
        values["report"] = None
        return True
    return as_json
