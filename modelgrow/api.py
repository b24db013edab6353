"""The public Python API: everything the command line does, as calls.

    import modelgrow

    grown = modelgrow.convert("small/", "grown/", width="2x", depth="2x")
    assert grown.exact and grown.verified
    trained = modelgrow.train("grown/", "trained/", data=["corpus.txt"], steps=200)
    modelgrow.export("trained/", "trained.onnx")

Every keyword is an option declared once (modelgrow.options): the same names, checks
and defaults as the flags of the matching command. Results are typed (modelgrow.results)
and serialise to the JSON report schemas. The CLI parses, calls these and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import grow, hub, signals, trainer
from .compare import VerifyOptions, VerifyResult, compare
from .checkpoint import open_checkpoint
from .describe import describe
from .drafting import Draft, draft_layout as draft_layout_of
from .destination import check_outputs, source_inputs
from .engine.state import find_state, read_state
from .errors import UsageError
from .onnx_export import ExportOptions, data_path, export_onnx, preflight
from .fit import FitOptions
from .grow import ConvertOptions
from .plan import GrowthSpec
from .results import ConvertResult, ExportResult, TrainResult
from .source import open_source
from .train_options import TrainOptions, TrainRun, checkpoints_dir

PathLike = str | Path


def convert(source: PathLike, dest: PathLike | None = None, spec: GrowthSpec | dict | None = None, *,
            operator: str = "copy", operator_options: dict[str, Any] | None = None,
            fit: FitOptions | dict[str, Any] | None = None, progress: bool = False, **options: Any) -> ConvertResult:
    """Grow the checkpoint at ``source`` into the folder ``dest``.

    ``options`` are GrowthSpec fields (``width``, ``depth``, ``heads``, ``kv_heads``,
    ``ffn``, ``depth_mode``), ConvertOptions fields (``verify``, ``dry_run``,
    ``overwrite``, ``max_shard_size``, ``report``, ``onnx``, ...) and otherwise the
    operator's own (``noise``, ``seed``, ``rank``, ...; also as ``operator_options``).
    ``fit`` is a learned operator's FitOptions. With ``onnx`` the grown model is also
    exported and checked. ``source`` may be a Hugging Face Hub id (``org/name[@revision]``)
    when no local path has that name (modelgrow.hub).
    """
    sizes = {k: options.pop(k) for k in list(options) if k in GrowthSpec.model_fields}
    spec = GrowthSpec.parse(spec, **sizes)
    run = ConvertOptions.parse({k: options.pop(k) for k in list(options) if k in ConvertOptions.model_fields})
    operator_options = {**(operator_options or {}), **options}  # the operator refuses what it does not take
    if dest is None and not run.dry_run:
        raise UsageError("give -o/--output, or --dry-run to only print the plan")
    fitting = FitOptions.parse(fit) if fit else None
    source, from_hub = hub.resolve(source)
    # Every output is checked, a dry run's too: it says whether the real run would start.
    outputs = {"--report": run.report, "-o/--output": dest, "--onnx": run.onnx,
               "--onnx data": data_path(run.onnx) if run.onnx else None}
    _check_paths(source, run.config, outputs, report=run.report, data=(fitting.data or ()) if fitting else (),
                 tokenizer=fitting.tokenizer if fitting else None)
    if run.onnx is not None:
        preflight(run.onnx, overwrite=run.overwrite)  # refuse before growing, not after
    if not run.dry_run:
        signals.expect(dest, run.onnx, run.report)  # an interruption then says which of them exist
    report = grow.convert(
        source, dest, spec, operator=operator, operator_options=operator_options,
        config_path=run.config, max_shard_size=run.max_shard_size, overwrite=run.overwrite, verify=run.verify,
        dry_run=run.dry_run, allow_nonfinite=run.allow_nonfinite, report_path=run.report, progress=progress,
        fit_options=fit, dtype=run.dtype, keep_card=run.keep_card, hub=from_hub, preflight=run.preflight,
    )
    onnx = None
    if run.onnx is not None and "output" in report:
        onnx = export(dest, run.onnx, overwrite=run.overwrite)
    return ConvertResult(report, onnx=onnx)


def verify(source: PathLike, grown: PathLike, *, check: bool = False, **options: Any) -> VerifyResult:
    """Run ``source`` and ``grown`` on the same random inputs and compare their outputs.

    ``check=True`` raises VerificationError (exit code 4 on the CLI) when they differ.
    """
    o = VerifyOptions.parse(options)
    source, _ = hub.resolve(source)
    with open_source(source, o.config) as s, open_source(grown) as g:
        result = compare(s, g, batch=o.batch, seq=o.seq, seed=o.seed)
    if check and not result.passed:
        raise result.failure(source, grown)
    return result


def train(source: PathLike, dest: PathLike, options: TrainOptions | dict[str, Any] | None = None, *,
          progress: bool = False, **fields: Any) -> TrainResult:
    """Continue training ``source`` and write the dense result to ``dest``.

    ``options``/``fields`` are TrainOptions (``data``, ``steps``, ``lr``, ``relora``, ...)
    and TrainRun fields (``resume``, ``overwrite``, ``report``, ``config``, ``max_shard_size``).
    """
    given = options.model_dump(exclude_unset=True) if isinstance(options, TrainOptions) else dict(options or {})
    given.update(fields)
    where = TrainRun.parse({k: given.pop(k) for k in list(given) if k in TrainRun.model_fields})
    o = TrainOptions.parse(given)
    source, from_hub = hub.resolve(source)
    state = find_state(where.resume) if where.resume is not None else None  # the step folder actually read
    if state is not None:
        o = o.resumed(read_state(state), state)  # its options, unless given again: its data is an input too
    data = [*(o.data or ()), *(o.val_data or ())]
    _check_paths(source, where.config, {"-o/--output": dest, "--report": where.report, "--plot": o.plot},
                 report=where.report, plot=o.plot, data=data, tokenizer=o.tokenizer, resume=state)
    # Step folders go beside OUT; a resume state may lie among them.
    _check_paths(source, where.config, {"--save-every step folders": checkpoints_dir(dest)}, data=data,
                 tokenizer=o.tokenizer)
    report = trainer.train(source, dest, o, overwrite=where.overwrite, resume=where.resume,
                           progress=progress, report_path=where.report, config_path=where.config,
                           max_shard_size=where.max_shard_size, dtype=where.dtype, keep_card=where.keep_card,
                           hub=from_hub)
    return TrainResult(report)


def export(source: PathLike, dest: PathLike, **options: Any) -> ExportResult:
    """Export ``source`` to the ONNX file ``dest`` and check it with onnxruntime.

    ``options`` are ExportOptions fields: ``opset``, ``check``, ``external_data``,
    ``overwrite``, ``config``, ``report``.
    """
    o = ExportOptions.parse(options)
    source, _ = hub.resolve(source)
    signals.expect(o.report)
    _check_paths(source, o.config, {"-o/--output": dest, "the external data file": data_path(dest), "--report": o.report},
                 report=o.report)
    report = export_onnx(source, dest, opset=o.opset, check=o.check, external_data=o.external_data,
                         overwrite=o.overwrite, config_path=o.config)
    result = ExportResult(report)
    if o.report is not None:
        result.write(o.report)
        signals.committed(o.report)
    return result


def _check_paths(source: PathLike, config: PathLike | None, outputs: dict[str, Any], *, report=None, plot=None,
                data=(), tokenizer=None, resume=None) -> None:
    """The one rule for output paths (modelgrow.destination), before any work."""
    folders = {"-o/--output", "--save-every step folders"}
    with open_checkpoint(source, config) as ckpt:
        inputs = source_inputs(ckpt, data=data, tokenizer=tokenizer, resume=resume)
    replaced = {what: kind for what, kind, path in (("--report", "report", report), ("--plot", "plot", plot)) if path}
    check_outputs(inputs, outputs, folders=folders & set(outputs), replaced=replaced)


def inspect(path: PathLike, *, config: PathLike | None = None, tensors: bool = False) -> dict[str, Any]:
    """A checkpoint's architecture, sizes, parameter count (and every tensor's axis roles)."""
    return describe(hub.resolve(path)[0], config, tensors=tensors)


def draft_layout(source: PathLike, dest: PathLike | None = None, *, config: PathLike | None = None,
                 overwrite: bool = False) -> Draft:
    """Draft a layout for ``source``, an architecture no plugin knows (schemas/LAYOUT.md).

    The Draft holds the layout (``layout``, a dict that validates; ``to_json()`` formats
    it like the built-in files) and ``checks``: what the weights cannot show, for the
    author to confirm. With ``dest`` the JSON is also written there, atomically; an
    existing file only with ``overwrite``.
    """
    if dest is not None:
        _check_paths(source, config, {"-o/--output": dest})
    draft = draft_layout_of(source, config)
    if dest is not None:
        draft.write(dest, overwrite=overwrite)
    return draft


__all__ = ["convert", "verify", "train", "export", "inspect", "draft_layout", "ConvertResult", "TrainResult", "ExportResult",
           "VerifyResult", "GrowthSpec", "FitOptions", "TrainOptions"]
