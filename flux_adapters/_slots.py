"""Setting the slots of a frozen attrs instance the library makes on every call, directly.

A frozen attrs class refuses ``instance.name = value``, so attrs' own ``__init__`` sets each field
with ``object.__setattr__``: a generic attribute lookup per field. Setting a slot through its
descriptor (``Class.__dict__["name"].__set__``) is the same store without the lookup, about
twice as fast; the few classes made for every edit (the images of an answer, the result, its
attempt, the flow's outcome) use it in constructors of their own.

`slot_setters` checks that the names given are exactly the class's attrs fields, in order (and
then any slots of its own besides them), so a field added later cannot be left unset: such a
constructor fails when its module is imported, not when a call comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["slot_setters"]


def slot_setters(
    cls: type, fields: tuple[str, ...], extra: tuple[str, ...] = ()
) -> tuple[Callable[[Any, Any], None], ...]:
    """The descriptor setters of *cls*'s attrs *fields* (every one, in order), then of *extra*.

    Raises:
        TypeError: *fields* are not exactly the attrs fields of *cls*, or a name is no slot.
    """
    import attrs

    declared = tuple(each.name for each in attrs.fields(cls))
    if declared != fields:
        raise TypeError(f"{cls.__qualname__} has the fields {declared}, not {fields}")
    setters = []
    for name in fields + extra:
        slot = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
        setter = getattr(type(slot), "__set__", None)
        if slot is None or type(slot).__name__ != "member_descriptor" or setter is None:
            raise TypeError(f"{cls.__qualname__}.{name} is not a slot")
        setters.append(slot.__set__)
    return tuple(setters)
