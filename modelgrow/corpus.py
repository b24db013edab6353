"""Token data for fitting and training: text, pre-tokenised ``.npy`` or raw ``.bin`` ids.

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

TOKENIZER_FILE = "tokenizer.json"
# ids above 2**16 cannot be stored in uint16: raw .bin files of larger vocabularies are
# uint32 (the nanoGPT convention: one dtype fixed by the vocabulary size).
UINT16_VOCAB = 1 << 16
# Validate huge memory-mapped id files in slices, never all in memory at once.
_SCAN = 1 << 24
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
) -> TokenData:
    """Read and check every file; text goes through ``tokenizer`` (a tokenizer.json).

    ``separator`` (usually the end-of-text id) is put between documents so windows that
    cross a file boundary see a boundary marker rather than a silent splice.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise InputError("no fit data given", hint="pass --fit-data FILE")
    if separator is not None and not 0 <= separator < vocab:
        separator = None  # a config's eos id outside the vocabulary is no use as a marker
    tok = None
    parts: list[np.ndarray] = []
    sources: list[dict] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError("data file does not exist", path=path)
        if not path.is_file():
            raise InputError("data path is not a file", path=path)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            ids, fmt = _read_npy(path), "npy"
        elif suffix == ".bin":
            ids, fmt = _read_bin(path, vocab, bin_dtype), "bin"
        else:
            text = _read_text(path)  # the file's own problems first, then the tokenizer's
            if tok is None:
                tok = load_tokenizer(tokenizer, path)
            ids, fmt = _encode(text, tok), "text"
        if ids.shape[0] == 0:
            raise InputError("data file is empty" if fmt != "text" else "text file tokenises to no tokens", path=path)
        _check_ids(ids, vocab, path)
        if parts and separator is not None:
            parts.append(np.array([separator], dtype=np.int64))
        parts.append(ids)
        sources.append({"path": str(path), "format": fmt, "tokens": int(ids.shape[0])})
    tokens = parts[0] if len(parts) == 1 else np.concatenate([p.astype(np.int64, copy=False) for p in parts])
    return TokenData(tokens, vocab, sources, str(tokenizer) if tok is not None else None)


def default_tokenizer(checkpoint_root: str | Path | None) -> Path | None:
    """The checkpoint's own tokenizer.json, when it ships one."""
    if checkpoint_root is None:
        return None
    root = Path(checkpoint_root)
    candidate = (root if root.is_dir() else root.parent) / TOKENIZER_FILE
    return candidate if candidate.is_file() else None


def load_tokenizer(path: str | Path | None, data: Path):
    if path is None:
        raise InputError(
            "is text, but there is no tokenizer.json beside the checkpoint",
            path=data,
            hint="pass --tokenizer PATH/tokenizer.json, or give pre-tokenised .npy/.bin ids",
        )
    path = Path(path)
    if not path.is_file():
        raise InputError("tokenizer file does not exist", path=path)
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise InputError(f"not a usable tokenizer.json: {exc}", path=path) from None


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"is not UTF-8 text ({exc.reason} at byte {exc.start})", path=path, hint="give .npy/.bin token ids for binary data") from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if not text:
        raise InputError("text file is empty", path=path)
    return text


def _encode(text: str, tok) -> np.ndarray:
    # Tokenise in line-aligned chunks: one multi-megabyte string is slow and memory-hungry
    # in BPE, and a line break is a natural split point for any pre-tokeniser.
    chunks, start, size = [], 0, 1 << 20
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    ids = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(chunks, add_special_tokens=False)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"not a readable .npy array: {exc}", path=path) from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f".npy holds {arr.dtype} values, not integer token ids", path=path)
    return arr.reshape(-1)  # a [documents, length] array is read row after row


def _read_bin(path: Path, vocab: int, dtype: str | None) -> np.ndarray:
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
