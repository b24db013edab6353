"""Every config.json value checked before a module is built: a value transformers (or
torch) would refuse is bad input naming the key, on one line, before any growth.

The rules are data: ``RULES`` maps key patterns to what a value must be, the layout adds
its own size keys (``config_keys``, ``config_also``, ``inputs``) and norm epsilon, and
``DIVISIBLE`` / ``AT_MOST`` relate keys to each other. A pattern without a dot matches a
key at any depth (``*dropout`` matches ``text_config.attention_dropout``); one with a
dot matches the end of the key's dotted path (``rope_scaling.*factor``). Rules check
numbers (and strings, for activations): a value of another type is left to transformers'
own type checks, whose first line the error then carries (``first_line``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config_access import config_get
from .errors import CheckpointError, InputError, ModelgrowError

# Larger than any real config: ImageNet-22k classifiers hold 21,843 labels each way.
MAX_ENTRIES = 250_000  # keys and list items, all levels together
MAX_LABELS = 100_000  # num_labels, and entries of id2label / label2id
MAX_SIZE = 2**31 - 1  # a size beyond this overflows the kernels that would use it

# Keys whose content is free text chosen by the model's author (label names), never settings.
FREE_TEXT = ("id2label", "label2id")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numeric(v: Any) -> bool:  # sizes: a bool or a float is a wrong value, not another type
    return isinstance(v, (int, float))


# Names every transformers release modelgrow supports knows (a test holds the installed
# one to it): the usual config is judged without importing transformers.activations,
# which pulls in its distributed stack (~3.5 s of every conversion's start).
COMMON_ACTIVATIONS = frozenset({"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_accurate", "quick_gelu",
                                "relu", "relu6", "silu", "swish", "tanh", "sigmoid", "mish", "linear", "leaky_relu"})


def _activations():
    from transformers.activations import ACT2FN  # lazily: transformers is slow to import

    return ACT2FN


def _known_activation(name: str) -> bool:
    return name in COMMON_ACTIVATIONS or name in _activations()


@dataclass(frozen=True)
class Rule:
    want: str  # what the value must be, for the message
    ok: Callable[[Any], bool]  # for one value the rule applies to
    hint: str  # what to do
    applies: Callable[[Any], bool] = _number  # values of other types are transformers' to check
    each: bool = True  # a list is checked item by item
    hf_only: bool = False  # only where transformers builds the module


PROBABILITY = Rule("a probability from 0 to 1", lambda v: 0 <= v <= 1, "dropout rates are probabilities")
EPS = Rule("a number above 0", lambda v: v > 0, "a norm's epsilon keeps its division away from zero; the usual is 1e-5 or 1e-6")
POSITIVE = Rule("a number above 0", lambda v: v > 0, "set a positive value")
SIZE = Rule(f"a whole number from 1 to {MAX_SIZE}", lambda v: _whole(v) and 0 < v <= MAX_SIZE,
            "sizes and counts are positive integers", applies=_numeric, each=False)
SIZES = Rule(f"a whole number from 1 to {MAX_SIZE} (or a list of them)", SIZE.ok, SIZE.hint, applies=SIZE.applies)
LABELS = Rule(f"a whole number from 0 to {MAX_LABELS:,}", lambda v: _whole(v) and 0 <= v <= MAX_LABELS,
              "it counts the classifier's labels", applies=SIZE.applies, each=False)
ACTIVATION = Rule("an activation transformers knows", _known_activation,
                  "e.g. gelu, gelu_new, gelu_pytorch_tanh, relu, silu", applies=lambda v: isinstance(v, str), each=False,
                  hf_only=True)
# Negative ids count from the end, as torch's padding_idx does: old Llama conversions
# ship "pad_token_id": -1 and load fine, so only what torch itself refuses is refused.
TOKEN_ID = Rule("a token id: null, or a whole number from -vocab_size to below vocab_size (a list of them for several)",
                _whole, "use null for no such token", applies=_numeric)

RULES: tuple[tuple[str, Rule], ...] = (
    ("*dropout", PROBABILITY), ("*_pdrop", PROBABILITY), ("*dropout_prob", PROBABILITY), ("*dropout_rate", PROBABILITY),
    ("*layerdrop", PROBABILITY), ("*drop_path_rate", PROBABILITY),
    ("eps", EPS), ("*_eps", EPS), ("*epsilon", EPS),
    ("*hidden_act", ACTIVATION), ("*activation_function", ACTIVATION), ("*hidden_activation", ACTIVATION),
    ("*rope_theta", POSITIVE), ("*rope_local_base_freq", POSITIVE),
    ("rope_scaling.*factor", POSITIVE), ("rope_parameters.*factor", POSITIVE), ("rope_parameters.*.*factor", POSITIVE),
    ("pad_token_id", TOKEN_ID), ("bos_token_id", TOKEN_ID), ("eos_token_id", TOKEN_ID), ("sep_token_id", TOKEN_ID),
    ("cls_token_id", TOKEN_ID), ("mask_token_id", TOKEN_ID), ("decoder_start_token_id", TOKEN_ID),
    ("num_experts_per_tok", SIZE), ("*patch_size", SIZES), ("type_vocab_size", SIZE), ("num_labels", LABELS),
)

# Relations transformers enforces (or its modules assume), between layout roles ("@role",
# or an ``inputs`` entry such as "@image_size") and plain keys.
# (numerator, denominator, unless): numerator % denominator == 0, unless ``unless`` is set.
DIVISIBLE = (("@residual", "@heads", "@head_dim"), ("@heads", "@kv_heads", None), ("@image_size", "patch_size", None))
AT_MOST = (("num_experts_per_tok", "@experts"),)  # (key, limit): value <= limit


# Where a message's own text ends and a stack begins (torch's C++ frames, a traceback).
_STACK = re.compile(r"^\s*(Exception raised from |frame #\d|Traceback |File \")")


def first_line(exc: BaseException, limit: int = 240) -> str:
    """``Type: message`` on one line: the message's leading paragraph (transformers'
    validators put the reason on a second line), never a stack, at most ``limit`` long."""
    kept = []
    for line in str(exc).strip().splitlines():
        if not line.strip() or _STACK.match(line):
            break
        kept.append(line.strip())
    text = " ".join(kept)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_error(class_name: str, exc: Exception) -> Exception:
    """What building a module from a config that passed ``check_config`` raised, as the
    one-line bad input it is; modelgrow's own errors, NotImplementedError (no module
    factory) and MemoryError pass as they are."""
    if isinstance(exc, (ModelgrowError, NotImplementedError, MemoryError)):
        return exc
    return InputError(f"transformers cannot build a {class_name} from this config.json: {first_line(exc)}",
                      hint="fix the value it names in config.json")


def check_config(config: dict, path: str | Path | None, arch=None) -> None:
    """Refuse (CheckpointError, exit 3) a config holding a value the runtime would refuse.

    ``arch`` (an Architecture) adds its layout's keys and, for a module transformers
    builds, the activation names transformers knows. Checks run in order: size limits,
    then every value (finite numbers, no lone surrogates, the rules), then relations.
    (RoPE types are judged on transformers' normalised config: ``rope_problem``.)
    """
    layout = getattr(arch, "layout", None)
    hf = arch is not None and hasattr(arch, "hf_config")
    _check_labels(config, path)
    rules = _rules(layout)
    tokens: list[tuple[str, Any, dict | None]] = []
    for key, value, parent, free in _walk(config, path):
        rule = None if free else rules(key)
        if rule is TOKEN_ID:  # checked once the vocabulary size is known to be sound
            tokens.append((key, value, parent if parent is not config else None))
        elif rule is not None and (hf or not rule.hf_only):
            _apply(rule, key, value, path)
    _check_tokens(config, layout, tokens, path)
    if layout is not None:
        _check_relations(config, layout, path)


def rope_problem(hf_config) -> str | None:
    """An unknown RoPE type, judged after transformers has normalised the config (legacy
    rope_scaling.type, Phi-3's "su"): transformers itself only fails on it when it builds
    the rotary embedding."""
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:  # a transformers without the table judges for itself
        return None
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict):
        return None
    by_layer = {"": params} if "rope_type" in params else {f"{k}.": v for k, v in params.items() if isinstance(v, dict)}
    for prefix, one in by_layer.items():
        kind = one.get("rope_type")
        if isinstance(kind, str) and kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
            known = ", ".join(["default", *sorted(ROPE_INIT_FUNCTIONS)])
            return (f"config key 'rope_parameters.{prefix}rope_type' is {_short(kind)} but must be a RoPE type transformers "
                    f"knows ({known}; older configs call it rope_scaling.type; fix it in config.json)")
    return None


def _fail(key: str, value: Any, want: str, hint: str, path) -> None:
    raise CheckpointError(f"config key '{_show(key)}' is {_short(value)} but must be {want}", path=path,
                          hint=f"{hint}; fix it in config.json")


def _show(key: str) -> str:
    return key if key.isprintable() else ascii(key)[1:-1]


def _short(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")  # as JSON spells them
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _apply(rule: Rule, key: str, value: Any, path) -> None:
    items = list(enumerate(value)) if rule.each and isinstance(value, list) else [(None, value)]
    for index, item in items:
        if rule.applies(item) and not rule.ok(item):
            _fail(key if index is None else f"{key}[{index}]", item, rule.want, rule.hint, path)


def _check_labels(config: dict, path) -> None:
    # Before the walk: a million labels must be refused at once, not walked.
    for key in FREE_TEXT:
        value = config.get(key)
        if isinstance(value, dict) and len(value) > MAX_LABELS:
            raise CheckpointError(f"config key '{key}' holds {len(value):,} labels, more than the {MAX_LABELS:,} "
                                  "modelgrow accepts", path=path, hint="no real classifier has that many; fix config.json")


def _walk(config: dict, path):
    """(dotted key, value, parent dict, under free text) for every entry, all levels.

    Refuses non-finite numbers, lone surrogates (in keys too) and configs with more than
    MAX_ENTRIES entries. Iterative: nesting depth costs no recursion.
    """
    count = 0
    stack: list[tuple[str, Any, Any, bool]] = [("", config, None, False)]
    while stack:
        key, value, parent, free = stack.pop()
        nested = isinstance(value, (dict, list))
        if not nested:
            _check_scalar(key, value, path)  # before any rule reads it
        if key:
            yield key, value, parent, free
        if not nested:
            continue
        count += len(value)
        if count > MAX_ENTRIES:
            raise CheckpointError(f"config holds more than {MAX_ENTRIES:,} keys and list items", path=path,
                                  hint="no model config is that large; fix config.json")
        if isinstance(value, dict):
            children = [(f"{key}.{k}" if key else k, v, value, free or k in FREE_TEXT, k) for k, v in value.items()]
        else:
            children = [(f"{key}[{i}]", v, value, free, None) for i, v in enumerate(value)]
        for child, v, p, f, name in reversed(children):
            if isinstance(name, str):
                _check_text(child, name, path, "a key")
            stack.append((child, v, p, f))


def _check_scalar(key: str, value: Any, path) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        _fail(key, value, "a finite number", "JSON has no NaN or Infinity, and no model setting is one", path)
    if isinstance(value, str):
        _check_text(key, value, path, "its value")


def _check_text(key: str, text: str, path, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"config key '{_show(key)}': {what} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                              "which is not text", path=path, hint="fix the escape in config.json") from None


def _pattern(glob: str) -> str:
    """A key pattern as a regex over dotted keys; '*' stays within one key."""
    return re.escape(glob).replace(r"\*", r"[^.]*")


# One regex for the whole table: an optional "parent." prefix, then the first pattern
# that matches the rest (the longest prefix is tried first: a key's own name wins).
_RULES_REGEX = re.compile(r"(?:.*\.)?(?:" + "|".join(f"(?P<r{i}>{_pattern(g)})" for i, (g, _) in enumerate(RULES)) + ")")


def _rules(layout) -> Callable[[str], Rule | None]:
    """The rule for a dotted key, or None: the layout's keys exactly, then RULES."""
    exact: dict[str, Rule] = {}
    if layout is not None:
        for keys in layout.config_keys.values():
            exact.update((k, SIZE) for k in ([keys] if isinstance(keys, str) else keys))
        for keys in layout.config_also.values():
            exact.update((k, SIZE) for k in keys)
        exact.update((layout.inputs[k], SIZES) for k in ("image_size", "channels") if k in layout.inputs)
        if layout.eps_key:
            exact[layout.eps_key] = EPS

    def rule(key: str) -> Rule | None:
        if key in exact:
            return exact[key]
        match = _RULES_REGEX.fullmatch(key)
        return RULES[int(match.lastgroup[1:])][1] if match else None

    return rule


def _vocab(config: dict, layout) -> int | None:
    key = layout.config_key(config, "vocab") if layout is not None and "vocab" in layout.config_keys else "vocab_size"
    value = config_get(config, key) if key else None
    return value if _whole(value) and value > 0 else None


def _check_tokens(config: dict, layout, tokens, path) -> None:
    """Token ids within the vocabulary: the model's own, or a nested config's vocab_size."""
    for key, value, parent in tokens:
        vocab = _vocab(config, layout) if parent is None else _vocab(parent, None)
        for index, item in (enumerate(value) if isinstance(value, list) else [(None, value)]):
            if not TOKEN_ID.applies(item):
                continue
            if TOKEN_ID.ok(item) and (vocab is None or -vocab <= item < vocab):
                continue
            where = key if index is None else f"{key}[{index}]"
            want = f"a token id from {-vocab} to {vocab - 1} (vocab_size is {vocab})" if vocab else "a whole token id"
            _fail(where, item, want, TOKEN_ID.hint, path)


def _resolve(config: dict, layout, ref: str | None) -> tuple[str | None, Any]:
    """A relation's key ("@role" through the layout) and its value."""
    if ref is None:
        return None, None
    key: str | None = ref
    if ref.startswith("@"):
        role = ref[1:]
        key = layout.config_key(config, role) if role in layout.config_keys else layout.inputs.get(role)
    return key, (config_get(config, key) if key else None)


def _ints(value: Any) -> list[int] | None:
    """A size as a list of positive ints (an int, or [height, width]); None if it is not one."""
    items = value if isinstance(value, list) else [value]
    ok = items and all(_whole(v) and v > 0 for v in items)
    return list(items) if ok else None


def _check_relations(config: dict, layout, path) -> None:
    for top, bottom, unless in DIVISIBLE:
        (a_key, a), (b_key, b), (_, skip) = (_resolve(config, layout, r) for r in (top, bottom, unless))
        a_sizes, b_sizes = _ints(a), _ints(b)
        if skip is not None or not a_sizes or not b_sizes:
            continue
        if len(b_sizes) == 1:
            b_sizes = b_sizes * len(a_sizes)
        if len(a_sizes) == 1 and len(b_sizes) > 1:
            a_sizes = a_sizes * len(b_sizes)
        if any(x % y for x, y in zip(a_sizes, b_sizes)):
            _fail(a_key, a, f"divisible by {b_key}={_short(b)}", "transformers splits the one evenly into the other", path)
    for key, limit in AT_MOST:
        (a_key, a), (b_key, b) = _resolve(config, layout, key), _resolve(config, layout, limit)
        if _whole(a) and _whole(b) and a > b:
            _fail(a_key, a, f"at most {b_key}={b}", "a token cannot be routed to more experts than there are", path)


__all__ = ["check_config", "build_error", "first_line", "rope_problem", "MAX_ENTRIES", "MAX_LABELS", "RULES", "DIVISIBLE",
           "AT_MOST"]
