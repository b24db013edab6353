"""Fuzz the checkpoint reader: a mutated checkpoint is read or refused, nothing else.

modelgrow runs unattended over files it did not write, so every input must end in one
of two ways: the mutation was harmless and the checkpoint is read, or a ModelgrowError
whose one-line message names the file. A different exception, a case that takes too
long, or one that allocates far more than the files hold is a failure.

This is a test tool, not part of the installed package: it lives in tests/ (on pytest's
pythonpath, so tests import it as ``fuzz_reader``) and runs as a script.

Each case starts from a small valid checkpoint (safetensors weights + config.json, built
in memory, so the run needs no network and no model download), mutates one file of it
(header bytes, the length field, data_offsets, dtypes, shapes, truncation, byte flips,
hostile JSON, the shard index) and runs what a convert runs on it: open_source, read
every tensor, plan a 2x growth and produce every grown tensor with the non-finite check
(only the write to disk is left out; the writer has its own tests). The seed
checkpoints' tensors come from the built-in architecture layouts (modelgrow/layouts/):
every tensor a layout requires, named by its template and shaped by its axes' roles
under a tiny config, so the fuzzer follows the layouts instead of repeating them.

    python tests/fuzz_reader.py --cases 10000 --seed 0 [--json]
    python tests/fuzz_reader.py --seed 0 --case 1234      # replay one case, verbosely

Cases are independent: case N of seed S always applies the same mutation, so a failure
can be replayed alone. Time and memory are measured, not enforced with signals: the
per-case deadline is checked after the case, and the peak is the larger of the Python
heap peak (tracemalloc) and the growth of the resident-set high-water mark (Linux, reset
per case through /proc/self/clear_refs), which also sees torch's and mmap's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import struct
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save as save_bytes

from modelgrow import grow, plugins
from modelgrow.architecture import Architecture
from modelgrow.checkpoint.safetensors_format import SAFETENSORS_DTYPES
from modelgrow.errors import ModelgrowError
from modelgrow.layout import Layout, builtin_layout_paths
from modelgrow.plan import GrowthSpec, make_plan
from modelgrow.source import open_source

PROG = "python tests/fuzz_reader.py"

# A case may allocate this multiple of its files' total size plus a constant before it
# counts as "allocating what a lying header asks for". Parsing a JSON header legitimately
# costs several times its size in Python objects; a lying header asks for gigabytes.
PEAK_MULTIPLE = 32
PEAK_CONSTANT = 48 * 2**20
DEFAULT_DEADLINE_MS = 5000.0

CONFIG = "config.json"


# -- seed checkpoints ------------------------------------------------------------------


@dataclass
class Seed:
    """A valid checkpoint: file name -> bytes, and what to hand to open_source."""

    name: str
    files: dict[str, bytes]
    entries: list[str]  # "" is the folder itself
    index: str | None = None  # name of the shard index, if sharded

    def weight_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".safetensors"))


def _rand(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return (0.1 * torch.randn(shape, generator=gen)).to(dtype)


def builtin_layouts() -> dict[str, Layout]:
    """The layouts modelgrow ships (modelgrow/layouts/*.json), by layout name."""
    layouts = (Layout.from_file(p) for p in builtin_layout_paths())
    return {layout.name: layout for layout in layouts}


def layout_tensors(layout: Layout, config: dict, gen: torch.Generator, dtype: torch.dtype,
                   *, prefixed: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors for what a checkpoint of ``layout`` with ``config`` stores.

    Every required tensor of the layout, and of the optional ones only an output head
    that the config's class has and does not tie; names from the layout's templates
    (without its base_prefix unless ``prefixed``, as a bare base model stores them),
    shapes from each axis's roles under ``layout.dims(config)``. Tensors are drawn from
    ``gen`` in the layout's order (pre, each layer, post); norm gains are 1 + noise.
    """
    dims = layout.dims(config)
    arch = Architecture(layout)
    untied_head = bool(layout.tie and arch.class_info(config).get("tied_head") and not arch.has_tied_head(config))
    kept = [s for s in layout.tensors if not s.optional or (untied_head and s.name == layout.tie["head"])]
    places = [(s, None) for s in kept if s.section == "pre"]
    places += [(s, layer) for layer in range(dims.layers) for s in kept if s.per_layer]
    places += [(s, None) for s in kept if s.section == "post"]
    prefix = "" if prefixed else layout.base_prefix
    tensors = {}
    for spec, layer in places:
        shape = dims.axis_sizes(spec)
        if None in shape:
            raise ValueError(f"{layout.name} {spec.name}: an axis of {spec.axes} has a size the config does not give")
        name = spec.render(layer)
        name = name[len(prefix):] if prefix and name.startswith(prefix) else name
        tensor = _rand(gen, *shape, dtype=dtype)
        tensors[name] = 1 + tensor if spec.kind == "norm_weight" else tensor
    return tensors


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose ``__metadata__`` keys are in sorted order.

    safetensors writes the metadata in hash-map order, which changes from one process to
    the next; a seed's bytes must not, or a case replayed alone would mutate other bytes.
    """
    blob = save_bytes(tensors, metadata=metadata)
    stored = json.dumps(split(blob)[0]["__metadata__"], separators=(",", ":")).encode()
    ordered = json.dumps(dict(sorted(metadata.items())), separators=(",", ":")).encode()
    return blob.replace(stored, ordered, 1)  # same keys and values: same length


def _config(obj: dict) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


# Tiny configs of the seed checkpoints; the layouts turn them into tensors.
GPT2_LM_TIED = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 8, "n_layer": 2,
                "n_head": 2, "n_positions": 8, "vocab_size": 16, "n_inner": None,
                "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0}
GPT2_BARE = {"model_type": "gpt2", "architectures": ["GPT2Model"], "n_embd": 8, "n_layer": 2,
             "n_head": 2, "n_positions": 8, "vocab_size": 16, "layer_norm_epsilon": 1e-5,
             "bos_token_id": 0, "eos_token_id": 0}
LLAMA_GQA_UNTIED = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                    "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 16,
                    "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def build_seeds() -> list[Seed]:
    """Three small, valid checkpoints covering the reader's input forms and dtypes."""
    layouts = builtin_layouts()
    gen = torch.Generator().manual_seed(0)
    seeds = []

    # 1. GPT-2 LM head, float32, one file, tied head (stored once), prefixed names.
    tensors = layout_tensors(layouts["gpt2"], GPT2_LM_TIED, gen, torch.float32)
    seeds.append(Seed(
        "gpt2-f32",
        {"model.safetensors": _save(tensors, {"format": "pt"}), CONFIG: _config(GPT2_LM_TIED)},
        ["", "model.safetensors"],
    ))

    # 2. Bare GPT2Model (no prefix), float16, three shards and an index.
    tensors = layout_tensors(layouts["gpt2"], GPT2_BARE, gen, torch.float16, prefixed=False)
    names = sorted(tensors)
    shards = [names[0::3], names[1::3], names[2::3]]
    files, weight_map = {}, {}
    for i, part in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-00003.safetensors"
        files[fname] = _save({n: tensors[n] for n in part}, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = "model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files[index] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
    files[CONFIG] = _config(GPT2_BARE)
    seeds.append(Seed("gpt2-f16-sharded", files, ["", index], index=index))

    # 3. Llama with grouped-query attention, bfloat16, untied head, two metadata keys.
    # "origin" keeps the fuzzer's old module name, so that the seed bytes, and with them
    # the cases of a seed, stay the old fuzzer's (with its metadata in sorted order).
    tensors = layout_tensors(layouts["llama"], LLAMA_GQA_UNTIED, gen, torch.bfloat16)
    seeds.append(Seed(
        "llama-bf16",
        {"model.safetensors": _save(tensors, {"format": "pt", "origin": "modelgrow.fuzz"}),
         CONFIG: _config(LLAMA_GQA_UNTIED)},
        ["", "model.safetensors"],
    ))
    return seeds


# -- safetensors surgery -----------------------------------------------------------------


def split(blob: bytes) -> tuple[dict, bytes]:
    """(header object, data buffer) of a valid safetensors file."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict | bytes | str, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else (
        header.encode("utf-8", "surrogatepass") if isinstance(header, str) else json.dumps(header).encode()
    )
    return struct.pack("<Q", len(raw)) + raw + data


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# Values a hostile header puts where an integer, list or string belongs.
_ODD_VALUES: list = [None, True, False, -1, 1.5, "4", [], {}, [[1]], 2**63, 2**64, -(2**63), 1e308]
_HUGE = [2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**19, 10**20]
_DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                "F8_E4M3", "F8_E5M2", "U16", "U32", "U64"]


@dataclass
class Mutation:
    file: str  # the seed file that was changed ("" when none was)
    blob: bytes
    what: str  # mutator and detail, for the report and for replaying
    kind: str = ""  # the mutator's name, set by plan_case


Mutator = Callable[[random.Random, Seed, str], Mutation]


def m_flip_bytes(rng: random.Random, seed: Seed, file: str) -> Mutation:
    blob = bytearray(seed.files[file])
    n = rng.choice([1, 1, 2, 4, 8, 32])
    for _ in range(n):
        i = rng.randrange(len(blob))
        blob[i] ^= rng.randrange(1, 256)
    return Mutation(file, bytes(blob), f"flip_bytes n={n}")


def m_flip_header(rng: random.Random, seed: Seed, file: str) -> Mutation:
    blob = bytearray(seed.files[file])
    n_hdr = int.from_bytes(blob[:8], "little")
    n = rng.choice([1, 1, 2, 3, 8])
    for _ in range(n):
        i = 8 + rng.randrange(n_hdr)
        # Printable replacements make syntactically valid but wrong JSON more likely.
        blob[i] = rng.choice(b'0123456789[]{}",:-.eE \\tfnu') if rng.random() < 0.6 else rng.randrange(256)
    return Mutation(file, bytes(blob), f"flip_header n={n}")


def m_length_field(rng: random.Random, seed: Seed, file: str) -> Mutation:
    blob = seed.files[file]
    n = int.from_bytes(blob[:8], "little")
    size = len(blob)
    value = rng.choice([0, 1, 7, 8, n - 1, n + 1, n + rng.randint(2, 64), n - rng.randint(2, 8),
                        size - 8, size - 7, size, 100_000_001, 2**31, 2**32, 2**63, 2**64 - 1,
                        rng.getrandbits(64), rng.getrandbits(16)])
    value = max(0, min(value, 2**64 - 1))
    return Mutation(file, value.to_bytes(8, "little") + blob[8:], f"length_field {value}")


def m_truncate(rng: random.Random, seed: Seed, file: str) -> Mutation:
    blob = seed.files[file]
    n = int.from_bytes(blob[:8], "little")
    cut = rng.choice([0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(blob) - 1,
                      len(blob) - 2, rng.randrange(len(blob))])
    return Mutation(file, blob[:cut], f"truncate to {cut} of {len(blob)}")


def m_extend(rng: random.Random, seed: Seed, file: str) -> Mutation:
    blob = seed.files[file]
    extra = rng.choice([b"\0", b" ", b"\0" * 8, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))])
    return Mutation(file, blob + extra, f"extend by {len(extra)}")


def _pick_entry(rng: random.Random, header: dict) -> str:
    return rng.choice(_tensor_names(header))


def m_offsets(rng: random.Random, seed: Seed, file: str) -> Mutation:
    header, data = split(seed.files[file])
    name = _pick_entry(rng, header)
    begin, end = header[name]["data_offsets"]
    size = end - begin
    d = rng.choice([1, 2, 4, size, -1, -2, -size, len(data), 2**32, 2**62, 2**64])
    choice = rng.randrange(12)
    if choice == 0:
        new = [begin + d, end]
    elif choice == 1:
        new = [begin, end + d]
    elif choice == 2:
        new = [begin + d, end + d]
    elif choice == 3:
        new = [end, begin]
    elif choice == 4:
        new = [0, size]  # overlaps the first tensor unless it is the first
    elif choice == 5:
        new = [begin, rng.choice(_HUGE)]
    elif choice == 6:
        new = [rng.choice(_HUGE), rng.choice(_HUGE)]
    elif choice == 7:
        new = rng.choice(_ODD_VALUES)
    elif choice == 8:
        new = [begin, end, end]
    elif choice == 9:
        new = [begin]
    elif choice == 10:
        new = [rng.choice(_ODD_VALUES), end]
    else:
        del header[name]["data_offsets"]
        return Mutation(file, join(header, data), f"offsets: drop from {name}")
    header[name]["data_offsets"] = new
    return Mutation(file, join(header, data), f"offsets {name} -> {new!r}"[:200])


def m_dtype(rng: random.Random, seed: Seed, file: str) -> Mutation:
    header, data = split(seed.files[file])
    name = _pick_entry(rng, header)
    new = rng.choice(_DTYPE_CODES + ["F128", "f32", "", "F4", "C64", "BF8", None, 32, ["F32"]])
    header[name]["dtype"] = new
    if rng.random() < 0.3:  # a lying header that is consistent about the new size
        begin, end = header[name]["data_offsets"]
        item = torch.tensor([], dtype=_itemsize_dtype(new)).element_size() if _itemsize_dtype(new) else 1
        numel = 1
        for s in header[name]["shape"]:
            numel *= s
        header[name]["data_offsets"] = [begin, begin + numel * item]
    return Mutation(file, join(header, data), f"dtype {name} -> {new!r}")


def _itemsize_dtype(code) -> torch.dtype | None:
    return SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None


def m_shape(rng: random.Random, seed: Seed, file: str) -> Mutation:
    header, data = split(seed.files[file])
    name = _pick_entry(rng, header)
    shape = list(header[name]["shape"])
    choice = rng.randrange(12)
    if choice == 0:
        new = shape[::-1]
    elif choice == 1:
        new = shape + [1]
    elif choice == 2:
        new = shape[:-1]
    elif choice == 3:
        new = [s * 2 for s in shape]
    elif choice == 4:
        new = [rng.choice(_HUGE)] + shape[1:]
    elif choice == 5:
        new = [2**62, 2**62]
    elif choice == 6:
        new = [0] + shape
    elif choice == 7:
        new = [1] * rng.choice([64, 65, 1000])
    elif choice == 8:
        new = [rng.choice(_ODD_VALUES)] + shape[1:]
    elif choice == 9:
        new = rng.choice(_ODD_VALUES)
    elif choice == 10:
        new = [shape[0] * shape[-1]] if shape else [1]  # same numel, wrong rank
    else:
        new = [2**32, 2**32, 2**32]
    header[name]["shape"] = new
    # Half the time the header lies consistently: offsets that match the claimed shape,
    # so only the size of the file can tell that the bytes are not there.
    if rng.random() < 0.5 and isinstance(new, list) and all(type(s) is int and s >= 0 for s in new):
        begin = header[name]["data_offsets"][0]
        item = _itemsize_dtype(header[name]["dtype"])
        numel = 1
        for s in new:
            numel *= s
        header[name]["data_offsets"] = [begin, begin + numel * torch.tensor([], dtype=item).element_size()]
    return Mutation(file, join(header, data), f"shape {name} -> {_short(new)}")


def m_entry(rng: random.Random, seed: Seed, file: str) -> Mutation:
    header, data = split(seed.files[file])
    name = _pick_entry(rng, header)
    choice = rng.randrange(7)
    if choice == 0:
        del header[name]
        what = f"drop {name}"
    elif choice == 1:
        header["unexpected.weight"] = header.pop(name)
        what = f"rename {name} -> unexpected.weight"
    elif choice == 2:
        new = rng.choice(["", " ", "\u0000", "a\nb", "\ud800", "x" * 10000, name.upper()])
        header[new] = header.pop(name)
        what = f"rename {name} -> {_short(new)}"
    elif choice == 3:
        header[name] = rng.choice(_ODD_VALUES)
        what = f"entry {name} -> {header[name]!r}"
    elif choice == 4:
        header[name]["extra"] = {"nested": [1, 2, {"x": None}]}
        what = f"extra key in {name}"
    elif choice == 5:
        # Two names for the same bytes: overlapping ranges.
        header["alias.weight"] = dict(header[name])
        what = f"alias of {name}"
    else:
        header.pop("__metadata__", None)
        header = {"__metadata__": {"format": "pt"}, **{k: header[k] for k in reversed(list(header))}}
        what = "reorder entries"
    return Mutation(file, join(json.dumps(header, ensure_ascii=False), data), f"entry: {what}")


def m_metadata(rng: random.Random, seed: Seed, file: str) -> Mutation:
    header, data = split(seed.files[file])
    new = rng.choice([None, [], "pt", 1, {"format": 1}, {"format": None}, {"a": {"b": "c"}},
                      {"format": "pt", "big": "x" * 100_000}, {}, {"format": "tf"}])
    header["__metadata__"] = new
    return Mutation(file, join(header, data), f"metadata -> {_short(new)}")


def m_hostile_json(rng: random.Random, seed: Seed, file: str) -> Mutation:
    header, data = split(seed.files[file])
    text = json.dumps(header)
    name = _pick_entry(rng, header)
    entry = json.dumps(header[name])
    depth = rng.choice([100, 1000, 10_000, 100_000, 1_000_000])
    digits = rng.choice([19, 20, 21, 25, 100, 4301, 100_000])
    # Built lazily: some are megabytes, and only the chosen one is needed.
    options: list[tuple[str, Callable[[], str]]] = [
        ("deep array", lambda: "[" * depth + "]" * depth),
        ("deep array unterminated", lambda: "[" * depth),
        ("deep object", lambda: '{"a":' * depth + "1" + "}" * depth),
        ("deep in entry", lambda: text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"),
        ("deep in metadata", lambda: '{"__metadata__": ' + '{"a":' * depth + '"b"' + "}" * depth + "}"),
        ("huge int shape", lambda: text.replace(entry, entry.replace('"shape": [', f'"shape": [{"9" * digits}, ', 1))),
        ("huge int offset", lambda: text.replace(entry, re.sub(r'"data_offsets": \[\d+', f'"data_offsets": [{"1" * digits}', entry))),
        ("huge negative int", lambda: text.replace(entry, re.sub(r'"data_offsets": \[\d+', f'"data_offsets": [-{"1" * digits}', entry))),
        ("huge float", lambda: text.replace(entry, re.sub(r'"data_offsets": \[\d+', '"data_offsets": [1e999', entry))),
        ("float offset", lambda: text.replace(entry, re.sub(r'"data_offsets": \[(\d+)', r'"data_offsets": [\1.0', entry))),
        ("exponent offset", lambda: text.replace(entry, re.sub(r'"data_offsets": \[\d+', '"data_offsets": [0e0', entry))),
        ("NaN", lambda: text.replace(entry, re.sub(r'"data_offsets": \[\d+', '"data_offsets": [NaN', entry))),
        ("Infinity", lambda: text.replace(entry, re.sub(r'"shape": \[\d+', '"shape": [Infinity', entry))),
        ("duplicate tensor", lambda: text[:-1] + f', "{name}": ' + entry + "}"),
        ("duplicate metadata", lambda: text[:-1] + ', "__metadata__": {"format": "pt"}}'),
        ("duplicate field", lambda: text.replace(entry, entry[:-1] + ', "dtype": "F64"}')),
        ("non-object list", lambda: "[" + text + "]"),
        ("non-object string", lambda: json.dumps(text)),
        ("non-object number", lambda: "12345"),
        ("non-object null", lambda: "null"),
        ("non-object true", lambda: "true"),
        ("empty object", lambda: "{}"),
        ("empty", lambda: " "),
        ("trailing garbage", lambda: text + "}"),
        ("trailing json", lambda: text + " {}"),
        ("padding spaces", lambda: text + " " * rng.choice([1, 7, 1000])),
        ("padding nul", lambda: text + "\0" * rng.choice([1, 7])),
        ("BOM", lambda: "\ufeff" + text),
        ("lone surrogate key", lambda: text.replace(f'"{name}"', '"\\ud800"', 1)),
        ("control char", lambda: text.replace(f'"{name}"', f'"{name}\x01"', 1)),
        ("escaped nul", lambda: text.replace(f'"{name}"', f'"{name}\\u0000"', 1)),
        ("long string", lambda: text[:-1] + ', "__x": "' + "x" * 1_000_000 + '"}'),
        ("many entries", lambda: '{' + ",".join(f'"t{i}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}' for i in range(20_000)) + "}"),
    ]
    what, make = rng.choice(options)
    raw = make().encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:
        raw = rng.choice([b"\xff\xfe" + raw, raw + b"\xc3", raw.replace(b'"', b'"\xe9', 1), b"\x80\x04\x95" + raw])
        what += " + invalid utf-8"
    return Mutation(file, join(raw, data), f"hostile_json: {what}")


def m_nonfinite(rng: random.Random, seed: Seed, file: str) -> Mutation:
    header, data = split(seed.files[file])
    name = rng.choice([n for n in _tensor_names(header) if header[n]["dtype"] in ("F32", "F16", "BF16")])
    info = header[name]
    dtype = _itemsize_dtype(info["dtype"])
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    begin, end = info["data_offsets"]
    item = torch.tensor([], dtype=dtype).element_size()
    pos = begin + item * rng.randrange((end - begin) // item)
    patch = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
    data = data[:pos] + patch + data[pos + item :]
    return Mutation(file, _replace_data(seed.files[file], data), f"nonfinite {value} in {name}")


def _replace_data(blob: bytes, data: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    return blob[: 8 + n] + data


def m_splice(rng: random.Random, seed: Seed, file: str) -> Mutation:
    """A header from one file with the data of another (same seed or not)."""
    others = [f for f in seed.weight_files() if f != file]
    blob = seed.files[file]
    n = int.from_bytes(blob[:8], "little")
    if others and rng.random() < 0.5:
        other = seed.files[rng.choice(others)]
        m = int.from_bytes(other[:8], "little")
        return Mutation(file, blob[: 8 + n] + other[8 + m :], "splice: data of another shard")
    data = blob[8 + n :]
    cut = rng.randrange(len(data) + 1)
    return Mutation(file, blob[: 8 + n] + data[cut:] + data[:cut], f"splice: data rotated by {cut}")


_INDEX_SHARDS = ["../model-00001-of-00003.safetensors", "/etc/passwd", "", ".", "..", "config.json",
                 "model.safetensors.index.json", "missing.safetensors", "sub/x.safetensors",
                 "a\\b.safetensors", "x" * 300, "x" * 5000, "nul\0.safetensors", "\ud800.safetensors",
                 "model-00001-of-00003.safetensors/", "./model-00001-of-00003.safetensors"]


def m_index(rng: random.Random, seed: Seed, file: str) -> Mutation:
    index = json.loads(seed.files[file])
    weight_map = index["weight_map"]
    name = rng.choice(sorted(weight_map))
    shards = sorted(set(weight_map.values()))
    choice = rng.randrange(10)
    if choice in (0, 9):  # hostile shard names are the index's main attack surface
        weight_map[name] = rng.choice(_INDEX_SHARDS)
        what = f"{name} -> {_short(weight_map[name])}"
    elif choice == 1:
        weight_map[name] = rng.choice([s for s in shards if s != weight_map[name]])
        what = f"{name} -> wrong shard"
    elif choice == 2:
        del weight_map[name]
        what = f"drop {name}"
    elif choice == 3:
        weight_map["unexpected.weight"] = shards[0]
        what = "unknown tensor"
    elif choice == 4:
        weight_map[name] = rng.choice(_ODD_VALUES)
        what = f"{name} -> {weight_map[name]!r}"
    elif choice == 5:
        index["weight_map"] = rng.choice(_ODD_VALUES)
        what = f"weight_map -> {index['weight_map']!r}"
    elif choice == 6:
        index = rng.choice([[], "x", None, 1])
        what = f"index -> {index!r}"
    elif choice == 7:
        for key in weight_map:
            weight_map[key] = shards[0]
        what = "every tensor in the first shard"
    else:
        depth = rng.choice([1000, 100_000])
        text = '{"weight_map": ' + "[" * depth + "]" * depth + "}"
        return Mutation(file, text.encode(), f"index: deep nesting {depth}")
    raw = json.dumps(index, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return Mutation(file, raw, f"index: {what}")


def m_empty_file(rng: random.Random, seed: Seed, file: str) -> Mutation:
    return Mutation(file, b"", f"empty file {file}")


MUTATORS: dict[str, tuple[Mutator, float]] = {
    # name: (mutator, weight)
    "flip_bytes": (m_flip_bytes, 3),
    "flip_header": (m_flip_header, 3),
    "length_field": (m_length_field, 2),
    "truncate": (m_truncate, 2),
    "extend": (m_extend, 1),
    "offsets": (m_offsets, 3),
    "dtype": (m_dtype, 2),
    "shape": (m_shape, 3),
    "entry": (m_entry, 2),
    "metadata": (m_metadata, 1),
    "hostile_json": (m_hostile_json, 3),
    "nonfinite": (m_nonfinite, 1),
    "splice": (m_splice, 1),
    "empty_file": (m_empty_file, 0.3),
}


def _short(value, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- running cases -------------------------------------------------------------------------


class _NullWriter:
    """Stands in for CheckpointWriter: the grown tensors are produced, then dropped."""

    def declare(self, tensors: list) -> list[str]:
        return [name for name, _, _ in tensors]  # taken in the plan's order

    def add(self, name: str, tensor: torch.Tensor) -> None:
        pass


def probe(entry: Path) -> None:
    """Run what a convert runs on a checkpoint, short of writing the result."""
    with open_source(entry) as source:
        for name in source.checkpoint.names():  # ignored tensors too, not only bound ones
            source.checkpoint.get(name)
        plan = make_plan(source, GrowthSpec(width="2x", depth="2x"))
        op = plugins.get_operator("copy")(plan, noise=0.01, noise_mode="exact", seed=0)
        grow._write_tensors(plan, op, _NullWriter(), allow_nonfinite=False, progress=False)


@dataclass
class CaseResult:
    case: int
    seed: str
    entry: str
    mutation: str
    outcome: str  # ok | refused | failure
    error: str | None
    ms: float
    peak_bytes: int
    input_bytes: int


@dataclass
class Summary:
    command: str
    cases: int
    ok: int = 0
    refused: int = 0
    failures: int = 0
    slowest_case_ms: float = 0.0
    slowest_case: int | None = None
    max_peak_alloc_bytes: int = 0
    max_peak_case: int | None = None
    max_input_bytes: int = 0
    peak_limit: str = f"{PEAK_MULTIPLE} x input bytes + {PEAK_CONSTANT // 2**20} MiB"
    deadline_ms: float = DEFAULT_DEADLINE_MS
    memory_measure: str = ""
    elapsed_s: float = 0.0
    mutators: dict[str, int] = field(default_factory=dict)
    outcomes_by_mutator: dict[str, dict[str, int]] = field(default_factory=dict)
    failure_cases: list[dict] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"fuzz: {self.cases} cases: {self.ok} ok, {self.refused} refused, {self.failures} failures; "
            f"slowest case {self.slowest_case_ms:.1f} ms (#{self.slowest_case}); "
            f"max peak alloc {self.max_peak_alloc_bytes / 2**20:.2f} MiB (#{self.max_peak_case}, "
            f"largest input {self.max_input_bytes / 2**20:.2f} MiB; limit {self.peak_limit}); "
            f"{self.elapsed_s:.1f} s"
        )


class _Memory:
    """Peak allocation of one case: Python heap (tracemalloc) and resident-set growth."""

    def __init__(self):
        self.rss = _rss_resettable()

    def start(self) -> None:
        tracemalloc.reset_peak()
        self.heap0 = tracemalloc.get_traced_memory()[0]
        if self.rss:
            _write_clear_refs()
            self.rss0 = _status_kb("VmRSS")

    def peak(self) -> int:
        heap = tracemalloc.get_traced_memory()[1] - self.heap0
        rss = (_status_kb("VmHWM") - self.rss0) * 1024 if self.rss else 0
        return max(heap, rss, 0)

    def describe(self) -> str:
        what = "tracemalloc peak"
        if self.rss:
            what += " and resident-set high-water growth (/proc/self/clear_refs)"
        return what


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _write_clear_refs() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one


def _rss_resettable() -> bool:
    try:
        _write_clear_refs()
        _status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _write(path: Path, data: bytes) -> None:
    # A fresh inode each time: a handle that a previous case leaked keeps mapping the old
    # file instead of seeing it truncated under it (which would be SIGBUS, not a finding).
    tmp = path.with_name(path.name + ".fuzz-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def plan_case(seeds: list[Seed], seed: int, case: int) -> tuple[Seed, str, Mutation]:
    rng = random.Random(f"modelgrow-fuzz:{seed}:{case}")
    s = rng.choice(seeds)
    entry = rng.choice(s.entries)
    if s.index and rng.random() < 0.3:
        mutation = m_index(rng, s, s.index)
        mutation.kind = "index"
        return s, entry, mutation
    names = list(MUTATORS)
    name = rng.choices(names, weights=[MUTATORS[n][1] for n in names])[0]
    file = rng.choice(s.weight_files())
    mutation = MUTATORS[name][0](rng, s, file)
    mutation.kind = name
    return s, entry, mutation


def run_case(root: Path, s: Seed, entry: str, mutation: Mutation, memory: _Memory, deadline_ms: float,
             case: int, check: Callable[[Path], None] = probe, on_disk: dict[Path, bytes] | None = None) -> CaseResult:
    folder = root / s.name
    on_disk = {} if on_disk is None else on_disk
    for name, blob in s.files.items():
        want = mutation.blob if name == mutation.file else blob
        if on_disk.get(folder / name) != want:  # rewrite only what the last case changed
            _write(folder / name, want)
            on_disk[folder / name] = want
    target = folder / entry if entry else folder
    mutated = folder / mutation.file
    input_bytes = sum(len(mutation.blob if n == mutation.file else b) for n, b in s.files.items())
    error = None
    memory.start()
    t0 = time.perf_counter()
    try:
        check(target)
        outcome = "ok"
    except ModelgrowError as err:
        message = str(err)
        outcome = "refused"
        if "\n" in message or "\r" in message:
            outcome, error = "failure", f"message spans lines: {message!r}"
        elif str(mutated) not in message and str(target) not in message:
            outcome, error = "failure", f"message names neither {mutated.name} nor {target}: {message}"
        else:
            error = message
    except Exception as err:  # noqa: BLE001 - any other exception is what we hunt for
        outcome, error = "failure", f"{type(err).__name__}: {_short(str(err), 300)}"
    ms = (time.perf_counter() - t0) * 1000
    peak = memory.peak()
    if outcome != "failure" and ms > deadline_ms:
        outcome, error = "failure", f"took {ms:.0f} ms, over the {deadline_ms:.0f} ms deadline ({error or 'ok'})"
    limit = PEAK_MULTIPLE * input_bytes + PEAK_CONSTANT
    if outcome != "failure" and peak > limit:
        outcome, error = "failure", f"allocated {peak} bytes for {input_bytes} bytes of input ({error or 'ok'})"
    return CaseResult(case, s.name, entry or ".", mutation.what, outcome, error, ms, peak, input_bytes)


def run(cases: int, seed: int = 0, *, deadline_ms: float = DEFAULT_DEADLINE_MS, only: int | None = None,
        check: Callable[[Path], None] | None = None, on_case: Callable[[CaseResult], None] | None = None,
        workdir: str | Path | None = None) -> Summary:
    """Run ``cases`` cases (or only case ``only``) and summarise them.

    ``check`` is what runs on each mutated checkpoint (default: probe); tests pass one
    that misbehaves to show that the harness catches it.
    """
    check = check or probe
    seeds = build_seeds()
    argv = f"{PROG} --cases {cases} --seed {seed}"
    summary = Summary(command=argv if only is None else f"{PROG} --seed {seed} --case {only}",
                      cases=0, deadline_ms=deadline_ms)
    started = time.perf_counter()
    was_tracing = tracemalloc.is_tracing()
    # The tensors are tiny: intra-op threads only add contention, and on a busy machine
    # that turned 1 ms index_add_ calls into 100 ms ones, timing the scheduler, not us.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="modelgrow-fuzz-", dir=workdir) as tmp:
        root = Path(tmp)
        on_disk: dict[Path, bytes] = {}
        for s in seeds:
            (root / s.name).mkdir()
            for name, blob in s.files.items():
                _write(root / s.name / name, blob)
                on_disk[root / s.name / name] = blob
            # Warm-up on the pristine seed: lazy imports and first-call allocations of
            # torch and transformers are not the mutation's doing.
            probe(root / s.name)
        if not was_tracing:
            tracemalloc.start()
        memory = _Memory()
        summary.memory_measure = memory.describe()
        try:
            for case in ([only] if only is not None else range(cases)):
                s, entry, mutation = plan_case(seeds, seed, case)
                result = run_case(root, s, entry, mutation, memory, deadline_ms, case, check, on_disk)
                _tally(summary, result, mutation.kind)
                if on_case:
                    on_case(result)
        finally:
            if not was_tracing:
                tracemalloc.stop()
            torch.set_num_threads(threads)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _tally(summary: Summary, r: CaseResult, mutator: str) -> None:
    summary.cases += 1
    setattr(summary, r.outcome if r.outcome != "failure" else "failures",
            getattr(summary, r.outcome if r.outcome != "failure" else "failures") + 1)
    summary.mutators[mutator] = summary.mutators.get(mutator, 0) + 1
    by = summary.outcomes_by_mutator.setdefault(mutator, {"ok": 0, "refused": 0, "failure": 0})
    by[r.outcome] += 1
    if r.ms > summary.slowest_case_ms:
        summary.slowest_case_ms, summary.slowest_case = r.ms, r.case
    if r.peak_bytes > summary.max_peak_alloc_bytes:
        summary.max_peak_alloc_bytes, summary.max_peak_case = r.peak_bytes, r.case
    summary.max_input_bytes = max(summary.max_input_bytes, r.input_bytes)
    if r.outcome == "failure" and len(summary.failure_cases) < 50:
        summary.failure_cases.append(asdict(r))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fuzz modelgrow's checkpoint reader with mutated safetensors checkpoints.",
    )
    parser.add_argument("--cases", type=int, default=1000, help="number of cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutation sequence (default 0)")
    parser.add_argument("--case", type=int, default=None, help="run only this case, printing its detail")
    parser.add_argument("--deadline-ms", type=float, default=DEFAULT_DEADLINE_MS,
                        help=f"a case slower than this fails (default {DEFAULT_DEADLINE_MS:.0f})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    if args.cases < 0:
        parser.error("--cases must not be negative")

    def show(r: CaseResult) -> None:
        if args.verbose or args.case is not None or r.outcome == "failure":
            print(f"#{r.case} [{r.seed} {r.entry}] {r.mutation}: {r.outcome} in {r.ms:.1f} ms, "
                  f"peak {r.peak_bytes} B: {r.error or ''}", file=sys.stderr)

    summary = run(args.cases, args.seed, deadline_ms=args.deadline_ms, only=args.case, on_case=show)
    if args.json:
        print(json.dumps(asdict(summary), indent=2, sort_keys=True))
    else:
        print(summary.line())
        for f in summary.failure_cases[:10]:
            print(f"  failure #{f['case']} ({f['mutation']}): {f['error']}")
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
