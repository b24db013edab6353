"""The marker that says a folder is modelgrow's output, and what ``--overwrite`` may replace.

Every folder CheckpointWriter commits (a grown or trained checkpoint, a training step
folder) carries ``.modelgrow``: UTF-8 JSON, for example

    {"files": ["config.json", "model.safetensors"], "format": 1,
     "metadata": {"format": "pt", "modelgrow.version": "0.1.0", ...},
     "modelgrow_version": "0.1.0", "written_by": "modelgrow"}

``files`` lists every file the writer put there (paths relative to the folder, ``/``
separated; the marker itself is not listed); ``metadata`` is the provenance also stored
in the safetensors headers (command options, version, the source by its content digest:
checkpoint/identity.py; never a local path). There is no timestamp or command line, on
purpose: the same inputs, options and seed give byte-identical folders, marker included
(the marker's mtime says when). Loaders ignore the file:
``transformers``' ``from_pretrained`` and safetensors read only the names they know.
An empty folder (a sentence-transformers Normalize module) is listed as ``NAME/``.

``--overwrite`` replaces a destination only if it is absent, an empty folder, or a
folder whose marker says modelgrow wrote it and that holds nothing the marker does not
list. A folder without a marker (another tool's, or written by a modelgrow from before
the marker existed) is refused like any other: its files are named, nothing is deleted.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from modelgrow.checkpoint.atomic import MARKER_NAME, fsync_path, output_errors, remove_stale_temps
from modelgrow.errors import OutputError
from modelgrow.version import __version__

MARKER_FORMAT = 1
_SHOWN = 5  # foreign names in the refusal before "and N more"


def write_marker(folder: Path, metadata: dict[str, str], dest: Path) -> None:
    """Write ``folder``'s marker listing every file in it now, and fsync it.

    Rewrites the staging folder's lock file in place (same inode, so the lock holds).
    """
    files = sorted(_files_under(folder))
    marker = {
        "written_by": "modelgrow",
        "format": MARKER_FORMAT,
        "modelgrow_version": __version__,
        "metadata": dict(sorted(metadata.items())),
        "files": files,
    }
    text = json.dumps(marker, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path = folder / MARKER_NAME
    with output_errors(path, dest):
        with open(path, "wb") as f:
            f.write(text.encode("utf-8"))
        fsync_path(path)


def check_replaceable(dest: str | Path) -> None:
    """Refuse (OutputError, exit 5) to replace ``dest`` unless modelgrow wrote all of it."""
    dest = Path(dest)
    with output_errors(dest, dest):
        try:
            mode = os.lstat(dest).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "a file"
            raise OutputError(f"is {kind}, not a folder modelgrow wrote; --overwrite replaces only "
                              "what modelgrow wrote; remove it or choose another -o", path=dest)
        listed = _listed_files(dest)
        foreign = _foreign(dest, "", listed)
        if foreign:
            why = "" if listed is not None else f" (it has no valid {MARKER_NAME} marker)"
            raise OutputError(f"holds files modelgrow did not write: {_summary(foreign)}{why}; "
                              "remove them or choose another -o", path=dest)


def _summary(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown} and {len(names) - _SHOWN} more"


def _listed_files(dest: Path) -> set[str] | None:
    """The files the marker in ``dest`` lists, or None if there is no valid marker."""
    path = dest / MARKER_NAME
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        marker = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if marker.get("written_by") != "modelgrow" or not isinstance(files, list):
        return None
    if not all(isinstance(name, str) for name in files):
        return None
    return set(files)


def _foreign(folder: Path, prefix: str, listed: set[str] | None) -> list[str]:
    """Entries under ``folder`` (relative names, folders with a trailing /) not in ``listed``.

    ``listed`` is None where there is no valid marker: then every entry is foreign.
    """
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        rel = f"{prefix}{entry.name}"
        if listed is None:
            found.append(f"{rel}/" if entry.is_dir(follow_symlinks=False) else rel)
            continue
        if not prefix and entry.name == MARKER_NAME:
            continue  # the valid marker itself
        if entry.is_dir(follow_symlinks=False):
            inside = f"{rel}/"
            if any(name.startswith(inside) for name in listed):
                found += _foreign(Path(entry.path), inside, listed)
            else:
                found.append(inside)
        elif not (entry.is_file(follow_symlinks=False) and rel in listed):
            found.append(rel)
    return found


def _files_under(folder: Path, prefix: str = "") -> list[str]:
    files = []
    for entry in os.scandir(folder):
        rel = f"{prefix}{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            files += _files_under(Path(entry.path), f"{rel}/") or [f"{rel}/"]
        elif rel != MARKER_NAME:
            files.append(rel)
    return files


def check_target(dest: Path, overwrite: bool, *, clean: bool = False) -> None:
    """What entering a writer for ``dest`` would refuse: the name, the parent folder, an
    existing folder without ``overwrite``, one modelgrow did not write. ``clean``: first
    tidy what killed runs left beside ``dest``, as entering does (a dry run touches nothing)."""
    _check_folder_name(dest)
    if clean:
        with output_errors(dest.parent, dest):
            remove_stale_temps(dest)
    _check_existing(dest, overwrite)


def _check_folder_name(dest: Path) -> None:
    if not dest.name or dest.name in (".", ".."):
        raise OutputError("is not a usable destination folder name", path=dest)
    if not dest.parent.is_dir():
        raise OutputError(f"parent folder {dest.parent} does not exist", path=dest,
                          hint=f"create it first (mkdir -p {dest.parent}); nothing was written")


def _check_existing(dest: Path, overwrite: bool) -> None:
    if os.path.lexists(dest) and not overwrite:
        raise OutputError("exists; pass --overwrite to replace it", path=dest)
    check_replaceable(dest)  # before any work: --overwrite replaces only what modelgrow wrote
