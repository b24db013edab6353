"""Checking an exported ONNX file: onnxruntime must reproduce eager PyTorch on shapes
other than the export example (parity), and how long one forward pass takes in each
(latency, information only).

Used by modelgrow/onnx_export.py before the file is moved to its destination; the
onnxruntime module is passed in by the caller, which imports the optional extra.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from .errors import VerificationError
from .onnx_graph import fit_shape, one_line
from .source import SourceModel

# (batch, tokens) the parity check runs; all differ from the export's example shape so
# a dimension frozen at export time cannot pass unnoticed.
CHECK_SHAPES = ((3, 11), (1, 17))

# Max abs difference, relative to max(1, largest reference output). An architecture
# can set ``onnx_atol`` when its kernels round differently (the export is always fp32).
DEFAULT_ATOL = 1e-4

# Latency is information, measured on a machine that may be busy: one thread per
# runtime (a thread pool on a shared machine stalls tens of times over) and the best of
# a few runs is what two runs of the check agree on.
LATENCY_RUNS = 5
LATENCY_BUDGET_S = 0.5  # per runtime; a big model gets fewer runs, not a long wait


def open_session(ort, path: Path):
    """An onnxruntime CPU session on the file, single-threaded (see LATENCY_RUNS)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the graph is ours, its warnings are noise
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise VerificationError(f"onnxruntime cannot load the exported file: {one_line(exc)}",
                                hint="nothing was written") from exc


@contextlib.contextmanager
def torch_threads(n: int):
    """Run eager PyTorch on ``n`` threads inside the block (compared like for like)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        batch, seq = fit_shape(shape, source)
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
    batch, seq = fit_shape(CHECK_SHAPES[0], source)
    inputs = source.arch.example_inputs(source.config, batch, seq, torch.Generator().manual_seed(2))
    feeds, args = _feeds(inputs), tuple(inputs.values())
    ort_ms = _best_ms(lambda: session.run(None, feeds))
    torch_ms = _best_ms(lambda: module(*args))
    return {"batch": batch, "seq": seq, "onnxruntime_ms": ort_ms, "pytorch_ms": torch_ms,
            "ratio": ort_ms / torch_ms if torch_ms else None, "threads": 1}


def _feeds(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {name: t.numpy() for name, t in inputs.items()}


def _check_inputs(source: SourceModel, batch: int, seq: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    inputs = source.arch.example_inputs(source.config, batch, seq, gen)
    mask = inputs.get("attention_mask")
    if mask is not None and batch > 1 and seq > 2:
        # Right-pad the first row so the masking path is compared too, not only all-ones.
        mask[0, seq - seq // 3:] = 0
    return inputs


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
