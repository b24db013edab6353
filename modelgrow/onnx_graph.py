"""Building the ONNX graph: example shapes and dynamic axes, a quiet exporter whose
failures read as one line, and the initializer tidying that stores every weight once.

Used by modelgrow/onnx_export.py; imports nothing from onnx itself (the ``ir`` module is
passed in by the caller, which imports the optional extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import sys
import warnings
from typing import Any

import numpy as np
import torch

from .source import SourceModel


def fit_shape(shape: tuple[int, int], source: SourceModel) -> tuple[int, int]:
    """A (batch, seq) the model accepts: no more tokens than it has positions."""
    batch, seq = shape
    positions = source.dims.positions
    return batch, min(seq, positions) if positions else seq


def dynamic_axes(source: SourceModel, example: dict[str, torch.Tensor],
                 shape: tuple[int, int]) -> dict[str, dict[int, str]]:
    """Which axis of each input is the batch and which the sequence.

    ``example`` holds the inputs the architecture made for ``shape`` (batch, seq); the
    axes are found by asking it for inputs one batch row and one token larger (image
    inputs, say, have a batch axis but a fixed size otherwise).
    """
    batch, seq = shape
    gen = torch.Generator().manual_seed(0)
    more_rows = source.arch.example_inputs(source.config, batch + 1, seq, gen)
    more_tokens = source.arch.example_inputs(source.config, *fit_shape((batch, seq + 1), source), gen)
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in example.items():
        axes[name] = {}
        for i, size in enumerate(tensor.shape):
            if more_rows[name].shape[i] != size:
                axes[name][i] = "batch"
            elif more_tokens[name].shape[i] != size:
                axes[name][i] = "seq"
    return axes


# -- the exporter -------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_exporter():
    """Keep the exporter's chatter off the terminal; collect its warnings for the report.

    It warns about things that are not the user's business (torchvision missing, dim
    names merged because every input shares batch and seq), and on a failure torch.export
    prints partial graphs to stderr: the one-line error says what failed, the chained
    exception has the detail, and MODELGROW_DEBUG=1 shows the captured text.
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch.fx", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("always")
            yield caught
    except BaseException:
        if os.environ.get("MODELGROW_DEBUG"):
            sys.stderr.write(chatter.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException) -> str:
    """The exception's first line, plus its root cause's (the exporter wraps the real one)."""

    def first(e: BaseException) -> str:
        lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
        return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    if root is exc:
        text = first(exc)
    else:  # the wrapper's first sentence says which step failed; the rest is advice
        text = f"{first(exc).split('. ')[0].rstrip('.')}: {first(root)}"
    return text if len(text) <= 400 else text[:397] + "..."


# -- the graph's weights ------------------------------------------------------------------


def tidy_initializers(ir, model, module: torch.nn.Module) -> dict[str, int]:
    """Give initializers the checkpoint's names and store every weight once.

    The exporter names weights after the wrapper ("model.transformer.wte.weight"), and
    its constant folding can leave a tied embedding twice: as is for the lookup and
    transposed for the output head. Copies the exporter made are merged; a transposed
    copy becomes a Transpose node, which onnxruntime folds again in memory at load time.
    Two weights of the module that merely hold equal values (zeroed blocks of a grown
    model, say) stay apart: each keeps its name.
    """
    graph = model.graph
    # Initializer name -> the module tensor it came from; tied names share one tensor.
    owner = {f"model.{name}": id(t) for name, t in module.named_parameters(remove_duplicate=False)}
    owner |= {f"model.{name}": id(t) for name, t in module.named_buffers(remove_duplicate=False)}

    def distinct_weights(a, b) -> bool:
        return a.name in owner and b.name in owner and owner[a.name] != owner[b.name]

    merged = transposed = 0
    kept: dict[tuple, Any] = {}
    for value in list(graph.initializers.values()):
        array = value.const_value.numpy()
        key = (array.dtype.str, array.shape, _digest(array))
        first = kept.setdefault(key, value)
        if first is not value and not distinct_weights(first, value):
            _replace(graph, value, first)
            merged += 1
    # Only folded constants (not the module's own weights) are candidates to be undone.
    shapes = {(k[0], k[1]) for k in kept}
    for (dtype, shape, _), value in list(kept.items()):
        if value.name in owner or len(shape) != 2 or (dtype, shape[::-1]) not in shapes:
            continue
        flipped = value.const_value.numpy().T
        twin = kept.get((dtype, flipped.shape, _digest(flipped)))
        if twin is not None and twin is not value:
            node = ir.node("Transpose", inputs=[twin], attributes={"perm": [1, 0]})
            graph.insert_before(graph.node(0), node)
            _replace(graph, value, node.outputs[0])
            node.outputs[0].name = f"{twin.name}.T"
            transposed += 1
    for value in list(graph.initializers.values()):
        short = value.name[len("model."):] if value.name.startswith("model.") else None
        if short and short not in graph.initializers:
            value.name = short  # onnx_ir re-keys graph.initializers itself
    return {"merged_duplicates": merged, "unfolded_transposes": transposed}


def drop_stack_traces(ir, model) -> int:
    """Remove the Python stack the exporter records on each node: it holds absolute paths
    (site-packages, modelgrow's own files) and line numbers, so an export would publish
    local paths and its bytes would depend on where things are installed. Returns how many
    were dropped."""
    dropped = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key in [k for k in node.metadata_props if k.endswith("stack_trace")]:
            del node.metadata_props[key]
            dropped += 1
    return dropped


def initializer_bytes(model) -> int:
    """Bytes of all the graph's weights (what decides whether they go to external data)."""
    values = model.graph.initializers.values()
    return sum(int(v.const_value.nbytes) for v in values if v.const_value is not None)


def _digest(array: np.ndarray) -> bytes:
    # Bytes of the C-order layout, hashed without a copy when the array already has it.
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).digest()


def _replace(graph, old, new) -> None:
    old.replace_all_uses_with(new)
    graph.initializers.pop(old.name)
