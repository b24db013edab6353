"""Export a checkpoint to ONNX and prove the file computes what PyTorch computes.

The graph comes from ``torch.onnx.export(..., dynamo=True)`` run on the module the
architecture plugin builds, reduced to one output: the architecture's primary one
(logits for LM heads, the last hidden state for bare encoders). Batch and sequence are
dynamic. The graph is fp32 whatever the checkpoint stores (the module is built in fp32).
onnxruntime then runs the file on shapes other than the export example and its outputs
must match eager PyTorch; only then does the file appear at the destination.

An export with external data is two files, ``NAME.onnx`` and ``NAME.onnx.data``: the
graph names the data file relatively, so the pair is one artefact to be moved together.

onnx, onnxscript and onnxruntime are the optional ``modelgrow[onnx]`` extra; they are
imported only when an export runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
# The checkpoint writer's staging conventions, so a crashed export is cleaned up alike.
from .checkpoint.writer import TMP_MARKER, _output_error, _remove_stale_temp_folders, _unique_sibling
from .architecture import PrimaryOutput
from .errors import ModelgrowError, OutputError, UsageError, VerificationError
from .source import SourceModel, load_module, open_source

MISSING_EXTRA = "ONNX export needs the onnx extra: pip install 'modelgrow[onnx]'"

# protobuf cannot serialise a message over 2 GiB; the weights go beside the graph well
# before that (the same margin torch.onnx uses). Tests lower it to exercise that path.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024

# torch.export specialises a dimension whose example size is 0 or 1 into a constant,
# so the example must use sizes that are neither.
EXAMPLE_SHAPE = (2, 8)
# (batch, tokens) the parity check runs; all differ from EXAMPLE_SHAPE so a dimension
# frozen at export time cannot pass unnoticed.
CHECK_SHAPES = ((3, 11), (1, 17))

# The dynamo exporter writes this operator set natively; older ones it silently ignores.
MIN_OPSET = 18

# Max abs difference, relative to max(1, largest reference output). An architecture
# can set ``onnx_atol`` when its kernels round differently (the export is always fp32).
DEFAULT_ATOL = 1e-4

# Latency is information, measured on a machine that may be busy: one thread per
# runtime (a thread pool on a shared machine stalls tens of times over) and the best of
# a few runs is what two runs of the check agree on.
LATENCY_RUNS = 5
LATENCY_BUDGET_S = 0.5  # per runtime; a big model gets fewer runs, not a long wait


def require_onnx():
    """Import the optional dependencies, or say how to install them."""
    try:
        import onnx  # noqa: F401 - the exporter needs it even if we do not call it
        import onnx_ir
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise UsageError(MISSING_EXTRA) from None
    return onnx_ir, onnxruntime


def data_path(dest: str | Path) -> Path:
    """The external-data file that belongs to ``dest`` (NAME.onnx -> NAME.onnx.data)."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".data")


def check_destination(dest: str | Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse a destination we could not or should not write, before any work is done."""
    dest = Path(dest)
    if not dest.name or dest.name in (".", ".."):
        raise OutputError("is not a usable file name", path=dest)
    if not dest.parent.is_dir():
        raise OutputError(f"parent folder {dest.parent} does not exist", path=dest)
    if dest.is_dir():
        raise OutputError("is a folder; give a file name such as model.onnx", path=dest)
    if dest.resolve() in {Path(p).resolve() for p in inputs}:
        raise OutputError("output path is the input", path=dest, hint="choose another -o/--output")
    if not overwrite:
        for path in (dest, data_path(dest)):
            if os.path.lexists(path):
                raise OutputError("exists; pass --overwrite to replace it", path=path)
    return dest


def preflight(dest: str | Path, *, overwrite: bool = False) -> None:
    """What `convert --onnx` checks before growing, so it cannot fail only at the end."""
    require_onnx()
    check_destination(dest, overwrite=overwrite)


def export_onnx(
    checkpoint_path: str | Path,
    dest: str | Path,
    *,
    opset: int = 18,
    check: bool = True,
    external_data: bool | None = None,
    overwrite: bool = False,
    config_path: str | Path | None = None,
    reference: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Export the checkpoint at ``checkpoint_path`` to ``dest`` (an .onnx file); return a report.

    external_data: True always writes ``dest.data`` beside the graph, False never, None
    when the weights exceed EXTERNAL_DATA_THRESHOLD. check: run the parity check (a
    failure raises VerificationError and writes nothing). reference: the module whose
    primary output the file must reproduce (default: the checkpoint's own module).
    """
    started = time.perf_counter()
    ir, ort = require_onnx()
    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} is too old: the exporter writes opset {MIN_OPSET} or newer",
                         hint=f"use --opset {MIN_OPSET} or higher")
    dest = Path(dest)
    with open_source(checkpoint_path, config_path) as source:
        check_destination(dest, overwrite=overwrite, inputs=_input_paths(source))
        module = _load(source)
        example = source.arch.example_inputs(source.config, *_fit(EXAMPLE_SHAPE, source), torch.Generator().manual_seed(0))
        names, output_name = list(example), source.arch.class_info(source.config)["output"]
        wrapper = PrimaryOutput(source.arch, source.config, module, names).eval()

        axes = _dynamic_axes(source, example)
        t0 = time.perf_counter()
        program, exporter_warnings = _run_exporter(wrapper, example, names, output_name, opset, axes)
        model = program.model
        written = model.opset_imports.get("")
        if written != opset:  # the version converter falls back quietly when it cannot convert
            raise ModelgrowError(f"the exporter wrote opset {written}, not the requested {opset}",
                                 hint=f"choose another --opset; {MIN_OPSET} always works")
        tidy = _tidy_initializers(ir, model, module)
        weight_bytes = sum(_nbytes(v.const_value) for v in model.graph.initializers.values())
        external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
        export_s = time.perf_counter() - t0

        report: dict[str, Any] = {
            "modelgrow_version": __version__,
            "command": "export",
            "source": {"path": str(checkpoint_path), "architecture": source.arch.name,
                       "class": source.arch.class_name(source.config)},
            "opset": opset,
            "dtype": "float32",
            "inputs": names,
            "outputs": [output_name],
            "dynamic_axes": axes,
            "example_shape": list(example[names[0]].shape),
            "initializers": {"count": len(model.graph.initializers), "bytes": weight_bytes, **tidy},
            "exporter_warnings": exporter_warnings,
        }
        with _output_errors(dest.parent, dest):
            _remove_stale_temp_folders(dest.parent, dest.name)
            staging = _unique_sibling(dest, TMP_MARKER)
            staging.mkdir()
        try:
            staged = staging / dest.name  # same name: the graph refers to NAME.onnx.data
            with _output_errors(staged, dest):
                ir.save(model, staged, external_data=data_path(staged).name if external else None)
            del program, model  # folded constants are copies: free them before onnxruntime loads its own
            t1 = time.perf_counter()
            if check:
                session = _session(ort, staged)
                ref = wrapper if reference is None else PrimaryOutput(source.arch, source.config, reference, names).eval()
                with _torch_threads(1):
                    report["parity"] = check_parity(session, ref, source, names, output_name)
                    report["latency"] = measure_latency(session, wrapper, source)
                del session
            else:
                report["parity"] = {"skipped": "--no-check"}
            check_s = time.perf_counter() - t1
            files = [_describe(staged)] + ([_describe(data_path(staged))] if external else [])
            _commit(staging, dest, external)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report["output"] = {
        "path": str(dest),
        "external_data": external,
        "files": files,
        "bytes": sum(f["bytes"] for f in files),
    }
    report["timings"] = {"export_s": export_s, "check_s": check_s, "total_s": time.perf_counter() - started}
    return report


# -- building and exporting ---------------------------------------------------------------


def _input_paths(source: SourceModel) -> tuple[Path, ...]:
    ckpt = source.checkpoint
    return (Path(ckpt.path), Path(ckpt.root), *(Path(f) for f in ckpt.files))


def _load(source: SourceModel) -> torch.nn.Module:
    try:
        return load_module(source)
    except NotImplementedError as exc:
        raise UsageError(str(exc)) from None


def _fit(shape: tuple[int, int], source: SourceModel) -> tuple[int, int]:
    """A (batch, seq) the model accepts: no more tokens than it has positions."""
    batch, seq = shape
    positions = source.dims.positions
    return batch, min(seq, positions) if positions else seq


def _dynamic_axes(source: SourceModel, example: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Which axis of each input is the batch and which the sequence, found by asking the
    architecture for inputs one batch row and one token larger (image inputs, say, have
    a batch axis but a fixed size otherwise)."""
    batch, seq = _fit(EXAMPLE_SHAPE, source)
    gen = torch.Generator().manual_seed(0)
    more_rows = source.arch.example_inputs(source.config, batch + 1, seq, gen)
    more_tokens = source.arch.example_inputs(source.config, *_fit((batch, seq + 1), source), gen)
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in example.items():
        axes[name] = {}
        for i, size in enumerate(tensor.shape):
            if more_rows[name].shape[i] != size:
                axes[name][i] = "batch"
            elif more_tokens[name].shape[i] != size:
                axes[name][i] = "seq"
    return axes


def _run_exporter(wrapper, example, names, output_name, opset, axes=None):
    """torch.onnx.export with dynamic batch and sequence; its failures become one line."""
    dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq")}
    axes = axes if axes is not None else {name: {0: "batch", 1: "seq"} for name in names}
    # forward(*inputs): the spec is one entry (the varargs tuple) holding one per input.
    dynamic_shapes = (tuple({i: dims[role] for i, role in axes[name].items()} for name in names),)
    try:
        with _quiet_exporter() as caught:
            program = torch.onnx.export(
                wrapper, tuple(example.values()), dynamo=True, opset_version=opset,
                input_names=names, output_names=[output_name], dynamic_shapes=dynamic_shapes,
                verbose=False, optimize=True,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything; report it in one line
        raise ModelgrowError(f"ONNX export failed: {_one_line(exc)}") from exc
    return program, sorted({str(w.message).splitlines()[0] for w in caught})


@contextlib.contextmanager
def _quiet_exporter():
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


def _one_line(exc: BaseException) -> str:
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


def _tidy_initializers(ir, model, module: torch.nn.Module) -> dict[str, int]:
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


def _digest(array: np.ndarray) -> bytes:
    # Bytes of the C-order layout, hashed without a copy when the array already has it.
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).digest()


def _replace(graph, old, new) -> None:
    old.replace_all_uses_with(new)
    graph.initializers.pop(old.name)


def _nbytes(tensor) -> int:
    return int(tensor.nbytes) if tensor is not None else 0


# -- committing ---------------------------------------------------------------------------


@contextlib.contextmanager
def _output_errors(path: Path, dest: Path):
    try:
        yield
    except OSError as err:
        raise _output_error(err.errno, err.strerror or str(err), path, dest) from err


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return {"name": path.name, "bytes": size, "sha256": digest.hexdigest()}


def _commit(staging: Path, dest: Path, external: bool) -> None:
    """Move the checked pair into place: the data first, so the graph never points at nothing."""
    data = data_path(dest)
    with _output_errors(dest, dest):
        if external:
            os.replace(staging / data.name, data)
        os.replace(staging / dest.name, dest)
        if not external and os.path.lexists(data):
            os.unlink(data)  # left by an earlier export with --overwrite; no longer referenced


# -- checking -----------------------------------------------------------------------------


def _session(ort, path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the graph is ours, its warnings are noise
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # see LATENCY_RUNS
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise VerificationError(f"onnxruntime cannot load the exported file: {_one_line(exc)}",
                                hint="nothing was written") from exc


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _feeds(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {name: t.numpy() for name, t in inputs.items()}


def _check_inputs(source: SourceModel, batch: int, seq: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    inputs = source.arch.example_inputs(source.config, batch, seq, gen)
    mask = inputs.get("attention_mask")
    if mask is not None and batch > 1 and seq > 2:
        # Right-pad the first row so the masking path is compared too, not only all-ones.
        mask[0, seq - seq // 3:] = 0
    return inputs


@torch.no_grad()
def check_parity(session, reference: torch.nn.Module, source: SourceModel, input_names: list[str],
                 output_name: str, *, shapes=CHECK_SHAPES, seed: int = 1) -> dict[str, Any]:
    """Run the file and ``reference`` on the same inputs; raise VerificationError on a mismatch."""
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if names != input_names or outputs != [output_name]:
        raise VerificationError(
            f"the exported graph has inputs {names} and outputs {outputs}; "
            f"expected {input_names} and [{output_name!r}]", hint="nothing was written")
    atol = getattr(source.arch, "onnx_atol", DEFAULT_ATOL)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for shape in shapes:
        batch, seq = _fit(shape, source)
        inputs = _check_inputs(source, batch, seq, gen)
        ref = reference(*inputs.values()).float().numpy()
        got = session.run([output_name], _feeds(inputs))[0]
        if got.shape != ref.shape:
            raise VerificationError(
                f"ONNX output {output_name!r} has shape {list(got.shape)}, PyTorch {list(ref.shape)} "
                f"at batch {batch} × {seq} tokens", hint="nothing was written")
        scale = max(1.0, float(abs(ref).max()))
        diff = float(abs(got.astype(ref.dtype) - ref).max())
        results.append({"batch": batch, "seq": seq, "shape": list(ref.shape), "max_abs_diff": diff,
                        "reference_max_abs": float(abs(ref).max()), "tolerance": atol * scale,
                        "passed": diff <= atol * scale})  # NaN compares False: it fails
    worst = max(results, key=lambda r: (not r["passed"], r["max_abs_diff"]))
    report = {"output": output_name, "atol": atol, "max_abs_diff": worst["max_abs_diff"],
              "passed": all(r["passed"] for r in results), "shapes": results}
    if not report["passed"]:
        raise VerificationError(
            f"ONNX output {output_name!r} differs from PyTorch by {worst['max_abs_diff']:.3g} "
            f"at batch {worst['batch']} × {worst['seq']} tokens (tolerance {worst['tolerance']:.3g})",
            hint="nothing was written")
    return report


@torch.no_grad()
def measure_latency(session, module: torch.nn.Module, source: SourceModel) -> dict[str, Any]:
    """Best-of-N CPU time of one forward pass in onnxruntime and in eager PyTorch (information only)."""
    batch, seq = _fit(CHECK_SHAPES[0], source)
    inputs = source.arch.example_inputs(source.config, batch, seq, torch.Generator().manual_seed(2))
    feeds, args = _feeds(inputs), tuple(inputs.values())
    ort_ms = _best_ms(lambda: session.run(None, feeds))
    torch_ms = _best_ms(lambda: module(*args))
    return {"batch": batch, "seq": seq, "onnxruntime_ms": ort_ms, "pytorch_ms": torch_ms,
            "ratio": ort_ms / torch_ms if torch_ms else None, "threads": 1}


def _best_ms(fn) -> float:
    fn()  # warm-up: first runs allocate buffers and pick kernels
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + LATENCY_BUDGET_S
    while len(times) < LATENCY_RUNS and (not times or time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return min(times)


# -- printing -----------------------------------------------------------------------------


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What the CLI prints about an export."""
    lines = []
    parity = report["parity"]
    if "skipped" in parity:
        lines.append(f"parity: skipped ({parity['skipped']})")
    else:
        shapes = ", ".join(f"{r['batch']}×{r['seq']}" for r in parity["shapes"])
        tol = max(r["tolerance"] for r in parity["shapes"])
        lines.append(f"parity: onnxruntime matches PyTorch on batch×tokens {shapes}: "
                     f"max |Δ {parity['output']}| = {parity['max_abs_diff']:.3g} (tolerance {tol:.3g})")
        lat = report["latency"]
        lines.append(f"latency ({lat['batch']}×{lat['seq']}, 1 CPU thread): onnxruntime {lat['onnxruntime_ms']:.2f} ms, "
                     f"PyTorch eager {lat['pytorch_ms']:.2f} ms (onnxruntime/eager {lat['ratio']:.2f}; best of a few runs, information only)")
    out = report["output"]
    names = " + ".join(f["name"] for f in out["files"])
    pair = "; keep the two files together" if out["external_data"] else ""
    lines.append(f"wrote {out['path']} ({names}, {out['bytes']:,} bytes, opset {report['opset']}, "
                 f"inputs {', '.join(report['inputs'])} -> {', '.join(report['outputs'])}{pair})")
    return lines
