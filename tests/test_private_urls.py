"""A provider's URLs may not lead the library to non-public addresses (request forgery).

A hostile provider chooses the result URLs the library downloads, the polling URLs it polls and
where those redirect. Each is refused when it leads to loopback, a private network, link-local
(cloud metadata), ... unless the provider is trusted (its base URL is itself such an address,
or ``allow_private_urls``). The check is made where the connection is opened, after the name is
resolved: these tests map public-looking names to loopback (or to addresses nothing listens on)
with a stubbed ``getaddrinfo``, and a fake internal server counts the requests that reach it.
Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpcore
import httpx
import openai
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters._addresses import GUARDED, Guard, Target, address_kind, guard_for
from flux_adapters._bounded import _BoundedBackend, _GuardedAsyncBackend
from flux_adapters.config import ProviderSettings, load_config
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.gateway import run_gateway
from flux_adapters.jobs import Polling
from flux_adapters.routing import billing_rule
from tests.conftest import CLIENT_KINDS, driver, image_bytes, serving

KEY = "sk-private-urls-7Hq2Lw9Zt4Nc1Vb8Xm3R"
REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")
FAST_POLLS = Polling(first=0.01, factor=1.0, longest=0.01, jitter=0.0)
PNG = image_bytes()


# -- the classifier ------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34"])
def test_public_addresses_pass(address: str) -> None:
    assert address_kind(address) is None


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.5.6.7", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "site-local"),  # deprecated, but routed where a network still uses it
        ("169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (IPv4 inside IPv6)"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::1", "loopback (IPv4 inside IPv6)"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", "private network (IPv4 inside IPv6)"),  # NAT64 of 10.0.0.1
        ("198.18.0.1", ""),  # benchmarking
        ("240.0.0.1", ""),  # reserved
        ("not-an-address", "not an IP address"),
    ],
)
def test_non_public_addresses_are_named(address: str, kind: str) -> None:
    found = address_kind(address)
    assert found is not None
    assert kind in found


def scrub(text: str) -> str:
    return text.replace(KEY, "[key]")


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:8000",
        "http://localhost:1",
        "http://emulator.localhost:1",
        "http://[::1]:2",
        "http://10.0.0.7/v1",
        "http://192.168.0.2",
    ],
)
def test_a_provider_at_a_non_public_base_url_is_trusted(base: str) -> None:
    assert guard_for("laozhang", base, scrub, allow_private_urls=False) is None


def test_a_provider_at_a_named_base_url_is_checked_unless_allowed() -> None:
    for base in ("https://api.laozhang.ai", "http://reseller.test:8080"):
        assert isinstance(guard_for("laozhang", base, scrub, allow_private_urls=False), Guard)
        assert guard_for("laozhang", base, scrub, allow_private_urls=True) is None


def test_which_urls_are_checked_where() -> None:
    guard = Guard("laozhang", "https://api.laozhang.ai", scrub)
    # The base URL's own host and port: where the operator sends the key.
    assert guard.target("https://api.laozhang.ai/files/1.png", "result") is None
    assert guard.target("https://API.laozhang.ai:443/x", "result") is None
    # A public literal address: nothing left to check.
    assert guard.target("https://93.184.216.34/x", "result") is None
    # A name: checked where it is connected to.
    found = guard.target("https://api.laozhang.ai:8443/x", "result")
    assert isinstance(found, Target)
    assert found.host == "api.laozhang.ai"
    assert isinstance(guard.target("https://cdn.example/x.png", "result"), Target)
    # A literal non-public address: refused at once.
    for url in (
        "http://127.0.0.1:9/x",
        "http://[::ffff:7f00:1]/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0:80/",
        f"http://{KEY}@10.0.0.1/?key={KEY}",
    ):
        with pytest.raises(errors.AddressRefused) as caught:
            guard.target(url, "result")
        assert KEY not in str(caught.value)
        assert "allow_private_urls = true in [provider.laozhang]" in str(caught.value)


def test_the_error_pickles_and_says_what_and_how() -> None:
    import pickle

    guard = Guard("laozhang", "https://api.laozhang.ai", scrub)
    with pytest.raises(errors.AddressRefused) as caught:
        guard.target("http://169.254.169.254/latest", "polling")
    error = caught.value
    assert isinstance(error, errors.FluxError)
    assert (error.provider, error.host) == ("laozhang", "169.254.169.254:80")
    assert "link-local" in error.reason
    text = str(error)
    assert text.startswith("laozhang: the polling URL it gave leads to a link-local")
    assert "nothing was sent there" in text
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), str(again), again.reason) == (type(error), text, error.reason)


# -- the network backends: checked where they connect ----------------------------------------------


class _Stream(httpcore.NetworkStream):
    def close(self) -> None:
        pass


class _Inner(httpcore.NetworkBackend):
    """A backend that connects nowhere and records where it was asked to."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> _Stream:
        self.asked.append(host)
        return _Stream()


class _AsyncStream(httpcore.AsyncNetworkStream):
    async def aclose(self) -> None:
        pass


class _AsyncInner(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> _AsyncStream:
        self.asked.append(host)
        return _AsyncStream()


def _answer(*addresses: str) -> list[tuple[Any, ...]]:
    return [
        (
            socket.AF_INET6 if ":" in address else socket.AF_INET,
            socket.SOCK_STREAM,
            6,
            "",
            (address, 443, 0, 0) if ":" in address else (address, 443),
        )
        for address in addresses
    ]


@pytest.fixture
def rebinding(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """``getaddrinfo`` answers each name with the next of these lists (the last one again)."""
    answers: list[list[str]] = []
    asked: list[int] = [0]

    def lookup(host: object, port: object, *args: object, **kwargs: object) -> object:
        turn = min(asked[0], len(answers) - 1)
        asked[0] += 1
        return _answer(*answers[turn])

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return answers


def _target() -> Target:
    found = Guard("fal", "https://queue.fal.run", scrub).target("https://rebind.test/x", "polling")
    assert found is not None
    return found


def test_a_name_that_rebinds_is_caught_where_it_connects(rebinding: list[list[str]]) -> None:
    """Public at one look, loopback at the next: each connect checks what it connects to."""
    rebinding += [["93.184.216.34"], ["127.0.0.1"]]
    inner = _Inner()
    backend = _BoundedBackend(inner)
    token = GUARDED.set(_target())
    try:
        backend.connect_tcp("rebind.test", 443)
        with pytest.raises(errors.AddressRefused, match="loopback"):
            backend.connect_tcp("rebind.test", 443)
    finally:
        GUARDED.reset(token)
    # Connected to the address checked, never to the name (no second lookup to rebind).
    assert inner.asked == ["93.184.216.34"]


def test_a_name_with_one_private_address_among_public_ones_is_refused(
    rebinding: list[list[str]],
) -> None:
    rebinding.append(["93.184.216.34", "10.0.0.5"])
    inner = _Inner()
    token = GUARDED.set(_target())
    try:
        with pytest.raises(errors.AddressRefused, match="private network"):
            _BoundedBackend(inner).connect_tcp("rebind.test", 443)
    finally:
        GUARDED.reset(token)
    assert inner.asked == []


def test_a_proxy_pool_and_an_unguarded_exchange_connect_as_before(
    rebinding: list[list[str]],
) -> None:
    rebinding.append(["127.0.0.1"])
    inner = _Inner()
    _BoundedBackend(inner).connect_tcp("api.example", 443)  # nothing guarded in this context
    token = GUARDED.set(_target())
    try:
        _BoundedBackend(inner, guarded=False).connect_tcp("proxy.internal", 3128)
    finally:
        GUARDED.reset(token)
    assert inner.asked == ["api.example", "proxy.internal"]


def test_the_async_backend_checks_where_it_connects(rebinding: list[list[str]]) -> None:
    rebinding += [["93.184.216.34"], ["::ffff:169.254.169.254"]]
    inner = _AsyncInner()
    backend = _GuardedAsyncBackend(inner)

    async def connect() -> None:
        token = GUARDED.set(_target())
        try:
            await backend.connect_tcp("rebind.test", 443)
            with pytest.raises(errors.AddressRefused, match="link-local"):
                await backend.connect_tcp("rebind.test", 443)
        finally:
            GUARDED.reset(token)

    asyncio.run(connect())
    assert inner.asked == ["93.184.216.34"]


def test_the_aiohttp_connector_checks_what_it_resolves() -> None:
    pytest.importorskip("aiohttp")
    from aiohttp.abc import AbstractResolver, ResolveResult

    from flux_adapters._aiohttp import _GuardedConnector

    turns = [["93.184.216.34"], ["10.0.0.5"]]

    class Inner(AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
            return [
                ResolveResult(
                    hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0
                )
                for a in turns.pop(0)
            ]

        async def close(self) -> None:
            pass

    async def resolve() -> None:
        connector = _GuardedConnector(resolver=Inner(), use_dns_cache=False)
        token = GUARDED.set(_target())
        try:
            found = await connector._resolve_host("rebind.test", 443)
            assert [entry["host"] for entry in found] == ["93.184.216.34"]
            with pytest.raises(errors.AddressRefused, match="private network"):
                await connector._resolve_host("rebind.test", 443)
        finally:
            GUARDED.reset(token)
            await connector.close()

    asyncio.run(resolve())


def test_through_a_proxy_the_name_is_checked_beforehand(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy resolves the target itself: the connection to it (the proxy's) is not checked,
    and the caller resolves and checks the target first instead."""
    from flux_adapters._bounded import needs_lookup
    from flux_adapters._drivers import HttpxDriver
    from flux_adapters._transport import bounded_http_client

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "direct.test")
    with bounded_http_client() as sync:
        assert needs_lookup(sync, "http://cdn.test/x.png")
        assert not needs_lookup(sync, "http://direct.test/x.png")
    own = HttpxDriver()
    try:
        assert own.needs_lookup("http://cdn.test/x.png")
        assert not own.needs_lookup("http://direct.test/x.png")
    finally:
        asyncio.run(own.aclose())
    monkeypatch.delenv("HTTP_PROXY")
    with bounded_http_client() as direct:
        assert not needs_lookup(direct, "http://cdn.test/x.png")
    with httpx.Client() as yours:  # the caller's: its connections cannot be reached
        assert needs_lookup(yours, "http://cdn.test/x.png")
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as mocked:
        assert not needs_lookup(mocked, "http://cdn.test/x.png")  # it goes where it says


# -- end to end: a provider at a public-looking name, mapped to loopback ----------------------------


class Recorder(http.server.ThreadingHTTPServer):
    """A fake internal service on loopback: it serves an image and counts who asked."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.heads: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.paths.append(self.path)
                recorder.heads.append(str(self.headers))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Provider(http.server.ThreadingHTTPServer):
    """A laozhang-shaped provider whose answer's result URL the test chooses (``result``).

    ``GET /redirect`` answers a 302 to ``location``.
    """

    def __init__(self) -> None:
        self.result = ""
        self.location = ""
        self.paths: list[str] = []
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                provider.paths.append(self.path)
                body = json.dumps({"created": 1, "data": [{"url": provider.result}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                provider.paths.append(self.path)
                self.send_response(302)
                self.send_header("Location", provider.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Names the test maps to addresses; any other name is looked up as before (loopback only)."""
    mapped: dict[str, str] = {}
    before = socket.getaddrinfo

    def lookup(host: object, port: object, *args: object, **kwargs: object) -> object:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in mapped:
            number = int(port) if isinstance(port, int | str) and str(port).isdigit() else 0
            return [(*_answer(mapped[name])[0][:4], (mapped[name], number))]
        return before(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return mapped


@pytest.fixture
def internal() -> Iterator[Recorder]:
    with serving(Recorder()) as server:
        yield server


@pytest.fixture
def provider(names: dict[str, str]) -> Iterator[Provider]:
    names["reseller.test"] = "127.0.0.1"
    with serving(Provider()) as server:
        yield server


def base(provider: Provider) -> str:
    return f"http://reseller.test:{provider.port}"


def fetched(kind: str, url_base: str, **options: Any) -> bytes:
    """Edit with a client of *kind* at *url_base*, then read the result image."""
    if kind == "sync":
        with FluxClient("laozhang", api_key=KEY, base_url=url_base, **options) as client:
            return client.edit(REQUEST).images[0].read()

    async def run() -> bytes:
        async with AsyncFluxClient(
            "laozhang", api_key=KEY, base_url=url_base, driver=driver(kind), **options
        ) as client:
            result = await client.edit(REQUEST)
            return await result.images[0].read_async()

    return asyncio.run(run())


RESULTS: dict[str, Callable[[int], str]] = {
    "loopback": lambda port: f"http://127.0.0.1:{port}/result.png",
    "mapped-v6": lambda port: f"http://[::ffff:127.0.0.1]:{port}/result.png",
    "name-to-loopback": lambda port: f"http://internal.test:{port}/result.png",
    "localhost": lambda port: f"http://localhost:{port}/result.png",
}


@pytest.mark.parametrize("kind", CLIENT_KINDS)
@pytest.mark.parametrize("shape", list(RESULTS))
def test_a_result_url_to_a_private_address_is_refused_unsent(
    kind: str, shape: str, provider: Provider, internal: Recorder, names: dict[str, str]
) -> None:
    names["internal.test"] = "127.0.0.1"
    provider.result = RESULTS[shape](internal.port)
    with pytest.raises(errors.AddressRefused) as caught:
        fetched(kind, base(provider))
    assert internal.paths == []  # not one request reached the internal service
    assert provider.paths == ["/v1/images/generations"]  # the job was sent (and paid) once
    text = str(caught.value)
    assert text.startswith("laozhang: the result URL it gave leads to a loopback")
    assert "allow_private_urls = true in [provider.laozhang]" in text
    assert KEY not in text


@pytest.mark.parametrize("kind", ["sync", "httpx"])
def test_a_short_form_of_a_loopback_address_is_judged_by_what_it_resolves_to(
    kind: str, provider: Provider, internal: Recorder
) -> None:
    # "127.1" is no address to ``ipaddress``, but the resolver reads it as 127.0.0.1 (aiohttp
    # refuses such a URL before it connects: tests/test_async_drivers.py).
    provider.result = f"http://127.1:{internal.port}/result.png"
    with pytest.raises(errors.AddressRefused, match="loopback"):
        fetched(kind, base(provider))
    assert internal.paths == []


@pytest.mark.parametrize("kind", CLIENT_KINDS)
@pytest.mark.parametrize(
    ("address", "kind_of"), [("10.0.0.5", "private network"), ("169.254.169.254", "link-local")]
)
def test_a_name_resolving_to_an_internal_network_is_refused_before_connecting(
    kind: str, address: str, kind_of: str, provider: Provider, names: dict[str, str]
) -> None:
    names["metadata.test"] = address  # nothing listens there: a connect would hang, not pass
    provider.result = "http://metadata.test/latest/meta-data/iam"
    with pytest.raises(errors.AddressRefused, match=kind_of):
        fetched(kind, base(provider))


@pytest.mark.parametrize("kind", CLIENT_KINDS)
@pytest.mark.parametrize("to", ["literal", "name"])
def test_a_redirect_to_a_private_address_is_refused(
    kind: str, to: str, provider: Provider, internal: Recorder, names: dict[str, str]
) -> None:
    # The first hop is at the provider's own host (trusted: the operator's base URL), the
    # second is not.
    names["internal.test"] = "127.0.0.1"
    host = "127.0.0.1" if to == "literal" else "internal.test"
    provider.result = f"{base(provider)}/redirect"
    provider.location = f"http://{host}:{internal.port}/result.png"
    with pytest.raises(errors.AddressRefused, match=r"redirect .* loopback"):
        fetched(kind, base(provider))
    assert provider.paths == ["/v1/images/generations", "/redirect"]
    assert internal.paths == []


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_allow_private_urls_lets_a_provider_lead_anywhere(
    kind: str, provider: Provider, internal: Recorder
) -> None:
    provider.result = f"http://127.0.0.1:{internal.port}/result.png"
    settings = {"laozhang": ProviderSettings(name="laozhang", allow_private_urls=True)}
    assert fetched(kind, base(provider), settings=settings) == PNG
    assert internal.paths == ["/result.png"]
    assert KEY not in internal.heads[0]  # a result URL never gets the key, allowed or not
    assert "authorization" not in internal.heads[0].lower()


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_a_provider_on_loopback_is_trusted_as_the_emulator_is(
    kind: str, provider: Provider, internal: Recorder
) -> None:
    provider.result = f"http://localhost:{internal.port}/result.png"
    assert fetched(kind, f"http://127.0.0.1:{provider.port}") == PNG
    assert internal.paths == ["/result.png"]


def test_the_cli_says_the_paid_image_was_refused_and_offers_no_private_address(
    provider: Provider,
    internal: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import io

    from flux_adapters.cli import main

    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    provider.result = f"http://127.0.0.1:{internal.port}/latest/meta-data/"
    out, err = io.StringIO(), io.StringIO()
    code = main(
        [
            "edit",
            "p",
            "-p",
            "laozhang",
            "--base-url",
            base(provider),
            "-o",
            str(tmp_path / "a.png"),
        ],
        out=out,
        err=err,
    )
    assert code != 0
    said = err.getvalue()
    assert "flux-adapters: AddressRefused: laozhang: the result URL it gave leads to" in said
    assert "download it" not in said  # the refused address is not offered to fetch by hand
    assert internal.paths == []
    assert not (tmp_path / "a.png").exists()


def test_a_callers_httpx_client_has_the_name_checked_beforehand(
    provider: Provider, internal: Recorder, names: dict[str, str]
) -> None:
    """The library cannot reach a caller's connections: the name is resolved first (best effort)."""
    names["internal.test"] = "127.0.0.1"
    provider.result = f"http://internal.test:{internal.port}/result.png"
    with (
        httpx.Client() as http,
        FluxClient("laozhang", api_key=KEY, base_url=base(provider), http_client=http) as client,
    ):
        result = client.edit(REQUEST)
        with pytest.raises(errors.AddressRefused, match="loopback"):
            result.images[0].read()
    assert internal.paths == []


def test_a_literal_private_address_is_refused_even_through_a_mock_transport() -> None:
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        if request.method == "POST":
            return httpx.Response(200, json={"data": [{"url": "http://169.254.169.254/x"}]})
        return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})

    with (
        httpx.Client(transport=httpx.MockTransport(answer)) as http,
        FluxClient(
            "laozhang", api_key=KEY, base_url="https://api.laozhang.ai", http_client=http
        ) as client,
    ):
        result = client.edit(REQUEST)
        with pytest.raises(errors.AddressRefused, match="link-local"):
            result.images[0].read()
    assert asked == ["https://api.laozhang.ai/v1/images/generations"]


def test_a_file_sets_allow_private_urls(tmp_path: Path) -> None:
    path = tmp_path / "flux-adapters.toml"
    path.write_text(
        'providers = ["laozhang"]\n[provider.laozhang]\nallow_private_urls = true\n',
        encoding="utf-8",
    )
    loaded = load_config(path, environ={})
    assert loaded.providers[0].allow_private_urls is True
    path.write_text('[provider.laozhang]\nallow_private_urls = "yes"\n', encoding="utf-8")
    with pytest.raises(errors.ConfigurationError, match="allow_private_urls"):
        load_config(path, environ={})


def test_settings_made_in_code_must_say_true_or_false() -> None:
    settings = {"laozhang": ProviderSettings(name="laozhang", allow_private_urls="yes")}  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError, match="allow_private_urls must be True or False"):
        FluxClient("laozhang", api_key=KEY, settings=settings)


# -- a polling URL: an accepted job, its outcome unknown ------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_a_polling_url_to_a_private_address_ends_the_job_unpolled_and_resumable(
    kind: str, emulator: Emulator, names: dict[str, str]
) -> None:
    emulator.clear_faults()
    names["bfl.test"] = "127.0.0.1"
    port = emulator.base_url("bfl").split(":")[2].split("/")[0]
    url_base = f"http://bfl.test:{port}/bfl"
    emulator.inject("bfl", Fault(other_host=True))  # polling URLs at localhost
    before = len(emulator.calls("bfl", kind="submit"))
    polled = len(emulator.calls("bfl", kind="poll"))

    def edit(options: dict[str, Any]) -> Any:
        if kind == "sync":
            with FluxClient("bfl", api_key=KEY, base_url=url_base, **options) as client:
                return client.edit(REQUEST)

        async def run() -> Any:
            async with AsyncFluxClient(
                "bfl", api_key=KEY, base_url=url_base, driver=driver(kind), **options
            ) as client:
                return await client.edit(REQUEST)

        return asyncio.run(run())

    def resume(job: Any) -> Any:
        # A client the operator set up where the polling URLs are (localhost: trusted, and the
        # key goes there); the job is picked up as it was, never submitted again.
        at = f"http://localhost:{port}/bfl"
        if kind == "sync":
            with FluxClient("bfl", api_key=KEY, base_url=at, polling=FAST_POLLS) as client:
                return client.resume(job)

        async def run() -> Any:
            async with AsyncFluxClient(
                "bfl", api_key=KEY, base_url=at, driver=driver(kind), polling=FAST_POLLS
            ) as client:
                return await client.resume(job)

        return asyncio.run(run())

    with pytest.raises(
        errors.AddressRefused, match="polling URL it gave leads to a loopback"
    ) as caught:
        edit({"polling": FAST_POLLS})
    refused = caught.value
    assert refused.job is not None  # accepted: never submitted again, `resume` picks it up
    assert billing_rule(refused).proves == "may be billed"
    assert len(emulator.calls("bfl", kind="submit")) == before + 1
    assert len(emulator.calls("bfl", kind="poll")) == polled  # not one poll went out
    result = resume(refused.job)
    assert result.images[0].url is not None
    assert len(emulator.calls("bfl", kind="submit")) == before + 1  # resumed, not resent


# -- the gateway inherits it -----------------------------------------------------------------------


def test_the_gateway_answers_a_refused_result_as_paid_and_not_kept(tmp_path: Path) -> None:
    """The gateway's clients are the library's: a result URL at cloud metadata is not fetched."""
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.method} {request.url}")
        if request.method == "POST":
            metadata = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
            return httpx.Response(200, json={"created": 1, "data": [{"url": metadata}]})
        return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})

    def make(only: tuple[str, ...] | None) -> AsyncFluxClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        return AsyncFluxClient(
            "laozhang", api_key=KEY, base_url="https://api.laozhang.ai", http_client=http
        )

    with run_gateway(files_dir=tmp_path / "files", clients=make) as gateway:
        key, _ = gateway.add_key()
        sdk = openai.OpenAI(base_url=gateway.url, api_key=key, max_retries=2)
        with sdk, pytest.raises(openai.APIStatusError) as caught:
            sdk.images.generate(model="flux-2-pro", prompt="made, refused")
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"  # it was billed
    body: Any = caught.value.body
    assert (body["code"], body["may_be_billed"]) == ("result_not_kept", True)
    assert "AddressRefused" in body["message"]
    # Sent (and paid) once, not again by the SDK's retries; the metadata URL never asked.
    assert asked == ["POST https://api.laozhang.ai/v1/images/generations"]


# -- a port httpx and yarl read but urlsplit does not ----------------------------------------------


@pytest.mark.parametrize("kind", CLIENT_KINDS)
@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", "+{}"), ("internal.test", " {}")])
def test_a_redirect_with_a_port_written_oddly_is_still_checked(
    kind: str, host: str, port: str, provider: Provider, internal: Recorder, names: dict[str, str]
) -> None:
    """``:+8080`` or ``: 8080``: ``int()`` reads them (so httpx and yarl send there), but
    ``urlsplit`` refuses the port: the URL was taken as one nothing could send, and left
    unchecked."""
    names["internal.test"] = "127.0.0.1"
    provider.result = f"{base(provider)}/redirect"
    provider.location = f"http://{host}:{port.format(internal.port)}/result.png"
    with pytest.raises(errors.AddressRefused, match="loopback"):
        fetched(kind, base(provider))
    assert internal.paths == []


def test_a_url_whose_host_or_port_urlsplit_cannot_read_is_never_taken_as_unchecked() -> None:
    guard = Guard("laozhang", "https://api.laozhang.ai", scrub)
    for url in ("http://127.0.0.1:+8080/x", "http://[::1]: 80/x"):
        with pytest.raises(errors.AddressRefused, match="loopback"):
            guard.target(url, "redirect")
    # The base URL's host, but a port written oddly: not provably its own port, so checked.
    found = guard.target("https://api.laozhang.ai:+443/x", "redirect")
    assert isinstance(found, Target)
    assert (found.host, found.port) == ("api.laozhang.ai", None)
    # urlsplit refuses the netloc (NFKC makes a "#" of it); httpx reads the host 127.0.0.1.
    with pytest.raises(errors.AddressRefused) as caught:
        guard.target("https://api.laozhang.ai\uff03@127.0.0.1/x", "redirect")
    assert caught.value.reason == "unreadable"
    assert "has a host that cannot be read" in str(caught.value)


# -- a connection a trusted provider opened, reused for an untrusted one's URL ----------------------


class Trusted(http.server.ThreadingHTTPServer):
    """An internal reseller (aimlapi-shaped) the operator allows: it answers ``statuses`` in turn
    (200 with its own result URL, or an error), and serves that image; it records every path."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.statuses: list[int] = []
        self.url = ""
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: its connections stay open for reuse

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.paths.append(self.path)
                status = server.statuses.pop(0)
                body = json.dumps(
                    {"created": 1, "data": [{"url": f"{server.url}/own.png"}]}
                    if status == 200
                    else {"error": {"message": "no balance"}}
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def trusted(names: dict[str, str]) -> Iterator[Trusted]:
    names["internal.test"] = "127.0.0.1"
    with serving(Trusted()) as server:
        server.url = f"http://internal.test:{server.server_address[1]}"
        yield server


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_a_connection_a_trusted_provider_opened_is_not_reused_for_another_ones_url(
    kind: str, provider: Provider, trusted: Trusted, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aimlapi is allowed private URLs (an internal reseller); laozhang, in the same client, is
    not. The first edit (aimlapi) leaves a keep-alive connection to internal.test; the second
    fails over from aimlapi (402) to laozhang, whose result URL is at internal.test: reusing that
    connection would connect nowhere anew, so nothing would be checked."""
    trusted.statuses = [200, 402]
    provider.result = f"{trusted.url}/admin/secrets"
    monkeypatch.setenv("AIMLAPI_API_KEY", KEY)
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    options: dict[str, Any] = {
        "providers": ["aimlapi", "laozhang"],
        "settings": {
            "aimlapi": ProviderSettings(
                name="aimlapi", base_url=trusted.url, allow_private_urls=True
            ),
            "laozhang": ProviderSettings(name="laozhang", base_url=base(provider)),
        },
    }
    if kind == "sync":
        with FluxClient(**options) as client:
            assert client.edit(REQUEST).images[0].read() == PNG
            result = client.edit(REQUEST)
            with pytest.raises(errors.AddressRefused, match="loopback"):
                result.images[0].read()
    else:

        async def run() -> None:
            async with AsyncFluxClient(driver=driver(kind), **options) as client:
                assert await (await client.edit(REQUEST)).images[0].read_async() == PNG
                result = await client.edit(REQUEST)
                with pytest.raises(errors.AddressRefused, match="loopback"):
                    await result.images[0].read_async()

        asyncio.run(run())
    assert "/admin/secrets" not in trusted.paths
    assert trusted.paths == ["/v1/images/generations", "/own.png", "/v1/images/generations"]


def test_an_answer_aiohttp_kept_for_a_trusted_url_is_checked_for_a_guarded_one() -> None:
    """aiohttp's DNS cache answers without the resolver: what a request is given is checked in
    its own context (a lookup made for the base URL, or a trusted provider, is kept 10 s)."""
    pytest.importorskip("aiohttp")
    from aiohttp.abc import ResolveResult

    from flux_adapters._aiohttp import _GuardedConnector

    async def resolve() -> None:
        connector = _GuardedConnector()
        try:
            kept = ResolveResult(
                hostname="internal.test",
                host="10.0.0.5",
                port=80,
                family=socket.AF_INET,
                proto=0,
                flags=0,
            )
            connector._cached_hosts.add(("internal.test", 80), [kept])
            assert await connector._resolve_host("internal.test", 80) == [kept]  # trusted
            token = GUARDED.set(_target())
            try:
                with pytest.raises(errors.AddressRefused, match="private network"):
                    await connector._resolve_host("internal.test", 80)
            finally:
                GUARDED.reset(token)
        finally:
            await connector.close()

    asyncio.run(resolve())


# -- a batch's rerun downloads again the URLs its journal kept --------------------------------------


def _batch(kind: str, url_base: str, folder: Path, **options: Any) -> list[Any]:
    async def run() -> list[Any]:
        async with AsyncFluxClient(
            "laozhang", api_key=KEY, base_url=url_base, driver=driver(kind), **options
        ) as client:
            return [item async for item in client.edit_many([REQUEST], output_dir=folder)]

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
def test_a_rerun_checks_the_result_urls_its_journal_kept_as_their_providers(
    kind: str, provider: Provider, internal: Recorder, names: dict[str, str], tmp_path: Path
) -> None:
    """The first run's download is refused; the job is answered (billed) and its URL kept in the
    journal, as after a crash between the answer and the save. The rerun downloads it again
    from the journal: checked as the URLs of the provider that gave it (the record says which),
    and, when the record does not say, as an untrusted provider's."""
    names["internal.test"] = "127.0.0.1"
    provider.result = f"http://internal.test:{internal.port}/latest/meta-data/"
    [first] = _batch(kind, base(provider), tmp_path)
    assert first.status == "unconfirmed"
    assert isinstance(first.error, errors.AddressRefused)
    journal = tmp_path / ".flux-journal.jsonl"
    lines = [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]
    assert [line["p"] for line in lines if line.get("k") == "answered"] == ["laozhang"]
    [again] = _batch(kind, base(provider), tmp_path)
    assert again.status == "unconfirmed"  # not downloaded from the internal host, nor sent again
    assert "could not be downloaded again (AddressRefused)" in again.reason
    # A journal that does not say (edited, or written otherwise): the strictest check.
    for line in lines:
        line.pop("p", None)
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    trusting = {"laozhang": ProviderSettings(name="laozhang", allow_private_urls=True)}
    [unknown] = _batch(kind, base(provider), tmp_path, settings=trusting)
    assert unknown.status == "unconfirmed"
    assert internal.paths == []
    assert provider.paths == ["/v1/images/generations"]  # the job was paid for once
    # The provider named, and allowed: its URL downloaded again, for free.
    for line in lines:
        if line.get("k") == "answered":
            line["p"] = "laozhang"
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    [allowed] = _batch(kind, base(provider), tmp_path, settings=trusting)
    assert (allowed.status, allowed.reason) == ("ok", "downloaded again from its result URL")
    assert internal.paths == ["/latest/meta-data/"]
    assert provider.paths == ["/v1/images/generations"]


# -- a result that lost its downloader --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_unpickled_result_checks_its_url_the_strictest_way(
    kind: str, internal: Recorder, names: dict[str, str]
) -> None:
    """Pickled (a task queue, a cache), a result loses its downloader, and with it which provider
    gave its URL: the short-lived one it gets refuses what no provider's settings are there to
    allow. A ResultImage the caller makes holds a URL the caller trusts: as it was."""
    import pickle

    from flux_adapters.result import ResultImage

    names["internal.test"] = "127.0.0.1"
    for url in (
        f"http://127.0.0.1:{internal.port}/latest/meta-data/",
        f"http://internal.test:{internal.port}/latest/meta-data/",
    ):
        image = pickle.loads(pickle.dumps(ResultImage(url=url).fetched_with(_NOWHERE)))
        with pytest.raises(errors.AddressRefused, match="unpickled result") as caught:
            image.read() if kind == "sync" else asyncio.run(image.read_async())
        assert "loopback" in str(caught.value)
        assert "allow_private_urls" not in str(caught.value)  # no provider to name
    assert internal.paths == []
    mine = ResultImage(url=f"http://internal.test:{internal.port}/mine.png")
    assert (mine.read() if kind == "sync" else asyncio.run(mine.read_async())) == PNG
    assert internal.paths == ["/mine.png"]


class _Nowhere:
    """A downloader a result holds until it is pickled (it never downloads here)."""

    def read(self, url: str) -> bytes:
        raise AssertionError(url)

    def save(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        raise AssertionError(url)

    async def read_async(self, url: str) -> bytes:
        raise AssertionError(url)

    async def save_async(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        raise AssertionError(url)


_NOWHERE = _Nowhere()


def test_a_lookup_aiohttp_shares_is_refused_only_to_the_guarded_request() -> None:
    """aiohttp makes one lookup for concurrent requests to a host and port, in the context of
    the first. A guarded request first and a trusted one (an allowed provider's poll) joining:
    the refusal is the guarded request's alone; the trusted one gets its addresses (it failed
    with the other provider's AddressRefused, ending its job unknown)."""
    pytest.importorskip("aiohttp")
    from aiohttp.abc import AbstractResolver, ResolveResult

    from flux_adapters._aiohttp import _GuardedConnector

    class Slow(AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
            await asyncio.sleep(0.01)
            return [
                ResolveResult(
                    hostname=host, host="10.0.0.5", port=port, family=socket.AF_INET, proto=0,
                    flags=0,
                )
            ]  # fmt: skip

        async def close(self) -> None:
            pass

    async def both() -> list[object]:
        connector = _GuardedConnector(resolver=Slow())

        async def guarded() -> object:
            GUARDED.set(_target())  # in its task's own context only
            return await connector._resolve_host("internal.test", 80)

        try:
            first = asyncio.create_task(guarded())
            await asyncio.sleep(0)  # it started the shared lookup
            second = asyncio.create_task(connector._resolve_host("internal.test", 80))
            return list(await asyncio.gather(first, second, return_exceptions=True))
        finally:
            await connector.close()

    refused, trusted = asyncio.run(both())
    assert isinstance(refused, errors.AddressRefused)
    assert isinstance(trusted, list)
    assert [entry["host"] for entry in trusted] == ["10.0.0.5"]
