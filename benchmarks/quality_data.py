"""What the quality benchmarks train on and start from: the standard library's own source
as text (a fixed file-level split) and tiny random GPT-2 / BERT models, all byte level.

Shared by growth_quality.py and fit_quality.py so that both read the same split.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import torch
import transformers

from modelgrow.demo import demo_checkpoint

MASK_ID = 256  # byte-level BERT: ids 0-255 are bytes, 256 is [MASK]


def stdlib_corpus(folder: Path, limit: int) -> tuple[Path, Path]:
    """train.txt / val.txt from the standard library's .py files; every 20th file is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    train_text, val_text = [], []
    sizes = [0, 0]
    for i, path in enumerate(files):
        held = i % 20 == 0
        if sizes[held] >= (limit // 10 if held else limit):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        (val_text if held else train_text).append(text)
        sizes[held] += len(text)
    folder.mkdir(parents=True, exist_ok=True)
    for name, texts in (("train.txt", train_text), ("val.txt", val_text)):
        # Written aside and renamed: parallel runs on one workdir may be reading it.
        staged = folder / f".{name}.{os.getpid()}"
        staged.write_text("\n".join(texts), encoding="utf-8")
        os.replace(staged, folder / name)
    return folder / "train.txt", folder / "val.txt"


def byte_ids(text_file: Path, dest: Path) -> Path:
    """A text file as a .npy of byte ids (what the byte-level BERT reads; no tokenizer)."""
    staged = dest.with_name(f".{dest.stem}.{os.getpid()}.npy")
    np.save(staged, np.frombuffer(text_file.read_bytes(), dtype=np.uint8).astype(np.int32))
    os.replace(staged, dest)
    return dest


def random_gpt2(folder: Path, embd: int, layers: int, heads: int, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=embd, n_layer=layers, n_head=heads,
                                  n_inner=4 * embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=10, eos_token_id=10)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    shutil.copy(demo_checkpoint() / "tokenizer.json", folder / "tokenizer.json")  # byte-level
    return folder


def random_bert(folder: Path, embd: int, layers: int, heads: int, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=MASK_ID + 1, hidden_size=embd, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=4 * embd,
                                  max_position_embeddings=128, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0)
    transformers.BertForMaskedLM(cfg).save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    return folder
