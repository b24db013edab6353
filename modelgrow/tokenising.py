"""Text and ``.jsonl`` data to token ids, in bounded memory and bounded time.

Memory. A file is read PIECE_BYTES (64 KiB) at a time and cut just before a run of
whitespace, the pieces are tokenised in batches of at most CHUNK_CHARS (1 MiB of text)
and their ids go straight into one growing array of the smallest dtype that holds the
vocabulary (uint16 up to 65,536 ids, else uint32; never int64). Memory bound: peak
memory beyond that array (2 or 4 bytes a token) is one batch's: its text and the
tokenizer's Encodings, about 150 bytes a token, so at most about 160 MB when every byte
is a token (measured 125 MB with the demo's byte-level tokenizer; 43 MB with a word-level
one), plus one ``.jsonl`` line (at most MAX_LINE_BYTES, parsed whole). It does not grow
with the file.

Why cutting before whitespace keeps the ids: pre-tokenizers that split on whitespace
(GPT-2 and Llama 3 byte-level regexes, ``Whitespace``, BERT's, ``Metaspace``) never put
a non-space character and the whitespace after it in one token, so a cut there falls on
a token boundary and the ids equal those of the whole text. A file without whitespace
is cut every 64 KiB anyway (bounded, at the price of one possibly split token there), and
tokenizers that add a prefix per call (a SentencePiece ``Prepend`` normaliser) add one
marker per cut.

Time. Each batch runs in a worker thread (``encode_batch`` releases the GIL) and is
waited on for SECONDS_PER_MIB (30 s) per MiB of its text, at least MIN_SECONDS (2 s);
normal tokenizers run at 1 MiB/s or more on one core. A batch that takes longer is bad
input: a hostile tokenizer.json (a ``Split`` pre-tokenizer with a catastrophically
backtracking regex such as ``(a+)+$`` took 88 s for 6 KB in a probe). The first batch is
one piece, so a tokenizer that is slow on everything is refused within seconds. Rust
cannot be stopped mid-call: the budget is checked per batch, and the worker (a daemon
thread) is left to finish its batch in the background; the command exits at once. A
Rust panic in the tokenizer (``pyo3_runtime.PanicException``, a BaseException) is bad
input too, never a traceback; Rust's own report of it (written straight to descriptor 2)
is held back while the batch runs and dropped, so the one-line error is all one sees.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import InputError

PIECE_BYTES = 1 << 16  # read (and cut) unit: also the tokenizer's unit of parallel work
CHUNK_CHARS = 1 << 20  # text tokenised per batch, which bounds the tokenizer's memory
MAX_BATCH_PIECES = 1024  # many tiny .jsonl documents: each Encoding has a fixed overhead
MAX_LINE_BYTES = 64 << 20  # one .jsonl line (one document) is parsed whole
SECONDS_PER_MIB = 30.0  # time budget per MiB (2**20 characters) of text in a batch
MIN_SECONDS = 2.0  # ... and at least this per batch: timer noise, a busy machine
UINT16_VOCAB = 1 << 16
_MIB = float(1 << 20)
# The start of the last whitespace run that follows a non-space character: ``.*`` runs
# to the end and backtracks, so this costs the distance from the end, not the length.
_LAST_BOUNDARY = re.compile(r".*\S(?=\s)", re.S)


def id_dtype(vocab: int) -> np.dtype:
    """The smallest dtype that holds every id of a ``vocab``-sized vocabulary."""
    return np.dtype(np.uint16 if vocab <= UINT16_VOCAB else np.uint32)


class IdBuffer:
    """A growing 1-D id array of one dtype.

    Grown and shrunk with ``ndarray.resize`` (realloc: large blocks are remapped, not
    copied), and allocated up front at an estimate whose untouched pages cost no memory.
    """

    def __init__(self, dtype: np.dtype, capacity: int):
        self._data = np.empty(max(int(capacity), 1024), dtype=dtype)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, ids) -> None:
        ids = np.asarray(ids)
        end = self._size + ids.shape[0]
        if end > self._data.shape[0]:
            self._data.resize(max(end, self._data.shape[0] * 3 // 2), refcheck=False)
        self._data[self._size:end] = ids  # ids are checked against the vocabulary first
        self._size = end

    def array(self) -> np.ndarray:
        """The ids, trimmed to size (the buffer is done with after this)."""
        self._data.resize(self._size, refcheck=False)
        return self._data


def require_regular(path: Path, what: str = "data") -> None:
    """Refuse a FIFO, device or socket up front: reading one can block for ever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror or exc}", path=path) from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise InputError(f"{what} path is {kind}; give a regular file", path=path,
                         hint="write the stream to a file first" if stat.S_ISFIFO(mode) else None)


def load_tokenizer(path: str | Path | None, data: Path):
    if path is None:
        raise InputError(
            "is text, but there is no tokenizer.json beside the checkpoint",
            path=data,
            hint="pass --tokenizer PATH/tokenizer.json, or give pre-tokenised .npy/.bin ids",
        )
    path = Path(path)
    if not path.exists():
        raise InputError("tokenizer file does not exist", path=path)
    require_regular(path, "tokenizer")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except BaseException as exc:  # noqa: BLE001 - plain Exceptions, and a Rust panic is a BaseException
        if not _tokenizer_fault(exc):
            raise
        raise InputError(f"not a usable tokenizer.json: {_first_line(exc)}", path=path) from None


def is_panic(exc: BaseException) -> bool:
    """A Rust panic raised through pyo3 (``pyo3_runtime.PanicException``, not importable)."""
    return any(cls.__name__ == "PanicException" for cls in type(exc).__mro__)


def _tokenizer_fault(exc: BaseException) -> bool:
    """Raised by a bad tokenizer (a panic or a plain error), not KeyboardInterrupt,
    SystemExit, signals.Terminated or MemoryError, which stand as they are."""
    return is_panic(exc) or (isinstance(exc, Exception) and not isinstance(exc, MemoryError))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class Encoder:
    """A tokenizer run batch by batch under the time budget; ``path`` names it in errors."""

    def __init__(self, tokenizer, path: str | Path):
        self.path = Path(path)
        # encode_batch_fast skips the offsets (3x faster); both release the GIL.
        self._encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch

    def ids(self, pieces: list[str], data: Path) -> list[np.ndarray]:
        chars = sum(map(len, pieces))
        allowed = max(MIN_SECONDS, SECONDS_PER_MIB * chars / _MIB)

        def work():
            return [np.array(e.ids, dtype=np.uint32) for e in self._encode(pieces, add_special_tokens=False)]

        with _stderr_held() as held:
            late, value, error = _within(allowed, work)
            held["drop"] = error is not None and is_panic(error)
        if error is not None:
            raise self._failure(error, data) from None
        if late:
            raise InputError(
                f"tokenising {data} took over {allowed:.0f} s for {chars / 1024:,.0f} KiB of text (the budget is "
                f"{SECONDS_PER_MIB:g} s per MiB, {MIN_SECONDS:g} s at least)", path=self.path,
                hint="its pre-tokenizer regex may backtrack catastrophically: fix this tokenizer.json, "
                     "pass another --tokenizer or give pre-tokenised .npy/.bin ids")
        return value

    def _failure(self, error: BaseException, data: Path) -> BaseException:
        """A Rust panic or an error of the tokenizer is bad input; anything else stands."""
        if not _tokenizer_fault(error):
            return error
        what = "crashed (Rust panic)" if is_panic(error) else "failed"
        return InputError(f"tokenizer {what} on {data}: {_first_line(error)}", path=self.path,
                          hint="fix this tokenizer.json, pass another --tokenizer or give pre-tokenised .npy/.bin ids")


@contextmanager
def _stderr_held():
    """Hold file descriptor 2 in a temporary file; pass its text on unless told to drop it."""
    box = {"drop": False}
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 (an embedding application)
        yield box
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read()
            if text and not box["drop"]:
                os.write(2, text)


def _within(seconds: float, work):
    """Run ``work()`` in a daemon thread, waiting at most ``seconds``: (late, value, error).

    The wait is interruptible, so Ctrl-C and SIGTERM act during a long batch too.
    """
    box: dict = {}

    def run():
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException: the caller sorts it
            box["error"] = exc

    start = time.monotonic()
    worker = threading.Thread(target=run, name="modelgrow-tokenise", daemon=True)
    worker.start()
    worker.join(seconds)
    # Also late when the call held the GIL (then join could not return in time).
    late = worker.is_alive() or time.monotonic() - start > seconds
    return late, box.get("value"), box.get("error")


def tokenise_file(path: Path, encoder: Encoder, out: IdBuffer, *, vocab: int, separator: int | None = None,
                  text_field: str | None = None) -> int:
    """Append the ids of text file ``path`` to ``out`` (a ``.jsonl`` file when ``text_field``
    is given: that field of each line's object, ``separator`` between documents); returns
    how many ids were appended."""
    start = len(out)
    pending = False  # a document has ended: the separator goes before the next one's ids
    with _open_regular(path) as f:
        pieces = _jsonl_pieces(f, path, text_field) if text_field else _text_pieces(f, path)
        for batch in _batches(pieces):
            parts = encoder.ids([text for text, _ in batch], path)
            _check_vocab(parts, vocab, path, encoder.path)
            for (_, new_document), ids in zip(batch, parts):
                pending = pending or (new_document and len(out) > start and separator is not None)
                if ids.shape[0]:
                    if pending:
                        out.append([separator])
                        pending = False
                    out.append(ids)
    return len(out) - start


def check_text_head(path: Path) -> None:
    """Refuse a file whose first PIECE_BYTES are not UTF-8 (binary data named .txt): the
    file's own problem is named before the tokenizer's. Later bytes are checked as read."""
    with _open_regular(path) as f:
        _decode(codecs.getincrementaldecoder("utf-8")(), _read(f, PIECE_BYTES, path) or b" ", 0, path)


def _open_regular(path: Path):
    """Open for reading without blocking on a FIFO (which may replace the file after a stat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError("data path is not a regular file", path=path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _batches(pieces: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Group pieces into batches that double from one piece up to CHUNK_CHARS of text."""
    target, batch, chars = PIECE_BYTES, [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if chars >= target or len(batch) >= MAX_BATCH_PIECES:
            yield batch
            batch, chars, target = [], 0, min(2 * target, CHUNK_CHARS)
    if batch:
        yield batch


def _text_pieces(f, path: Path) -> Iterator[tuple[str, bool]]:
    """(text, starts a document) pieces of a UTF-8 text file: one document."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset, first = "", 0, True
    while True:
        block = _read(f, PIECE_BYTES, path)
        text = carry + _decode(decoder, block, offset, path)
        offset += len(block)
        cut = _cut(text, 0, len(text)) if block else len(text)
        carry = text[cut:]  # under half the text: the cut is in its second half
        if cut:
            yield text[:cut], first
            first = False
        if not block:
            return


def _jsonl_pieces(f, path: Path, field: str) -> Iterator[tuple[str, bool]]:
    """(text, starts a document) pieces of each line's ``field``: one document a line."""
    for number, text in _jsonl_texts(f, path, field):
        start, first = 0, True
        while len(text) - start > PIECE_BYTES:  # a long document is cut as a text file is
            end = _cut(text, start, start + PIECE_BYTES)
            yield text[start:end], first
            start, first = end, False
        yield text[start:], first


def _jsonl_texts(f, path: Path, field: str) -> Iterator[tuple[int, str]]:
    number = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise InputError(f"line {number} is longer than {MAX_LINE_BYTES >> 20} MiB", path=path,
                             hint="split long documents over several lines")
        if line.strip():  # blank lines (a trailing one, say) hold no document
            yield number, _field(_record(line, number, path), field, number, path)


def _record(line: bytes, number: int, path: Path) -> dict:
    where = f"{path}:{number}"
    try:
        record = json.loads(line.decode("utf-8").rstrip("\r\n"))  # columns of this line alone
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: is not UTF-8 ({exc.reason} at byte {exc.start} of the line)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: is not valid JSON ({exc.msg} at column {exc.colno})",
                         hint="each line of a .jsonl file is one JSON object") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InputError(f"{where}: is not usable JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: is a JSON {_json_type(record)}, not an object",
                         hint="each line of a .jsonl file is one JSON object")
    return record


def _field(record: dict, field: str, number: int, path: Path) -> str:
    where = f"{path}:{number}"
    if field not in record:
        keys = ", ".join(repr(k)[:40] for k in list(record)[:10]) + (", ..." if len(record) > 10 else "")
        raise InputError(f"{where}: no {field!r} field (its keys: {keys or 'none'})",
                         hint=f"each line needs its document's text in {field!r}")
    text = record[field]
    if not isinstance(text, str):
        raise InputError(f"{where}: {field!r} is a JSON {_json_type(text)}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800" escape decodes to a lone surrogate
        raise InputError(f"{where}: {field!r} holds a lone surrogate ({exc.object[exc.start]!r}), not valid Unicode") from None
    return text


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read(f, size: int, path: Path) -> bytes:
    try:
        return f.read(size)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None


def _decode(decoder, block: bytes, offset: int, path: Path) -> str:
    """Decode the next block (final when empty), naming the file's byte offset of an error."""
    pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
    try:
        return decoder.decode(block, final=not block)
    except UnicodeDecodeError as exc:
        at = offset - pending + exc.start
        raise InputError(f"is not UTF-8 text ({exc.reason} at byte {at})", path=path,
                         hint="give .npy/.bin token ids for binary data") from None


def _cut(text: str, start: int, end: int) -> int:
    """Where to end a piece of ``text[start:end]``: before its last whitespace run in the
    second half, so the next piece starts with whitespace; ``end`` when there is none."""
    found = _LAST_BOUNDARY.match(text, start + (end - start) // 2, end)
    return found.end() if found else end


def _check_vocab(parts: list[np.ndarray], vocab: int, data: Path, tokenizer: Path) -> None:
    hi = max((int(p.max()) for p in parts if p.shape[0]), default=-1)
    if hi >= vocab:
        raise InputError(f"tokenises to id {hi} with {tokenizer}, but the model's vocabulary has {vocab} ids",
                         path=data, hint="is --tokenizer the model's own tokenizer.json?")
