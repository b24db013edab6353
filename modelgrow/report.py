"""Machine-readable run reports (shape: schemas/report.schema.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint.atomic import write_file_atomically
from .checkpoint.streams import stream_kind, write_stream


def write_report(report: dict[str, Any], path: str | Path | None) -> None:
    """Write atomically: a pipeline reading the report never sees half of it.

    ``-`` (standard output), /dev/stdout, a FIFO or a device is written straight into,
    never renamed over (checkpoint/streams.py).
    """
    if path is None:
        return
    text = report_json(report) + "\n"
    kind = stream_kind(path)
    if kind is None:
        write_file_atomically(path, text, what="the report")
    else:
        write_stream(path, text, kind, what="the report")


def report_json(report: dict[str, Any], indent: int | None = 2) -> str:
    """The report as JSON text, as --report and --json write it."""
    return json.dumps(report, indent=indent, sort_keys=True, default=str)
