"""The command line: parses, calls the library, prints. Nothing here that Python can't do."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_VERIFY_FAILED, ModelgrowError
from .plan import DEPTH_MODES, GrowthSpec

SIZE_HELP = "a factor (2x, 1.5x) or an absolute size (1024)"


def handle_errors(fn):
    """A user's mistake is one line on stderr and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise  # click prints usage errors itself (exit code 2)
        except ModelgrowError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - a bug: say so in one line, trace on request
            if os.environ.get("MODELGROW_DEBUG"):
                traceback.print_exc()
            click.echo(
                f"internal error: {type(err).__name__}: {err} (a modelgrow bug; set MODELGROW_DEBUG=1 for the traceback)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="modelgrow")
def main():
    """Grow a small pretrained transformer checkpoint into a larger one.

    Exit codes: 0 success, 1 internal error, 2 bad usage, 3 bad input,
    4 verification failed, 5 output could not be written.
    """


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


# fit option -> the convert parameter click fills for it. The command reads them back from
# the click context; _fit_params_read_from_context keeps them out of its signature.
FIT_OPTIONS = {"data": "fit_data", "steps": "fit_steps", "lr": "fit_lr", "warmup": "fit_warmup",
               "weight_decay": "fit_weight_decay", "batch_size": "fit_batch_size", "seq_len": "fit_seq_len",
               "objective": "fit_objective", "tokenizer": "tokenizer", "device": "device"}


def _fit_params_read_from_context(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for name in FIT_OPTIONS.values():
            kwargs.pop(name, None)
        return fn(*args, **kwargs)

    return wrapper


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Folder to write the grown checkpoint to.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.json, when not beside SOURCE.")
@click.option("--width", help=f"Hidden size: {SIZE_HELP}.")
@click.option("--depth", help=f"Number of layers: {SIZE_HELP}.")
@click.option("--heads", help=f"Attention heads (head size never changes): {SIZE_HELP}.")
@click.option("--kv-heads", help=f"Key/value heads for grouped-query attention: {SIZE_HELP}.")
@click.option("--ffn", help=f"FFN hidden size: {SIZE_HELP}. Default: scaled with the width.")
@click.option("--depth-mode", type=click.Choice(DEPTH_MODES), default="identity", show_default=True,
              help="identity: inserted blocks add nothing (exact for pre-LN); interleave: 0,0,1,1,..; stack: 0,1,..,0,1,.. (not exact).")
@click.option("--operator", default="copy", show_default=True, help="Growth operator (see `modelgrow plugins`).")
@click.option("--noise", type=float, default=0.01, show_default=True,
              help="Symmetry-breaking noise, relative to each tensor's spread (0 for none).")
@click.option("--noise-mode", type=click.Choice(["exact", "plain"]), default="exact", show_default=True,
              help="exact: noise cancels across copies (function preserved); plain: noise everywhere.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for noise; same seed, same bytes.")
@click.option("--rank", type=int, help="mango: ring rank of the tensor-ring operator, 1 to 64 [default: 4].")
@click.option("--slot-grouping", help="mango: slices (matrices cut into residual-sized slots) or modules "
                                      "(one slot per matrix, zero-padded) [default: slices].")
@click.option("--ring-init", help="mango: ring channels beyond the copy map start at zero (copy) or as copies "
                                  "whose depth core is zero (echo); both exact [default: copy].")
@click.option("--ring-residual", help="mango: embeddings, norms and the head grow through their own residual "
                                      "map (separate) or the ring's channel 0 (tied) [default: separate].")
@click.option("--fit-data", "fit_data", multiple=True, type=click.Path(path_type=Path),
              help="Learned operators (ligo, mango): data to fit on: text (tokenised with --tokenizer), .npy ids, or raw "
                   ".bin ids (uint16, uint32 past 65,536 ids); repeat for more files. A learned operator refuses to run "
                   "without it unless --fit-steps 0, which writes its exact copy initialisation.")
@click.option("--fit-steps", type=int, help="Optimiser steps of the fit [default: 100].")
@click.option("--fit-lr", type=float, help="Peak learning rate: AdamW, linear warmup, cosine to 10% [default: 3e-5].")
@click.option("--fit-warmup", type=int, help="Warmup steps [default: 10% of --fit-steps].")
@click.option("--fit-weight-decay", type=float, help="AdamW weight decay of the operator's tensors [default: 0].")
@click.option("--fit-batch-size", type=int, help="Global batch in windows, split across torchrun processes [default: 16].")
@click.option("--fit-seq-len", type=int, help="Tokens per window [default: min(128, the model's positions)].")
@click.option("--fit-objective", type=click.Choice(["lm", "distill"]),
              help="lm: the model's own loss (causal LM, or masked LM 15%); distill: KL to the small model's logits "
                   "(zero at an exact start: for stack/interleave or post-LN growth) [default: lm].")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json for text --fit-data [default: the checkpoint's].")
@click.option("--device", help="Where to fit: auto, cpu, cuda or cuda:N; bf16 autocast on CUDA [default: auto].")
@_fit_params_read_from_context
@click.option("--max-shard-size", default="2GB", show_default=True,
              help="Largest shard in bytes; units KB/MB/GB (powers of 1000) or KiB/MiB/GiB.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@click.option("--verify/--no-verify", default=None, help="Run both models and compare outputs [default: on up to 300M parameters].")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@click.option("--allow-nonfinite", is_flag=True, help="Grow weights that hold NaN or Inf instead of refusing.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write a JSON report of the run here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or plan table.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path),
              help="Also export the grown model to this .onnx file, checked like `modelgrow export` does.")
@handle_errors
def convert(source, output, config_path, width, depth, heads, kv_heads, ffn, depth_mode, operator, noise,
            noise_mode, seed, rank, slot_grouping, ring_init, ring_residual, max_shard_size, overwrite, verify,
            dry_run, allow_nonfinite, report_path, quiet, onnx_path):
    """Grow SOURCE (a .safetensors file, a sharded index, or a Hugging Face folder)."""
    from .grow import convert as run

    if output is None and not dry_run:
        raise click.UsageError("give -o/--output, or --dry-run to only print the plan")
    if onnx_path is not None and not dry_run:
        from .export import preflight

        preflight(onnx_path, overwrite=overwrite)  # refuse before growing, not after
    spec = GrowthSpec(width=width, depth=depth, heads=heads, kv_heads=kv_heads, ffn=ffn, depth_mode=depth_mode)
    ctx = click.get_current_context().params
    fit_options = {key: ctx[opt] for key, opt in FIT_OPTIONS.items() if ctx[opt] not in (None, ())}
    operator_options = {"noise": noise, "noise_mode": noise_mode, "seed": seed}
    # Operator-specific options travel only when given; the operator checks them.
    given = {"rank": rank, "slot_grouping": slot_grouping, "ring_init": ring_init, "ring_residual": ring_residual}
    operator_options.update({k: v for k, v in given.items() if v is not None})
    report = run(
        source, None if dry_run else output, spec,
        operator=operator,
        operator_options=operator_options,
        config_path=config_path, max_shard_size=max_shard_size, overwrite=overwrite, verify=verify,
        dry_run=dry_run, allow_nonfinite=allow_nonfinite, report_path=report_path, progress=_progress(quiet),
        fit_options=fit_options,
    )
    if "fit" in report and not quiet:
        click.echo(format_fit(report["fit"]))
    if not quiet or dry_run:
        click.echo(format_plan(report))
    if "verify" in report:
        click.echo(format_verify(report["verify"]))
    if "output" in report:
        out = report["output"]
        size = sum(f["bytes"] for f in out["files"])
        click.echo(f"wrote {out['path']} ({len(out['files'])} files, {size:,} bytes) in {report['timings']['total_s']:.1f}s")
        if onnx_path is not None:
            from .export import export_onnx, summary_lines

            click.echo("\n".join(summary_lines(export_onnx(output, onnx_path, overwrite=overwrite))))


def format_fit(fit: dict) -> str:
    if not fit.get("loss_curve") and "eval" not in fit:
        return f"fit: {fit.get('note', 'no steps')}"
    ev, drift = fit["eval"], fit["drift"]
    loss = f"eval loss {ev['before']:.4f} -> {ev['after']:.4f}" if ev["before"] is not None else "no eval"
    return (f"fit: {fit['steps']} steps of {fit['objective']} ({fit['task']}) on {fit['device']} x{fit['world_size']}, "
            f"lr {fit['lr']:g}, batch {fit['batch_size']} x {fit['seq_len']}: {loss}; "
            f"operator drift {drift['relative']:.3g}; {fit['wall_s']:.1f}s, peak memory {fit['peak_memory']['bytes'] / 2**20:,.0f} MiB")


def format_plan(report: dict) -> str:
    plan, promise = report["plan"], report["promise"]
    rows = [f"{plan['architecture']} ({plan['class']}) · operator {report['operator']['name']} · depth mode {plan['depth_mode']}",
            f"{'':12}{'source':>12}{'target':>12}"]
    for key in ("residual", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab"):
        if plan["source"][key] is None:  # vision models have no vocabulary
            continue
        rows.append(f"{key:12}{plan['source'][key]:>12,}{plan['target'][key]:>12,}")
    ratio = plan["target_params"] / max(1, plan["source_params"])
    rows.append(f"{'parameters':12}{plan['source_params']:>12,}{plan['target_params']:>12,}  ({ratio:.2f}x)")
    exact = "yes" if promise["exact"] else "no"
    rows.append(f"function-preserving: {exact}" + "".join(f"\n  - {n}" for n in promise["notes"]))
    return "\n".join(rows)


def format_verify(v: dict) -> str:
    if "skipped" in v:
        return f"verify: skipped ({v['skipped']})"
    verdict = "matches" if v["passed"] else "differs from"
    return (f"verify: grown model {verdict} the source: max |Δ {v['output']}| = {v['max_abs_diff']:.3g} "
            f"(tolerance {v['tolerance']:.3g}, batch {v['batch']} × {v['seq']} tokens)")


@main.command("train")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--data", multiple=True, type=click.Path(path_type=Path), required=True,
              help="Training data: text (tokenised with --tokenizer), .npy ids or raw .bin ids; repeat for more files.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folder for the trained checkpoint: always dense, in SOURCE's format.")
@click.option("--val-data", multiple=True, type=click.Path(path_type=Path),
              help="Held-out data for the validation curve [default: the last --val-fraction of --data].")
@click.option("--val-fraction", type=float, help="Tail of the token stream held out for validation [default: 0.05].")
@click.option("--steps", type=int, help="Optimiser steps [default: 1000].")
@click.option("--lr", type=float, help="Peak learning rate: AdamW, linear warmup, cosine to --min-lr-ratio [default: 1e-3].")
@click.option("--warmup", type=int, help="Warmup steps [default: 10% of --steps, at most --relora-every].")
@click.option("--min-lr-ratio", type=float, help="Where the cosine ends, as a fraction of --lr [default: 0.1].")
@click.option("--weight-decay", type=float, help="AdamW weight decay of matrices and embeddings [default: 0.1].")
@click.option("--batch-size", type=int, help="Global batch in windows, split across torchrun processes [default: 16].")
@click.option("--seq-len", type=int, help="Tokens per window [default: min(128, the model's positions)].")
@click.option("--seed", type=int, help="Seed of data order, dropout and adapters [default: 0].")
@click.option("--device", help="auto, cpu, cuda or cuda:N; bf16 autocast on CUDA [default: auto].")
@click.option("--grad-clip", type=float, help="Gradient norm clip, 0 for none [default: 1.0].")
@click.option("--betas", type=(float, float), help="AdamW betas [default: 0.9 0.95].")
@click.option("--eval-every", type=int, help="Validation every N steps, 0 for only before and after [default: steps/10].")
@click.option("--eval-batches", type=int, help="Validation batches of --batch-size windows [default: 8].")
@click.option("--relora", is_flag=True, default=None,
              help="ReLoRA: train low-rank adapters on the layer matrices, merged every --relora-every steps.")
@click.option("--rank", type=int, help="ReLoRA adapter rank [default: 128].")
@click.option("--alpha", type=float, help="ReLoRA scale numerator: scale = alpha / rank [default: 32].")
@click.option("--adapter-dropout", type=float, help="Dropout on the adapter branch [default: 0.1].")
@click.option("--relora-every", type=int, help="Steps between merges; the LR drops to 0 there [default: 500].")
@click.option("--restart-warmup", type=int, help="Steps to re-warm the LR after a merge [default: 50].")
@click.option("--optimizer-prune", type=float,
              help="Fraction of the adapters' Adam moments zeroed (smallest |m|) at a merge; >= 1 resets them [default: 0.9].")
@click.option("--save-every", type=int,
              help="Also write OUTPUT-checkpoints/step-N/ every N steps: a dense checkpoint plus the state --resume needs.")
@click.option("--resume", type=click.Path(path_type=Path),
              help="Continue from a step folder (or the latest one in OUTPUT-checkpoints/); give the same options.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json for text data [default: the checkpoint's].")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.json, when not beside SOURCE.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest shard in bytes (KB/MB/GB, KiB/MiB/GiB).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT (and its step folders) if they exist.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write a JSON report of the run here.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw the train and validation loss curves to this PNG (needs matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def train_command(source, data, output, resume, config_path, max_shard_size, overwrite, report_path, quiet, **options):
    """Continue training SOURCE (e.g. a grown checkpoint), full-rank or with ReLoRA.

    Under torchrun every process trains its slice of the global batch; rank 0 writes.
    """
    from .train import train

    options = {k: v for k, v in options.items() if v not in (None, ())}
    options["data"] = [str(p) for p in data]
    report = train(source, output, options, overwrite=overwrite, resume=resume, progress=_progress(quiet),
                   report_path=report_path, config_path=config_path, max_shard_size=max_shard_size)
    if "output" in report:
        click.echo(format_train(report))


def format_train(r: dict) -> str:
    mode = "full-rank" if r["mode"] == "full-rank" else f"ReLoRA r={r['relora']['rank']}, {r['restarts']} merges"
    val = r["val_loss"]
    loss = f"val loss {val['before']:.4f} -> {val['after']:.4f}" if val["before"] is not None and val["after"] is not None else "no validation"
    out = r["output"]
    size = sum(f["bytes"] for f in out["files"])
    return (f"trained {r['steps']} steps ({mode}) on {r['device']} x{r['world_size']}, batch {r['options']['batch_size']} x "
            f"{r['seq_len']}: {loss}; {r['trainable_params']:,} of {r['total_params']:,} parameters trained, optimizer state "
            f"{r['optimizer_state_bytes']:,} bytes\nwrote {out['path']} ({len(out['files'])} files, {size:,} bytes) in {r['wall_s']:.1f}s")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.json, when not beside PATH.")
@click.option("--tensors", is_flag=True, help="List every tensor with its shape, dtype and axis roles.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def inspect(path, config_path, tensors, as_json):
    """Show a checkpoint's architecture, sizes, tensors and parameter count."""
    from .inspect import describe

    info = describe(path, config_path, tensors=tensors)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"{info['path']}: {info['architecture']} ({info['class']}), {info['params']:,} parameters, "
               f"{info['dtype']}, {len(info['files'])} file(s), tied embeddings: {'yes' if info['tied_embeddings'] else 'no'}")
    click.echo("  " + ", ".join(f"{k}={v}" for k, v in info["dims"].items() if v is not None))
    for t in info.get("tensors", []):
        click.echo(f"  {t['name']:60} {str(t['shape']):>16} {t['dtype']:>8}  {t['axes']}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("grown", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.json of SOURCE, when not beside it.")
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--seq", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def verify(source, grown, config_path, batch, seq, seed, as_json):
    """Run SOURCE and GROWN on the same random inputs and compare their outputs.

    Exits 4 when they differ by more than the tolerance.
    """
    from .source import open_source
    from .verify import compare

    with open_source(source, config_path) as s, open_source(grown) as g:
        result = compare(s, g, batch=batch, seq=seq, seed=seed)
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_verify(result.as_dict()))
    if not result.passed:
        click.echo(f"error: {grown}: outputs differ from {source} by {result.max_abs_diff:.3g} "
                   f"(tolerance {result.tolerance:.3g})", err=True)
        sys.exit(EXIT_VERIFY_FAILED)


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Keep the grown demo model here.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@handle_errors
def demo(output, overwrite):
    """Grow the small GPT-2 shipped with modelgrow 2x wide and 2x deep, verify, and sample."""
    from .demo import run_demo

    run_demo(output, overwrite=overwrite, echo=click.echo, progress=_progress(False))


@main.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The .onnx file to write; with external data OUTPUT.data goes beside it (keep the two together).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.json, when not beside SOURCE.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX operator set (18 or newer).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the file in onnxruntime on new shapes and compare it with PyTorch.")
@click.option("--external-data", is_flag=True, help="Store the weights in OUTPUT.data [default: only past 1.5 GiB].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT (and OUTPUT.data) if they exist.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write a JSON report of the run here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def export_command(source, output, config_path, opset, check, external_data, overwrite, report_path, as_json):
    """Export SOURCE to ONNX (needs the onnx extra) and check it against PyTorch.

    Exits 4 when onnxruntime's outputs differ from PyTorch's; nothing is written then.
    """
    from .export import export_onnx, summary_lines
    from .report import write_report

    report = export_onnx(source, output, opset=opset, check=check, external_data=True if external_data else None,
                         overwrite=overwrite, config_path=config_path)
    write_report(report, report_path)
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(summary_lines(report)))


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def plugins_command(as_json):
    """List loaded plugins, where they come from, and what they register."""
    from . import plugins

    rows, failed = plugins.describe_plugins(), plugins.failures()
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failures": [f.__dict__ for f in failed]}, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}  [{r['distribution']} {r['version']}]")
        for key in ("architectures", "operators"):
            if r[key]:
                click.echo(f"  {key}: {', '.join(r[key])}")
        click.echo(f"  hooks: {', '.join(r['hooks'])}")
    for f in failed:
        click.echo(f"{f.name}  FAILED to load: {f.error}")
