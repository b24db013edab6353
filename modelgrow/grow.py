"""The conversion pipeline: read → plan → operator → write (staged) → verify → commit.

Everything the CLI's `convert` does is here, callable from Python. Tensors stream one
at a time from the memory-mapped source into byte-bounded shards; the destination only
appears, complete, after verification passed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import plugins, signals
from .version import __version__
from .card import Recipe, convert_card, source_label, write_card
from .checkpoint import CheckpointWriter, dtypes, parse_size, tagalong
from .checkpoint.marker import check_target
from .checkpoint.dtypes import DtypeName
from .checkpoint.sizes import ShardSize, row_parts
from .checkpoint.identity import source_digest, source_identity
from .destination import check_destination
from .options import Options, option
from .errors import InputError, ModelgrowError, OutputError, UsageError, VerificationError
from .fit import FitOptions, is_writer, prepare_fit
from .growth_map import GROWTH_MAP, growth_map
from .train_options import recorded_final_lr
from .operators.upcycling import upcycled
from .plan import GrowthSpec, Plan, make_plan
from .preflight import Preflight
from .report import write_report
from .source import SourceModel, open_source
from .compare import compare

# Verification runs both models on the CPU; past this size it is opt-in (--verify).


class ConvertOptions(Options):
    """How a conversion runs and where its extras go (the growth itself: GrowthSpec)."""

    kind = "convert"

    config: Path | None = option(None, "config.json, when not beside SOURCE.")
    max_shard_size: ShardSize = option("2GB", "Largest shard in bytes; units KB/MB/GB (powers of 1000) or KiB/MiB/GiB.")
    overwrite: bool = option(False, "Replace OUTPUT if it exists (only once the new one is complete).")
    verify: bool | None = option(None, "Run both models and compare outputs, block by block, one block in memory at a "
                                       "time [default: on, at every size].")
    dry_run: bool = option(False, "Run every check, print the plan and the estimate, and stop (fit data is checked "
                                  "to exist, not read).")
    preflight: bool = option(True, "Before any work, estimate the grown model's size on disk and this run's peak "
                                   "memory and refuse (exit 2) a job that does not fit; --no-preflight tries anyway.")
    allow_nonfinite: bool = option(False, "Grow weights that hold NaN or Inf instead of refusing.")
    report: Path | None = option(None, "Write a JSON report of the run here; - (or /dev/stdout) prints it, like --json.")
    onnx: Path | None = option(None, "Also export the grown model to this .onnx file, checked like `modelgrow export` does.")
    dtype: DtypeName = option("source", "Store the grown weights as bf16, fp16 or fp32 (growth computes in fp32 either "
                                        "way); source: each tensor as the source stores it.")
    keep_card: bool = option(False, "Copy SOURCE's README.md (its model card) instead of writing a new card.")


def provenance(plan: Plan, operator_name: str, options: dict[str, Any], source_sha256: str) -> dict[str, str]:
    """safetensors metadata (str -> str) saying where a grown checkpoint came from.

    The source by content (checkpoint/identity.py), never by path: the same source under
    any spelling gives byte-identical shards, and no local path is published with them.
    """
    return {
        "modelgrow.version": __version__,
        "modelgrow.source_sha256": source_sha256,
        "modelgrow.operator": operator_name,
        "modelgrow.options": json.dumps(options, sort_keys=True),
        "modelgrow.plan": json.dumps(
            {"source": plan.old.as_dict(), "target": plan.new.as_dict(), "depth_mode": plan.spec.depth_mode},
            sort_keys=True,
        ),
    }


def convert(
    source_path: str | Path,
    dest: str | Path | None,
    spec: GrowthSpec,
    *,
    operator: str = "copy",
    operator_options: dict[str, Any] | None = None,
    config_path: str | Path | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    verify: bool | None = None,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    report_path: str | Path | None = None,
    progress: bool = True,
    fit_options: dict[str, Any] | None = None,
    dtype: str = "source",
    keep_card: bool = False,
    hub: dict[str, Any] | None = None,
    preflight: bool = True,
) -> dict[str, Any]:
    """Grow the checkpoint at ``source_path`` into ``dest``; return the run's report.

    A learned operator (``op.learned``) is first fitted with ``fit_options`` (see
    modelgrow.fit.FitOptions); under torchrun every rank fits, rank 0 alone writes.
    ``dtype`` is what the weights are stored as (modelgrow.checkpoint.dtypes); ``hub``
    the Hub id the source was resolved from (modelgrow.hub), for the report and the card.
    The pre-flight (modelgrow.preflight; ``preflight=False`` skips its resource check)
    refuses a job that cannot fit before the plan lists a tensor; a dry run (``dry_run``
    or no ``dest``) runs every check the real run would, and stops.
    """
    started = time.perf_counter()
    run = ConvertOptions.parse(dtype=dtype, max_shard_size=max_shard_size, allow_nonfinite=allow_nonfinite, verify=verify,
                               preflight=preflight)
    timings: dict[str, float] = {}
    options = dict(operator_options or {})
    max_shard_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    dry_run = dry_run or dest is None
    with open_source(source_path, config_path) as source:
        # Opening reads the headers and checks the config, with transformers (imported here).
        timings["open_s"] = time.perf_counter() - started
        try:
            kind = plugins.get_operator(operator)
            gate = Preflight(source, spec, kind, options, dtype=run.dtype, verify=verify is not False, dest=dest,
                             check=run.preflight)
            plan = make_plan(source, spec, gate)  # refuses a job that cannot fit before listing any tensor
            casting = dtypes.describe(run.dtype, {source.checkpoint.info(b.name).dtype for b in source.bound()})
            if dtypes.cast_note(casting):  # before the operator takes the plan's promise
                plan.promise.notes.append(dtypes.cast_note(casting))
            op = upcycled(kind(plan, **options), plan)  # sparse upcycling: experts, router
        except ModelgrowError as err:
            # "target width 16 is smaller than the source's 32" must say which
            # checkpoint it is about when it is one line in a batch job's log.
            raise err.located(source_path) from None
        source_sha256 = source_digest(source_identity(source.checkpoint.files))
        timings["plan_s"] = time.perf_counter() - started
        report: dict[str, Any] = {
            "modelgrow_version": __version__,
            "command": "convert",
            "source": {"path": str(source_path), "params": plan.source_params(), "files": [str(f) for f in source.checkpoint.files],
                       "sha256": source_sha256, **({"hub": hub} if hub else {})},
            "plan": plan.summary(),
            "operator": {"name": op.name, "options": op.describe_options()},
            "promise": op.promise().as_dict(),
            "dry_run": dry_run,
            "dtype": casting,
            "estimate": gate.estimate.as_dict(),
            # What `modelgrow run REPORT` needs to make it again (modelgrow.replay): the options
            # given, and where relative paths start.
            "options": recorded_options(spec, op, run, config_path, keep_card, fit_options),
            "cwd": os.getcwd(),
        }
        if dest is not None:  # what CheckpointWriter would refuse, refused now (a dry run too)
            dest = Path(dest)
            check_destination(source, dest)
            check_target(dest, overwrite, clean=not dry_run)
        if verify is None:
            verify = True  # streamed: memory of one block, whatever the size
        # Fit options and data are checked now, before any output exists (a dry run reads no data).
        if fit_options and not op.learned:
            raise UsageError(f"fit options are for learned operators, and {op.name!r} is not one", hint="e.g. --operator ligo")
        fitting = prepare_fit(op, fit_options, read=not dry_run) if op.learned else None
        if dry_run:
            report["timings"] = timings
            write_report(report, report_path)
            return report
        if fitting is not None and not is_writer():
            report["fit"] = fitting.run(progress=False)  # a data-parallel helper rank: rank 0 writes
            return report
        with CheckpointWriter(dest, max_shard_bytes=max_shard_bytes, metadata=provenance(plan, op.name, op.describe_options(), source_sha256), overwrite=overwrite) as writer:
            if fitting is not None:
                t1 = time.perf_counter()
                report["fit"] = fitting.run(progress)
                report["promise"] = op.promise().as_dict()  # fitting moves it off the exact start
                timings["fit_s"] = time.perf_counter() - t1
            t0 = time.perf_counter()
            _write_tensors(plan, op, writer, allow_nonfinite, progress, dtypes.target_dtype(run.dtype))
            writer.write_json("config.json", dtypes.config_with_dtype(plan.config, run.dtype))
            writer.write_json(GROWTH_MAP, growth_map(plan, op.name, op.learned, source_final_lr(source)))
            report["tagalong"] = tagalong.write(writer, source.checkpoint.tagalong_found(), plan.old.residual,
                                                plan.new.residual)
            staged = writer.finish()
            timings["write_s"] = time.perf_counter() - t0
            # A source rewritten while it was read would give a mixed model: say so before
            # verification can blame the growth, and again right before publishing.
            source.checkpoint.verify_unchanged()
            if verify:
                t1 = time.perf_counter()
                cast = dtypes.target_dtype(run.dtype) if casting["rounds"] else None
                report["verify"] = _verify(source, staged, op.promise().exact, cast)
                timings["verify_s"] = time.perf_counter() - t1
            report["card"] = write_card(writer, source.checkpoint, convert_card(report, _recipe(hub, spec, op, fit_options, run)),
                                        keep_card, report["tagalong"]["left_behind"])
            source.checkpoint.verify_unchanged()
            with signals.committing(dest):
                files = writer.commit()
        report["output"] = {
            "path": str(dest),
            "params": plan.target_params(),
            "files": [{"name": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files],
        }
    timings["total_s"] = time.perf_counter() - started
    report["timings"] = timings
    try:
        write_report(report, report_path)
    except OutputError as err:  # the checkpoint is complete: say so, so a rerun is not a guess
        raise OutputError(f"{dest} was written, but the report could not be: {err.problem}", path=report_path) from None
    if report_path is not None:
        signals.committed(report_path)
    return report


def source_final_lr(source: SourceModel) -> tuple[float, str] | None:
    """The rate the source's training ended at, when a trainer_state.json beside it (or its
    own growth map) says: carried into the growth map for `train --lr-schedule continue`.
    Only a record: one that cannot be read is not this conversion's problem."""
    try:
        return recorded_final_lr(source.checkpoint.root)
    except ModelgrowError:
        return None


RECORDED = ("config", "max_shard_size", "verify", "dtype", "keep_card", "allow_nonfinite", "preflight")


def recorded_options(spec: GrowthSpec, op, run: ConvertOptions, config_path, keep_card: bool,
                     fit_options) -> dict[str, Any]:
    """The report's "options": the growth asked for, the operator's settings (as given: the report's
    "operator" says what they resolved to), the options that shape the output, the fit's."""
    convert = {**run.as_dict(), "config": str(config_path) if config_path is not None else None, "keep_card": keep_card}
    out = {"growth": {k: v for k, v in spec.as_dict().items() if v is not None}, "operator": op.settings.as_dict(),
           "convert": {k: convert[k] for k in RECORDED}}
    if fit_options:
        out["fit"] = FitOptions.parse(fit_options).as_dict()
    return out


def _recipe(hub, spec: GrowthSpec, op, fit_options, run: ConvertOptions) -> Recipe:
    """The command (and Python call) that grows this checkpoint again, for its card."""
    recipe = Recipe("convert", source_label(hub)).add(spec)
    if op.name != "copy":
        recipe.option("--operator", "operator", op.name)
    recipe.add(op.settings)
    if fit_options:
        recipe.add(FitOptions.parse(fit_options), nest="fit")
    return recipe.add(run)


def _write_tensors(plan: Plan, op, writer: CheckpointWriter, allow_nonfinite: bool, progress: bool,
                   cast: torch.dtype | None = None) -> None:
    stored = {t.name: dtypes.output_dtype(plan.source.info(t.spec, t.source_layer).dtype, cast) for t in plan.targets}
    # Every shard is laid out from the plan: each tensor is written into its place while
    # the next one grows, only a few are held (never a shard), and taken in the writer's
    # order each file is written front to back. (Growth does not depend on the order.)
    order = writer.declare([(t.name, tuple(t.shape), stored[t.name]) for t in plan.targets])
    by_name = {t.name: t for t in plan.targets}
    bar = tqdm([by_name[name] for name in order], desc="growing", unit="tensor", disable=not progress, leave=False)
    for target in bar:
        dtype = stored[target.name]
        parts = row_parts(target.shape) if op.grows_rows(target) else [None]
        if len(parts) == 1:  # grown whole: one fp32 tensor, then stored
            writer.add(target.name, _checked(plan, op, target, op.tensor(target), dtype, allow_nonfinite))
            continue
        # A large tensor (a vocabulary's embedding) is grown a slice of rows at a time into
        # its stored dtype: no fp32 copy of the whole grown tensor is ever held.
        out = torch.empty(target.shape, dtype=dtype)
        for rows in parts:
            out[rows] = _checked(plan, op, target, op.tensor(target, rows), dtype, allow_nonfinite)
        writer.add(target.name, out)
        del out  # the writing thread holds it until written; this name would keep it for the whole run


def _checked(plan: Plan, op, target, w: torch.Tensor, dtype: torch.dtype, allow_nonfinite: bool) -> torch.Tensor:
    """``w`` (the grown tensor, or a slice of its rows) in ``dtype``, refused if it holds NaN or Inf."""
    src = plan.source.stored_name(target.spec, target.source_layer)
    if not allow_nonfinite and w.is_floating_point() and not _all_finite(w):
        source_w = plan.source.get(target.spec, target.source_layer)
        if op.learned and (not source_w.is_floating_point() or _all_finite(source_w)):
            raise UsageError(f"the {op.name} operator grows the finite tensor {src!r} to NaN or Inf values "
                             "(its fit diverged)", hint="lower --fit-lr or fit for fewer steps; nothing was written")
        raise InputError(f"tensor {src!r} holds NaN or Inf values", path=plan.source.checkpoint.path,
                         hint="pass --allow-nonfinite to grow it anyway")
    narrowed, w = w.dtype != dtype, w.to(dtype).contiguous()
    if narrowed and not allow_nonfinite and w.is_floating_point() and not _all_finite(w):  # fp16 overflows at 65504
        raise InputError(f"tensor {src!r} grows to values beyond the range of {dtypes.short(dtype)}",
                         path=plan.source.checkpoint.path, hint="choose another --dtype (bf16 has fp32's range)")
    return w


def _all_finite(w: torch.Tensor) -> bool:
    # One reduction instead of an elementwise mask (3x faster on large tensors): a NaN
    # or Inf anywhere makes the sum non-finite. Only when the sum overflows does the
    # exact elementwise check have to decide.
    total = w.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(w).all())


def _verify(source: SourceModel, staged: Path, promised_exact: bool, cast: torch.dtype | None = None) -> dict:
    try:
        with open_source(staged) as grown:
            result = compare(source, grown, cast=cast)
    except NotImplementedError as exc:
        return {"skipped": str(exc)}
    out = result.as_dict()
    out["promised_exact"] = promised_exact
    if promised_exact and not result.passed:
        raise VerificationError(
            f"grown model differs from the source by {result.max_abs_diff:.3g} "
            f"(tolerance {result.tolerance:.3g}) although the growth is exact"
            + (f" (the cast to {result.cast['dtype']} alone moves it by {result.cast['max_abs_diff']:.3g})" if result.cast else ""),
            path=source.path,
            hint="nothing was written; please report this as a bug",
        )
    return out
