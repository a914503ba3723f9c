"""The typed fields of every config, and the one adapter from pydantic's errors to one-line ``ConfigError``s.

Configs (``core.config``) and attack specs (``attacks.spec``) are pydantic v2 models built from these
types, so a value means the same thing wherever it is given: an integer is an integer (``1.5`` and
``"3"`` are refused, not rounded or parsed), a flag is ``true``/``false``, a number is finite and may be
written as a fraction (``8/255``), a radius is a number >= 0. Ranges are ``Field(ge=..., le=...)`` on
the field, with the fix a user needs next to them (``fix(...)``); ``config_error`` turns the first
pydantic error into the message a user reads, naming the key, the value and the fix::

    attack.steps=0 must be >= 1
    config key 'attack.eps' must be a number, got 'big'
    unknown config key 'attack.epz' in section 'attack'; allowed: eps, name, ...

A validator that knows more than a range (run names, registered names, combinations of settings)
raises ``ConfigError`` itself; it reaches the user unchanged. Nothing here imports torch.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Annotated, Any

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic_core import PydanticCustomError

from .errors import ConfigError

__all__ = ["Bool", "Bytes", "Count", "Fraction", "Float", "Int", "Positive", "PositiveFloat", "Radius", "Section",
           "Str", "check_flag", "config_error", "fix", "parse_bytes", "parse_number"]


def parse_number(value: Any) -> float:
    """A finite number from an int, a float or a string such as ``"0.1"`` or ``"8/255"``; bools are not numbers."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            num, _, den = value.partition("/")
            number = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            pass
    if number is None:
        raise PydanticCustomError("number_type", "must be a number")
    if not math.isfinite(number):
        raise PydanticCustomError("number_finite", "must be a finite number")
    return number


# Memory sizes: decimal units as GPU vendors print them (an "80GB" H100 has 80e9 bytes and a little more), binary
# ones as torch reports them (GiB = 2**30).
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any) -> int:
    """A memory size in bytes from ``"80GB"`` (80e9), ``"80GiB"`` (80 * 2**30), ``"512 MiB"`` or a plain number of
    bytes; it must be > 0. Units are case-insensitive."""
    if isinstance(value, bool):
        raise PydanticCustomError("size_type", "must be a size such as 80GB or 80GiB")
    if isinstance(value, (int, float)):
        number, unit = float(value), "b"
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):] or "b"
        try:
            number = float(digits)
        except ValueError:
            raise PydanticCustomError("size_type", "must be a size such as 80GB or 80GiB") from None
        if unit not in SIZE_UNITS:
            raise PydanticCustomError("size_unit", "has an unknown unit; use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB")
    else:
        raise PydanticCustomError("size_type", "must be a size such as 80GB or 80GiB")
    if not math.isfinite(number) or number <= 0:
        raise PydanticCustomError("size_positive", "must be a size > 0")
    return int(number * SIZE_UNITS[unit])


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Float = Annotated[float, BeforeValidator(parse_number)]  # finite; "8/255" is 8/255
Radius = Annotated[Float, Field(ge=0)]  # an attack's eps: a radius in pixel units
Positive = Annotated[Int, Field(ge=1)]  # a count: steps, restarts, epochs, batch sizes
Bytes = Annotated[int, BeforeValidator(parse_bytes)]  # a memory size: "80GB", "80GiB", 1e9
Count = Annotated[Int, Field(ge=0)]  # a count that may be none: warm-up steps, a rank's index
PositiveFloat = Annotated[Float, Field(gt=0)]  # a size, a rate, a duration
Fraction = Annotated[Float, Field(ge=0, le=1)]  # a share of something, or an eps in pixel units


def fix(text: str) -> dict[str, Any]:
    """Field metadata: what to do about a value out of range, appended to its message as written."""
    return {"json_schema_extra": {"fix": text}}


class Section(BaseModel):
    """A frozen config section: unknown keys are errors, and a copy is validated like a new one.

    ``section`` is the section's dotted path in the run config (``"attack"``), so an error raised while
    building one section on its own still names the full key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)  # validators built on first use
    section: typing.ClassVar[str] = ""
    title: typing.ClassVar[str] = "the run config"  # what an unknown top-level key is unknown in
    hints: typing.ClassVar[dict[str, str]] = {}  # unknown top-level key -> what to say after the allowed ones

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise config_error(e, type(self)) from None

    @classmethod
    def build(cls, values: Any) -> Any:
        """Validate ``values`` (a mapping from YAML, JSON or flags) into this section, or raise ``ConfigError``."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise config_error(e, cls) from None

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any:
        """A copy with ``update`` applied and validated (pydantic's own copy skips validation)."""
        if not update:
            return super().model_copy(deep=deep)
        return type(self).build({**dict(self), **update})

    @classmethod
    def model_construct(cls, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{cls.__name__} is built validated: call it, or derive one with core.config.replace()")


# --- pydantic's errors -> one line -----------------------------------------------------------------------------

_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "number_type": "a number", "number_finite": "a finite number",
    "tuple_type": "a list", "list_type": "a list", "iterable_type": "a list",
    "size_type": "a size such as 80GB or 80GiB", "size_unit": "a size in B, KB, MB, GB, TB, KiB, MiB, GiB or TiB",
    "size_positive": "a size > 0",
}
_RANGES = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _section_of(annotation: Any) -> type[Section] | None:
    """``Section`` or ``Section | None`` -> the section class; anything else -> None."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, Section)]
        return found[0] if len(found) == 1 else None
    return None


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel], Any]:
    """The model that holds the last named field of ``loc``, and that field's FieldInfo (None if unknown)."""
    names = [part for part in loc if isinstance(part, str)]
    for name in names[:-1]:
        info = model.model_fields.get(name)
        section = _section_of(info.annotation) if info else None
        if section is None:
            break
        model = section
    return model, model.model_fields.get(names[-1]) if names else None


def _metadata(info: Any) -> list[Any]:
    """Every constraint and annotation on a field, also those inside ``Annotated[...] | None``."""
    found = list(info.metadata)
    for arg in typing.get_args(info.annotation):
        for item in getattr(arg, "__metadata__", ()):
            found += [item, *getattr(item, "metadata", ())]
    return found


def _interval(info: Any) -> str:
    """``[0, 1)``, ``>= 1`` ... from the field's bounds."""
    bounds = {name: getattr(m, name) for m in _metadata(info) if isinstance(m, annotated_types.BaseMetadata)
              for name in ("ge", "gt", "le", "lt") if getattr(m, name, None) is not None}
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"


def _fix(info: Any) -> str:
    extra = info.json_schema_extra if info is not None and isinstance(info.json_schema_extra, dict) else {}
    return extra.get("fix", "")


def _allowed(info: Any) -> str:
    annotation = info.annotation
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return ", ".join(map(str, typing.get_args(arg)))
    return ""


def config_error(error: ValidationError, model: type[BaseModel]) -> ConfigError:
    """The first of pydantic's errors as the one line a user reads (an unknown key first: it explains the rest)."""
    errors = error.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    raised = (first.get("ctx") or {}).get("error")
    if isinstance(raised, ConfigError):  # a validator's own message
        return raised
    loc = tuple(first["loc"])
    prefix = getattr(model, "section", "")
    names = [part for part in loc if isinstance(part, str)]
    key = ".".join(([prefix] if prefix else []) + names)
    holder, info = _walk(model, loc)
    value, kind = first["input"], first["type"]
    if kind == "extra_forbidden":
        where = f"section {key.rpartition('.')[0]!r}" if "." in key else getattr(model, "title", "the run config")
        hint = getattr(holder, "hints", {}).get(names[-1], "") if len(names) == 1 else ""
        return ConfigError(f"unknown config key {key!r} in {where}; allowed: {', '.join(sorted(holder.model_fields))}"
                           + hint)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        optional = info is not None and type(None) in typing.get_args(info.annotation)
        return ConfigError(f"config key {key!r} must be a mapping of its fields" + (", or null for off" if optional else ""))
    if kind in _TYPE_WORDS:
        return ConfigError(f"config key {key!r} must be {_TYPE_WORDS[kind]}, got {value!r}")
    if kind == "literal_error" and info is not None:
        return ConfigError(f"config key {key!r} is {value!r}; allowed: {_allowed(info)}")
    if kind in _RANGES and info is not None:
        shown = f"{value:g}" if isinstance(value, float) else value  # 8 and 8.0 alike, whichever pydantic reports
        return ConfigError(f"{key}={shown} must be {_interval(info)}{_fix(info)}")
    return ConfigError(f"config key {key!r}: {first['msg']}, got {value!r}")  # a kind this adapter does not word


# --- command-line flags through the same fields ----------------------------------------------------------------


def _bounds(field: Any) -> Any:
    """A stand-in FieldInfo for ``_interval``: the bounds on an ``Annotated`` field and the fields it nests."""
    found: list[Any] = []
    todo = [field]
    while todo:
        item = todo.pop()
        for meta in getattr(item, "__metadata__", ()):
            found += [meta, *getattr(meta, "metadata", ())]
        todo += [a for a in typing.get_args(item) if getattr(a, "__metadata__", None)]
    return types.SimpleNamespace(metadata=found, annotation=None)


def check_flag(flag: str, value: Any, field: Any, fix: str = "") -> Any:
    """A command-line flag's value through a typed field (``Positive``, ``PixelEps`` ...), as a config key's value
    goes through it; returns the value, or raises one line naming the flag (``fix``: appended, as a field's)::

        --steps=0 must be >= 1
        --lr=inf must be a finite number > 0
    """
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(field).validate_python(value)
    except ValidationError as e:
        kind = e.errors(include_url=False)[0]["type"]
    bounds = _bounds(field)
    shown = f"{value:g}" if isinstance(value, float) else value
    interval = _interval(bounds) if any(isinstance(m, annotated_types.BaseMetadata) for m in bounds.metadata) else ""
    if kind in _RANGES:
        wanted = interval
    else:  # a type error: say the range too (nan and inf are refused by the type, before any bound)
        wanted = " ".join(filter(None, [_TYPE_WORDS.get(kind, "a valid value"), interval]))
    raise ConfigError(f"{flag}={shown} must be {wanted}{fix}")
