"""Strict structuring of what a person writes: a batch file's lines, the configuration file.

cattrs builds each value class from a dict, refusing keys the class does not have
(``forbid_extra_keys``) and collecting every problem at once (``detailed_validation``). The
hooks here never convert a value's type: cattrs' own would take ``"512"`` for 512, 3.7 for 3,
``"no"`` for True and a string for the list of its characters. Each problem comes back as one
`Problem` (the field, what it must be, what it was) for the caller to word with its own
context: a batch file names the line, the configuration file its section.

Only the shape is checked here (which keys, which JSON/TOML types); what the values mean
(ranges, known ids, files) is checked by the code that uses them, with messages of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import attrs

from flux_adapters._display import render_value, type_name

if TYPE_CHECKING:
    import cattrs

__all__ = ["Problem", "Unstructured", "fits", "structure"]

_T = TypeVar("_T")


@attrs.frozen
class Problem:
    """One way a dict does not fit its class.

    Attributes:
        kind: ``"unknown"`` (keys the class does not have), ``"missing"`` (a required key is
            absent) or ``"type"`` (a value of the wrong type).
        field: The key at fault, with an index inside a list (``"images[1]"``); empty for
            ``"unknown"``.
        expected: What the key takes (``"a whole number"``); for ``"unknown"``, every key the
            class has, comma-separated.
        value: What was given, rendered short; for ``"unknown"``, the unknown keys.
    """

    kind: Literal["unknown", "missing", "type"]
    field: str
    expected: str
    value: str

    def __str__(self) -> str:
        if self.kind == "unknown":
            return f"unknown fields {self.value}; known: {self.expected}"
        if self.kind == "missing":
            return f"{self.field} is missing ({self.expected})"
        return f"{self.field} must be {self.expected}, not {self.value}"


class Unstructured(Exception):
    """The data does not fit the class; every problem found, not only the first."""

    def __init__(self, problems: tuple[Problem, ...]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


class _Wrong(TypeError):
    """Raised by a hook: *value* is not of the type the field takes (at *at* inside it)."""

    def __init__(self, value: object, at: str = "") -> None:
        super().__init__(type_name(value))
        self.value = value
        self.at = at


def _shown(value: object) -> str:
    return f"{type_name(value)} {render_value(value)}"


def _plain(*kinds: type) -> Callable[[object, object], object]:
    """A hook taking a value whose type is exactly one of *kinds* (no subclass: bool is no int)."""

    def hook(value: object, _: object) -> object:
        if type(value) not in kinds:
            raise _Wrong(value)
        return value

    return hook


def _strings(value: object, _: object) -> list[str]:
    if type(value) is not list:
        raise _Wrong(value)
    for index, item in enumerate(value):
        if type(item) is not str:
            raise _Wrong(item, f"[{index}]")
    return list(value)


def _table(value: object, _: object) -> dict[str, object]:
    if type(value) is not dict:
        raise _Wrong(value)
    return dict(value)


_NONE: Final = type(None)

# The types taken as they are: what each is called in messages, and the exact types of its values.
_SCALARS: Final[dict[object, tuple[str, tuple[type, ...]]]] = {
    str: ("text", (str,)),
    int: ("a whole number", (int,)),
    float: ("a number", (int, float)),
    bool: ("true or false", (bool,)),
    str | None: ("text", (str, _NONE)),
    int | None: ("a whole number", (int, _NONE)),
    float | None: ("a number", (int, float, _NONE)),
    bool | None: ("true or false", (bool, _NONE)),
    str | int | None: ("text or a whole number", (str, int, _NONE)),
}

# What each type a value class may use is called in messages, and its hook.
_TYPES: Final[dict[object, tuple[str, Callable[[object, object], object]]]] = {
    **{kind: (words, _plain(*exact)) for kind, (words, exact) in _SCALARS.items()},
    list[str]: ("a list of strings", _strings),
    list[str] | None: (
        "a list of strings",
        lambda value, kind: None if value is None else _strings(value, kind),
    ),
    dict[str, object]: ("a table", _table),
}


@functools.cache
def _converter() -> cattrs.Converter:
    import cattrs  # lazy: keeps `import flux_adapters` cheap

    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for kind, (_, hook) in _TYPES.items():
        if isinstance(kind, type):  # str, int, ...: replaces cattrs' own (converting) hook
            converter.register_structure_hook(kind, hook)
    # Unions and generics go by predicate; registered last, these come before cattrs' own.
    converter.register_structure_hook_func(
        lambda kind: not isinstance(kind, type) and kind in _TYPES,
        lambda value, kind: _TYPES[kind][1](value, kind),
    )
    return converter


def _expected(kind: type, name: str) -> str:
    """What field *name* of *kind* takes: its ``expected`` metadata, else its type's name."""
    for attribute in attrs.fields(attrs.resolve_types(kind)):
        if attribute.name == name:
            described = attribute.metadata.get("expected")
            if isinstance(described, str):
                return described
            return _TYPES.get(attribute.type, ("a value",))[0]
    return "a value"


def _problems(error: BaseException, kind: type) -> Iterator[Problem]:
    from cattrs.errors import AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError

    if isinstance(error, ForbiddenExtraKeysError):
        known = ", ".join(sorted(attribute.name for attribute in attrs.fields(kind)))
        yield Problem("unknown", "", known, str(sorted(map(str, error.extra_fields))))
        return
    if not isinstance(error, ClassValidationError):
        raise error  # not a shape problem: a bug, to be seen
    for inner in error.exceptions:
        notes = [note for note in getattr(inner, "__notes__", ()) if hasattr(note, "name")]
        if not notes:
            yield from _problems(inner, kind)
            continue
        note = notes[-1]
        assert isinstance(note, AttributeValidationNote)
        expected = _expected(kind, note.name)
        if isinstance(inner, KeyError):
            yield Problem("missing", note.name, expected, "nothing")
        elif isinstance(inner, _Wrong):
            described = expected if not inner.at else "text"
            yield Problem("type", note.name + inner.at, described, _shown(inner.value))
        else:
            raise inner


_LIST: Final[tuple[type, ...]] = (list,)
"""In a `_quick_plan`: the field takes a list of strings."""


@functools.cache
def _quick_plan(kind: type) -> tuple[dict[str, tuple[type, ...]], frozenset[str]] | None:
    """What `_quick` checks of *kind*: each field's exact types, and the fields required.

    ``None`` for a class with a field of another type (a table, another class): `_quick` passes
    it on to cattrs. A field taking a list of strings has `_LIST`.
    """
    plan: dict[str, tuple[type, ...]] = {}
    required = set()
    for attribute in attrs.fields(attrs.resolve_types(kind)):
        if attribute.alias != attribute.name:
            return None
        if attribute.type in _SCALARS:
            plan[attribute.name] = _SCALARS[attribute.type][1]
        elif attribute.type == list[str]:
            plan[attribute.name] = _LIST
        else:
            return None
        if attribute.default is attrs.NOTHING:
            required.add(attribute.name)
    return plan, frozenset(required)


def fits(data: dict[str, object], kind: type) -> bool:
    """Whether *data* fits *kind* at first sight (the usual case), without making a *kind*.

    When it does, `structure` makes a *kind* of exactly these values (each list copied) with no
    problem to report: a caller that needs only to know so, or only the values, is spared
    making it (a batch checks each line of its file, then reads it again to send it). When it
    does not, *data* may still fit: `structure` says.
    """
    plan = _quick_plan(kind)
    if plan is None:
        return False
    exact, required = plan
    for key, value in data.items():
        kinds = exact.get(key)
        if kinds is None:  # not a field
            return False
        if kinds is _LIST:
            if type(value) is not list:
                return False
            for item in value:
                if type(item) is not str:
                    return False
        elif type(value) not in kinds:
            return False
    return required <= data.keys()


def _quick(data: dict[str, object], kind: type[_T]) -> _T | None:
    """*data* as a *kind* when it fits at first sight (`fits`), else ``None``.

    What it makes is what cattrs and the hooks above make (each value as it is, each list a
    copy); whatever does not fit, or a class it does not know, goes to them for the problems.
    """
    if not fits(data, kind):
        return None
    values = dict(data)
    for key, value in values.items():
        if type(value) is list:
            values[key] = list(value)
    return kind(**values)


def structure(data: dict[str, object], kind: type[_T]) -> _T:
    """*data* as a *kind* (an attrs class whose fields use the types above).

    Raises:
        Unstructured: Every key *kind* does not have, every required key missing, and every
            value of the wrong type.
    """
    made = _quick(data, kind)
    if made is not None:
        return made
    from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

    try:
        return _converter().structure(data, kind)
    except (ClassValidationError, ForbiddenExtraKeysError) as error:
        raise Unstructured(tuple(_problems(error, kind))) from None
