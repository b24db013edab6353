"""Hostile inputs and resource bounds of the data readers (issue #19).

- text is tokenised in bounded chunks, with the ids of the whole text, into uint16 ids
  for a small vocabulary; tokenising a 32 MiB file stays within a stated memory bound
  that tokenising it whole breaks;
- a tokenizer.json whose regex backtracks catastrophically, or that panics in Rust, is
  bad input (exit 3, one line naming it) in bounded time, through the command line;
- a .jsonl file is trained on its "text" fields only; a bad line is named;
- a FIFO as data or tokenizer is refused at once; an .npz or a pickle named .npy is bad input.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import tiny
from modelgrow import tokenising
from modelgrow.cli import main
from modelgrow.corpus import load_tokens
from modelgrow.errors import InputError

REPO = Path(__file__).resolve().parents[1]
# Peak memory of tokenising TEXT_MIB of text, beyond the process before and the id array
# itself: one 1 MiB chunk of this tokenizer's work (measured 43 MB) with room for the allocator.
# Tokenising the text whole took 1.2 GB for 40 MiB (the code before issue #19).
TEXT_MIB = 32
EXTRA_MIB = 100
random.seed(0)
WORDS = sorted({"".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(1, 9)))
                for _ in range(400)})


def _words_text(chars: int, seed: int = 0) -> str:
    """Words with single and double spaces, tabs, blank lines and non-ASCII words."""
    rng = random.Random(seed)
    words = WORDS + ["café", "naïve", "€uro", "日本語", "emoji😀"]
    gaps = [" "] * 12 + ["  ", "\t", "\n", "\n\n", " \n", "\n   "]
    parts, size = [], 0
    while size < chars:
        part = rng.choice(words) + rng.choice(gaps)
        parts.append(part)
        size += len(part)
    return "".join(parts)


def _bpe(path: Path, sample: str) -> Path:
    """GPT-2's recipe at a small vocabulary: byte-level BPE behind the GPT-2 split regex,
    whose tokens carry their leading space (" word"), so ids depend on where text is cut."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([sample], trainer)
    tok.save(str(path))
    return path


def _word_level(path: Path, words: list[str]) -> Path:
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def _hostile(path: Path) -> Path:
    """One token per printable character behind a Split on ``(a+)+$``: a run of n a's
    not at the end costs 2**n steps, and Oniguruma panics past its retry limit."""
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+$"), behavior="isolated")
    tok.save(str(path))
    return path


def test_streamed_ids_equal_the_whole_texts(tmp_path, monkeypatch):
    raw = _words_text(450_000).encode()
    at = edge = tokenising.PIECE_BYTES - 2  # a 4-byte character across the first 64 KiB read
    while raw[at] & 0xC0 == 0x80:  # back to a character's first byte
        at -= 1
    text = raw[:at].decode() + " " * (edge - at) + "😀" + raw[at:].decode()
    assert text.encode()[edge:edge + 4] == "😀".encode()
    tok_path = _bpe(tmp_path / "tokenizer.json", text[:100_000])
    tok = Tokenizer.from_file(str(tok_path))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    batches = []
    real = tokenising.Encoder.ids
    monkeypatch.setattr(tokenising.Encoder, "ids", lambda self, pieces, data: batches.append(pieces) or real(self, pieces, data))

    data = load_tokens(tmp_path / "a.txt", vocab=tok.get_vocab_size(), tokenizer=tok_path)

    whole = np.array(tok.encode(text, add_special_tokens=False).ids)
    assert len(batches) >= 3 and max(map(len, batches)) > 1  # several batches of several pieces
    assert data.tokens.dtype == np.uint16 and np.array_equal(data.tokens, whole)
    assert data.sources == [{"path": str(tmp_path / "a.txt"), "format": "text", "tokens": len(whole)}]
    # The check has teeth: cutting *after* a space instead changes the ids (" word" -> " ", "word").
    at = text.index(" ", 1000) + 1
    split = tok.encode(text[:at], add_special_tokens=False).ids + tok.encode(text[at:], add_special_tokens=False).ids
    assert split != whole.tolist()


def test_ids_take_the_smallest_dtype_and_files_join_with_the_separator(tmp_path):
    tok = _word_level(tmp_path / "tokenizer.json", WORDS)
    (tmp_path / "a.txt").write_text(" ".join(WORDS[:50]))
    np.save(tmp_path / "b.npy", np.arange(5, dtype=np.int64))
    data = load_tokens([tmp_path / "a.txt", tmp_path / "b.npy"], vocab=len(WORDS) + 1, tokenizer=tok, separator=0)
    assert data.tokens.dtype == np.uint16
    assert data.tokens.tolist() == [*range(1, 51), 0, *range(5)]
    assert [s["tokens"] for s in data.sources] == [50, 5]
    assert tokenising.id_dtype(65_536) == np.uint16 and tokenising.id_dtype(65_537) == np.uint32
    big = load_tokens([tmp_path / "a.txt"], vocab=70_000, tokenizer=tok)
    assert big.tokens.dtype == np.uint32 and big.tokens.tolist() == list(range(1, 51))


def test_tokenising_a_large_file_stays_within_the_memory_bound(tmp_path):
    tok = _word_level(tmp_path / "tokenizer.json", WORDS)
    line = "".join(" ".join(random.Random(i).choices(WORDS, k=12)) + "\n" for i in range(20_000))
    text = (line * (TEXT_MIB * 2**20 // len(line) + 1))[:TEXT_MIB * 2**20]
    (tmp_path / "big.txt").write_text(text)
    del text, line
    # VmHWM, the peak of this process's memory: ru_maxrss is not, since Linux carries the
    # parent's (this test's) peak into a child across the spawn.
    script = textwrap.dedent(f"""
        import json, re, time
        from modelgrow.corpus import load_tokens
        def status(key):
            return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak so far (importing torch) is forgotten: VmHWM restarts from now
        before = status("VmRSS")
        start = time.monotonic()
        data = load_tokens({str(tmp_path / "big.txt")!r}, vocab={len(WORDS) + 1}, tokenizer={str(tok)!r})
        print(json.dumps({{"tokens": len(data), "dtype": str(data.tokens.dtype), "id_bytes": data.tokens.nbytes,
                          "extra": status("VmHWM") - before, "seconds": time.monotonic() - start}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["dtype"] == "uint16" and got["id_bytes"] == 2 * got["tokens"] > 10_000_000
    assert got["extra"] < got["id_bytes"] + EXTRA_MIB * 2**20, got


def _modelgrow(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "modelgrow", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return done, time.monotonic() - start


@pytest.mark.parametrize("case", ["slow", "panic"])
def test_a_hostile_tokenizer_is_bad_input_in_bounded_time(tmp_path, case):
    src = tiny.gpt2(tmp_path / "src")
    hostile = _hostile(tmp_path / "hostile.json")
    # slow: runs of 20 a's, each ~2**20 steps (about 2 ms a byte here, 150 s for the first
    # 64 KiB); panic: a run of 40, past Oniguruma's retry limit.
    body = ("a" * 20 + "b") * 8000 if case == "slow" else "a" * 40 + "b\n"
    (tmp_path / "data.txt").write_text(body)
    done, seconds = _modelgrow("train", str(src), "--data", str(tmp_path / "data.txt"), "--tokenizer", str(hostile),
                               "--steps", "1", "--seq-len", "16", "--device", "cpu", "-o", str(tmp_path / "out"))
    lines = done.stderr.strip().splitlines()
    last = lines[-1]
    assert done.returncode == 3, done.stderr
    assert len(lines) == 1, done.stderr  # Rust's own panic report is held back
    assert last.startswith(f"error: {hostile}: ") and str(tmp_path / "data.txt") in last, last
    assert ("took over 2 s for 64 KiB" if case == "slow" else "tokenizer crashed (Rust panic)") in last, last
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    assert seconds < 60  # the import of torch and transformers, then at most the 2 s budget


class PanicException(BaseException):
    """What pyo3 raises for a Rust panic: a BaseException, found by its name."""


class _Raises:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def encode_batch(self, pieces, add_special_tokens=True):
        raise self.exc


def test_a_panic_or_tokenizer_error_is_bad_input_but_an_interrupt_stays_one(tmp_path):
    data = tmp_path / "a.txt"
    for exc, message in ((PanicException("boom"), "tokenizer crashed (Rust panic) on"), (Exception("odd"), "tokenizer failed on")):
        with pytest.raises(InputError, match=re.escape(message)) as err:
            tokenising.Encoder(_Raises(exc), "tok.json").ids(["text"], data)
        assert str(err.value).startswith("tok.json: ") and str(data) in str(err.value)
    for exc in (KeyboardInterrupt(), MemoryError()):
        with pytest.raises(type(exc)):
            tokenising.Encoder(_Raises(exc), "tok.json").ids(["text"], data)


def test_jsonl_trains_on_its_text_fields_only(tmp_path):
    tok = _word_level(tmp_path / "tokenizer.json", WORDS[:60])  # ids 1..60 fit the tiny model's 96
    docs = [" ".join(WORDS[i:i + 20]) for i in (0, 20, 40)]
    lines = [json.dumps({"id": i, "text": d, "meta": " ".join(WORDS[60:80])}) for i, d in enumerate(docs)]
    lines.insert(2, json.dumps({"text": ""}))  # an empty document adds no separator
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n")  # blank lines are no documents
    data = load_tokens(tmp_path / "d.jsonl", vocab=96, tokenizer=tok, separator=0)
    assert data.tokens.tolist() == [*range(1, 21), 0, *range(21, 41), 0, *range(41, 61)]
    assert data.sources[0]["format"] == "jsonl"

    src = tiny.gpt2(tmp_path / "src")
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["train", str(src), "--data", str(tmp_path / "d.jsonl"), "--tokenizer", str(tok),
                                       "--steps", "2", "--seq-len", "16", "--val-fraction", "0", "--device", "cpu",
                                       "-o", str(tmp_path / "out"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["data"]["train"]["tokens"] == 62


@pytest.mark.parametrize("line,message", [
    ('{"text": "abc"', "d.jsonl:3: is not valid JSON (Expecting ',' delimiter at column 15)"),
    ('{"body": "abc", "id": 7}', "d.jsonl:3: no 'text' field (its keys: 'body', 'id')"),
    ('["text"]', "d.jsonl:3: is a JSON array, not an object"),
    ('{"text": 5}', "d.jsonl:3: 'text' is a JSON number, not a string"),
    ('{"text": "a\\ud800"}', "d.jsonl:3: 'text' holds a lone surrogate ('\\ud800'), not valid Unicode"),
    ("[" * 100_000, "d.jsonl:3: JSON nested too deeply"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, line, message):
    tok = _word_level(tmp_path / "tokenizer.json", WORDS)
    (tmp_path / "d.jsonl").write_text(f'{{"text": "{WORDS[0]}"}}\n\n{line}\n')
    with pytest.raises(InputError) as err:
        load_tokens(tmp_path / "d.jsonl", vocab=len(WORDS) + 1, tokenizer=tok)
    assert message in str(err.value), str(err.value)
    result = CliRunner().invoke(main, ["train", str(tiny.gpt2(tmp_path / "src")), "--data", str(tmp_path / "d.jsonl"),
                                       "--tokenizer", str(tok), "--steps", "1", "-o", str(tmp_path / "out")])
    assert result.exit_code == 3 and message in result.output and result.output.count("\n") == 1, result.output


def _within(seconds: float, fn):
    """fn()'s exception, or a failure when it has not returned within ``seconds`` (a hang)."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    return box.get("error")


def test_a_fifo_is_refused_at_once(tmp_path):
    tok = _word_level(tmp_path / "tokenizer.json", WORDS)
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "a.txt").write_text(" ".join(WORDS))
    err = _within(10, lambda: load_tokens(tmp_path / "pipe.txt", vocab=len(WORDS) + 1, tokenizer=tok))
    assert isinstance(err, InputError) and "is a FIFO (named pipe); give a regular file" in str(err), err
    err = _within(10, lambda: load_tokens(tmp_path / "a.txt", vocab=len(WORDS) + 1, tokenizer=tmp_path / "pipe.txt"))
    assert isinstance(err, InputError) and "tokenizer path is a FIFO" in str(err), err


def test_an_npz_or_a_pickle_named_npy_is_bad_input(tmp_path):
    np.savez(tmp_path / "ids.npz", ids=np.arange(100))
    (tmp_path / "ids.npz").rename(tmp_path / "zip.npy")
    np.save(tmp_path / "obj.npy", np.array([1, 2], dtype=object), allow_pickle=True)
    (tmp_path / "pickle.npy").write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    for name, message in (("zip.npy", "is an .npz (zip) archive"), ("pickle.npy", "is not a .npy array"),
                          ("obj.npy", "not a readable .npy array")):
        with pytest.raises(InputError, match=re.escape(message)):
            load_tokens(tmp_path / name, vocab=200)


def test_invalid_utf8_is_named_by_its_byte_offset(tmp_path):
    tok = _word_level(tmp_path / "tokenizer.json", WORDS)
    body = (" ".join(WORDS) + "\n").encode() * 200
    (tmp_path / "a.txt").write_bytes(body[:150_001] + b"\xff" + body[150_001:])
    with pytest.raises(InputError, match="is not UTF-8 text \\(invalid start byte at byte 150001\\)"):
        load_tokens(tmp_path / "a.txt", vocab=len(WORDS) + 1, tokenizer=tok)
