"""Files that travel with a checkpoint: tokenizer, chat templates, generation config,
licence and policy files, and a sentence-transformers packaging (modules.json and its
module folders, checkpoint/sentence_packaging.py).

They are copied as regular files only: never through a link that leaves the source
folder (a ``chat_template.jinja -> /etc/shadow`` stays behind), never a device, FIFO or
socket, never past a size cap (a link to a huge sparse file stays behind too), and the
copy gets ordinary permissions. The one link accepted outside the folder is the Hugging
Face cache's own: ``<repo>/snapshots/<rev>/NAME -> ../../blobs/<hash>``. Folders
(``additional_chat_templates/``, sentence-transformers modules) are entered only when
they lie inside the source folder and their names are plain. Whatever stays behind is
listed with the reason (the report's ``tagalong.left_behind``, a warning each).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .pinned import FileIdentity, identity

MAX_BYTES = 256 * 2**20  # the largest tokenizer files are tens of MB
JSON_BYTES = 2**20  # a JSON file read to decide what travels (modules.json, a module's config)
MAX_ENTRIES = 64  # files in one carried folder
CHUNK = 1 << 20

#: Files a Hugging Face model folder carries beside its weights; copied as they are.
FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "NOTICE",
    "USE_POLICY.md",
)
#: Also carried where found: any other *.jinja template, licences and notices by other spellings.
EXTRA = re.compile(r"[A-Za-z0-9_][\w.+-]*\.jinja|(?i:licen[cs]e|notice|copying|use_policy)(?:[-_.][A-Za-z0-9]+)?"
                   r"(?:\.(?:txt|md|rst))?", re.ASCII)
#: Weights, never carried beside the grown ones (nor read: a pickle is never opened).
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx", ".gguf")
TEMPLATE_FOLDER = "additional_chat_templates"  # transformers' named chat templates: NAME.jinja
#: A name inside a carried path: no separator, no leading dot (no "..", no hidden files).
PLAIN = re.compile(r"[A-Za-z0-9_][\w.+-]{0,199}", re.ASCII)


@dataclass
class Module:
    """A sentence-transformers module folder that travels (checkpoint/sentence_packaging.py)."""

    path: str  # relative to the source folder, plain names only
    kind: str  # "Pooling" or "Normalize"
    files: list[str]  # its files, relative to the source folder (none: an empty folder)
    config: dict | None = None  # a Pooling module's config.json


@dataclass
class Found:
    """What travels from ``root``: ``files`` (relative name -> its path in the source, in
    copy order), ``modules`` (their files are in ``files`` too), ``left_behind`` (name ->
    why) and ``pins`` (each carried file's identity, taken before it was read)."""

    root: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    modules: list[Module] = field(default_factory=list)
    left_behind: dict[str, str] = field(default_factory=dict)
    pins: dict[Path, FileIdentity | None] = field(default_factory=dict)

    def take(self, rel: str) -> Path | None:
        """Carry ``rel`` if it may travel (the real file), else note why not; None if absent."""
        real, why = vet(self.root, rel)
        pin = identity(real) if real is not None else None
        if pin is None:
            if real is not None or why is not None:
                self.left_behind[rel] = why or "unreadable"
            return None
        self.files[rel] = self.root / rel
        self.pins[self.root / rel] = pin
        return real

    def drop(self, rel: str, why: str) -> None:
        """Leave ``rel`` behind after all (its pin stays: what it held decided what travels)."""
        self.files.pop(rel, None)
        self.left_behind[rel] = why


def survey(root: Path) -> Found:
    """Everything in the model folder ``root`` that travels, and what stays behind."""
    from .sentence_packaging import survey_modules  # imported here: it builds on this module

    found = Found(root)
    try:
        names = sorted(entry.name for entry in os.scandir(root))
    except OSError:
        names = []
    for name in (*FILES, *(n for n in names if n not in FILES and EXTRA.fullmatch(n) and not n.endswith(WEIGHTS))):
        found.take(name)
    entries, why = folder_entries(root, TEMPLATE_FOLDER)
    if why is not None:
        found.left_behind[f"{TEMPLATE_FOLDER}/"] = why
    for rel in entries:
        if rel.endswith(".jinja"):
            found.take(rel)
        else:
            found.left_behind[rel] = "not a chat template (*.jinja)"
    survey_modules(found, names)
    return found


def write(writer, found: Found, hidden: int, grown_hidden: int) -> dict[str, object]:
    """Copy what ``found`` carries into ``writer`` (a CheckpointWriter), sentence-transformers
    values that follow the width set for ``grown_hidden``; return the report's ``tagalong``
    section: ``copied`` (relative names; an empty folder as ``NAME/``) and ``left_behind``."""
    from .sentence_packaging import settle_modules

    rewrite, left, skip = settle_modules(found, hidden, grown_hidden)
    copied: list[str] = []
    for rel, src in found.files.items():
        if rel in skip:
            continue
        if rel in rewrite:
            writer.write_json(rel, rewrite[rel])
        else:
            writer.copy_file(src, rel, root=found.root)
        copied.append(rel)
    for module in found.modules:
        if not module.files and f"{module.path}/" not in left:
            writer.make_folder(module.path)  # sentence-transformers loads a Normalize module by its path
            copied.append(f"{module.path}/")
    return {"copied": copied, "left_behind": left}


def vet(root: Path, name: str) -> tuple[Path | None, str | None]:
    """(the file to copy, None) or (None, why it stays behind); (None, None) if absent.

    ``name`` may be a relative path (``1_Pooling/config.json``): the file it reaches must
    still lie inside ``root``."""
    path = root / name
    if not os.path.lexists(path):
        return None, None
    real = path.resolve()
    allowed = [root.resolve()]
    if root.parent.name == "snapshots":
        allowed.append((root.parent.parent / "blobs").resolve())
    if not any(real == a or a in real.parents for a in allowed):
        return None, f"a link to {real}, outside the source folder"
    try:
        st = os.stat(real)
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if st.st_size > MAX_BYTES:
        return None, f"{st.st_size:,} bytes, over the {MAX_BYTES:,}-byte cap for such files"
    return real, None


def folder_entries(root: Path, rel: str) -> tuple[list[str], str | None]:
    """The entries of the folder ``rel`` (relative names, sorted), or ([], why it cannot
    travel); ([], None) if there is none. The folder must lie inside ``root`` (a link out
    of it is never entered) and hold at most MAX_ENTRIES plainly named entries."""
    folder = root / rel
    if not os.path.lexists(folder):
        return [], None
    real, inside = folder.resolve(), root.resolve()
    if inside not in real.parents:
        return [], f"a link to {real}, outside the source folder" if real != inside else "the source folder itself"
    try:
        if not stat.S_ISDIR(os.stat(real).st_mode):
            return [], "not a folder"
        with os.scandir(real) as it:
            names = sorted(entry.name for _, entry in zip(range(MAX_ENTRIES + 1), it))
    except OSError as exc:
        return [], f"unreadable: {exc.strerror or exc}"
    if len(names) > MAX_ENTRIES:
        return [], f"more than {MAX_ENTRIES} entries"
    odd = next((n for n in names if not PLAIN.fullmatch(n)), None)
    if odd is not None:
        return [], f"holds {ascii(odd[:80])}, not a plain file name"
    return [f"{rel}/{n}" for n in names], None


def read_json(root: Path, rel: str) -> tuple[object, str | None]:
    """(the JSON value in ``rel``, None) or (None, why it cannot be read): the file is
    vetted as a tag-along file is, and read only up to JSON_BYTES."""
    real, why = vet(root, rel)
    if real is None:
        return None, why or "missing"
    try:
        with os.fdopen(os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None, "not a regular file"
            data = f.read(JSON_BYTES + 1)
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if len(data) > JSON_BYTES:
        return None, f"over {JSON_BYTES:,} bytes, too large to read"
    try:
        return json.loads(data), None
    except (ValueError, RecursionError):
        return None, "not valid JSON"


def copy_regular(src: Path, dest: Path) -> None:
    """Copy the regular file ``src`` (not through a link, at most MAX_BYTES) to a new ``dest``."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"cannot copy: {exc.strerror or exc}", path=src) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            raise InputError("cannot copy: not a regular file of at most the size cap", path=src)
        with open(dest, "xb") as out:
            copied = 0
            while chunk := f.read(CHUNK):
                copied += len(chunk)
                if copied > MAX_BYTES:  # it grew while we copied
                    raise InputError("cannot copy: the file grows past the size cap", path=src)
                out.write(chunk)
