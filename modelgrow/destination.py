"""Where a command may write: one rule for every output path.

An output (the grown or trained folder, ``--report``, ``--onnx`` and its data file,
``--plot``, step folders) must not be an input (source files, its config, tokenizer and
other files that travel with it, training data, a resume state), must not contain one,
and must not lie inside an input folder. A file output must not lie inside the output
folder either: that folder is replaced as a whole. All of it is checked before any work,
``--dry-run`` included.

A file output that already exists is replaced only when modelgrow wrote it (a report
is JSON with ``modelgrow_version``; a plot is a PNG whose text chunks name modelgrow).
A report may instead name a stream (``-``, /dev/stdout, a FIFO): it is written into.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint.streams import stream_kind
from .errors import OutputError, UsageError

PLOT_SOFTWARE = "modelgrow"  # the PNG "Software" text chunk plots are written with


def check_destination(source, dest: Path) -> None:
    """Refuse an output folder that is the source checkpoint, its folder or one of its files."""
    check_outputs(source_inputs(source), {"-o/--output": Path(dest)}, folders={"-o/--output"})


def source_inputs(source, *, data=(), tokenizer=None, resume=None) -> dict[Path, str]:
    """Every input of a run, resolved: path -> what it is (for the message)."""
    ckpt = getattr(source, "checkpoint", source)
    inputs: dict[Path, str] = {}

    def add(path, what: str) -> None:
        if path is not None:
            inputs.setdefault(Path(path).resolve(), what)

    add(ckpt.path, "the source checkpoint")
    for f in ckpt.files:
        add(f, "a source weights file")
    add(ckpt.config_path, "the source config")
    for f in ckpt.tagalong_files():
        add(f, "a file of the source checkpoint")
    for f in data:
        add(f, "a data file")
    add(tokenizer, "the tokenizer")
    add(resume, "the resume state")
    return inputs


def check_outputs(inputs: dict[Path, str], outputs: dict[str, Path | None], *, folders: set[str] = frozenset(),
                  replaced: dict[str, str] | None = None) -> None:
    """Apply the rule; ``folders`` names the outputs that are folders written as a whole,
    ``replaced`` the file outputs that may replace an earlier one of that kind.

    A report may also be a stream (``-``, /dev/stdout, a FIFO, a device: checkpoint/streams.py),
    written into and never replaced: the rule does not apply to it. Any other output
    that names a stream is refused."""
    given = {}
    for what, p in outputs.items():
        if p is None:
            continue
        if stream_kind(p) is None:
            given[what] = Path(p)
        elif (replaced or {}).get(what) != "report":
            raise UsageError(f"{what} {p} names a stream or device, not a file; only --report may be one "
                             f"(- is standard output)")
    resolved = {what: p.resolve() for what, p in given.items()}
    relations = (("is", lambda out, inp: out == inp), ("holds", lambda out, inp: out in inp.parents),
                 ("lies inside", lambda out, inp: inp in out.parents and inp.is_dir()))
    for what, out in resolved.items():
        for relation, holds in relations:  # the closest relation names the problem
            inp = next((i for i in inputs if holds(out, i)), None)
            if inp is not None:
                raise OutputError(f"{what} {relation} {inputs[inp]} ({inp}); modelgrow never writes over its inputs",
                                  path=given[what], hint="choose another path")
        for folder in folders & set(resolved):
            if folder != what and resolved[folder] in out.parents:
                raise OutputError(f"{what} lies inside the output folder {given[folder]}, which is written as a whole",
                                  path=given[what], hint="put it beside the output folder")
    for what, kind in (replaced or {}).items():
        if what in given:
            check_replaceable(given[what], what, kind)


def check_replaceable(path: Path, what: str, kind: str) -> None:
    """A file output: its folder exists, and what is there now is ours to replace."""
    try:
        _check_replaceable(path, what, kind)
    except OSError as exc:  # a name too long for the file system, a loop of links, no permission
        raise OutputError(f"{what} cannot be written there: {exc.strerror or exc}", path=path,
                          hint="choose another path") from None


def _check_replaceable(path: Path, what: str, kind: str) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"{what}: folder {path.parent} does not exist", path=path,
                          hint=f"create it first (mkdir -p {path.parent}); nothing was written")
    if path.is_dir():
        raise OutputError(f"{what} is a folder; give a file name", path=path)
    if path.exists() and not written_by_modelgrow(path, kind):
        raise OutputError(f"{what} exists and modelgrow did not write it; it is left as it is", path=path,
                          hint="choose another path or remove the file")


def written_by_modelgrow(path: Path, kind: str) -> bool:
    """Whether an existing ``kind`` ("report" or "plot") file is one modelgrow wrote."""
    try:
        if kind == "report":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return isinstance(data, dict) and "modelgrow_version" in data
        if kind == "plot":
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            return head.startswith(b"\x89PNG") and b"Software\x00" + PLOT_SOFTWARE.encode() in head
    except (OSError, ValueError):
        return False
    return False
