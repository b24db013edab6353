"""Export a checkpoint to ONNX and prove the file computes what PyTorch computes.

The graph comes from ``torch.onnx.export(..., dynamo=True)`` run on the module the
architecture plugin builds, reduced to one output: the architecture's primary one
(logits for LM heads, the last hidden state for bare encoders). Batch and sequence are
dynamic. The graph is fp32 whatever the checkpoint stores (the module is built in fp32).
onnxruntime then runs the file on shapes other than the export example and its outputs
must match eager PyTorch; only then does the file appear at the destination.

An export with external data is two files, ``NAME.onnx`` and ``NAME.onnx.data``: the
graph names the data file relatively, so the pair is one artefact to be moved together.
An --overwrite of such a pair writes the new data as ``NAME.onnx.alt.data`` (and the
next one as ``NAME.onnx.data`` again), so that the graph at NAME.onnx always names a
complete data file, whenever the export is killed (``commit_pair``).

onnx, onnxscript and onnxruntime are the optional ``modelgrow[onnx]`` extra; they are
imported only when an export runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from . import signals
from .version import __version__
from .architecture import PrimaryOutput
# The checkpoint writer's staging conventions, so a crashed export is cleaned up alike.
from .checkpoint.atomic import (fsync_path, hash_and_fsync, make_staging_folder, output_errors, remove_path,
                                remove_stale_temps)
from .options import Options, option
from .destination import check_outputs, source_inputs
from .errors import ModelgrowError, OutputError, UsageError
from .onnx_check import check_parity, measure_latency, open_session, torch_threads
from .onnx_graph import drop_stack_traces, dynamic_axes, fit_shape, initializer_bytes, one_line, quiet_exporter, tidy_initializers
from .source import SourceModel, load_module, open_source

MISSING_EXTRA = "ONNX export needs the onnx extra: pip install 'modelgrow[onnx]'"

# protobuf cannot serialise a message over 2 GiB; the weights go beside the graph well
# before that (the same margin torch.onnx uses). Tests lower it to exercise that path.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024

# torch.export specialises a dimension whose example size is 0 or 1 into a constant,
# so the example must use sizes that are neither (and differ from onnx_check.CHECK_SHAPES).
EXAMPLE_SHAPE = (2, 8)

# The dynamo exporter writes this operator set natively; older ones it silently ignores.
MIN_OPSET = 18
# The newest its version converter (onnxscript's SUPPORTED_MAX_ONNX_OPSET) reaches; a newer
# --opset is refused when the options are read, before any export.
MAX_OPSET = 25


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
    if not dest.name or dest.name in (".", ".."):
        raise OutputError("is not a usable file name", path=dest, hint="give a file name such as model.onnx")
    return dest.with_name(dest.name + ".data")


def check_destination(dest: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a destination we could not or should not write, before any work is done."""
    try:
        return _check_destination(Path(dest), overwrite)
    except OSError as exc:  # a name too long for the file system, a loop of links, no permission
        raise OutputError(f"cannot be written there: {exc.strerror or exc}", path=dest,
                          hint="choose another path") from None


def _check_destination(dest: Path, overwrite: bool) -> Path:
    if not dest.name or dest.name in (".", ".."):
        raise OutputError("is not a usable file name", path=dest)
    if not dest.parent.is_dir():
        raise OutputError(f"parent folder {dest.parent} does not exist", path=dest)
    if dest.is_dir():
        raise OutputError("is a folder; give a file name such as model.onnx", path=dest)
    if not overwrite:
        for path in (dest, data_path(dest), alt_data_path(dest)):
            if os.path.lexists(path):
                raise OutputError("exists; pass --overwrite to replace it", path=path)
    return dest


def preflight(dest: str | Path, *, overwrite: bool = False) -> None:
    """What `convert --onnx` checks before growing, so it cannot fail only at the end."""
    require_onnx()
    check_destination(dest, overwrite=overwrite)


class ExportOptions(Options):
    """How `modelgrow export` writes and checks the graph."""

    kind = "export"

    config: Path | None = option(None, "config.json, when not beside SOURCE.")
    opset: int = option(18, f"ONNX operator set ({MIN_OPSET} to {MAX_OPSET}).", ge=MIN_OPSET, le=MAX_OPSET, strict=True)
    check: bool = option(True, "Run the file in onnxruntime on new shapes and compare it with PyTorch.")
    external_data: bool | None = option(None, "Store the weights in OUTPUT.data [default: only past 1.5 GiB].")
    overwrite: bool = option(False, "Replace OUTPUT (and OUTPUT.data) if they exist.")
    report: Path | None = option(None, "Write a JSON report of the run here; - (or /dev/stdout) prints it, like --json.")


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
        check_destination(dest, overwrite=overwrite)
        check_outputs(source_inputs(source), {"-o/--output": dest, "the external data file": data_path(dest)})
        signals.expect(dest)
        module = source.arch.prepare_for_export(_load(source), source.config)
        shape = fit_shape(EXAMPLE_SHAPE, source)
        example = source.arch.example_inputs(source.config, *shape, torch.Generator().manual_seed(0))
        names, output_name = list(example), source.arch.class_info(source.config)["output"]
        wrapper = PrimaryOutput(source.arch, source.config, module, names).eval()

        axes = dynamic_axes(source, example, shape)
        t0 = time.perf_counter()
        program, exporter_warnings = _run_exporter(wrapper, example, names, output_name, opset, axes)
        model = program.model
        written = model.opset_imports.get("")
        if written != opset:  # the version converter falls back quietly when it cannot convert
            raise ModelgrowError(f"the exporter wrote opset {written}, not the requested {opset}",
                                 hint=f"choose another --opset; {MIN_OPSET} always works")
        tidy = tidy_initializers(ir, model, module)
        drop_stack_traces(ir, model)
        weight_bytes = initializer_bytes(model)
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
            # What `modelgrow run REPORT` needs to export it again (modelgrow.recipe).
            "options": {"config": str(config_path) if config_path is not None else None, "opset": opset,
                        "check": check, "external_data": external_data},
            "cwd": os.getcwd(),
        }
        with output_errors(dest.parent, dest):
            remove_stale_temps(dest)
        staging = make_staging_folder(dest)
        try:
            staged = staging / dest.name  # same name: the graph refers to NAME.onnx.data
            with output_errors(staged, dest):
                ir.save(model, staged, external_data=data_path(staged).name if external else None)
            del program, model  # folded constants are copies: free them before onnxruntime loads its own
            t1 = time.perf_counter()
            if check:
                session = open_session(ort, staged)
                ref = wrapper if reference is None else PrimaryOutput(source.arch, source.config, reference, names).eval()
                with torch_threads(1):
                    report["parity"] = check_parity(session, ref, source, names, output_name)
                    report["latency"] = measure_latency(session, wrapper, source)
                del session
            else:
                report["parity"] = {"skipped": "--no-check"}
            check_s = time.perf_counter() - t1
            files = [_describe(staged)] + ([_describe(data_path(staged))] if external else [])
            used = commit_pair(staging, dest, external)
            if used is not None and used != data_path(dest):  # the graph now names the other data file
                files = [_describe(dest), {**files[1], "name": used.name}]
        finally:
            remove_path(staging)
    report["output"] = {
        "path": str(dest),
        "external_data": external,
        "files": files,
        "bytes": sum(f["bytes"] for f in files),
    }
    report["timings"] = {"export_s": export_s, "check_s": check_s, "total_s": time.perf_counter() - started}
    return report


# -- helpers ------------------------------------------------------------------------------


def _load(source: SourceModel) -> torch.nn.Module:
    try:
        return load_module(source)
    except NotImplementedError as exc:
        raise UsageError(str(exc)) from None


def _run_exporter(wrapper, example, names, output_name, opset, axes=None):
    """torch.onnx.export with dynamic batch and sequence; its failures become one line."""
    dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq")}
    axes = axes if axes is not None else {name: {0: "batch", 1: "seq"} for name in names}
    # forward(*inputs): the spec is one entry (the varargs tuple) holding one per input.
    dynamic_shapes = (tuple({i: dims[role] for i, role in axes[name].items()} for name in names),)
    try:
        with quiet_exporter() as caught:
            program = torch.onnx.export(
                wrapper, tuple(example.values()), dynamo=True, opset_version=opset,
                input_names=names, output_names=[output_name], dynamic_shapes=dynamic_shapes,
                verbose=False, optimize=True,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything; report it in one line
        raise ModelgrowError(f"ONNX export failed: {one_line(exc)}") from exc
    return program, sorted({str(w.message).splitlines()[0] for w in caught})


def _describe(path: Path) -> dict[str, Any]:
    size, sha256 = hash_and_fsync(path)
    return {"name": path.name, "bytes": size, "sha256": sha256}


def alt_data_path(dest: str | Path) -> Path:
    """The other name for the data: taken by an --overwrite while the old graph reads OUTPUT.data."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".alt.data")


def commit_pair(staging: Path, dest: Path, external: bool) -> Path | None:
    """Move the checked pair into place so that a kill at any moment leaves a whole pair; return the data file.

    The graph at ``dest`` only ever names a data file that is complete: the new data goes
    in under a name the old graph does not read (OUTPUT.data, or OUTPUT.alt.data when the
    old graph reads OUTPUT.data), the graph is renamed last, and the old data is removed
    after. (A hard link back to OUTPUT.data would leave a window in which onnx refuses the
    file as a "hardlink attack"; a copy would double the disk used.) SIGTERM and friends
    wait for the end of this (modelgrow.signals.committing); a SIGKILL can leave only an
    unreferenced data file behind, which the next --overwrite removes.
    """
    data, alt = data_path(dest), alt_data_path(dest)
    with output_errors(dest, dest), signals.committing(dest):
        if not external:
            os.replace(staging / dest.name, dest)
            _remove(data, alt)  # an earlier export's data: the new graph holds its weights
            used = None
        else:
            old = _referenced(dest)
            used, other = (alt, data) if data.name in old else (data, alt)
            if used == alt:
                _relocate(staging / dest.name, alt.name)
            os.replace(staging / data.name, used)
            os.replace(staging / dest.name, dest)
            _remove(other)  # the old data (or a killed export's), which the new graph does not read
        fsync_path(dest.parent)
    return used


def _referenced(graph: Path) -> set[str]:
    """The external data files an existing graph reads (none if it has no graph)."""
    if not graph.is_file() or not (data_path(graph).exists() or alt_data_path(graph).exists()):
        return set()
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a graph we can read: protect both names
        return {data_path(graph).name, alt_data_path(graph).name}
    return {e.value for t in _tensors(model) for e in t.external_data if e.key == "location"}


def _tensors(model):
    """Every TensorProto of a model: initializers and tensor attributes, subgraphs included."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _relocate(graph: Path, location: str) -> None:
    """Rewrite ``graph`` in place so that every external tensor is read from ``location``."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for t in _tensors(model):
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    tmp = graph.with_name(graph.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, graph)


def _remove(*paths: Path) -> None:
    for path in paths:
        if os.path.lexists(path) and not path.is_dir():
            os.unlink(path)


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
