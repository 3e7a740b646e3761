"""Frozen attrs classes made attrs classes on first use, so that importing them never imports attrs.

Importing attrs costs about as much as everything else ``from flux_adapters import EditRequest,
FluxClient`` loads on top of httpx (it makes its own classes with attrs as it loads), and making
each attrs class compiles its methods. The classes that import reaches (`EditRequest`, the image
inputs, `Violation`) are therefore written as attrs classes, and type checkers see exactly that
(each module imports ``attrs.frozen`` and ``attrs.field`` under ``TYPE_CHECKING``), while at run
time this module's `frozen` leaves the class as written and applies ``attrs.frozen`` to it, in
place, the first time it is used:

- an instance is made (``__init__``) or unpickled (``__setstate__``);
- anyone asks for its fields (``__attrs_attrs__``: ``attrs.fields``, ``attrs.has``,
  ``attrs.evolve``, ``attrs.asdict``, cattrs; or attrs, making a subclass of it), its
  ``__match_args__`` or its signature (``inspect.signature``, ``help()``).

From then on the class is the attrs class it would have been (``__init__`` with its converters,
``__attrs_post_init__``, ``repr``, ``==``, ``hash``, ``FrozenInstanceError``, pickling), with one
difference: instances keep their values in a ``__dict__``, not in slots (attrs adds slots only by
making a new class, and the class must stay the object that was imported). Each class is made
once, under a lock, and only when used: a script that never passes an image never makes the
image classes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar, overload

__all__ = ["field", "frozen", "make_now"]

_C = TypeVar("_C", bound=type)

_LOCK: Final = threading.RLock()
_PENDING: Final[dict[type, dict[str, Any]]] = {}
"""Each class not made yet, with the options for ``attrs.frozen``."""
_MAKING: Final[set[type]] = set()
"""The classes attrs is making now (attrs may look at a class's fields while it makes it)."""


class _Field:
    """What ``field(...)`` was given in a class body, until ``attrs.field`` can be called."""

    __slots__ = ("options",)

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options


def field(**options: Any) -> Any:
    """``attrs.field(**options)``, called when the class is made."""
    return _Field(options)


class _MakesTheClass:
    """A class attribute that is there once attrs made the class: reading it makes the class.

    For ``__attrs_attrs__`` and ``__match_args__`` (which attrs writes), and ``__signature__``
    (which it does not: once the class is made, `inspect.signature` reads attrs' ``__init__``).
    ``__attrs_attrs__`` stays while attrs makes the class (another thread asking waits for it);
    attrs replaces it.
    """

    def __init__(self, cls: type, name: str) -> None:
        self.cls = cls
        self.name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        make_now(self.cls)
        made = self.cls.__dict__.get(self.name, self)
        if made is self:  # attrs is making this very class now, or writes no such attribute
            raise AttributeError(self.name)
        return made


_MADE_BY_ATTRS: Final = ("__attrs_attrs__", "__match_args__", "__signature__")


@overload
def frozen(maybe_cls: _C, /, **options: Any) -> _C: ...
@overload
def frozen(maybe_cls: None = None, /, **options: Any) -> Callable[[_C], _C]: ...
def frozen(maybe_cls: _C | None = None, /, **options: Any) -> _C | Callable[[_C], _C]:
    """``attrs.frozen(**options)``, applied to the class (in place) on its first use."""

    def defer(cls: _C) -> _C:
        own = vars(cls)
        if "__init__" in own or "__setstate__" in own or {"init", "slots"} & options.keys():
            raise TypeError(f"{cls.__qualname__}: attrs makes __init__ of a deferred class")

        def __init__(self: object, *args: object, **kwargs: object) -> None:
            make_now(cls)
            cls.__init__(self, *args, **kwargs)  # type: ignore[misc]  # attrs has made it

        def __setstate__(self: object, state: object) -> None:  # unpickled first
            make_now(cls)
            if isinstance(state, tuple):  # (__dict__, slots) as pickle writes them
                state, slots = state
                _restore(self, slots)
            _restore(self, state)

        _PENDING[cls] = options
        cls.__init__ = __init__  # type: ignore[misc]
        cls.__setstate__ = __setstate__  # type: ignore[attr-defined]
        for name in _MADE_BY_ATTRS:
            setattr(cls, name, _MakesTheClass(cls, name))
        return cls

    return defer if maybe_cls is None else defer(maybe_cls)


def _restore(instance: object, values: object) -> None:
    if isinstance(values, dict):
        for name, value in values.items():
            object.__setattr__(instance, name, value)


def make_now(cls: type) -> None:
    """Apply ``attrs.frozen`` to *cls* now, if it was deferred and is not made yet."""
    if cls not in _PENDING:
        return
    with _LOCK:
        options = _PENDING.get(cls)
        if options is None or cls in _MAKING:  # made by another thread meanwhile; or now
            return
        import attrs

        _MAKING.add(cls)
        try:
            for name, value in list(vars(cls).items()):
                if isinstance(value, _Field):
                    setattr(cls, name, attrs.field(**value.options))
                elif isinstance(value, _MakesTheClass) and name != "__attrs_attrs__":
                    delattr(cls, name)  # attrs writes no __match_args__ a class has already
            # init=True: attrs replaces the placeholder __init__ (it would keep a class's own).
            made = attrs.frozen(cls, slots=False, init=True, **options)
        finally:
            _MAKING.discard(cls)
        assert made is cls  # without slots, attrs changes the class itself
        del _PENDING[cls]
        # attrs writes no __setstate__ for a class without slots: pickle's own way restores the
        # __dict__ from now on (an unpickling that already found the placeholder still works).
        del cls.__setstate__  # type: ignore[attr-defined]
