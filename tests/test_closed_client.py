"""A closed client raises `ClientClosedError` (a FluxError), never httpx's bare RuntimeError.

Closing a `with_options` copy closes the copy only; closing the client closes its copies too.
Nothing is ever sent by a closed client, and no other provider is tried after one.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters.jobs import Job
from tests.conftest import image_bytes

KEY = "sk-test-0123456789abcdef"
REQUEST = EditRequest(prompt="a lighthouse", model="flux-2-pro")
OK = {"created": 1, "data": [{"url": "https://cdn.example/results/a.png"}]}
PNG = image_bytes(16, 16)
JOB = Job(provider="bfl", model="flux-2-pro", id="j-1", poll_url="https://api.bfl.ai/v1/get?id=j")


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)


class Seen:
    """A MockTransport handler that answers OK (and the image) and counts what it was sent."""

    def __init__(self) -> None:
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        if request.url.host == "cdn.example":
            return httpx.Response(200, content=PNG)
        return httpx.Response(200, json=OK)


def test_the_error_is_in_the_flux_tree_and_where_old_handlers_look() -> None:
    assert issubclass(errors.ClientClosedError, errors.FluxError)
    assert issubclass(errors.ClientClosedError, errors.ConfigurationError)  # what it was
    assert issubclass(errors.ClientClosedError, RuntimeError)  # what httpx raises


def test_a_closed_client_refuses_every_call_and_sends_nothing() -> None:
    seen = Seen()
    with httpx.Client(transport=httpx.MockTransport(seen)) as http:
        client = FluxClient("laozhang", api_key=KEY, http_client=http)
        states = []
        with client:
            states.append(client.is_closed)
        states.append(client.is_closed)
        assert states == [False, True]
        with pytest.raises(errors.ClientClosedError, match=r"closed \(by close\(\)"):
            client.edit(REQUEST)
        with pytest.raises(errors.ClientClosedError):
            client.with_options(timeout=5)
        client.close()  # again: nothing happens
        assert not http.is_closed  # the caller's: never closed here
    assert seen.sent == []


def test_resume_on_a_closed_client_is_refused_before_any_poll() -> None:
    seen = Seen()
    with httpx.Client(transport=httpx.MockTransport(seen)) as http:
        client = FluxClient("bfl", api_key=KEY, http_client=http)
        client.close()
        with pytest.raises(errors.ClientClosedError):
            client.resume(JOB)
    assert seen.sent == []


def test_closing_a_copy_closes_the_copy_only() -> None:
    seen = Seen()
    with httpx.Client(transport=httpx.MockTransport(seen)) as http:
        client = FluxClient("laozhang", api_key=KEY, http_client=http)
        with client.with_options(max_retries=1) as copy:
            assert copy.edit(REQUEST).provider == "laozhang"
        assert copy.is_closed
        assert not client.is_closed
        with pytest.raises(errors.ClientClosedError, match="closed"):
            copy.edit(REQUEST)
        assert client.edit(REQUEST).provider == "laozhang"
        fresh = client.with_options(max_retries=2)  # a new copy of an open client is open
        assert fresh.edit(REQUEST).provider == "laozhang"
    assert len(seen.sent) == 3


def test_closing_the_client_closes_every_copy_even_on_a_callers_pool() -> None:
    with httpx.Client(transport=httpx.MockTransport(Seen())) as http:
        client = FluxClient("laozhang", api_key=KEY, http_client=http)
        copy = client.with_options(timeout=5)
        copy_of_copy = copy.with_options(max_retries=1)
        client.close()
        assert not http.is_closed
        for each in (copy, copy_of_copy):
            with pytest.raises(errors.ClientClosedError, match="with_options\\(\\) copy"):
                each.edit(REQUEST)


def test_a_client_whose_own_pool_was_closed_closes_its_copies_too() -> None:
    client = FluxClient("laozhang", api_key=KEY)
    copy = client.with_options(timeout=5)
    client.close()
    assert client._http.is_closed
    with pytest.raises(errors.ClientClosedError):
        copy.edit(REQUEST)


def test_a_callers_httpx_client_closed_under_it_is_named() -> None:
    http = httpx.Client(transport=httpx.MockTransport(Seen()))
    client = FluxClient("laozhang", api_key=KEY, http_client=http)
    http.close()
    assert client.is_closed
    with pytest.raises(errors.ClientClosedError, match="httpx client of this FluxClient"):
        client.edit(REQUEST)


def test_closed_between_providers_ends_the_call_instead_of_failing_over() -> None:
    seen: list[str] = []
    client: FluxClient

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        client.close()  # another thread closes it while the first answer is on its way
        return httpx.Response(503, json={"error": {"message": "busy"}})

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(providers=["laozhang", "apiyi"], http_client=http, max_retries=0)
        with pytest.raises(errors.ClientClosedError) as caught:
            client.edit(REQUEST)
    assert seen == ["api.laozhang.ai"]  # apiyi was never tried: nothing more was sent
    assert not isinstance(caught.value, errors.AllProvidersFailed)


def test_httpx_refusing_a_closed_pool_mid_call_becomes_client_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The window between our check and httpx's own: httpx raises a bare RuntimeError there.
    http = httpx.Client(transport=httpx.MockTransport(Seen()))
    client = FluxClient("laozhang", api_key=KEY, http_client=http)
    checked = {"times": 0}
    real = FluxClient._check_open

    def once(self: FluxClient) -> None:
        checked["times"] += 1
        real(self)
        if checked["times"] == 2:  # the check in _send passed; now the pool closes
            http.close()

    monkeypatch.setattr(FluxClient, "_check_open", once)
    with pytest.raises(errors.ClientClosedError) as caught:
        client.edit(REQUEST)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert not isinstance(caught.value.__cause__, errors.FluxError)


def test_results_of_a_closed_client_can_still_be_read() -> None:
    seen = Seen()
    with httpx.Client(transport=httpx.MockTransport(seen)) as http:
        with FluxClient("laozhang", api_key=KEY, http_client=http) as client:
            result = client.edit(REQUEST)
        assert result.images[0].read() == PNG  # through the caller's pool, still open


def test_async_closed_client_copies_and_batches() -> None:
    seen = Seen()

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(seen)) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            async with client.with_options(max_retries=1) as copy:
                assert (await copy.edit(REQUEST)).provider == "laozhang"
            with pytest.raises(errors.ClientClosedError):
                await copy.edit(REQUEST)
            assert (await client.edit(REQUEST)).provider == "laozhang"
            async with client:
                pass
            with pytest.raises(errors.ClientClosedError):
                await client.edit(REQUEST)
            with pytest.raises(errors.ClientClosedError):
                await client.resume(JOB)
            with pytest.raises(errors.ClientClosedError):
                client.edit_many([REQUEST])
            await client.aclose()  # again: nothing happens
            assert not http.is_closed

    asyncio.run(main())
    assert len(seen.sent) == 2


def test_async_client_closed_mid_call_ends_the_call() -> None:
    seen: list[str] = []

    async def main() -> None:
        client: AsyncFluxClient

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.url.host)
            client._lifetime.close()  # as aclose() does first, from another task
            return httpx.Response(429, json={"error": {"message": "slow"}})

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = AsyncFluxClient(providers=["laozhang", "apiyi"], http_client=http)
            with pytest.raises(errors.ClientClosedError):
                await client.edit(REQUEST)

    asyncio.run(main())
    assert seen == ["api.laozhang.ai"]
