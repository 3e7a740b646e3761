"""Any value of any type for any client argument, and for edit(): a client or a FluxError.

5,000 generated examples in all, at every Hypothesis profile: 1,000 for one argument and 1,000
for edit(), each for both clients, and 1,000 for several arguments at once. With the 10,000 of
tests/test_hostile_input.py (every EditRequest field, and check()) that is 15,000.
Each constructor gets a shared httpx client (unless that is the argument under test), so no
connection pool or TLS context is built per example.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters.prices import PerCall
from flux_adapters.routing import RoutingPolicy

KEY = "sk-test-0123456789abcdef"
OK = {"created": 1, "data": [{"url": "https://cdn.example/a.png"}]}


class Hostile:
    """An object whose every dunder a careless caller's code might hit raises.

    Only ``__repr__`` works, so that Hypothesis can show a failing example.
    """

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("__eq__")

    def __hash__(self) -> int:
        raise RuntimeError("__hash__")

    def __str__(self) -> str:
        raise RuntimeError("__str__")

    def __repr__(self) -> str:
        return "Hostile()"

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"__getattr__({name})")

    def __iter__(self) -> Iterator[object]:
        raise RuntimeError("__iter__")

    def __len__(self) -> int:
        raise RuntimeError("__len__")

    def __bool__(self) -> bool:
        raise RuntimeError("__bool__")

    def __fspath__(self) -> str:
        raise RuntimeError("__fspath__")

    def __float__(self) -> float:
        raise RuntimeError("__float__")


def _raising() -> Iterator[str]:
    yield "laozhang"
    raise RuntimeError("a generator that fails")


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**400, -(10**400), 2**63, 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=30),
    st.sampled_from(["\ud800", "laozhang\r\n", "", " ", "cheapest ", "https://x", "ordered"]),
    st.binary(max_size=20),
    st.builds(Hostile),
    st.builds(object),
    st.just(Path("/dev/null")),
    st.builds(_raising),
    st.sampled_from([httpx.Timeout(5), httpx.Timeout(None), RoutingPolicy(), PerCall(usd=0.1)]),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.tuples(st.text(max_size=8), st.text(max_size=8))),
            inner,
            max_size=3,
        ),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=5,
)

ARGUMENTS = [
    "provider",
    "providers",
    "routing",
    "api_key",
    "base_url",
    "http_client",
    "timeout",
    "deadline",
    "max_cost_usd",
    "failover_on_ambiguous",
    "policy",
    "prices",
    "settings",
]


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[httpx.Client, httpx.AsyncClient]]:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=OK))
    sync, asynchronous = httpx.Client(transport=transport), httpx.AsyncClient(transport=transport)
    yield sync, asynchronous
    sync.close()
    asyncio.run(asynchronous.aclose())


def build(kind: str, shared: tuple[httpx.Client, httpx.AsyncClient], **options: Any) -> object:
    options.setdefault("http_client", shared[0] if kind == "sync" else shared[1])
    if "providers" not in options:
        options.setdefault("provider", "laozhang")
    if "provider" in options and options.get("provider") is not None:
        options.setdefault("api_key", KEY)
    cls = FluxClient if kind == "sync" else AsyncFluxClient
    return cls(**options)


def typed(call: Any) -> Any:
    """Run *call*: a result or a FluxError, never any other exception."""
    try:
        return call()
    except errors.FluxError as error:
        return error


PROFILE = settings(
    max_examples=1_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("kind", ["sync", "async"])
@PROFILE
@given(name=st.sampled_from(ARGUMENTS), value=anything)
def test_any_value_for_one_constructor_argument(
    kind: str, name: str, value: object, shared: tuple[httpx.Client, httpx.AsyncClient]
) -> None:
    options = {name: value}
    if name == "providers":
        options["provider"] = None
    typed(lambda: build(kind, shared, **options))


@PROFILE
@given(values=st.dictionaries(st.sampled_from(ARGUMENTS), anything, min_size=2, max_size=5))
def test_any_values_for_several_constructor_arguments(
    values: dict[str, object], shared: tuple[httpx.Client, httpx.AsyncClient]
) -> None:
    typed(lambda: build("sync", shared, **values))


@pytest.mark.parametrize("kind", ["sync", "async"])
@settings(
    max_examples=1_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=anything)
def test_any_value_given_to_edit(
    kind: str, request: object, shared: tuple[httpx.Client, httpx.AsyncClient]
) -> None:
    client = build(kind, shared)
    if kind == "sync":
        outcome = typed(lambda: client.edit(request))  # type: ignore[attr-defined]
    else:

        async def call() -> object:
            try:
                return await client.edit(request)  # type: ignore[attr-defined]
            except errors.FluxError as error:
                return error

        outcome = asyncio.run(call())
    assert isinstance(outcome, errors.RequestError)  # nothing but an EditRequest is sent


def test_a_valid_request_still_goes_through(shared: tuple[httpx.Client, httpx.AsyncClient]) -> None:
    client = build("sync", shared)
    result = client.edit(EditRequest(prompt="a robot", model="flux-2-pro"))  # type: ignore[attr-defined]
    assert result.images[0].url == OK["data"][0]["url"]  # type: ignore[index]
