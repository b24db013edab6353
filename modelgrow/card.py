"""The model card (README.md) every output folder of `convert` and `train` gets.

Hugging Face metadata front matter (``base_model`` only when the source came from the
Hub, ``library_name: transformers``, ``tags: [modelgrow]``), the recipe (sizes, operator,
options), the exactness figure (verification's max |Δ|, or "not verified") and the
command and Python call that make it again.

Deterministic, like the shards: made of the report's content and the options in effect,
never a timestamp, a timing or a local path. The source is SOURCE (or its Hub id) and
the output OUTPUT in the command; data files are named by file name alone.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint.reader import CARD_FILE
from .options import Options, flag_of


@dataclass
class Recipe:
    """The command that made a checkpoint, as flags and as keyword arguments."""

    command: str  # "convert" or "train"
    source: str  # "SOURCE", or the Hub id (with @revision) it was read from
    flags: list[str] = field(default_factory=list)
    kwargs: list[str] = field(default_factory=list)

    def add(self, options: Options | None, *, nest: str | None = None, skip: tuple[str, ...] = ()) -> Recipe:
        """Add the fields of ``options`` whose values differ from their defaults.

        ``nest`` puts them into one keyword argument (``fit={...}``) in the Python call.
        """
        values = given(options, skip=skip) if options is not None else {}
        for name, value in values.items():
            self.flags += _flag_tokens(type(options).flag(name), value)
        if nest and values:
            self.kwargs.append(f"{nest}={values!r}")
        else:
            self.kwargs += [f"{name}={value!r}" for name, value in values.items()]
        return self

    def option(self, flag: str, name: str, value: Any) -> Recipe:
        """One option that is no field of a group (``--operator ligo``)."""
        self.flags += _flag_tokens(flag, value)
        self.kwargs.append(f"{name}={value!r}")
        return self

    def shell(self) -> str:
        words = ["modelgrow", self.command, self.source, "-o", "OUTPUT", *self.flags]
        return " ".join(shlex.quote(str(w)) for w in words)

    def python(self) -> str:
        args = ", ".join([repr(self.source), repr("OUTPUT"), *self.kwargs])
        return f"import modelgrow\n\nmodelgrow.{self.command}({args})"


def given(options: Options, *, skip: tuple[str, ...] = (), plain: bool = True) -> dict[str, Any]:
    """The command-line fields of ``options`` that differ from their (derived) defaults.

    Paths are reduced to file names (a card names no local folder), unless ``plain`` is
    False (a recipe rebuilt from a report, modelgrow.recipe).
    """
    model = type(options)
    derived = options.derived() if hasattr(options, "derived") else {}
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in skip or name in model.hidden or not flag_of(info).cli:
            continue
        value = getattr(options, name)
        if value is None or value == info.default or (name in derived and value == derived[name]):
            continue
        out[name] = _plain(value) if plain else value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flag_tokens(flag: str, value: Any) -> list[str]:
    if value is True:
        return [flag]
    if value is False:
        return [f"--no-{flag[2:]}"]
    if isinstance(value, list):
        return [t for v in value for t in (flag, str(v))]
    return [flag, str(value)]


def front_matter(hub: dict[str, Any] | None) -> str:
    lines = ["---"]
    if hub:
        lines.append(f"base_model: {hub['id']}")
    lines += ["library_name: transformers", "tags:", "- modelgrow", "---"]
    return "\n".join(lines)


def source_label(hub: dict[str, Any] | None) -> str:
    """What the card's command reads: the Hub id as typed, else SOURCE."""
    if not hub:
        return "SOURCE"
    return f"{hub['id']}@{hub['revision']}" if hub.get("revision") else hub["id"]


def source_line(source: dict[str, Any]) -> str:
    hub = source.get("hub")
    if hub:
        rev = f", revision `{hub['revision']}`" if hub.get("revision") else ""
        return f"the Hugging Face Hub model [`{hub['id']}`](https://huggingface.co/{hub['id']}){rev} (commit `{hub['commit']}`)"
    digest = source.get("sha256")
    return f"a local checkpoint (content sha256 `{digest}`)" if digest else "a local checkpoint"


def _how(recipe: Recipe) -> list[str]:
    return ["## How it was made", "", "```", recipe.shell(), "```", "", "or from Python:", "", "```python",
            recipe.python(), "```", "", "SOURCE is the checkpoint named above and OUTPUT this folder."
            if recipe.source == "SOURCE" else "OUTPUT is this folder."]


def _number(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "—"


def convert_card(report: dict[str, Any], recipe: Recipe) -> str:
    """README.md for a grown checkpoint, from its report (verification included)."""
    plan, promise, op = report["plan"], report["promise"], report["operator"]
    old, new, up = plan["source"], plan["target"], plan.get("upcycle")
    rows = [f"| {key} | {_number(old.get(key))} | {_number(new.get(key))} |"
            for key in ("residual", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab", "experts")
            if old.get(key) is not None or new.get(key) is not None]
    rows.append(f"| parameters | {plan['source_params']:,} | {plan['target_params']:,} |")
    options = ", ".join(f"{k}={v}" for k, v in sorted(op["options"].items())) or "none"
    dtype = report.get("dtype") or {}
    lines = [front_matter(report["source"].get("hub")), "",
             f"# A {up['architecture'] if up else plan['architecture']} checkpoint grown with modelgrow", "",
             f"Grown from {source_line(report['source'])} by modelgrow {report['modelgrow_version']}: "
             f"{plan['source_params']:,} → {plan['target_params']:,} parameters.", "",
             "## Recipe", "", "| size | source | grown |", "| --- | ---: | ---: |", *rows, "",
             f"- operator: `{op['name']}` ({options})",
             *([f"- sparse upcycling into {up['architecture']} (`{up['class']}`): {up['experts']} experts, "
                f"top-{up['top_k']}, router {up['router_init']}"] if up else []),
             f"- depth mode: `{plan['depth_mode']}`, target layers copy source layers "
             f"{[d['source_layer'] for d in plan['depth_map']]}"]
    if dtype:
        lines.append(f"- weights stored as {', '.join(dtype['output'])} (`--dtype {dtype['requested']}`); "
                     "the growth itself computes in float32")
    if "fit" in report:
        fit = report["fit"]
        ev = (fit.get("eval") or {})
        loss = f", eval loss {ev['before']:.4f} → {ev['after']:.4f}" if ev.get("before") is not None else ""
        lines.append(f"- fitted for {fit.get('steps', 0)} steps{loss}")
    lines += ["", "## Exactness", "", f"Function-preserving by construction: {'yes' if promise['exact'] else 'no'}."]
    lines += [""] * bool(promise["notes"]) + [f"- {note}" for note in promise["notes"]]
    lines += ["", verify_line(report.get("verify")), "", *_how(recipe)]
    return "\n".join(lines) + "\n"


def verify_line(v: dict[str, Any] | None) -> str:
    """The exactness figure: verification's max |Δ|, or why there is none."""
    if v is None:
        return "Not verified: the grown model was not run against the source (`--no-verify`)."
    if "skipped" in v:
        return f"Not verified: {v['skipped']}."
    verdict = "passed" if v["passed"] else "failed"
    text = (f"Verified: on {v['batch']} × {v['seq']} random tokens (seed {v['seed']}) the grown model's "
            f"{v['output']} differ from the source's by at most {v['max_abs_diff']:.3g} (max |Δ|; tolerance "
            f"{v['tolerance']:.3g}): {verdict}.")
    cast = v.get("cast")
    if cast:
        text += (f" For comparison, the cast to {cast['dtype']} alone (the source's own weights rounded) moves its "
                 f"{v['output']} by {cast['max_abs_diff']:.3g}.")
    return text


def train_card(report: dict[str, Any], recipe: Recipe, architecture: str) -> str:
    """README.md for a trained checkpoint, from its report."""
    o, val = report["options"], report["val_loss"]
    mode = "full-rank" if report["mode"] == "full-rank" else f"ReLoRA (rank {o['rank']}, merges every {o['relora_every']} steps)"
    loss = (f"validation loss {val['before']:.4f} before → {val['after']:.4f} after"
            if val["before"] is not None and val["after"] is not None else "no validation loss recorded")
    dtype = report.get("dtype") or {}
    lines = [front_matter(report["source"].get("hub")), "",
             f"# A {architecture} checkpoint trained with modelgrow", "",
             f"Trained from {source_line(report['source'])} by modelgrow {report['modelgrow_version']}.", "",
             "## Recipe", "",
             f"- {report['steps']} steps, {mode}, {report['task']}; learning rate {o['lr']:g}, batch "
             f"{o['batch_size']} × {report['seq_len']} tokens ({report['tokens_seen']:,} tokens seen)",
             f"- {report['trainable_params']:,} of {report['total_params']:,} parameters trained"]
    if dtype:
        lines.append(f"- weights stored as {', '.join(dtype['output'])} (`--dtype {dtype['requested']}`); "
                     "training keeps fp32 weights")
    lines += ["", "## Exactness", "", "Not verified: training changes the model's function on purpose; "
              f"{loss}.", "", *_how(recipe)]
    return "\n".join(lines) + "\n"


def write_card(writer, checkpoint, text: str, keep: bool, left_behind: dict[str, str] | None = None) -> dict[str, Any]:
    """README.md into ``writer``: the source's card with ``keep`` (when it has one), else ``text``.

    Returns the report's ``card`` section. The source's card is copied as the tag-along
    files are (a regular file inside the source folder); when it cannot be, the reason goes
    into ``left_behind`` (a warning) and the generated card is written instead.
    """
    source_card, why = checkpoint.card_file() if keep else (None, None)
    if source_card is not None:
        writer.copy_file(source_card, CARD_FILE)
        return {"file": CARD_FILE, "from": "source"}
    writer.write_text(CARD_FILE, text)
    if why and left_behind is not None:
        left_behind[CARD_FILE] = why
    return {"file": CARD_FILE, "from": "generated"}
