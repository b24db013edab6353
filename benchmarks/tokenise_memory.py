"""Wall time and peak memory of tokenising a large text file with the streaming reader.

    python benchmarks/tokenise_memory.py            # 1024 MB of text
    python benchmarks/tokenise_memory.py 20 --tokenizer path/tokenizer.json

Generates N MB (MiB) of word text with newlines in a temporary folder, tokenises it
with ``modelgrow.corpus.load_tokens`` (the path ``train`` and ``fit`` take) and prints one
JSON object: wall time, throughput, tokens, the id array's bytes and peak memory. The
default tokenizer is the demo checkpoint's byte-level one (one token a byte: the largest
id array and the most tokenizer work per MB, the worst case for memory).

Peak memory is given twice: ``ru_maxrss`` (getrusage) and ``VmHWM`` from
/proc/self/status. Linux carries a parent's peak into a child it spawns, so under a
large parent (a test runner) ru_maxrss can overstate; VmHWM is this process's own.
``peak_extra_mb`` is VmHWM minus the memory in use before tokenising (after imports),
minus nothing else: compare it with ``id_array_mb`` plus the stated chunk allowance
(README, "Data files").
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modelgrow.corpus import load_tokens  # noqa: E402 - the repository's, not an installed copy
from modelgrow.demo import demo_checkpoint  # noqa: E402

MB = 1 << 20


def write_text(path: Path, mb: int, seed: int = 0) -> None:
    """``mb`` MiB of lines of random words, written a block at a time (never held whole)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    block = "".join(" ".join(rng.choices(words, k=rng.randint(4, 16))) + "\n" for _ in range(40_000)).encode()
    left = mb * MB
    with open(path, "wb") as f:
        while left:
            part = block[:left]
            f.write(part)
            left -= len(part)


def status_bytes(key: str) -> int | None:
    try:
        found = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mb", nargs="?", type=int, default=1024, help="MiB of text to generate [default: 1024]")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json [default: the demo's byte-level one]")
    parser.add_argument("--vocab", type=int, default=None, help="model vocabulary [default: the tokenizer's size]")
    args = parser.parse_args()
    tokenizer = args.tokenizer or demo_checkpoint() / "tokenizer.json"
    from tokenizers import Tokenizer

    vocab = args.vocab or Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    with tempfile.TemporaryDirectory(prefix="modelgrow-tokenise-") as tmp:
        text = Path(tmp) / "corpus.txt"
        write_text(text, args.mb)
        try:  # forget the peak of imports and generation: VmHWM restarts here
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        before = status_bytes("VmRSS")
        start = time.perf_counter()
        data = load_tokens(text, vocab=vocab, tokenizer=tokenizer)
        seconds = time.perf_counter() - start
    hwm = status_bytes("VmHWM")
    print(json.dumps({
        "text_mb": args.mb,
        "tokenizer": str(tokenizer),
        "seconds": round(seconds, 2),
        "mb_per_s": round(args.mb / seconds, 2),
        "tokens": len(data),
        "dtype": str(data.tokens.dtype),
        "id_array_mb": round(data.tokens.nbytes / MB, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "vm_hwm_mb": round(hwm / MB, 1) if hwm else None,
        "rss_before_mb": round(before / MB, 1) if before else None,
        "peak_extra_mb": round((hwm - before) / MB, 1) if hwm and before else None,
    }))


if __name__ == "__main__":
    main()
