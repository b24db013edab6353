"""Options declared once: a pydantic model per option group, from which the command
line flags, their help, the validation, the defaults recorded in reports and the JSON
Schema of those records are all derived.

A field becomes a flag unless declared with ``cli=False``; its flag is ``--<prefix><name>``
(underscores as dashes) unless ``flag`` says otherwise. Flags carry no click default:
a value the user did not type stays unset, so the model's default (or a default derived
from other options) applies, and reports show the value actually used.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import click
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UsageError


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line (kept out of the JSON Schema)."""

    cli: bool = True
    flag: str | None = None  # without dashes; default: prefix + name
    choices: tuple[str, ...] | None = None


def option(default: Any = None, help: str = "", *, flag: str | None = None, cli: bool = True,
           choices: tuple[str, ...] | None = None, **constraints: Any):
    """A field with its help text and command-line spelling (``flag`` without dashes)."""
    extra = {"enum": list(choices)} if choices else None
    field = Field(default, description=help, json_schema_extra=extra, **constraints)
    field.metadata.append(Flag(cli, flag, tuple(choices) if choices else None))
    return field


def seed_option(help: str):
    """A seed: any 64-bit integer, the range torch's generators take."""
    return option(0, help, strict=True, ge=-(2**63), le=2**63 - 1)


def flag_of(field) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


class Options(BaseModel):
    """Base of every option group: unknown names are refused, values checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)
    kind: ClassVar[str] = "option"  # "unknown <kind> option(s): ..."
    prefix: ClassVar[str] = ""  # flag prefix, e.g. "fit-"
    flags: ClassVar[dict[str, str]] = {}  # field -> flag without dashes, where not prefix + name
    hidden: ClassVar[tuple[str, ...]] = ()  # fields of a base class this group keeps off the command line
    help_prefix: ClassVar[str] = ""  # before each flag's help, e.g. "learned operators: "
    # field -> the field its flag follows in --help, where a subclass's field belongs beside
    # one of its base's (declaration order would put it after every base field)
    help_after: ClassVar[dict[str, str]] = {}

    @classmethod
    def parse(cls, values: dict[str, Any] | Options | None = None, **more: Any):
        """Validate ``values`` into the model; any problem is one UsageError naming the flag."""
        if isinstance(values, cls) and not more:
            return values
        given = values.model_dump() if isinstance(values, Options) else dict(values or {})
        given.update(more)
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise UsageError(f"unknown {cls.kind} option(s): {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as exc:
            raise usage_error(cls, exc) from None

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + (cls.flags.get(name) or flag_of(cls.model_fields[name]).flag or cls.prefix + name.replace("_", "-"))

    def as_dict(self) -> dict[str, Any]:
        """The values in effect, as JSON (what reports record)."""
        return self.model_dump(mode="json")


def usage_error(model: type[Options], exc: ValidationError) -> UsageError:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else ""
    if name not in model.model_fields:  # a check across fields (model validator)
        return UsageError(err["msg"].removeprefix("Value error, "))
    field = model.model_fields[name]
    where = model.flag(name) if flag_of(field).cli and name not in model.hidden else name
    where += "".join(f"[{part!r}]" for part in err["loc"][1:])
    if err["type"] == "value_error":  # a field's own check says what it accepts: ValueError("a size above 0 ...")
        wanted = err["msg"].removeprefix("Value error, ")
    elif len(err["loc"]) > 1:  # an item of a tuple or list: pydantic's words ("Input should be less than 1")
        return UsageError(f"{where}: {err['msg'][:1].lower()}{err['msg'][1:]}, got {err.get('input')!r}")
    else:
        wanted = describe(field)
    return UsageError(f"{where} must be {wanted}, got {err.get('input')!r}")


def describe(field) -> str:
    """What a field accepts, in words: 'a whole number >= 1', 'one of a, b', ..."""
    choices = flag_of(field).choices
    if choices:
        return "one of " + ", ".join(choices)
    base = _core_type(field.annotation)
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(base)))
    noun = {int: "a whole number", float: "a number", bool: "true or false"}.get(base, "a valid value")
    low = high = None
    for m in field.metadata:
        if isinstance(m, (Ge, Gt)):
            low = ("[" if isinstance(m, Ge) else "(", getattr(m, "ge", getattr(m, "gt", None)))
        if isinstance(m, (Le, Lt)):
            high = ("]" if isinstance(m, Le) else ")", getattr(m, "le", getattr(m, "lt", None)))
    if low and high:
        return f"{noun} in {low[0]}{_bound(low[1])}, {_bound(high[1])}{high[0]}"
    if low:
        return f"{noun} {'>=' if low[0] == '[' else '>'} {_bound(low[1])}"
    if high:
        return f"{noun} {'<=' if high[0] == ']' else '<'} {_bound(high[1])}"
    return noun


def _bound(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _core_type(annotation):
    """``X`` of ``X | None``; the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


# -- click ------------------------------------------------------------------------------


def click_options(model: type[Options], *, exclude: tuple[str, ...] = ()) -> list[click.Option]:
    """One click option per command-line field of ``model``, in declaration order (but for
    ``help_after``)."""
    names = [n for n, f in model.model_fields.items() if n not in exclude and n not in model.hidden and flag_of(f).cli]
    for name, after in model.help_after.items():
        if name in names and after in names:
            names.remove(name)
            names.insert(names.index(after) + 1, name)
    return [click_option(model, name, model.model_fields[name]) for name in names]


def click_option(model: type[Options], name: str, field) -> click.Option:
    flag = model.flag(name)
    base = _core_type(field.annotation)
    origin = typing.get_origin(base)
    choices = flag_of(field).choices
    kwargs: dict[str, Any] = {"default": None, "help": model.help_prefix + _help(field)}
    if base is bool:
        if field.default is False:
            kwargs["is_flag"] = True
        else:  # on by default, or decided by the command: both spellings
            flag = f"{flag}/--no-{flag[2:]}"
    elif choices or origin is Literal:
        kwargs["type"] = click.Choice(choices or [str(a) for a in typing.get_args(base)])
    elif origin is list:
        kwargs.update(multiple=True, type=_click_type(typing.get_args(base)[0]))
    elif origin is tuple:
        kwargs["type"] = tuple(_click_type(a) for a in typing.get_args(base))
    else:
        kwargs["type"] = _click_type(base)
    return click.Option([flag], **kwargs)


def _click_type(tp):
    if tp is Path:
        return click.Path(path_type=Path)
    return {int: click.INT, float: click.FLOAT, str: click.STRING}.get(tp, click.STRING)


def _help(field) -> str:
    text = field.description or ""
    if "[default:" in text or field.default is None or field.default is False:
        return text
    default = field.default
    if default is True:
        default = "on"
    elif isinstance(default, (list, tuple)):
        default = " ".join(map(str, default))
    return f"{text} [default: {default}]"


def with_options(model: type[Options] | Callable[[], type[Options]], *, exclude: tuple[str, ...] = ()):
    """Decorator: add ``model``'s flags to a click command (after those declared above it).

    ``model`` may be a function returning the group: it is then called only when the
    command (class ``OptionsCommand``) first needs its flags, to run or to show its own
    help, so that ``modelgrow --help`` does not import the engines (and torch) that
    declare the groups.
    """

    def apply(fn):
        params = [LazyOptions(model, exclude)] if not isinstance(model, type) else click_options(model, exclude=exclude)
        fn.__click_params__ = getattr(fn, "__click_params__", []) + params[::-1]
        return fn

    return apply


@dataclass(frozen=True)
class LazyOptions:
    """Holds a group's place among a command's parameters until OptionsCommand makes its flags."""

    load: Callable[[], type[Options]]
    exclude: tuple[str, ...] = ()

    def expand(self) -> list[click.Option]:
        return click_options(self.load(), exclude=self.exclude)


class OptionsCommand(click.Command):
    """A click command whose option groups (``with_options(lambda: Group)``) load on first use."""

    @property
    def params(self) -> list[click.Parameter]:
        if any(isinstance(p, LazyOptions) for p in self._params):
            self._params = [q for p in self._params for q in (p.expand() if isinstance(p, LazyOptions) else [p])]
        return self._params

    @params.setter
    def params(self, value: list) -> None:
        self._params = list(value)


def param_name(model: type[Options], name: str) -> str:
    """The click parameter a field's flag fills (``--fit-data`` fills ``fit_data``)."""
    return model.flag(name)[2:].replace("-", "_")


def given(values: dict[str, Any], model: type[Options], *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of ``model``'s fields the user typed (click leaves the others None/())."""
    out = {}
    for name, field in model.model_fields.items():
        value = values.get(param_name(model, name))
        if name in exclude or value is None or value == ():  # click leaves what was not typed None
            continue
        is_list = typing.get_origin(_core_type(field.annotation)) is list
        out[name] = list(value) if is_list else value
    return out


def defaults(**values: Any):
    """Class decorator: the same fields as the base group, other defaults."""

    def apply(cls: type[Options]) -> type[Options]:
        for name, value in values.items():
            cls.model_fields[name].default = value
        cls.model_rebuild(force=True)
        return cls

    return apply


def json_schema(model: type[Options]) -> dict[str, Any]:
    """The JSON Schema of the values a report records for ``model``."""
    return model.model_json_schema(mode="serialization")
