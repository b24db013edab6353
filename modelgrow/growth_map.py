"""The growth map written beside every grown checkpoint (``growth_map.json``).

It says, for a person and for a program, where every target tensor came from: which
source tensor, and how (copied as it was, grown by the unit maps, zeroed as an identity
block's residual writer, or made by a learned operator; sparse upcycling's router is
"initialised" and its zero-started tensors "zeroed", with no source, marked new), and
which layers are new (identity blocks and repeated copies). ``modelgrow train --train new`` trains exactly
the tensors it marks as new; an outside trainer reads ``new_layers`` (LLaMA Pro trains
only the inserted blocks). No path or time goes into it: the bytes depend only on the
growth.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from .errors import UsageError
from .plan import Plan

GROWTH_MAP = "growth_map.json"
FORMAT = "modelgrow.growth_map/1"


def layer_kinds(plan: Plan) -> list[str]:
    """Per target layer: original (the first plain copy of its source layer), copy or identity."""
    return ["identity" if ident else "copy" if inserted else "original"
            for (_, inserted), ident in zip(plan.depth_map, plan.identity)]


def growth_map(plan: Plan, operator: str, learned: bool, source_lr: tuple[float, str] | None = None) -> dict:
    """What each grown tensor came from; ``source_lr``: (the rate the source's training
    ended at, where it was read), for `train --lr-schedule continue` on the grown model."""
    kinds = layer_kinds(plan)
    tensors = {}
    for t in plan.targets:
        made_here = t.made in ("zero", "router")  # sparse upcycling: no source tensor
        if t.made == "zero" or (t.identity and t.spec.writes_residual):
            how = "zeroed"
        elif t.made == "router":
            how = "initialised"
        elif learned:
            how = "learned"
        else:
            how = "copied" if t.shape == t.source_shape else "grown"
        tensors[t.name] = {
            "source": None if made_here else plan.source.stored_name(t.spec, t.source_layer),
            "layer": t.layer,
            "how": how,
            "new": made_here or (t.layer is not None and kinds[t.layer] != "original"),
        }
    return {
        "format": FORMAT,
        "operator": operator,
        "source_layers": plan.old.layers,
        "layers": [{"layer": i, "source_layer": s, "kind": k} for i, ((s, _), k) in enumerate(zip(plan.depth_map, kinds))],
        "new_layers": [i for i, k in enumerate(kinds) if k != "original"],
        "tensors": tensors,
        **({"source_final_lr": {"lr": source_lr[0], "from": source_lr[1]}} if source_lr else {}),
    }


def chosen_tensors(source, which: str) -> set[str] | None:
    """The stored tensor names ``train --train`` trains: None for all."""
    if which == "all":
        return None
    names = {b.name for b in source.bound()}
    if which == "new":
        chosen = names & new_tensors(source.checkpoint.root)
    else:
        chosen = {n for n in names if fnmatch.fnmatchcase(n, which)}
    if not chosen:
        raise UsageError(f"--train {which} matches no tensor of {source.path}",
                         hint="modelgrow inspect SOURCE --tensors lists the names")
    return chosen


def read_growth_map(folder: Path) -> dict | None:
    """The growth map written beside the weights in ``folder``; None when there is none.
    A file that is not one modelgrow can read is a UsageError naming it."""
    path = Path(folder) / GROWTH_MAP
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        layers = [int(entry["source_layer"]) for entry in data["layers"]]
        new = {name for name, entry in data["tensors"].items() if entry["new"]}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path}: not a growth map modelgrow can read ({type(exc).__name__})",
                         hint="convert again to write a fresh one") from None
    if data.get("format") != FORMAT:
        raise UsageError(f"{path}: growth map format {data.get('format')!r}, expected {FORMAT!r}")
    lr = data.get("source_final_lr")
    lr = lr.get("lr") if isinstance(lr, dict) else None
    usable = isinstance(lr, float) and 0 < lr <= 1e30  # what json.loads gives for a rate convert wrote
    return {"source_layers": layers, "new_tensors": new, "source_final_lr": lr if usable else None}


def new_tensors(folder: Path) -> set[str]:
    """The tensor names the growth map in ``folder`` marks as new (``train --train new``)."""
    found = read_growth_map(folder)
    if found is None:
        raise UsageError(f"--train new needs {GROWTH_MAP}, which modelgrow convert writes beside the weights; "
                         f"{folder} has none", hint="train all (the default) or name tensors with a pattern")
    return found["new_tensors"]
