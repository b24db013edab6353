"""Where a command may write: never over its own input."""

from __future__ import annotations

from pathlib import Path

from .errors import OutputError


def check_destination(source, dest: Path) -> None:
    """Refuse an output folder that is the source checkpoint, its folder or one of its files."""
    src = Path(source.checkpoint.path).resolve()
    d = Path(dest).resolve()
    inputs = {src, Path(source.checkpoint.root).resolve(), *(Path(f).resolve() for f in source.checkpoint.files)}
    if d in inputs:
        raise OutputError("output path is the input", path=dest, hint="choose another -o/--output")
