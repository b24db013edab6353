"""Tiny random Hugging Face models for tests, saved as real checkpoints.

Norm gains and biases are randomised: with the default ones (gain 1, bias 0) a growth
that mishandled norms or biases could still look exact.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

import torch
import transformers


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or ".ln_" in name or "ln_f" in name):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def save(model: transformers.PreTrainedModel, folder: Path, **kwargs) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder, **kwargs)
    gen = folder / "generation_config.json"
    if gen.exists():
        gen.unlink()
    return folder


def logits_gap(cls, src: Path, grown: Path, vocab: int, low: int = 0):
    """Load both checkpoints with ``cls`` (no missing, unexpected or mis-shaped keys in the
    grown one) and return (max |logits difference| on random tokens, the grown model)."""
    small = cls.from_pretrained(src).eval()
    big, info = cls.from_pretrained(grown, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(low, vocab, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (small(input_ids=ids).logits - big.eval()(input_ids=ids).logits).abs().max().item()
    return diff, big


def gpt2(folder: Path, *, tie: bool = True, head: bool = True, embd: int = 32, layers: int = 2, heads: int = 4, seed: int = 0, **kw) -> Path:
    cfg = transformers.GPT2Config(
        n_embd=embd, n_layer=layers, n_head=heads, n_positions=32, vocab_size=96, n_inner=kw.pop("n_inner", None),
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, **kw,
    )
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
    torch.manual_seed(seed)
    return save(randomise(cls(cfg), seed), folder)


def llama(folder: Path, *, tie: bool = False, heads: int = 4, kv_heads: int = 2, hidden: int = 32, head_dim: int | None = None,
          layers: int = 2, bias: bool = False, seed: int = 0, head: bool = True, **kw) -> Path:
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads, vocab_size=96, max_position_embeddings=64,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, bos_token_id=0, eos_token_id=0, **kw,
    )
    cls = transformers.LlamaForCausalLM if head else transformers.LlamaModel
    torch.manual_seed(seed)
    return save(randomise(cls(cfg), seed), folder)


def bert(folder: Path, *, mlm: bool = True, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    cfg = transformers.BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=64,
        vocab_size=96, max_position_embeddings=64, type_vocab_size=2,
    )
    cls = transformers.BertForMaskedLM if mlm else transformers.BertModel
    torch.manual_seed(seed)
    return save(randomise(cls(cfg), seed), folder)


STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["argparse.py", "dataclasses.py", "textwrap.py", "json/decoder.py", "collections/__init__.py"]


def stdlib_corpus(folder: Path) -> Path:
    """~240 KB of real text every machine has: five standard-library modules, one file."""
    texts = [(STDLIB / f).read_text(encoding="utf-8") for f in CORPUS_FILES if (STDLIB / f).is_file()]
    if sum(map(len, texts)) < 50_000:
        pytest.skip("the Python standard library's source is not available")
    path = folder / "corpus.txt"
    path.write_text("\n".join(texts), encoding="utf-8")
    return path
