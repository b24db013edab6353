"""Machine-readable run reports (shape: schemas/report.schema.json)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import OutputError


def write_report(report: dict[str, Any], path: str | Path | None) -> None:
    """Write atomically: a pipeline reading the report never sees half of it."""
    if path is None:
        return
    path = Path(path)
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write the report: {exc.strerror or exc}", path=path) from None
