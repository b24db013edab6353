"""What `modelgrow train` writes: the dense result, and step checkpoints it can resume from.

Dense output: the module's weights under *exactly* the input checkpoint's tensor names
and dtypes, in its order. ReLoRA adapters are merged on the way out (W + scale·B·A in
fp32, as the in-place merge computes it), so nothing adapter-shaped is ever written. A
tied head is written only if the input stored it; tensors the layout ignores (GPT-2's
causal-mask buffers in old files) are copied through untouched.

Step checkpoint (``OUT-checkpoints/step-N/``, committed atomically by CheckpointWriter):
the dense checkpoint above, loadable as is, plus ``training_state/``:

- ``state.safetensors``: fp32 master values of every module parameter (ReLoRA's frozen
  bases unmerged), each adapter's A and B, the Adam moments and step counts, and the
  states of the data and mask generators;
- ``state.json``: the step, restarts done, the options, data fingerprints and the
  curves so far.

safetensors and JSON only: nothing is pickled, nothing runs code when read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .card import Recipe, source_label, train_card, write_card
from .checkpoint import CheckpointWriter, dtypes, tagalong
from .checkpoint.atomic import fsync_path
from .engine.state import STATE_DIR, STATE_FORMAT, STATE_JSON, STATE_TENSORS, is_step_folder, remove_step_folders
from .errors import OutputError, UsageError
from .relora import LoRAAdapter
from .train_options import TrainOptions, TrainRun


class WeightMap:
    """Module parameters <-> the input checkpoint's stored tensor names.

    Built on the plain module, before any adapter is inserted: parameters are kept as
    objects, and an adapter later wraps the very same Parameter, so the map survives. A
    stored tensor may be part of a parameter (transformers fuses a mixture-of-experts
    block's experts into one): ``index_of`` then selects it (Architecture.parameter_views).
    """

    def __init__(self, source, module: torch.nn.Module):
        self.source = source
        self.named = list(module.named_parameters())  # tied parameters once
        params = dict(self.named)
        bound = [b for b in source.bound() if not source.is_tied_head(b.spec)]
        # The names load_module loaded under (the layout's naming) -> module parameters.
        shapes = {source.stored_name(b.spec, b.layer): tuple(source.checkpoint.info(b.name).shape) for b in bound}
        to_module = source.arch.parameter_views(module, shapes)
        self.param_of: dict[str, torch.nn.Parameter] = {}
        self.index_of: dict[str, tuple] = {}  # stored name -> its part of a fused parameter
        for b in bound:
            key, index = to_module[source.stored_name(b.spec, b.layer)]
            self.param_of[b.name] = params[key]
            if index is not None:
                self.index_of[b.name] = index
        tie = source.layout.tie
        for b in source.bound():
            if source.is_tied_head(b.spec):  # stored although tied: same values as the embedding
                emb = next(e for e in bound if e.spec.name == tie["embedding"])
                self.param_of[b.name] = self.param_of[emb.name]
        for name in self.param_of:
            shape, held = tuple(source.checkpoint.info(name).shape), tuple(self.value(name).shape)
            if held != shape:
                raise RuntimeError(f"tensor {name!r} is {list(shape)} in the checkpoint but {list(held)} in the module")

    def value(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` as the module holds it now (a view, detached)."""
        value = self.param_of[name].detach()
        index = self.index_of.get(name)
        return value if index is None else value[index]

    def check_whole(self, names: set[str], flag: str) -> None:
        """Refuse to train a part of a fused parameter: one trains whole or not at all."""
        for name in sorted(names & self.index_of.keys()):
            fused = self.param_of[name]
            if any(p is fused and other not in names for other, p in self.param_of.items()):
                raise UsageError(f"{flag}: {name!r} is part of one parameter with tensors it leaves out (transformers "
                                 "fuses a block's experts)", hint="choose all experts of a block or none")

    def dense(self, adapters: list[LoRAAdapter], cast: torch.dtype | None = None):
        """(stored name, tensor in the stored dtype, or ``cast`` for floating ones, on the CPU) for every input tensor."""
        merged = {id(a.base.weight): a for a in adapters}
        ckpt = self.source.checkpoint
        for name in ckpt.names():
            dtype = dtypes.output_dtype(ckpt.info(name).dtype, cast)
            p = self.param_of.get(name)
            if p is None:
                yield name, ckpt.get(name).to(dtype)  # ignored by the layout: carried through (cast)
                continue
            with torch.no_grad():
                value = self.value(name)
                a = merged.get(id(p)) if name not in self.index_of else None
                if a is not None:
                    delta = (a.lora_B @ a.lora_A) * a.scale  # exactly LoRAAdapter.merge's sum
                    value = value.float() + (delta.T if a.in_axis == 0 else delta)
                yield name, value.to("cpu", dtype).contiguous()


def write_dense(writer: CheckpointWriter, source, weights: WeightMap, adapters: list[LoRAAdapter],
                dtype: str = "source") -> None:
    """Weights (stored as ``dtype``, modelgrow.checkpoint.dtypes), config.json (byte for byte
    unless the dtype changes) and the tag-along files into ``writer``."""
    for name, tensor in weights.dense(adapters, dtypes.target_dtype(dtype)):
        writer.add(name, tensor)
    config = source.checkpoint.config_path
    if dtypes.target_dtype(dtype) is not None:
        writer.write_json("config.json", dtypes.config_with_dtype(source.config, dtype))
    elif config is not None and Path(config).is_file():
        writer.copy_file(config, "config.json")
    else:
        writer.write_json("config.json", source.config)
    tagalong.write(writer, source.checkpoint.tagalong_found(), source.dims.residual, source.dims.residual)


def describe_output(writer: CheckpointWriter, report: dict, source, options: TrainOptions, *, digest: str, dtype: str,
                    max_shard_size, keep_card: bool, hub: dict | None) -> None:
    """The report's source digest, Hub id and dtype; the model card (README.md) into ``writer``."""
    report["source"].update(sha256=digest, **({"hub": hub} if hub else {}))
    report["dtype"] = dtypes.describe(dtype, {source.checkpoint.info(n).dtype for n in source.checkpoint.names()})
    recipe = Recipe("train", source_label(hub)).add(options, skip=("save_every", "plot"))
    recipe.add(TrainRun.parse(dtype=dtype, max_shard_size=max_shard_size))
    report["card"] = write_card(writer, source.checkpoint, train_card(report, recipe, source.layout.name), keep_card)


def save_step(dest: Path, source, weights: WeightMap, adapters: list[LoRAAdapter], tensors: dict[str, torch.Tensor],
              state: dict, *, max_shard_bytes: int, metadata: dict[str, str], dtype: str = "source") -> None:
    """Commit a step checkpoint atomically: the dense model, then training_state/.

    The step folders' parent is made here, and removed again if the first step fails
    (a full disk, a signal): a failed run leaves no empty folder beside its output.
    """
    made = not dest.parent.exists()
    dest.parent.mkdir(exist_ok=True)
    try:
        _save_step(dest, source, weights, adapters, tensors, state, max_shard_bytes=max_shard_bytes,
                   metadata=metadata, dtype=dtype)
    except BaseException:
        if made and not any(dest.parent.iterdir()):
            dest.parent.rmdir()
        raise


def _save_step(dest: Path, source, weights: WeightMap, adapters: list[LoRAAdapter], tensors: dict[str, torch.Tensor],
               state: dict, *, max_shard_bytes: int, metadata: dict[str, str], dtype: str) -> None:
    with CheckpointWriter(dest, max_shard_bytes=max_shard_bytes, metadata=metadata, overwrite=True) as writer:
        write_dense(writer, source, weights, adapters, dtype)
        staged = writer.finish()
        # Written into the staged folder before commit() moves it into place, so the step
        # folder appears with its state or not at all. A subfolder, not a second
        # *.safetensors beside the weights: loaders glob the top level.
        folder = staged / STATE_DIR
        folder.mkdir()
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, folder / STATE_TENSORS,
                  metadata={"format": STATE_FORMAT})
        (folder / STATE_JSON).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        for path in (folder / STATE_TENSORS, folder / STATE_JSON, folder):
            fsync_path(path)  # works for files too: fsync of an O_RDONLY descriptor
        writer.commit()


def check_resume(resume_from: Path, state: dict, *, options, free: tuple[str, ...], fingerprints, seq_len: int,
                 params: int, identity) -> None:
    """Refuse to continue a step folder with another source, other data or other options (exit 2).

    ``fingerprints`` and ``identity`` are callables: hashing data and source files costs
    time, paid only when a resume needs it. A step folder written before the source was
    recorded (no ``source_identity``) is checked on the parameter count alone.
    """
    where = resume_from / STATE_DIR / STATE_JSON
    mine, theirs = options.as_dict(), state.get("options", {})
    # Step folders from older versions: a derived default recorded as null meant "derived"
    # (it matches the value derived now), an option not recorded at all its default.
    derived, fields = options.derived(), type(options).model_fields
    old = {k: derived.get(k, fields[k].default) for k in mine if theirs.get(k) is None}
    same = lambda k: mine[k] == theirs.get(k) or (k in old and old[k] == mine[k])  # noqa: E731
    differ = [k for k in mine if k not in free and not same(k)]  # free: options that may change
    if differ:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine[k]!r} now" for k in differ[:4])
        raise UsageError(f"--resume {resume_from}: the run was started with other options ({shown})",
                         hint="leave them out to take the stored ones, or give the interrupted run's values")
    if state.get("seq_len") != seq_len or state.get("source_params") != params:
        raise UsageError(f"--resume {resume_from}: it was saved for another model or sequence length", path=where)
    recorded = state.get("source_identity")
    if recorded is not None:
        now = identity()
        key = lambda files: sorted((f.get("name"), f.get("bytes"), f.get("sha256")) for f in files)  # noqa: E731
        if key(recorded) != key(now):
            was = ", ".join(f"{f['name']} ({f['bytes']:,} bytes, sha256 {f['sha256'][:12]})" for f in recorded[:2])
            raise UsageError(f"--resume {resume_from}: it continues a run on another source checkpoint (that run "
                             f"read {was}; this SOURCE differs)", hint="give the SOURCE the interrupted run trained")
    if state.get("fingerprints") != fingerprints():
        raise UsageError(f"--resume {resume_from}: the training or validation tokens differ from the interrupted run's",
                         hint="give the same --data/--val-data (and tokenizer)")
    step = state.get("step")
    if not isinstance(step, int) or not 0 < step < options.steps:
        raise UsageError(f"--resume {resume_from}: it is at step {step} of {options.steps}")


def remove_earlier_steps(parent: Path, inputs: list[Path]) -> None:
    """--overwrite without --resume: the earlier run's step folders go, so no resume continues them.

    Only folders modelgrow wrote (training_state/state.json with its format marker); a step
    folder that holds one of this run's inputs (training from a step of the earlier run)
    is refused rather than deleted.
    """
    if not parent.is_dir():
        return
    steps = [p.resolve() for p in parent.glob("step-*") if p.is_dir() and not p.is_symlink() and is_step_folder(p)]
    for path in inputs:
        held = [s for s in steps if Path(path).resolve().is_relative_to(s)]
        if held:
            raise OutputError(f"--overwrite would delete the earlier run's step folder {held[0]}, which holds "
                              f"{path}, an input of this run", path=parent,
                              hint="copy that step elsewhere first, or write to another -o/--output")
    remove_step_folders(parent)
