#!/usr/bin/env python
"""Pretrain the tiny GPT-2-style checkpoint that ships as ``modelgrow/data/demo``.

The model is trained from scratch, on CPU, on text that exists on every machine
with Python installed: the standard library's own ``.py`` source files.

Corpus
    All ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, sorted by their
    POSIX relative path, skipping anything inside a ``test``/``tests``/``idlelib``
    folder (and ``site-packages``/``dist-packages``/``__pycache__``) and files larger
    than ``MAX_FILE_BYTES``.  Every ``HELDOUT_EVERY``-th file of that sorted list
    (index % HELDOUT_EVERY == HELDOUT_EVERY - 1) is held out for validation; the
    rest is training data.  The held-out file list is recorded in
    ``training.json`` so tests can evaluate on files the model never saw.

Tokenisation
    Pure byte level: a ``tokenizers`` BPE model whose vocabulary is the 256
    ByteLevel symbols (no merges), a ByteLevel pre-tokenizer with
    ``add_prefix_space=False, use_regex=False`` and a ByteLevel decoder.  Token id
    ``i`` is byte ``i``, so ids can also be produced as ``list(data)``.

Output (``--out``, default ``modelgrow/data/demo``)
    ``config.json``, ``model.safetensors`` (via ``save_pretrained``),
    ``tokenizer.json`` and ``training.json`` (settings, losses, versions, date).

Usage::

    .venv/bin/python scripts/make_demo_checkpoint.py [--out DIR] [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "modelgrow" / "data" / "demo"

# ---------------------------------------------------------------- corpus split
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
MAX_FILE_BYTES = 200_000
HELDOUT_EVERY = 20

# ---------------------------------------------------------------- model shape
MODEL_SHAPE = dict(
    vocab_size=256,
    n_positions=128,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_inner=256,
)
NEWLINE_ID = 10  # byte "\n": used as bos/eos so the ids are valid for a 256 vocab

# ---------------------------------------------------------------- training
TRAIN = dict(
    batch_size=16,
    seq_len=128,
    lr=3e-3,
    min_lr_ratio=0.1,
    warmup_steps=100,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    eps=1e-8,
    grad_clip=1.0,
    eval_every=250,
    eval_windows=256,  # windows of the held-out stream used for periodic evals
    final_eval_windows=2048,  # windows used for the final numbers in training.json
)
DEFAULT_STEPS = 3000
DEFAULT_SEED = 0
NUM_THREADS = 2


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus_files(root: Path) -> list[str]:
    """Sorted POSIX relative paths of the stdlib ``.py`` files used as the corpus."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        out.append(rel.as_posix())
    out.sort()
    return out


def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-out): every HELDOUT_EVERY-th file by sorted order is held out."""
    train = [f for i, f in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, held


def read_stream(root: Path, files: list[str]) -> np.ndarray:
    """Concatenate the files' raw bytes (a newline between files) into a uint8 array."""
    chunks = []
    for rel in files:
        data = (root / rel).read_bytes()
        if not data.endswith(b"\n"):
            data += b"\n"
        chunks.append(data)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()


# ---------------------------------------------------------------- tokenizer
def byte_to_symbol() -> dict[int, str]:
    """The GPT-2 / ByteLevel reversible byte -> printable unicode symbol map.

    Printable Latin-1 bytes map to themselves; the remaining bytes are mapped, in
    increasing byte order, to code points 256, 257, ...
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    mapping = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer() -> Tokenizer:
    sym = byte_to_symbol()
    vocab = {sym[b]: b for b in range(256)}  # token id == byte value
    if set(vocab) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte symbol map disagrees with tokenizers' ByteLevel alphabet")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def check_tokenizer(tok: Tokenizer, samples: list[str]) -> None:
    if tok.get_vocab_size() != 256:
        raise RuntimeError(f"tokenizer vocab size {tok.get_vocab_size()} != 256")
    for text in samples:
        ids = tok.encode(text).ids
        if not all(0 <= i < 256 for i in ids):
            raise RuntimeError("tokenizer produced ids outside [0, 256)")
        if ids != list(text.encode("utf-8")):
            raise RuntimeError("tokenizer ids are not the raw UTF-8 bytes")
        if tok.decode(ids) != text:
            raise RuntimeError("tokenizer encode -> decode does not round-trip")


# ---------------------------------------------------------------- training
def lr_at(step: int, total: int) -> float:
    """Linear warmup then cosine decay from lr to lr*min_lr_ratio."""
    base, warm = TRAIN["lr"], TRAIN["warmup_steps"]
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = base * TRAIN["min_lr_ratio"]
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sample_batch(stream: torch.Tensor, rng: np.random.Generator, batch: int, seq: int):
    starts = rng.integers(0, stream.numel() - seq - 1, size=batch)
    idx = torch.from_numpy(starts).unsqueeze(1) + torch.arange(seq + 1).unsqueeze(0)
    window = stream[idx]
    return window[:, :-1], window[:, 1:]


def fixed_windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """n evenly spaced (seq+1)-byte windows covering the whole stream."""
    n = min(n, (stream.numel() - 1) // (seq + 1))
    starts = torch.linspace(0, stream.numel() - seq - 2, n).long()
    idx = starts.unsqueeze(1) + torch.arange(seq + 1).unsqueeze(0)
    return stream[idx]


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, windows: torch.Tensor, chunk: int = 256) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], chunk):
        w = windows[i : i + chunk]
        logits = model(input_ids=w[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def unigram_cross_entropy(train: np.ndarray, held: np.ndarray) -> float:
    """Nats/byte of the held-out bytes under the (add-one smoothed) train byte unigram."""
    counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held].mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    t_start = time.perf_counter()
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    # --- corpus
    root = stdlib_root()
    files = list_corpus_files(root)
    train_files, held_files = split_files(files)
    train_np = read_stream(root, train_files)
    held_np = read_stream(root, held_files)
    sha = hashlib.sha256(train_np.tobytes() + b"\0" + held_np.tobytes()).hexdigest()
    print(
        f"corpus: {root}\n  {len(train_files)} train files ({train_np.size:,} bytes), "
        f"{len(held_files)} held-out files ({held_np.size:,} bytes)"
    )

    # --- tokenizer (byte level; ids are raw bytes)
    tok = build_tokenizer()
    samples = []
    for rel in held_files[:5] + train_files[:: max(1, len(train_files) // 5)]:
        try:
            samples.append((root / rel).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    samples.append("héllo wörld ✓ \t\r\n\x00 \U0001f600")
    check_tokenizer(tok, samples)
    print(f"tokenizer: byte-level, vocab {tok.get_vocab_size()}, round-trip OK on {len(samples)} texts")

    train = torch.from_numpy(train_np.astype(np.int64))
    held = torch.from_numpy(held_np.astype(np.int64))
    seq, bsz = TRAIN["seq_len"], TRAIN["batch_size"]
    eval_windows = fixed_windows(held, TRAIN["eval_windows"], seq)
    final_held_windows = fixed_windows(held, TRAIN["final_eval_windows"], seq)
    final_train_windows = fixed_windows(train, TRAIN["final_eval_windows"], seq)
    unigram = unigram_cross_entropy(train_np, held_np)
    print(f"baselines (nats/byte): uniform ln256 = {math.log(256):.4f}, train-unigram on held-out = {unigram:.4f}")

    # --- model
    config = GPT2Config(
        **MODEL_SHAPE,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=NEWLINE_ID,
        eos_token_id=NEWLINE_ID,
    )
    model = GPT2LMHeadModel(config)
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the token embedding")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT2LMHeadModel {MODEL_SHAPE}, {n_params:,} parameters (tied embeddings)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": TRAIN["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=TRAIN["lr"],
        betas=TRAIN["betas"],
        eps=TRAIN["eps"],
    )
    rng = np.random.default_rng(args.seed)

    # --- train
    model.train()
    t_train = time.perf_counter()
    recent = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps)
        x, y = sample_batch(train, rng, bsz, seq)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        opt.step()
        recent.append(loss.item())
        if (step + 1) % TRAIN["eval_every"] == 0 or step + 1 == args.steps:
            held_loss = evaluate(model, eval_windows)
            print(
                f"step {step + 1:5d}/{args.steps}  lr {lr_at(step, args.steps):.2e}  "
                f"train {sum(recent) / len(recent):.4f}  held-out {held_loss:.4f}  "
                f"({time.perf_counter() - t_train:.0f}s)",
                flush=True,
            )
            recent = []
    train_seconds = time.perf_counter() - t_train

    final_train = evaluate(model, final_train_windows)
    final_held = evaluate(model, final_held_windows)
    print(f"final (nats/byte, {final_held_windows.shape[0]} windows): train {final_train:.4f}  held-out {final_held:.4f}")
    if not final_held < unigram:
        raise RuntimeError(f"held-out loss {final_held:.4f} is not below the unigram baseline {unigram:.4f}")

    # --- save
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()  # not needed by modelgrow; keep the shipped folder minimal
    for name in ("config.json", "model.safetensors"):
        if not (out / name).is_file():
            raise RuntimeError(f"save_pretrained did not write {name}")
    tok.save(str(out / "tokenizer.json"))
    check_tokenizer(Tokenizer.from_file(str(out / "tokenizer.json")), samples[:3])

    record = {
        "description": "Tiny byte-level GPT-2 pretrained from scratch on Python stdlib source; "
        "produced by scripts/make_demo_checkpoint.py",
        "command": "python scripts/make_demo_checkpoint.py "
        + " ".join(f"--{k} {v}" for k, v in (("steps", args.steps), ("seed", args.seed))),
        "seed": args.seed,
        "steps": args.steps,
        "tokens_seen": args.steps * bsz * seq,
        "model": {**MODEL_SHAPE, "n_params": n_params, "tie_word_embeddings": True, "dropout": 0.0},
        "tokenizer": "byte-level (tokenizers BPE, 256 ByteLevel symbols, no merges); id == byte value",
        "optimizer": {
            "name": "AdamW",
            "lr": TRAIN["lr"],
            "betas": list(TRAIN["betas"]),
            "eps": TRAIN["eps"],
            "weight_decay": TRAIN["weight_decay"],
            "weight_decay_applies_to": "parameters with dim >= 2",
            "grad_clip_norm": TRAIN["grad_clip"],
        },
        "schedule": {
            "warmup_steps": TRAIN["warmup_steps"],
            "decay": "cosine",
            "min_lr": TRAIN["lr"] * TRAIN["min_lr_ratio"],  # exact float used by lr_at
        },
        "batch_size": bsz,
        "seq_len": seq,
        "num_threads": NUM_THREADS,
        "losses_nats_per_byte": {
            "final_train": round(final_train, 5),
            "final_heldout": round(final_held, 5),
            "unigram_baseline_heldout": round(unigram, 5),
            "uniform_baseline": round(math.log(256), 5),
            "eval_windows": int(final_held_windows.shape[0]),
            "eval_window_bytes": seq + 1,
        },
        "corpus": {
            "source": 'Python standard library .py files under sysconfig.get_paths()["stdlib"]',
            "python_version": platform.python_version(),
            "skip_dirs": sorted(SKIP_DIRS),
            "max_file_bytes": MAX_FILE_BYTES,
            "split_rule": f"sorted relative POSIX paths; index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1} is held out",
            "train_files": len(train_files),
            "train_bytes": int(train_np.size),
            "heldout_bytes": int(held_np.size),
            "sha256_train_nul_heldout": sha,
            "heldout_files": held_files,
        },
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
        "platform": platform.platform(),
        "date": datetime.date.today().isoformat(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")

    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"wrote {out}: " + ", ".join(f"{k} {v:,} B" for k, v in sizes.items()))
    print(f"total time {time.perf_counter() - t_start:.1f}s (training {train_seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
