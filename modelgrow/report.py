"""Machine-readable run reports (shape: schemas/report.schema.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint.atomic import write_file_atomically


def write_report(report: dict[str, Any], path: str | Path | None) -> None:
    """Write atomically: a pipeline reading the report never sees half of it."""
    if path is None:
        return
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    write_file_atomically(path, text, what="the report")
