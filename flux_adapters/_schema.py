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

__all__ = ["Problem", "Unstructured", "structure"]

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


def _optional(kinds: tuple[type, ...]) -> Callable[[object, object], object]:
    return _plain(*kinds, type(None))


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


# What each type a value class may use is called in messages, and its hook.
_TYPES: Final[dict[object, tuple[str, Callable[[object, object], object]]]] = {
    str: ("text", _plain(str)),
    int: ("a whole number", _plain(int)),
    float: ("a number", _plain(int, float)),
    bool: ("true or false", _plain(bool)),
    str | None: ("text", _optional((str,))),
    int | None: ("a whole number", _optional((int,))),
    float | None: ("a number", _optional((int, float))),
    bool | None: ("true or false", _optional((bool,))),
    str | int | None: ("text or a whole number", _optional((str, int))),
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


def structure(data: dict[str, object], kind: type[_T]) -> _T:
    """*data* as a *kind* (an attrs class whose fields use the types above).

    Raises:
        Unstructured: Every key *kind* does not have, every required key missing, and every
            value of the wrong type.
    """
    from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

    try:
        return _converter().structure(data, kind)
    except (ClassValidationError, ForbiddenExtraKeysError) as error:
        raise Unstructured(tuple(_problems(error, kind))) from None
