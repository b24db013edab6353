"""Token data for fitting and training: text, ``.jsonl`` documents, pre-tokenised ``.npy``
or raw ``.bin`` ids (text is tokenised in bounded memory and time by ``tokenising``).

Every problem with the data (missing, unreadable, empty, too short, ids outside the
model's vocabulary) is an InputError raised while loading, i.e. before any optimiser
step, so a long run never dies halfway on its input.

(Named ``corpus`` because ``modelgrow/data/`` is the package folder of the demo
checkpoint.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, UsageError
# load_tokenizer is used from here too (engine/objective.py): it lives with the tokenising.
from .tokenising import (UINT16_VOCAB, Encoder, IdBuffer, check_text_head, id_dtype, load_tokenizer, require_regular,
                         tokenise_file)

TOKENIZER_FILE = "tokenizer.json"
JSONL_FIELD = "text"  # the field of a .jsonl line's object that holds the document
# Validate huge memory-mapped id files in slices, never all in memory at once.
_SCAN = 1 << 24
_NPY_MAGIC = b"\x93NUMPY"
# Held-out batches allowed whatever the data holds (windows may then overlap): the
# defaults (8 for train, 4 for a fit) always pass, even on a few hundred tokens.
EVAL_BATCHES_ANYWAY = 64


@dataclass
class TokenData:
    """One flat stream of token ids (documents concatenated) and where it came from."""

    tokens: np.ndarray  # 1-D integer ids, possibly a read-only memory map
    vocab: int
    sources: list[dict] = field(default_factory=list)
    tokenizer: str | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def describe(self) -> dict:
        return {"tokens": len(self), "vocab": self.vocab, "tokenizer": self.tokenizer, "files": list(self.sources)}

    def require(self, seq_len: int, what: str = "one training window") -> None:
        need = seq_len + 1
        if len(self) < need:
            names = ", ".join(s["path"] for s in self.sources) or "data"
            raise InputError(
                f"{names}: {len(self):,} tokens in all, but {what} needs {need:,} (seq_len + 1)",
                hint="give more data or a smaller --fit-seq-len",
            )


    def check_eval(self, batches: int, batch_size: int, seq_len: int, flag: str, what: str) -> None:
        """Refuse more held-out batches than this data supplies: its windows of
        ``seq_len + 1`` tokens that do not overlap, or EVAL_BATCHES_ANYWAY batches if more
        (the scored windows are all built before the first step)."""
        span = seq_len + 1
        supply = len(self) // span
        allowed = max(supply // batch_size, EVAL_BATCHES_ANYWAY)
        if batches > allowed:
            raise UsageError(f"{flag} {batches:,} asks for {batches * batch_size:,} windows of {span:,} tokens, but "
                             f"{what} holds {len(self):,} tokens, room for {supply:,} without overlap: at most "
                             f"{allowed:,} batches", hint=f"give a smaller {flag}")


def load_tokens(
    paths: list[str | Path] | str | Path,
    *,
    vocab: int,
    tokenizer: str | Path | None = None,
    separator: int | None = None,
    bin_dtype: str | None = None,
    text_field: str = JSONL_FIELD,
) -> TokenData:
    """Read and check every file; text goes through ``tokenizer`` (a tokenizer.json).

    ``separator`` (usually the end-of-text id) is put between documents so windows that
    cross a file boundary see a boundary marker rather than a silent splice; each line of
    a ``.jsonl`` file is a document whose text is its ``text_field``.

    Text is read and tokenised in bounded chunks (see ``tokenising``): peak memory is the
    id array (2 bytes a token up to 65,536 ids, else 4) plus one chunk's worth, about
    160 MB at most, whatever the file's size. One ``.npy`` or ``.bin`` file is used as a
    memory map, never read whole; several files are joined into one such id array.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise InputError("no fit data given", hint="pass --fit-data FILE")
    if separator is not None and not 0 <= separator < vocab:
        separator = None  # a config's eos id outside the vocabulary is no use as a marker
    files = [_data_file(raw) for raw in paths]  # every path's own problems before any long tokenising
    if len(files) == 1 and _format(files[0]) in ("npy", "bin"):
        ids, source = _read_ids(files[0], vocab, bin_dtype)
        return TokenData(ids, vocab, [source], None)
    out = IdBuffer(id_dtype(vocab), sum(_estimate(path) for path in files) + len(files))
    encoder, sources = None, []
    for path in files:
        if sources and separator is not None:
            out.append([separator])
        fmt, start = _format(path), len(out)
        if fmt in ("npy", "bin"):
            ids, _ = _read_ids(path, vocab, bin_dtype)
            for at in range(0, ids.shape[0], _SCAN):  # a memory map copied in slices, never whole
                out.append(ids[at:at + _SCAN])
        else:
            if path.stat().st_size == 0:
                raise InputError("text file is empty", path=path)
            check_text_head(path)  # the file's own problems first, then the tokenizer's
            if encoder is None:
                encoder = Encoder(load_tokenizer(tokenizer, path), tokenizer)
            field = text_field if fmt == "jsonl" else None
            if not tokenise_file(path, encoder, out, vocab=vocab, separator=separator, text_field=field):
                raise InputError("text file tokenises to no tokens", path=path)
        sources.append({"path": str(path), "format": fmt, "tokens": len(out) - start})
    return TokenData(out.array(), vocab, sources, str(tokenizer) if encoder is not None else None)


def default_tokenizer(checkpoint_root: str | Path | None) -> Path | None:
    """The checkpoint's own tokenizer.json, when it ships one."""
    if checkpoint_root is None:
        return None
    root = Path(checkpoint_root)
    candidate = (root if root.is_dir() else root.parent) / TOKENIZER_FILE
    return candidate if candidate.is_file() else None


def _data_file(raw: str | Path) -> Path:
    path = Path(raw)
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for the file system, a loop of links
        raise InputError(f"data file cannot be read: {exc.strerror or exc}", path=path) from None
    if not exists:
        raise InputError("data file does not exist", path=path)
    require_regular(path)
    return path


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".npy": "npy", ".bin": "bin", ".jsonl": "jsonl"}.get(suffix, "text")


def _estimate(path: Path) -> int:
    """Ids a file is likely to give: its count for ids, its bytes for text (a byte-level
    tokenizer's count, an upper bound for most). Only pages written to cost memory."""
    size = path.stat().st_size
    return size // 2 if _format(path) in ("npy", "bin") else size


def _read_ids(path: Path, vocab: int, bin_dtype: str | None) -> tuple[np.ndarray, dict]:
    fmt = _format(path)
    ids = _read_npy(path) if fmt == "npy" else _read_bin(path, vocab, bin_dtype)
    if ids.shape[0] == 0:
        raise InputError("data file is empty", path=path)
    _check_ids(ids, vocab, path)
    return ids, {"path": str(path), "format": fmt, "tokens": int(ids.shape[0])}


def _read_npy(path: Path) -> np.ndarray:
    # np.load picks the format by the file's first bytes, whatever its name: check them
    # first, so an .npz or a pickle named .npy is bad input (and pickles are never loaded).
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if magic.startswith(b"PK"):
        raise InputError("is an .npz (zip) archive, not a .npy array", path=path, hint="save the ids with numpy.save")
    if magic != _NPY_MAGIC:
        raise InputError("is not a .npy array (no .npy header; pickled data is never loaded)", path=path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"not a readable .npy array: {exc}", path=path) from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f".npy holds {arr.dtype} values, not integer token ids", path=path)
    return arr.reshape(-1)  # a [documents, length] array is read row after row


def _read_bin(path: Path, vocab: int, dtype: str | None) -> np.ndarray:
    # ids above 2**16 cannot be stored in uint16: raw .bin files of larger vocabularies are
    # uint32 (the nanoGPT convention: one dtype fixed by the vocabulary size).
    dt = np.dtype(dtype or ("uint16" if vocab <= UINT16_VOCAB else "uint32"))
    size = path.stat().st_size
    if size % dt.itemsize:
        raise InputError(f"{size} bytes is not a whole number of {dt.name} ids", path=path, hint="raw .bin data must be uint16 (vocab <= 65536) or uint32")
    if size == 0:
        raise InputError("data file is empty", path=path)
    return np.memmap(path, dtype=dt, mode="r")


def _check_ids(ids: np.ndarray, vocab: int, path: Path) -> None:
    lo, hi = None, None
    for start in range(0, ids.shape[0], _SCAN):
        chunk = np.asarray(ids[start:start + _SCAN])
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    if lo < 0:
        raise InputError(f"holds a negative token id ({lo})", path=path)
    if hi >= vocab:
        raise InputError(f"holds token id {hi}, but the model's vocabulary has {vocab} ids", path=path, hint="was it tokenised for another model? see --tokenizer")


class WindowSampler:
    """Random windows of ``seq_len + 1`` ids from a seeded generator.

    The whole global batch is drawn on every rank from the same generator, and each rank
    keeps its slice: data parallel runs see exactly the windows a one-process run sees.
    """

    def __init__(self, data: TokenData, seq_len: int, seed: int):
        data.require(seq_len)
        self.data = data
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def windows(self, count: int) -> torch.Tensor:
        """[count, seq_len + 1] int64 ids."""
        n = len(self.data)
        starts = torch.randint(0, n - self.seq_len, (count,), generator=self.generator).tolist()
        span = self.seq_len + 1
        rows = [np.asarray(self.data.tokens[s:s + span], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))
