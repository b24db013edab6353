"""Run a checkpoint's model one block at a time, for verification at any size.

The module is built with its parameters on the meta device (buffers such as rotary
frequencies stay real), so building it allocates no weights. Every module that owns
weights outside the blocks (embeddings, final norm, head) has its tensors read just
before it runs and dropped after, and so has each block as a whole. A plain embedding or
linear head too large for one slice of rows (a large vocabulary) never exists whole in
fp32: it runs from its stored rows a slice at a time (the lookup gathers each slice's
ids, the head computes each slice's logits). Peak memory is the largest block in fp32
plus the activations, whatever the model's depth or vocabulary. Every block's output
hidden state is kept (small: batch × seq × width), so that a comparison can say which
block first departs ("block 17 differs by 3e-2") rather than only that the logits do.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .checkpoint.sizes import row_parts
from .errors import CheckpointError
from .architecture import block_module
from .source import SourceModel


@dataclass
class StreamedRun:
    output: torch.Tensor  # the primary output (logits or hidden states), fp32
    blocks: list[torch.Tensor]  # per layer: the block's output hidden state
    peak_block_bytes: int  # the largest block loaded at once
    sliced: list[str]  # modules run from row slices of their stored weight (large vocabularies)


@contextmanager
def meta_parameters():
    """Parameters registered inside the block live on the meta device (no storage)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


@torch.no_grad()
def run_streamed(source: SourceModel, inputs: dict[str, torch.Tensor],
                 round_to: torch.dtype | None = None) -> StreamedRun:
    """``source``'s primary output on ``inputs``, and every block's output, one block in
    memory; ``round_to``: weights rounded to that dtype first (what a cast would do)."""
    arch, config = source.arch, source.config
    with meta_parameters():
        module = arch.build_module(config)
    aliases = _aliases(module)
    by_layer: dict[int | None, dict[str, str]] = defaultdict(dict)  # layout name -> stored name
    for b in source.bound():
        if not source.is_tied_head(b.spec):
            by_layer[b.layer][source.stored_name(b.spec, b.layer)] = b.name

    def place(tensors: dict[str, torch.Tensor]) -> int:
        placed = arch.module_tensors(module, tensors, source.path)
        for key, tensor in placed.items():
            for alias in aliases.get(key, [key]):
                _load(module, alias, tensor, source)
        return sum(t.numel() * t.element_size() for t in placed.values())

    def read(names: dict[str, str]) -> dict[str, torch.Tensor]:
        return {key: read_float(source.checkpoint, stored, round_to) for key, stored in names.items()}

    def read_rows(stored: str, rows: slice) -> torch.Tensor:
        nonlocal peak
        t = _as_float(source.checkpoint.get(stored, rows), round_to)
        peak = max(peak, t.numel() * 4)
        return t

    blocks: dict[int, torch.Tensor] = {}
    peak = 0
    handles = []
    sliced = []
    # Embeddings, final norm, head: each loaded when its own module runs (a tied head
    # reads the embedding's tensor again), so a large vocabulary is held only while used.
    owners = _owners(module, arch, by_layer.pop(None, {}), aliases, source.path)
    for path, entries in owners.items():
        owner = module.get_submodule(path)
        if _runs_from_rows(owner, entries, source.checkpoint):
            shape = source.checkpoint.info(entries["weight"]).shape
            _check_shape(owner.weight.shape, shape, f"{path}.weight" if path else "weight", source)
            owner.forward = _row_forward(owner, entries, shape, read_rows)  # this module only: built here
            sliced.append(path)
            continue

        def load_owner(mod, _args, entries=entries, path=path):
            nonlocal peak
            tensors = read(entries)
            for name, tensor in tensors.items():
                _load(mod, name, tensor, source, f"{path}.{name}" if path else name)
            peak = max(peak, sum(t.numel() * t.element_size() for t in tensors.values()))

        def drop_owner(mod, _args, _output, entries=entries):
            for name in entries:
                _assign(mod, name, torch.empty(mod.get_parameter(name).shape, device="meta"))

        handles += [owner.register_forward_pre_hook(load_owner), owner.register_forward_hook(drop_owner)]
    lazy = {id(module.get_parameter(f"{path}.{name}" if path else name)) for path, e in owners.items() for name in e}
    block_of: dict[int, torch.nn.Module] = {}
    for layer, names in sorted(by_layer.items()):
        keys = list(arch.module_tensors(module, {k: _PROBE for k in names}, source.path))
        block_of[layer] = block_module(module, keys)
    inside = {id(p) for b in block_of.values() for p in b.parameters()}
    _fill_unstored(module, lambda p: id(p) not in inside and id(p) not in lazy)
    for layer, names in sorted(by_layer.items()):
        block = block_of[layer]

        def before(mod, _args, names=names):
            nonlocal peak
            peak = max(peak, place(read(names)))
            _fill_unstored(mod)

        def after(mod, _args, output, layer=layer):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            blocks[layer] = hidden.detach().float().clone()
            for name, p in list(mod.named_parameters()):  # drop the block's weights
                _assign(mod, name, torch.empty(p.shape, device="meta"))

        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    try:
        output = arch.call(module, config, inputs).float()
    finally:
        for h in handles:
            h.remove()
    return StreamedRun(output, [blocks[i] for i in sorted(blocks)], peak, sliced)


def _runs_from_rows(owner: torch.nn.Module, entries: dict[str, str], checkpoint) -> bool:
    """A plain embedding or linear layer (not a subclass: its forward is known) whose stored
    weight spans more than one slice of rows."""
    if type(owner) is torch.nn.Embedding:
        plain = set(entries) == {"weight"} and owner.max_norm is None  # max_norm rewrites the weight
    elif type(owner) is torch.nn.Linear:
        plain = "weight" in entries and set(entries) <= {"weight", "bias"}
    else:
        return False
    return plain and len(row_parts(checkpoint.info(entries["weight"]).shape)) > 1


def _row_forward(owner: torch.nn.Module, entries: dict[str, str], shape, read_rows):
    """``owner``'s forward computed from its stored weight one slice of rows at a time."""
    parts = row_parts(shape)
    weight = entries["weight"]
    if isinstance(owner, torch.nn.Embedding):
        def lookup(ids: torch.Tensor) -> torch.Tensor:
            flat = ids.reshape(-1)
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= shape[0]):
                raise IndexError(f"token id out of range for an embedding of {shape[0]} rows")
            out = torch.empty(flat.numel(), shape[1])
            for rows in parts:
                hit = (flat >= rows.start) & (flat < rows.stop)
                if bool(hit.any()):
                    out[hit] = read_rows(weight, rows)[flat[hit] - rows.start]
            return out.reshape(*ids.shape, shape[1])
        return lookup
    bias = read_rows(entries["bias"], slice(None)) if "bias" in entries else None

    def project(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], shape[0])
        for rows in parts:
            out[..., rows] = torch.nn.functional.linear(x, read_rows(weight, rows), None if bias is None else bias[rows])
        return out
    return project


def read_float(checkpoint, name: str, round_to: torch.dtype | None = None) -> torch.Tensor:
    """Stored tensor ``name`` in fp32 (``round_to``: rounded to that dtype first). A large one
    is read and converted a slice of rows at a time into one fp32 buffer, so its stored
    copy (bf16: half the buffer again) is never held whole beside it."""
    info = checkpoint.info(name)
    parts = row_parts(info.shape) if len(info.shape) > 1 else [None]
    if len(parts) == 1:
        return _as_float(checkpoint.get(name), round_to)
    out = torch.empty(info.shape, dtype=torch.float32)
    for rows in parts:
        t = checkpoint.get(name, rows)
        out[rows] = t.to(round_to) if round_to is not None else t
    return out


def _as_float(t: torch.Tensor, round_to: torch.dtype | None) -> torch.Tensor:
    """``t`` in fp32, rounded to ``round_to`` first (what a cast to it would store)."""
    return (t.to(round_to) if round_to is not None else t).float()


_PROBE = torch.zeros(1, 1)  # a stand-in where only the module key of a tensor is wanted


def _owners(module: torch.nn.Module, arch, names: dict[str, str], aliases: dict[str, list[str]],
            source) -> dict[str, dict[str, str]]:
    """Owner module path -> {parameter name in it: stored tensor}, for tensors outside the
    blocks, every name that shares a parameter included (a tied head and its embedding)."""
    owners: dict[str, dict[str, str]] = defaultdict(dict)
    for layout_name, stored in names.items():
        for key in arch.module_tensors(module, {layout_name: _PROBE}, source):
            for alias in aliases.get(key, [key]):
                path, _, name = alias.rpartition(".")
                owners[path][name] = stored
    return dict(owners)


def _fill_unstored(module: torch.nn.Module, where=lambda p: True) -> None:
    """Zeros for parameters the checkpoint does not hold (an optional pooler or mask token
    a module builds anyway): they never feed the primary output, but must be real."""
    for name, p in list(module.named_parameters()):
        if p.device.type == "meta" and where(p):
            _assign(module, name, torch.zeros(p.shape))


def _aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name sharing that parameter (a tied head and its embedding)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, p in module.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    return {name: names for names in groups.values() for name in names}


def _load(module: torch.nn.Module, key: str, tensor: torch.Tensor, source: SourceModel, label: str | None = None) -> None:
    """``_assign`` a stored tensor, if it has the shape the config gives the module: a size
    the layout does not describe (BERT's type_vocab_size, say) is checked only here."""
    _check_shape(module.get_parameter(key).shape, tensor.shape, label or key, source)
    _assign(module, key, tensor)


def _check_shape(built, stored, label: str, source: SourceModel) -> None:
    if tuple(stored) != tuple(built):
        raise CheckpointError(f"parameter {label} is {list(stored)} in the weights but {list(built)} by "
                              "config.json", path=source.checkpoint.config_path or source.path,
                              hint="the config and the weights disagree: fix the config value behind that size")


def _assign(module: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    path, _, name = key.rpartition(".")
    owner = module.get_submodule(path) if path else module
    owner._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
