"""The checkpoint shipped in modelgrow/data/demo loads cleanly and was really trained.

It is produced by scripts/make_demo_checkpoint.py (byte-level GPT-2 pretrained on the
Python standard library's own source).  Here we evaluate it on a stdlib file that the
training run held out and require a cross-entropy far below both the uniform
(ln 256) and the unigram baseline of that very text.
"""

from __future__ import annotations

import json
import math
import sysconfig
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

DEMO = Path(str(resources.files("modelgrow.data.demo")))
SEQ = 128
MAX_WINDOWS = 48

# Duplicated from scripts/make_demo_checkpoint.py (only used if none of the held-out
# files recorded in training.json exist on this machine, e.g. another Python version).
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
MAX_FILE_BYTES = 200_000
HELDOUT_EVERY = 20


def _training_record() -> dict:
    return json.loads((DEMO / "training.json").read_text())


def _split_rule_heldout(root: Path) -> list[str]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
            files.append(rel.as_posix())
    files.sort()
    return [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]


def _heldout_text() -> tuple[str, str]:
    """(relative path, text) of a held-out stdlib file of a useful size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    recorded = _training_record()["corpus"]["heldout_files"]
    for candidates in (recorded, None):
        if candidates is None:
            candidates = _split_rule_heldout(root)
        for rel in candidates:
            path = root / rel
            if not path.is_file() or not 4_000 <= path.stat().st_size <= 100_000:
                continue
            try:
                return rel, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    pytest.skip(f"no held-out stdlib source file found under {root}")


@pytest.fixture(scope="module")
def loaded():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model, info = GPT2LMHeadModel.from_pretrained(str(DEMO), output_loading_info=True)
    model.eval()
    return model, info


def test_shipped_files_are_small_and_complete():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        assert (DEMO / name).is_file(), name
    total = sum((DEMO / n).stat().st_size for n in ("config.json", "model.safetensors", "tokenizer.json"))
    assert total < 3_000_000
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "gpt2"
    assert cfg["vocab_size"] == 256
    assert (cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_inner"]) == (128, 64, 2, 4, 256)
    for key in ("bos_token_id", "eos_token_id"):
        assert cfg.get(key) is None or 0 <= cfg[key] < 256
    rec = _training_record()
    assert rec["steps"] >= 1000
    losses = rec["losses_nats_per_byte"]
    assert losses["final_heldout"] < losses["unigram_baseline_heldout"] < math.log(256)


def test_loads_without_missing_or_unexpected_keys(loaded):
    model, info = loaded
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), (kind, info.get(kind))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.transformer.wte.weight.shape == (256, 64)


def test_tokenizer_is_byte_level_and_round_trips():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    assert tok.get_vocab_size() == 256
    _, text = _heldout_text()
    for sample in (text[:2000], "héllo wörld ✓ \t\r\n\U0001f600"):
        ids = tok.encode(sample).ids
        assert ids == list(sample.encode("utf-8"))
        assert tok.decode(ids) == sample


def test_model_beats_baselines_on_heldout_stdlib_file(loaded):
    from tokenizers import Tokenizer

    model, _ = loaded
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    rel, text = _heldout_text()
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    n = min(MAX_WINDOWS, (ids.numel() - 1) // SEQ)
    assert n >= 8, rel
    # Non-overlapping windows of SEQ inputs (+1 target byte) from the start of the file.
    windows = torch.stack([ids[i * SEQ : i * SEQ + SEQ + 1] for i in range(n)])
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256).float(), windows[:, 1:].reshape(-1)).item()

    # Unigram entropy of exactly the bytes being predicted: the best any
    # context-free byte model could possibly do on this text.
    counts = np.bincount(windows[:, 1:].reshape(-1).numpy(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())

    assert loss < math.log(256) - 2.0, (rel, loss)
    assert loss < unigram - 0.5, (rel, loss, unigram)
