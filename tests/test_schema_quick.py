"""`_schema.structure` takes a plain line without cattrs (`_quick`): the shortcut must make what
cattrs makes whenever it takes a line, and leave every other line to cattrs and its messages."""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_adapters import _schema
from flux_adapters._batch_files import BatchLine
from flux_adapters.config import _FileShape, _ProviderShape

_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=6,
)
"""Any JSON value a line may hold."""


_FITTING: dict[object, st.SearchStrategy[Any]] = {
    str: st.text(max_size=5),
    int: st.integers(),
    float: st.one_of(st.floats(allow_nan=False), st.integers()),
    bool: st.booleans(),
    list[str]: st.lists(st.text(max_size=3), max_size=3),
    dict[str, object]: st.dictionaries(st.text(max_size=3), _VALUES, max_size=2),
}


def _fitting(kind: object) -> st.SearchStrategy[Any]:
    """A value of the type *kind* (an annotation of a line's field)."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    return st.one_of(
        *(st.none() if option is type(None) else _FITTING[option] for option in options)
    )


def _lines(kind: type) -> st.SearchStrategy[dict[str, Any]]:
    """Lines of *kind*: each required field, the others present or not; values of their types."""
    fields = attrs.fields(attrs.resolve_types(kind))
    return st.fixed_dictionaries(
        {field.name: _fitting(field.type) for field in fields if field.default is attrs.NOTHING},
        optional={
            field.name: _fitting(field.type)
            for field in fields
            if field.default is not attrs.NOTHING
        },
    )


_LINES: dict[type[Any], st.SearchStrategy[dict[str, Any]]] = {
    kind: _lines(kind) for kind in (BatchLine, _ProviderShape, _FileShape)
}
"""Each kind's lines, made once (a strategy is reusable): made again for each of the examples,
they were a quarter of their time."""


@settings(max_examples=1500, deadline=None)
@given(data=st.data())
def test_the_quick_path_makes_what_cattrs_makes_or_leaves_the_line_to_it(
    data: st.DataObject,
) -> None:
    kind: type[Any] = data.draw(st.sampled_from(list(_LINES)))
    line = data.draw(_LINES[kind])
    names = [field.name for field in attrs.fields(kind)]
    for name in data.draw(st.sets(st.sampled_from([*names, "unknown"]), max_size=2)):
        line[name] = data.draw(_VALUES)  # any value, of any type, or a key of no field
    quick = _schema._quick(dict(line), kind)
    if quick is None:
        return
    assert quick == _schema._converter().structure(dict(line), kind)
