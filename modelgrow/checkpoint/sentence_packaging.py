"""A sentence-transformers packaging travels with the grown model (issue #19).

A sentence-transformers model is a transformers checkpoint plus ``modules.json``, the
modules applied in turn (the Transformer beside config.json, then e.g. ``1_Pooling/``,
``2_Normalize/``, ``2_Dense/``), ``sentence_bert_config.json`` (``max_seq_length``:
kept, it does not depend on the width) and ``config_sentence_transformers.json``
(prompts, similarity function). Without them the grown model would load with mean
pooling, no Normalize and the tokenizer's length limit, silently.

What travels: those files as they are; Pooling modules, their ``word_embedding_dimension``
(the hidden size) set to the grown one; Normalize modules (they hold no file: the folder
is made even where the source has none, as a Hub snapshot, since git keeps no empty
folder). Nothing else: a Dense module's weights act on the hidden size and cannot be
grown exactly today, and a module of another kind may depend on the width in ways
modelgrow does not know. Such a module stays behind with its reason, and modules.json
with it: a modules.json naming a missing module does not load, while without it
sentence-transformers loads the grown model as a plain transformer with mean pooling.

A module's path must be plain relative names (no ``..``, no absolute path, no leading
dot); any other stays behind, never followed. Module folders are entered, and their files
copied, under checkpoint/tagalong.py's rules; a module folder holding weights stays
behind (they are never read: a pickle is never opened).
"""

from __future__ import annotations

import os
import re

from .tagalong import PLAIN, WEIGHTS, Found, Module, folder_entries, read_json

FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
#: Older models name the Transformer module's settings after the architecture.
SETTINGS = re.compile(r"sentence_[a-z0-9-]+_config\.json")
#: A module's type: a class of sentence_transformers (``sentence_transformers.models.Pooling``).
TYPE = re.compile(r"sentence_transformers\.(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)", re.ASCII)
CARRIED = ("Pooling", "Normalize")
DIMENSION = "word_embedding_dimension"  # a Pooling module's input: the hidden size
MAX_MODULES = 32


def survey_modules(found: Found, names: list[str]) -> None:
    """Add the sentence-transformers files among ``names`` (the source folder's) to ``found``,
    and the module folders modules.json lists; note what stays behind and why."""
    for name in (*FILES, *(n for n in names if n not in FILES and SETTINGS.fullmatch(n))):
        found.take(name)
    if "modules.json" not in found.files:
        return
    listing, why = read_json(found.root, "modules.json")
    if why is None and not _is_listing(listing):
        why = f"not a sentence-transformers module list (at most {MAX_MODULES} entries, each with a path and a type)"
    if why is not None:
        found.drop("modules.json", why)
        return
    behind: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(listing):
        path, match = entry["path"], TYPE.fullmatch(entry["type"])
        kind = match.group(1) if match else None
        if kind == "Transformer" and path == "":
            continue  # the weights modelgrow grows, beside config.json
        if not _plain(path):
            behind.append(f"module {i}'s path {ascii(path[:80])} (not a plain relative path inside the source "
                          "folder: not followed)")
            continue
        if path in seen:
            why = "listed twice in modules.json"
        elif kind == "Dense":
            why = _dense(found, path)
        elif kind == "Transformer":
            why = "a Transformer module in a folder of its own: modelgrow grows the weights beside config.json, not these"
        elif kind not in CARRIED:
            why = f"a {ascii(entry['type'][:80])} module: modelgrow does not know how it depends on the width"
        else:
            why = _carry(found, path, kind)
        seen.add(path)
        if why is not None:
            found.left_behind[f"{path}/"] = why
            behind.append(f"{path}/")
    if behind:
        found.drop("modules.json", _without(behind))


def settle_modules(found: Found, hidden: int, grown_hidden: int) -> tuple[dict[str, dict], dict[str, str], set[str]]:
    """For a model grown from ``hidden`` to ``grown_hidden`` units: (the JSON files written
    anew, relative name -> content; everything left behind, name -> why; the carried files
    that stay behind after all). A Pooling module whose ``word_embedding_dimension`` is not
    the hidden size stays behind: what it becomes is unknown."""
    rewrite: dict[str, dict] = {}
    left = dict(found.left_behind)
    skip: set[str] = set()
    for module in found.modules:
        if module.kind != "Pooling" or hidden == grown_hidden or DIMENSION not in module.config:
            continue
        dim = module.config[DIMENSION]
        if type(dim) is int and dim == hidden:
            rewrite[f"{module.path}/config.json"] = {**module.config, DIMENSION: grown_hidden}
        else:
            left[f"{module.path}/"] = (f"its {DIMENSION} {ascii(dim)[:40]} is not the hidden size {hidden}: "
                                       "modelgrow cannot tell what it becomes")
            skip.update(module.files)
    if skip and "modules.json" in found.files:
        left["modules.json"] = _without([f"{m.path}/" for m in found.modules if f"{m.path}/" in left])
        skip.add("modules.json")
    return rewrite, left, skip


def _is_listing(listing: object) -> bool:
    return (isinstance(listing, list) and 0 < len(listing) <= MAX_MODULES
            and all(isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("type"), str)
                    for e in listing))


def _plain(path: str) -> bool:
    """A relative path of plain names: no "..", ".", empty part, leading "/" or dot, backslash."""
    return len(path) <= 400 and all(PLAIN.fullmatch(part) for part in path.split("/"))


def _carry(found: Found, rel: str, kind: str) -> str | None:
    """Carry the module folder ``rel`` (its files into ``found``), or say why it stays behind."""
    entries, why = folder_entries(found.root, rel)
    if why is not None:
        return why
    if not entries and not os.path.lexists(found.root / rel) and kind != "Normalize":
        return "missing: modules.json lists it, the source folder has no such folder"
    module = Found(found.root)
    for sub in entries:
        name = sub.rsplit("/", 1)[1]
        if sub.endswith(WEIGHTS):
            return f"it holds weights ({name}), which modelgrow does not grow"
        if sub in found.files:
            return f"{name} travels already"
        if module.take(sub) is None:
            return f"{name}: {module.left_behind.get(sub, 'gone')}"
    config = None
    if kind == "Pooling":
        config, why = read_json(found.root, f"{rel}/config.json")
        if why is None and not isinstance(config, dict):
            why = "not a JSON object"
        if why is not None:
            return f"config.json: {why}"
    found.files.update(module.files)
    found.pins.update(module.pins)
    found.modules.append(Module(rel, kind, list(module.files), config))
    return None


def _dense(found: Found, rel: str) -> str:
    """Why a Dense module stays behind (its config.json read for the sizes; its weights never)."""
    config, _ = read_json(found.root, f"{rel}/config.json")
    sizes = ""
    if isinstance(config, dict) and all(type(config.get(k)) is int for k in ("in_features", "out_features")):
        sizes = f" ({config['in_features']} -> {config['out_features']} features)"
    return (f"a Dense module{sizes}: its weights act on the hidden size, which modelgrow cannot grow exactly "
            "yet; the grown model has no Dense layer")


def _without(behind: list[str]) -> str:
    return (f"it lists {', '.join(behind)}, which {'stays' if len(behind) == 1 else 'stay'} behind, and a "
            "modules.json naming a missing module does not load; without it sentence-transformers loads the grown "
            "model with mean pooling only (a modules.json without the modules left behind restores the others)")
