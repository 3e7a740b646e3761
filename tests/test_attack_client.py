"""Single edits under attack: a hostile provider, a careless caller, a crash.

Each test here reproduces a bug found by attacking the clients (a compression bomb, a redirect
that re-sends the paid POST, headers dripped past the deadline, ...) and pins the fix. Hostile
servers are `httpx.MockTransport` handlers or raw sockets on loopback; nothing leaves the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters._files import image_format
from flux_adapters.config import ProviderSettings
from flux_adapters.result import MAX_IMAGE_BYTES
from flux_adapters.wire import MAX_ANSWER_BYTES
from tests.conftest import CLIENT_KINDS, call_adapter, driver, image_bytes

KEY = "sk-live-7Qw2Zr9XbT4mKp1VfH8sLd3NcY6gJa0E"
REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")
RESULT_URL = "https://cdn.example/results/a.png"
OK = {"created": 1, "data": [{"url": RESULT_URL}]}
PNG = image_bytes(40, 30)
Handler = Callable[[httpx.Request], httpx.Response]
both = pytest.mark.parametrize("kind", ["sync", "async"])
"""FluxClient and AsyncFluxClient on a caller's httpx client (MockTransport)."""
every = pytest.mark.parametrize("kind", CLIENT_KINDS)
"""FluxClient, and AsyncFluxClient on each of its own drivers, on loopback."""


def run(
    kind: str,
    handler: Handler,
    call: Callable[[Any], Any],
    http: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """Make a client of *kind* on *handler* and return ``call(client)`` (awaited when async)."""
    transport = httpx.MockTransport(handler)
    options.setdefault("api_key", KEY)
    if kind == "sync":
        with httpx.Client(transport=transport, **(http or {})) as client:
            return call(FluxClient("laozhang", http_client=client, **options))

    async def main() -> Any:
        async with httpx.AsyncClient(transport=transport, **(http or {})) as client:
            flux = AsyncFluxClient("laozhang", http_client=client, **options)
            outcome = call(flux)
            return await outcome if asyncio.iscoroutine(outcome) else outcome

    return asyncio.run(main())


class Raw(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body sent as it is (already compressed), 64 KiB at a time, as a socket delivers it.

    A response built with ``content=`` is read (and inflated) by httpx as it is built; a stream
    is what a transport returns.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self._body), 65536):
            yield self._body[start : start + 65536]

    async def __aiter__(self) -> Any:
        for chunk in self:
            yield chunk


def peak_memory(action: Callable[[], object]) -> int:
    """The most bytes Python held at once, above what it held before, while *action* ran."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- compression bombs ---------------------------------------------------------------------


@functools.cache
def gzip_bomb(megabytes: int, head: bytes = b"") -> bytes:
    """*head* then *megabytes* MB of zeros, gzip-compressed (about 1,000 to 1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    parts = [compressor.compress(head)]
    parts += [compressor.compress(zeros) for _ in range(megabytes)]
    return b"".join([*parts, compressor.flush()])


BOMB_MB = 256
BOUND = MAX_ANSWER_BYTES + 32 * 1024 * 1024
"""What reading any answer may hold at once: the answer cap and some room for chunks."""


@both
@pytest.mark.parametrize("status", [200, 500])
def test_a_compressed_answer_is_capped_as_it_inflates_not_after(kind: str, status: int) -> None:
    """A 260 KB gzip body that inflates to 256 MB: the cap applies to the decoded bytes."""
    bomb = gzip_bomb(BOMB_MB)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-encoding": "gzip"}, stream=Raw(bomb))

    def edit() -> None:
        with pytest.raises((errors.ResponseFormatError, errors.ProviderUnavailable)):
            run(kind, handler, lambda client: client.edit(REQUEST))

    assert peak_memory(edit) < BOUND


@both
@pytest.mark.parametrize("encoding", ["gzip, gzip", "gzip, deflate", "br", "zstd", "compress"])
def test_an_encoding_that_was_not_asked_for_is_refused_unread(kind: str, encoding: str) -> None:
    """Only one layer of gzip or deflate is asked for; a chain multiplies the ratio (GBs)."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("accept-encoding", ""))
        bomb = gzip_bomb(BOMB_MB)
        return httpx.Response(200, headers={"content-encoding": encoding}, stream=Raw(bomb))

    def edit() -> None:
        with pytest.raises(errors.ResponseFormatError, match="could not be decoded"):
            run(kind, handler, lambda client: client.edit(REQUEST))

    assert peak_memory(edit) < BOUND
    assert sent == ["gzip, deflate"]


@both
def test_a_compressed_download_is_capped_as_it_inflates(kind: str, tmp_path: Path) -> None:
    """A result URL serving a PNG header and 256 MB of zeros, gzip-compressed."""
    bomb = gzip_bomb(BOMB_MB, head=PNG[:16])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json=OK)
        return httpx.Response(200, headers={"content-encoding": "gzip"}, stream=Raw(bomb))

    async def save_async(client: AsyncFluxClient) -> Path:
        result = await client.edit(REQUEST)
        return await result.images[0].save_async(tmp_path / "out.png")

    def save_sync(client: FluxClient) -> Path:
        return client.edit(REQUEST).images[0].save(tmp_path / "out.png")

    def save() -> None:
        with pytest.raises(
            errors.ResponseFormatError, match=f"larger than {MAX_IMAGE_BYTES >> 20}"
        ):
            run(kind, handler, save_sync if kind == "sync" else save_async)

    assert peak_memory(save) < BOUND
    assert list(tmp_path.iterdir()) == []


@both
def test_a_well_compressed_answer_and_download_still_work(kind: str) -> None:
    import gzip

    answer = gzip.compress(json.dumps(OK).encode())
    deflated = zlib.compress(PNG)  # "deflate" as most servers send it: with the zlib wrapper

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, headers={"content-encoding": "gzip"}, stream=Raw(answer))
        return httpx.Response(200, headers={"content-encoding": "deflate"}, stream=Raw(deflated))

    async def read_async(client: AsyncFluxClient) -> bytes:
        return await (await client.edit(REQUEST)).images[0].read_async()

    if kind == "sync":
        data = run(kind, handler, lambda client: client.edit(REQUEST).images[0].read())
    else:
        data = run(kind, handler, read_async)
    assert data == PNG


# --- the paid POST is sent once --------------------------------------------------------------


@both
@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize(
    "where", ["https://api.laozhang.ai/v1/again", "https://elsewhere.example/"]
)
def test_a_redirect_answering_the_paid_post_is_never_followed(
    kind: str, status: int, where: str
) -> None:
    """Even on a caller's client made with ``follow_redirects=True``.

    A 307/308 makes httpx send the POST again (body and images; the key too, on the same
    origin), up to 20 times: each could be billed.
    """
    posts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(str(request.url))
        if len(posts) > 1:
            return httpx.Response(200, json=OK)
        return httpx.Response(status, headers={"location": where})

    with pytest.raises(errors.ProviderError) as caught:
        run(kind, handler, lambda client: client.edit(REQUEST), http={"follow_redirects": True})
    assert len(posts) == 1
    assert caught.value.status_code == status
    assert caught.value.attempts[0].billing == "unreadable-answer"  # may be billed: final


# --- deadlines hold whatever the server drips ------------------------------------------------


class Server:
    """A raw HTTP server on loopback: reads each request's head, then runs *respond* on it."""

    def __init__(self, respond: Callable[[socket.socket, bytes], None]) -> None:
        self._respond = respond
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.heads: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(30)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    received = connection.recv(65536)
                    if not received:
                        return
                    head += received
                self.heads.append(head)
                self._respond(connection, head)
            except OSError:  # the client gave up
                return

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket, bytes], None]], Server]]:
    servers: list[Server] = []

    def start(respond: Callable[[socket.socket, bytes], None]) -> Server:
        servers.append(Server(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


HUNG_UP = threading.Event()
"""Set when a client hangs up on `drip_headers`."""


def drip_headers(connection: socket.socket, head: bytes) -> None:
    """A status line, then a header one byte every 20 ms: 20 s for 1,000 bytes."""
    try:
        connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(1000):
            connection.sendall(b"a")
            time.sleep(0.02)
    except OSError:
        HUNG_UP.set()
        raise


def edit_on(kind: str, base_url: str, **options: Any) -> Any:
    if kind == "sync":
        with FluxClient("laozhang", api_key=KEY, base_url=base_url, **options) as client:
            return client.edit(REQUEST)

    async def main() -> Any:
        async with AsyncFluxClient(
            "laozhang", api_key=KEY, base_url=base_url, driver=driver(kind), **options
        ) as client:
            return await client.edit(REQUEST)

    return asyncio.run(main())


@every
def test_headers_dripped_a_byte_at_a_time_end_at_the_deadline(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server]
) -> None:
    """Each byte comes well within the read timeout, so only the deadline can end the call."""
    server = serve(drip_headers)
    HUNG_UP.clear()
    started = time.monotonic()
    with pytest.raises(errors.Timeout, match=r"deadline of 1 s") as caught:
        edit_on(kind, server.url, deadline=1.0)
    assert time.monotonic() - started < 5.0
    assert caught.value.sent is True  # the provider had the request: never failed over


def test_a_send_given_up_on_hangs_up_instead_of_holding_the_connection(
    serve: Callable[[Callable[[socket.socket, bytes], None]], Server],
) -> None:
    """The caller's client stays open: nothing but the deadline closes the dripping connection."""
    server = serve(drip_headers)
    HUNG_UP.clear()
    with httpx.Client() as http:
        client = FluxClient(
            "laozhang", api_key=KEY, base_url=server.url, http_client=http, deadline=1.0
        )
        with pytest.raises(errors.Timeout, match="deadline"):
            client.edit(REQUEST)
        assert HUNG_UP.wait(5.0)  # within 5 s, not when the 20 s drip ends


@every
def test_a_download_whose_headers_drip_ends_at_its_deadline(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server], tmp_path: Path
) -> None:
    cdn = serve(drip_headers)

    def answer(connection: socket.socket, head: bytes) -> None:
        body = json.dumps({"data": [{"url": f"{cdn.url}/a.png"}]}).encode()
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    provider = serve(answer)
    result = edit_on(kind, provider.url, deadline=1.0)
    started = time.monotonic()
    image, target = result.images[0], tmp_path / "out.png"
    with pytest.raises(errors.Timeout, match="deadline"):
        image.save(target) if kind == "sync" else asyncio.run(image.save_async(target))
    assert time.monotonic() - started < 5.0
    assert list(tmp_path.iterdir()) == []


def test_a_send_that_blocks_in_the_callers_transport_ends_at_the_deadline() -> None:
    """Any transport (a proxy, a test double): the sync client waits no longer than the deadline."""
    release = threading.Event()

    def stuck(request: httpx.Request) -> httpx.Response:
        release.wait(30)
        return httpx.Response(200, json=OK)

    started = time.monotonic()
    try:
        with pytest.raises(errors.Timeout, match="deadline"):
            run("sync", stuck, lambda client: client.edit(REQUEST), deadline=0.5)
    finally:
        release.set()
    assert time.monotonic() - started < 3.0


def test_ctrl_c_while_a_callers_transport_blocks_ends_the_call_and_closes_the_late_answer() -> None:
    import signal

    release, closed = threading.Event(), threading.Event()

    class Late(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"{}"

        def close(self) -> None:
            closed.set()

    def interrupted(request: httpx.Request) -> httpx.Response:
        # Ctrl-C, a real signal, while the caller waits for this answer.
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        release.wait(10)
        return httpx.Response(200, stream=Late())

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run("sync", interrupted, lambda client: client.edit(REQUEST))
    assert time.monotonic() - started < 5.0
    release.set()
    assert closed.wait(5.0)  # the answer that came after was closed, not leaked


# --- result URLs that cannot be fetched ------------------------------------------------------


@both
@pytest.mark.parametrize(
    "url",
    ["https://cdn.example/a\x00.png", "https://cdn.example/a\r\nX: y", "https://cdn.example:port/a.png",
     "https://cdn.example:99999999/a.png", "https://[::1/a.png", "https:///a.png"],
    ids=["nul", "crlf", "port-name", "port-range", "bad-ipv6", "no-host"],
)  # fmt: skip
def test_an_answer_whose_result_url_cannot_be_fetched_is_a_format_error(
    kind: str, url: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"url": url}]})

    with pytest.raises(errors.ResponseFormatError, match="result URL"):
        run(kind, handler, lambda client: client.edit(REQUEST))


@both
@pytest.mark.parametrize(
    "url",
    ["https://cdn.example/a\x00.png", "https://cdn.example:port/a.png", "ftp://cdn.example/a"],
)
def test_a_hand_built_result_image_with_an_unusable_url_fails_typed_and_at_once(
    kind: str, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux_adapters._download import HttpDownloader
    from flux_adapters.result import ResultImage

    attempts = []
    follow, follow_async = HttpDownloader._follow, HttpDownloader._follow_async

    def counted(self: HttpDownloader, *args: Any, **kwargs: Any) -> Any:
        attempts.append(url)
        return follow(self, *args, **kwargs)

    async def counted_async(self: HttpDownloader, *args: Any, **kwargs: Any) -> Any:
        attempts.append(url)
        return await follow_async(self, *args, **kwargs)

    monkeypatch.setattr(HttpDownloader, "_follow", counted)
    monkeypatch.setattr(HttpDownloader, "_follow_async", counted_async)
    image = ResultImage(url=url)
    with pytest.raises(errors.TransportError) as caught:
        image.save(tmp_path / "a.png") if kind == "sync" else asyncio.run(image.read_async())
    assert caught.value.sent is False  # nothing could be sent
    assert len(attempts) == 1  # not retried after a pause: it cannot pass
    assert list(tmp_path.iterdir()) == []


# --- a careless caller: client arguments and configuration -----------------------------------


@pytest.mark.parametrize("option", ["timeout", "deadline"])
@pytest.mark.parametrize("seconds", [1e10, 1e308, 86_401])
def test_seconds_beyond_a_day_are_refused_when_the_client_is_built(
    option: str, seconds: float
) -> None:
    """A socket timeout of 1e10 s overflowed time_t: OverflowError from the first edit."""
    given: dict[str, Any] = {option: seconds}
    for make in (FluxClient, AsyncFluxClient):
        with pytest.raises(errors.ConfigurationError, match=f"{option}= must be .*86400"):
            make("laozhang", api_key=KEY, **given)
    with pytest.raises(errors.ConfigurationError, match="timeout= read must be"):
        FluxClient("laozhang", api_key=KEY, timeout=httpx.Timeout(10, read=1e10))


def test_a_day_is_still_a_usable_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=OK)

    result = run("sync", handler, lambda client: client.edit(REQUEST), timeout=86_400)
    assert result.images[0].url == RESULT_URL


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("timeout = 1e10", "timeout"),
        ("timeout = 0", "timeout"),
        ("[provider.laozhang]\ntimeout = 1e10", r"\[provider.laozhang\] timeout"),
        ("[provider.laozhang]\ntimeout = 0", r"\[provider.laozhang\] timeout"),
        ("[provider.laozhang]\napi_key_env = 5", "api_key_env must be"),
        ('[provider.laozhang]\napi_key_env = ["LAOZHANG_API_KEY"]', "api_key_env must be"),
        ('[provider.laozhang]\napi_key_env = "A=B"', "api_key_env must be"),
        ('[provider.laozhang]\napi_key_env = ""', "api_key_env must be"),
        # The shape: every key and TOML type checked, nothing converted, all problems at once.
        ('[provider.laozhang]\npriority = "1"', "priority must be a whole number, not str '1'"),
        ("[provider.laozhang]\npriority = true", "priority must be a whole number, not bool True"),
        ('[provider.laozhang]\ncolour = 1\npriority = 1.5', r"\[provider.laozhang\]: priority must be a whole number, not float 1.5; unknown keys \['colour'\]; known: allow_private_urls, api_key_env, base_url, prices, priority, rate_per_minute, timeout"),
        ('providers = "laozhang"', "providers must be a list of strings, not str 'laozhang'"),
        ('providers = ["laozhang", 5]', r"providers\[1\] must be text, not int 5"),
        ("provider = 5", r"provider must be \[provider.NAME\] sections, not int 5"),
        ("[provider]\nlaozhang = 5", r"\[provider.laozhang\]: must be a table, not int"),
        ('failover_on_ambiguous = "yes"', "failover_on_ambiguous must be true or false, not str"),
        ('timeout = "300"', "timeout must be seconds above 0 and at most 86400, not str '300'"),
        ('budget_period = "week"', "budget_period must be 'day' or 'total', not 'week'"),
        ('state_fallback = "maybe"', "state_fallback must be 'none' or 'local'"),
        ('budget_usd = "5"', "budget_usd must be dollars, a number, not str '5'"),
        ("budget_usd = nan", "budget_usd must be dollars from 0 to 1e9, not nan"),
        ("budget_usd = -1.0", "budget_usd must be dollars from 0 to 1e9"),
        ("state_url = 5", "state_url must be 'local' or redis://..., not int 5"),
        ("retries = 3", r"unknown keys \['retries'\]; known: budget_period, budget_scope, budget_usd, failover_on_ambiguous, job_deadline"),
        ("[provider.laozhang]\nprices = 3", "prices must be a table of model = price, not int 3"),
        ('[provider.laozhang.prices]\n"flux-2-pro" = 0.03', r"prices.flux-2-pro: must be a table such as \{ usd = 0.03 \}"),
        ('[provider.laozhang.prices]\n"flux-2-pro" = { usd = 0.03, eur = 1 }', r"unknown keys \['eur'\]; known: pixels_per_mp, usd, usd_extra, usd_first, usd_input"),
        ('[provider.laozhang.prices]\n"flux-2-pro" = { usd = "0.03" }', "usd must be a number, not str '0.03'"),
        ('[provider.laozhang.prices]\n"flux-2-pro" = { usd = 0.03, usd_first = 1 }', "do not go together; use usd, or usd_first/usd_extra/usd_input"),
    ],
)  # fmt: skip
def test_odd_configuration_files_are_configuration_errors_naming_the_file(
    text: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang")
    path = tmp_path / "flux-adapters.toml"
    path.write_text(text + "\n")
    for make in (FluxClient, AsyncFluxClient):
        with pytest.raises(errors.ConfigurationError, match=problem) as caught:
            make.from_env(config=path)
        assert str(path) in str(caught.value)


def test_an_odd_timeout_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang")
    for value in ("1e10", "0", "-1", "nan", "soon"):
        monkeypatch.setenv("FLUX_TIMEOUT", value)
        with pytest.raises(errors.ConfigurationError, match="FLUX_TIMEOUT"):
            FluxClient.from_env()


# --- one async client, two event loops -------------------------------------------------------


@pytest.mark.parametrize("http", ["aiohttp", "httpx", "callers"])
def test_an_async_client_used_in_a_second_event_loop_says_so(http: str) -> None:
    """``asyncio.run(client.edit(...))`` twice: the connections belong to the first loop.

    The second call raised RuntimeError ('Event loop is closed', or a future attached to a
    different loop) from deep in the transport; reading a result in another loop did too.
    """
    from flux_adapters.emulator import run_emulator

    first = asyncio.new_event_loop()
    with run_emulator() as emulator:
        mine = httpx.AsyncClient() if http == "callers" else None
        client = AsyncFluxClient(
            "laozhang",
            api_key=KEY,
            base_url=emulator.base_url("laozhang"),
            http_client=mine,
            driver=None if mine else driver(http),
        )
        try:
            result = first.run_until_complete(client.edit(REQUEST))
            image = asyncio.run(result.images[0].read_async())  # a result is a value: any loop
            assert image_format(image) is not None
            with pytest.raises(errors.ConfigurationError, match="another event loop"):
                asyncio.run(client.edit(REQUEST))
        finally:
            first.run_until_complete(client.aclose())
            if mine is not None:
                first.run_until_complete(mine.aclose())
            first.close()


# --- the key never shows: fields and URLs the provider controls ------------------------------


def leaks(text: str) -> list[str]:
    """Every 8-character fragment of the key in *text* (the key as sent: it is ASCII)."""
    return [KEY[i : i + 8] for i in range(len(KEY) - 7) if KEY[i : i + 8] in text]


@both
@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"error": {"message": "bad key", "code": KEY}}),
        (401, {"error": {"message": "bad key", "type": f"invalid key {KEY}"}}),
        (400, {"message": "bad request", "code": KEY}),
        (200, {"error": {"message": "moderated", "code": KEY}}),
    ],
)
def test_a_key_echoed_in_the_error_code_never_shows(
    kind: str, status: int, body: dict[str, Any]
) -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    with pytest.raises(errors.ProviderError) as caught:
        run(kind, echo, lambda client: client.edit(REQUEST))
    error = caught.value
    assert leaks(f"{error} {error!r} {error.detail} {error.code}") == []


@both
@pytest.mark.parametrize(
    ("url", "answer"),
    [
        (f"https://user:{KEY}@cdn.example/a.png", 404),
        (f"https://cdn.example/{KEY}/a.png", 404),
        (f"https://cdn.example/{KEY}/a.png", 200),
        (f"https://cdn.example/x/{KEY[3:]}.png", 302),
    ],
    ids=["userinfo-expired", "path-expired", "path-not-image", "path-redirect-nowhere"],
)
def test_a_key_in_a_result_url_never_shows_in_a_download_error(
    kind: str, url: str, answer: int, tmp_path: Path
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json={"data": [{"url": url}]})
        assert "Bearer" not in request.headers.get("authorization", "")  # never the client's
        return httpx.Response(answer, content=b"<html>gone</html>")

    async def save_async(client: AsyncFluxClient) -> Path:
        return await (await client.edit(REQUEST)).images[0].save_async(tmp_path / "a.png")

    def save_sync(client: FluxClient) -> Path:
        return client.edit(REQUEST).images[0].save(tmp_path / "a.png")

    with pytest.raises(errors.FluxError) as caught:
        run(kind, handler, save_sync if kind == "sync" else save_async)
    error = caught.value
    shown = f"{error} {error!r} {vars(error)}"
    assert leaks(shown) == [], shown


def test_a_result_image_repr_never_shows_a_user_name_or_password() -> None:
    from flux_adapters.result import ResultImage

    image = ResultImage(url=f"https://user:{KEY}@cdn.example/a.png?signature=s3cr3t")
    assert repr(image) == (
        "ResultImage(url='https://cdn.example/a.png?…', b64_json=None, declared_format=None)"
    )


def test_a_result_image_with_an_unusable_url_has_a_repr() -> None:
    """A URL urlsplit refuses, as an answer may give beside its inline data (which is used, so
    the URL is not judged): the image is still shown, never an exception from its repr."""
    from flux_adapters.result import ResultImage

    image = ResultImage(url=f"https://{KEY}@[::1/a.png")
    assert repr(image) == "ResultImage(url=<an unusable URL>, b64_json=None, declared_format=None)"


# --- honest kinds of transport failure -------------------------------------------------------


def hang_up(connection: socket.socket, head: bytes) -> None:
    """Read the request, then close without a word."""


def stall(connection: socket.socket, head: bytes) -> None:
    time.sleep(3)


@every
def test_a_server_hanging_up_is_a_dropped_connection_not_a_timeout(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server]
) -> None:
    """aiohttp's disconnect came back as httpx.ConnectTimeout: a ``Timeout`` nobody waited for."""
    server = serve(hang_up)
    with pytest.raises(errors.TransportError) as caught:
        edit_on(kind, server.url)
    assert type(caught.value) is errors.TransportError
    assert caught.value.sent is True  # it had the request: may be billed

    server = serve(stall)
    timeout = httpx.Timeout(5.0, read=0.5)
    with pytest.raises(errors.Timeout) as waited:
        edit_on(kind, server.url, timeout=timeout)
    assert waited.value.sent is True


def never_read(connection: socket.socket, head: bytes) -> None:
    """Take the request's head, then never read its body."""
    time.sleep(5)


@every
def test_an_upload_the_server_never_reads_is_not_sent_when_the_deadline_ends_it(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server], tmp_path: Path
) -> None:
    """The body was not written whole, so the provider cannot have the job: not billed."""
    import os
    import struct

    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR"
    header += struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0) + bytes(4)
    images = []
    for number in range(3):
        path = tmp_path / f"{number}.png"
        path.write_bytes(header + os.urandom(8 * 1024 * 1024))
        images.append(path)
    request = EditRequest(prompt="a robot", model="flux-2-pro", images=images)
    server = serve(never_read)
    started = time.monotonic()
    if kind == "sync":
        client = FluxClient("laozhang", api_key=KEY, base_url=server.url, deadline=1.0)
        with client, pytest.raises(errors.Timeout) as caught:
            client.edit(request)
    else:

        async def main() -> None:
            async with AsyncFluxClient(
                "laozhang", api_key=KEY, base_url=server.url, deadline=1.0, driver=driver(kind)
            ) as client:
                await client.edit(request)

        with pytest.raises(errors.Timeout) as caught:
            asyncio.run(main())
    assert time.monotonic() - started < 4.0
    assert caught.value.sent is False


# --- an adapter from another package cannot turn a billed answer into "not taken" ----------


class Fibbing:
    """An adapter whose parsers report failures that would fail over: "no balance", "not sent"."""

    name = "fibbing"
    default_base_url = "https://fibbing.example"
    env_prefix = "FIBBING"

    def __init__(self, report: errors.FluxError) -> None:

        self._inner = call_adapter("laozhang")
        self.limits = self._inner.limits
        self._report = report

    def build_request(self, *args: Any) -> Any:
        return self._inner.build_request(*args)

    def parse_response(self, response: Any) -> Any:
        raise self._report

    def parse_error(self, response: Any) -> Any:
        return self._report


@pytest.mark.parametrize("status", [200, 500])
@pytest.mark.parametrize(
    "report",
    [
        errors.InsufficientBalance("no balance", provider="fibbing", status_code=402),
        errors.TransportError("connection refused", provider="fibbing", sent=False),
        errors.RateLimited("slow down", provider="fibbing", status_code=429, retry_after=0),
    ],
    ids=["402", "not-sent", "429"],
)
def test_an_adapter_cannot_make_a_billed_answer_fail_over(
    status: int, report: errors.FluxError, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once an answer came, its real status decides, whatever an adapter of another package says.

    A 2xx or a 500 may be billed: final, not sent to the next provider (nor again).
    """
    monkeypatch.setenv("FIBBING_API_KEY", KEY)
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.host)
        return httpx.Response(status, json=OK)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(providers=[Fibbing(report), "laozhang"], http_client=http)
        with pytest.raises(errors.ProviderError) as caught:
            client.edit(REQUEST)
    assert sent == ["fibbing.example"]  # one POST, to the first provider only
    assert caught.value.status_code == status
    assert caught.value.attempts[-1].billing in ("unreadable-answer", "server-error")


@pytest.mark.parametrize("transport", ["sync", "async"])
def test_a_callers_transport_with_retries_does_not_send_the_post_twice(
    transport: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server]
) -> None:
    """httpx.HTTPTransport(retries=3) retries only failed connects, never a sent request."""
    server = serve(hang_up)  # reads the request, closes without answering
    if transport == "sync":
        with httpx.Client(transport=httpx.HTTPTransport(retries=3)) as http:
            client = FluxClient("laozhang", api_key=KEY, base_url=server.url, http_client=http)
            with pytest.raises(errors.TransportError) as caught:
                client.edit(REQUEST)
    else:

        async def main() -> None:
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(retries=3)) as http:
                client = AsyncFluxClient(
                    "laozhang", api_key=KEY, base_url=server.url, http_client=http
                )
                await client.edit(REQUEST)

        with pytest.raises(errors.TransportError) as caught:
            asyncio.run(main())
    assert caught.value.sent is True
    assert len(server.heads) == 1


@pytest.mark.parametrize(
    "base_url", ["https://user:pass@api.laozhang.ai", "https://user@api.laozhang.ai"]
)
def test_a_base_url_with_a_user_name_is_refused_without_showing_it(
    base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx turns URL user information into Basic auth, which replaced the Bearer key: every
    call was a 401 'refused the API key', and the client's repr showed the password."""
    with pytest.raises(errors.ConfigurationError, match="base_url= must not hold a user") as given:
        FluxClient("laozhang", api_key=KEY, base_url=base_url)
    assert ":pass@" not in str(given.value)
    assert "user@" not in str(given.value)
    monkeypatch.setenv("LAOZHANG_BASE_URL", base_url)
    with pytest.raises(errors.ConfigurationError, match="LAOZHANG_BASE_URL must not hold a user"):
        AsyncFluxClient("laozhang", api_key=KEY)


# --- a paid image is never dropped over a field the client does not need ---------------------


@pytest.mark.parametrize(
    "usage",
    [{"tokens_used": "lots"}, {"tokens_used": 1e400}, {"credits_used": [1]}, {"credits_used": {}},
     "none", [1, 2]],
)  # fmt: skip
def test_an_unreadable_usage_report_does_not_lose_the_image(usage: object) -> None:
    """The image was made and billed; usage is an optional report beside it."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.dumps({"data": [{"url": RESULT_URL}], "meta": {"usage": usage}})
        return httpx.Response(200, content=body.replace("Infinity", "1e400").encode())

    result = run("sync", handler, lambda client: client.edit(REQUEST))
    assert result.images[0].url == RESULT_URL
    assert result.usage is None


def test_a_readable_usage_report_is_kept_beside_an_unreadable_field() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        usage = {"credits_used": 2.5, "tokens_used": "many"}
        return httpx.Response(200, json={"data": [{"url": RESULT_URL}], "meta": {"usage": usage}})

    result = run("sync", handler, lambda client: client.edit(REQUEST))
    assert result.usage is not None
    assert result.usage.credits_used == 2.5
    assert result.usage.tokens_used is None


# --- a download cut short is not an image ----------------------------------------------------


JPEG = image_bytes(40, 30, "JPEG")
WEBP = image_bytes(40, 30, "WEBP")


@both
@pytest.mark.parametrize("image", [PNG, JPEG, WEBP], ids=["png", "jpeg", "webp"])
def test_a_download_cut_short_is_refused_not_saved(kind: str, image: bytes, tmp_path: Path) -> None:
    """A CDN serving part of the file with a 200: the bytes start like an image, but it is
    not whole, and its URL expires in minutes: saving it would lose the paid image quietly."""
    # Saved under its own format's extension: a JPEG saved as a.png is refused by its name as
    # soon as its first bytes arrive (tests/test_attack_results.py), before its end is seen.
    target = tmp_path / f"a.{image_format(image)}"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json=OK)
        return httpx.Response(200, stream=Raw(image[:-40]))

    async def save_async(client: AsyncFluxClient) -> Path:
        return await (await client.edit(REQUEST)).images[0].save_async(target)

    def save_sync(client: FluxClient) -> Path:
        return client.edit(REQUEST).images[0].save(target)

    with pytest.raises(errors.ResponseFormatError, match="cut short"):
        run(kind, handler, save_sync if kind == "sync" else save_async)
    assert list(tmp_path.iterdir()) == []


@both
@pytest.mark.parametrize("image", [PNG, JPEG, WEBP], ids=["png", "jpeg", "webp"])
def test_a_whole_image_in_any_format_downloads(kind: str, image: bytes) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json=OK)
        return httpx.Response(200, stream=Raw(image))

    async def read_async(client: AsyncFluxClient) -> bytes:
        return await (await client.edit(REQUEST)).images[0].read_async()

    def read_sync(client: FluxClient) -> bytes:
        return client.edit(REQUEST).images[0].read()

    assert run(kind, handler, read_sync if kind == "sync" else read_async) == image


@both
def test_a_content_length_shorter_than_the_image_is_refused(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server], tmp_path: Path
) -> None:
    """The client reads no further than the Content-Length a server declares."""

    def lie(connection: socket.socket, head: bytes) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(PNG) // 2))
        connection.sendall(PNG)

    cdn = serve(lie)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"url": f"{cdn.url}/a.png"}]})

    # The lying CDN is on loopback, which a provider at a public base URL may not lead to
    # unless allowed (tests/test_private_urls.py).
    allowed = {"laozhang": ProviderSettings(name="laozhang", allow_private_urls=True)}
    result = run(kind, handler, lambda client: client.edit(REQUEST), settings=allowed)
    image, target = result.images[0], tmp_path / "a.png"
    with pytest.raises(errors.ResponseFormatError, match="cut short"):
        image.save(target) if kind == "sync" else asyncio.run(image.save_async(target))
    assert list(tmp_path.iterdir()) == []


# --- provider text is shown, never obeyed by a terminal --------------------------------------

ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\x9b0m\u202edesrever\x00"


@both
@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, f"boom {ESCAPES}".encode()),
        (401, json.dumps({"error": {"message": f"bad {ESCAPES}", "code": ESCAPES}}).encode()),
        (200, f"not json {ESCAPES}".encode()),
    ],
)
def test_control_characters_from_a_provider_are_escaped_in_errors(
    kind: str, status: int, body: bytes
) -> None:
    """Error text reaches terminals (the command line prints it): an escape sequence from a
    hostile provider could retitle the window, clear the screen or reverse the text shown."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body)

    with pytest.raises(errors.ProviderError) as caught:
        run(kind, handler, lambda client: client.edit(REQUEST))
    error = caught.value
    for text in (str(error), error.detail or "", error.code or ""):
        assert text.isprintable(), text
    assert "red" in str(error)  # the words are still there, the escapes shown as text


# --- a careless caller: values that are not quite what they seem -----------------------------


class Masked(str):
    """A "secret string" as some settings libraries make them: str, but printed as stars."""

    def __str__(self) -> str:
        return "****"

    def __format__(self, spec: str) -> str:
        return "****"


@both
def test_a_key_given_as_a_str_subclass_is_sent_as_its_characters(kind: str) -> None:
    """f"Bearer {key}" asked the subclass to format itself: it sent 'Bearer ****'."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["authorization"])
        return httpx.Response(401, json={"error": {"message": f"bad key {KEY}"}})

    with pytest.raises(errors.AuthenticationFailed) as caught:
        run(kind, handler, lambda client: client.edit(REQUEST), api_key=Masked(KEY))
    assert sent == [f"Bearer {KEY}"]
    assert leaks(str(caught.value)) == []


@both
@pytest.mark.parametrize("retry_after", [-5.0, float("nan"), float("-inf")])
def test_an_adapters_odd_retry_after_never_breaks_the_wait(
    kind: str, retry_after: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """time.sleep(-5) raises ValueError; asyncio.sleep(nan) never ends."""
    monkeypatch.setenv("FIBBING_API_KEY", KEY)
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    report = errors.RateLimited(
        "slow down", provider="fibbing", status_code=429, retry_after=retry_after
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "fibbing.example":
            return httpx.Response(429)
        return httpx.Response(200, json=OK)

    started = time.monotonic()
    if kind == "sync":
        with httpx.Client(transport=httpx.MockTransport(handler)) as http:
            client = FluxClient(providers=[Fibbing(report), "laozhang"], http_client=http)
            result = client.edit(REQUEST)
    else:

        async def main() -> Any:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
                client = AsyncFluxClient(providers=[Fibbing(report), "laozhang"], http_client=http)
                return await asyncio.wait_for(client.edit(REQUEST), 10)

        result = asyncio.run(main())
    assert result.provider == "laozhang"
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("length", [241, 250, 255])
def test_a_long_file_name_the_system_takes_can_be_saved_to(length: int, tmp_path: Path) -> None:
    """The temporary file beside it was 15 characters longer: 'File name too long'."""
    import base64

    from flux_adapters.result import ResultImage

    image = ResultImage(b64_json=base64.b64encode(PNG).decode())
    target = tmp_path / ("é" * 20 + "a" * (length - 40))  # 255 bytes at most, in UTF-8
    assert image.save(target) == target
    assert target.read_bytes() == PNG
    assert [path.name for path in tmp_path.iterdir()] == [target.name]


@every
def test_a_garbled_answer_is_described_on_one_printable_line(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server]
) -> None:
    """aiohttp's parser errors span lines and quote what the server sent."""

    def garbled(connection: socket.socket, head: bytes) -> None:
        connection.sendall(b"HTTP/1.1 2000 \x1b[2J OK\r\n\r\n")

    server = serve(garbled)
    with pytest.raises(errors.TransportError) as caught:
        edit_on(kind, server.url)
    assert str(caught.value).isprintable(), str(caught.value)


@pytest.mark.parametrize("config", ["a\x00b.toml", 5, b"flux-adapters.toml", "caf\udce9.toml"])
def test_an_unusable_config_argument_is_a_configuration_error(
    config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    for make in (FluxClient, AsyncFluxClient):
        with pytest.raises(errors.ConfigurationError) as caught:
            make.from_env(config=config)
        assert str(caught.value).isprintable()


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"providers = [", "not valid TOML"), (b'providers = ["\xff"]', "is not UTF-8 text"),
     (b"a = " + b"[" * 5000 + b"]" * 5000, "not valid TOML")],
)  # fmt: skip
def test_a_configuration_file_that_cannot_be_read_says_why(
    content: bytes, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "flux-adapters.toml"
    path.write_bytes(content)
    with pytest.raises(errors.ConfigurationError, match=problem):
        FluxClient.from_env(config=path)


def head_then_hang_up(connection: socket.socket, head: bytes) -> None:
    """A 200 with the provider's request id and half its body, then the connection closes."""
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: req-7\r\n"
        b'Content-Length: 200\r\n\r\n{"created": 1, "da'
    )


def head_then_stall(connection: socket.socket, head: bytes) -> None:
    """The same head and half body, then nothing until long after the deadline."""
    head_then_hang_up(connection, head)
    time.sleep(5)


@every
@pytest.mark.parametrize("respond", [head_then_hang_up, head_then_stall], ids=["drop", "stall"])
def test_an_answer_cut_short_after_its_head_keeps_the_providers_request_id(
    kind: str,
    respond: Callable[[socket.socket, bytes], None],
    serve: Callable[[Callable[[socket.socket, bytes], None]], Server],
) -> None:
    # A 2xx whose body never came whole: the provider took (and bills) the job, and its request
    # id is what its support asks for. The error carried no headers and no id.
    server = serve(respond)
    with pytest.raises(errors.TransportError) as caught:
        edit_on(kind, server.url, deadline=1.0, max_retries=0)
    assert caught.value.sent is True
    assert caught.value.request_id == "req-7"
    assert caught.value.response_headers.get("x-request-id") == "req-7"


# --- a send that fails part-way closes the image file it was reading ------------------------


def reset_mid_body(connection: socket.socket, head: bytes) -> None:
    """Take part of the request's body, then reset the connection."""
    import struct

    taken = 0
    while taken < 200_000:
        received = connection.recv(65536)
        if not received:
            return
        taken += len(received)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def open_descriptors_of(path: Path) -> int:
    """How many of this process's descriptors are open on *path*."""
    found = 0
    for entry in os.scandir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found += os.readlink(entry.path) == str(path)
    return found


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The garbage collector off: a file must be closed when the call ends, not when it runs."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def large_image(tmp_path: Path) -> Path:
    """A PNG of 3 MB: several slices of the JSON body's base64."""
    path = tmp_path / "large.png"
    path.write_bytes(PNG + bytes(3_000_000))
    return path


def failing_hold_no_file(edit: Callable[[], object], image: Path) -> list[BaseException]:
    """Three calls of *edit*, each a `TransportError` kept (its traceback holds the body), and
    *image*'s file closed after each."""
    failures: list[BaseException] = []
    for _ in range(3):
        with pytest.raises(errors.TransportError) as caught:
            edit()
        failures.append(caught.value)
        assert open_descriptors_of(image) == 0
    return failures


async def failing_hold_no_file_async(
    edit: Callable[[], Awaitable[object]], image: Path
) -> list[BaseException]:
    """`failing_hold_no_file`, for an *edit* to await."""
    failures: list[BaseException] = []
    for _ in range(3):
        with pytest.raises(errors.TransportError) as caught:
            await edit()
        failures.append(caught.value)
        assert open_descriptors_of(image) == 0
    return failures


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@every
@pytest.mark.usefixtures("no_collector")
def test_a_send_cut_short_does_not_keep_the_image_file_open(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server], tmp_path: Path
) -> None:
    # With aiohttp the body's generator stayed suspended, its file open, for as long as the
    # error was kept (its traceback holds the body): a batch keeping its failures ran out of
    # descriptors ("Too many open files") and then refused every image.
    image = large_image(tmp_path)
    request = EditRequest(prompt="a robot", model="flux-2-pro", images=[image])
    server = serve(reset_mid_body)

    async def main() -> None:
        async with AsyncFluxClient(
            "laozhang", api_key=KEY, base_url=server.url, driver=driver(kind), max_retries=0
        ) as client:
            await failing_hold_no_file_async(lambda: client.edit(request), image)

    if kind == "sync":
        with FluxClient("laozhang", api_key=KEY, base_url=server.url, max_retries=0) as client:
            failing_hold_no_file(lambda: client.edit(request), image)
    else:
        asyncio.run(main())


class _TakesPartThenFails(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A caller's transport that reads the first slice of the body, then fails."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        chunks = iter(request.stream)
        next(chunks), next(chunks)  # the text before the image, then the image's first slice
        raise httpx.WriteError("the connection broke")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        chunks = aiter(request.stream)
        await anext(chunks), await anext(chunks)
        raise httpx.WriteError("the connection broke")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@both
@pytest.mark.usefixtures("no_collector")
def test_a_callers_transport_failing_mid_body_does_not_keep_the_image_file_open(
    kind: str, tmp_path: Path
) -> None:
    image = large_image(tmp_path)
    request = EditRequest(prompt="a robot", model="flux-2-pro", images=[image])

    async def main() -> None:
        async with httpx.AsyncClient(transport=_TakesPartThenFails()) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http, max_retries=0)
            await failing_hold_no_file_async(lambda: client.edit(request), image)

    if kind == "sync":
        with httpx.Client(transport=_TakesPartThenFails()) as http:
            client = FluxClient("laozhang", api_key=KEY, http_client=http, max_retries=0)
            failing_hold_no_file(lambda: client.edit(request), image)
    else:
        asyncio.run(main())


class _UploadsInAThread(httpx.BaseTransport):
    """A caller's transport that sends the body from a thread of its own and answers once that
    thread is inside it (*reading* set), not waiting for the body to be sent."""

    def __init__(self, reading: threading.Event) -> None:
        self.uploading: threading.Thread | None = None
        self._reading = reading

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        stream = request.stream
        self.uploading = threading.Thread(target=lambda: list(stream), daemon=True)
        self.uploading.start()
        assert self._reading.wait(10)
        return httpx.Response(200, json=OK)


def test_a_body_still_being_sent_by_a_callers_thread_when_the_call_ends_is_no_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing the body's file at the end of the call found the body's generator running in
    # the transport's thread: "generator already executing", a ValueError out of edit().
    image = large_image(tmp_path)
    request = EditRequest(prompt="a robot", model="flux-2-pro", images=[image])
    reading, finish = threading.Event(), threading.Event()
    transport = _UploadsInAThread(reading)
    real_read = os.read

    def slow_read(fd: int, n: int) -> bytes:
        if threading.current_thread() is transport.uploading:
            reading.set()
            finish.wait(10)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", slow_read)
    with httpx.Client(transport=transport) as http:
        client = FluxClient("laozhang", api_key=KEY, http_client=http)
        try:
            result = client.edit(request)
        finally:
            finish.set()
    assert result.images[0].url == RESULT_URL
    assert transport.uploading is not None
    transport.uploading.join(10)


# --- a long header line does not lose a paid answer on one driver only -----------------------


def ok_with_a_long_header(connection: socket.socket, head: bytes) -> None:
    """Take the whole request, then answer success with a 12,000-character request id."""
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    taken = len(head.partition(b"\r\n\r\n")[2])
    while taken < length:
        taken += len(connection.recv(65536))
    body = json.dumps(OK).encode()
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + b"X-Request-Id: req-"
        + b"7" * 12_000
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


@every
def test_an_answer_with_a_header_line_over_8_kb_is_read_by_every_client(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server]
) -> None:
    # aiohttp refuses a header line over 8,190 bytes by default, where httpx (h11) reads a head
    # up to 16 KiB whatever its lines: a paid answer the httpx clients returned was, on the
    # aiohttp driver, "the connection failed (the request may have reached it)": billed, lost.
    server = serve(ok_with_a_long_header)
    result = edit_on(kind, server.url)
    assert result.images[0].url == RESULT_URL
    assert result.request_id.startswith("req-777")


def read_slowly(connection: socket.socket, head: bytes) -> None:
    """Take the request's body a little at a time, never answering."""
    while connection.recv(4096):
        time.sleep(0.002)


@every
def test_a_client_closed_while_its_body_goes_out_ends_the_call_with_a_typed_error(
    kind: str, serve: Callable[[Callable[[socket.socket, bytes], None]], Server], tmp_path: Path
) -> None:
    # On aiohttp the session's close let the connection finish closing on its own, and the
    # body's abort then met asyncio's transport with its loop gone: an AttributeError
    # ("'NoneType' object has no attribute 'call_soon'") out of edit().
    image = tmp_path / "large.png"
    image.write_bytes(PNG + bytes(20_000_000))
    request = EditRequest(prompt="a robot", model="flux-2-pro", images=[image])
    server = serve(read_slowly)
    if kind == "sync":
        client = FluxClient("laozhang", api_key=KEY, base_url=server.url, deadline=30)
        threading.Timer(0.3, client.close).start()
        with pytest.raises(errors.FluxError):
            client.edit(request)
        return

    async def main() -> None:
        client = AsyncFluxClient(
            "laozhang", api_key=KEY, base_url=server.url, driver=driver(kind), deadline=30
        )
        closed: list[asyncio.Task[None]] = []
        closing = asyncio.get_running_loop().call_later(
            0.3, lambda: closed.append(asyncio.ensure_future(client.aclose()))
        )
        try:
            with pytest.raises(errors.FluxError):
                await client.edit(request)
        finally:
            closing.cancel()
            await client.aclose()

    asyncio.run(main())


@every
@pytest.mark.parametrize("fault", ["shrunk", "grown", "unreadable"])
def test_a_multipart_file_changed_or_unreadable_while_sent_is_a_request_error(
    kind: str, fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The multipart upload read the file through a plain file object: a disk error came out as
    # "the connection failed (the request may have reached it)", and a file changed since it
    # was measured sent another length than announced. Now as a JSON body's file: a
    # RequestError naming it, raised before the announced length is reached.
    import errno

    from flux_adapters.emulator import run_emulator

    path = tmp_path / "robot.png"
    path.write_bytes(image_bytes(256, 256) + bytes(200_000))
    request = EditRequest(prompt="p", model="flux-2-pro", images=[path], width=512, height=512)
    if fault == "shrunk":
        path.write_bytes(path.read_bytes()[:-1000])
    elif fault == "grown":
        with path.open("ab") as more:
            more.write(bytes(1000))
    else:

        def failing(descriptor: int, length: int) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr("flux_adapters._bodies._read_exactly", failing)
    with run_emulator() as emulator:
        options: dict[str, Any] = {
            "api_key": KEY,
            "base_url": emulator.base_url("apiyi"),
            "max_retries": 0,
        }

        def edit() -> None:
            if kind == "sync":
                with FluxClient("apiyi-multipart", **options) as client:
                    client.edit(request)
                return

            async def main() -> None:
                async with AsyncFluxClient(
                    "apiyi-multipart", driver=driver(kind), **options
                ) as flux:
                    await flux.edit(request)

            asyncio.run(main())

        with pytest.raises(errors.RequestError) as caught:
            edit()
        assert emulator.billed() == []  # nothing the provider could take for a whole request
    [violation] = caught.value.violations
    assert violation.field == "images"
    expected = "cannot be read" if fault == "unreadable" else "changed while it was being sent"
    assert expected in violation.message
    assert "robot.png" in violation.message


# --- Ctrl-C while the paid request's body is being sent ---------------------------------------


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError("no Content-Length")


MAY_HAVE_TAKEN_IT = [
    "flux-adapters: the request to laozhang was under way: laozhang may have taken it,"
    " and may bill it"
]
"""The note on a Ctrl-C that proves nothing of the paid request under way."""
CANNOT_HAVE_TAKEN_IT = [
    "flux-adapters: the request to laozhang was stopped before all of it was sent: laozhang"
    " cannot have taken it, and bills nothing"
]
"""The note on a Ctrl-C before the body's last byte went, with no answer awaited yet."""


def _with_a_large_image(tmp_path: Path) -> EditRequest:
    """An edit whose body is streamed (an image of several slices): its sending can be cut."""
    return EditRequest(prompt="a robot", model="flux-2-pro", images=[large_image(tmp_path)])


def _reads_all(received: list[tuple[int, int]]) -> Callable[[socket.socket, bytes], None]:
    """A server that reads the request to its end (or until the client hangs up), answering
    nothing: it notes (bytes of the body received, its Content-Length)."""

    def respond(connection: socket.socket, head: bytes) -> None:
        length = _content_length(head)
        taken = len(head.partition(b"\r\n\r\n")[2])
        while taken < length:
            chunk = connection.recv(1 << 20)
            if not chunk:
                break
            taken += len(chunk)
        received.append((taken, length))
        if taken >= length:  # the whole request came: Ctrl-C while its answer is awaited
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        connection.recv(1)  # until the client hangs up

    return respond


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in the main thread, as in a terminal."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _interrupted_after_one_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the image is read for the body: after its first slice went out."""
    from flux_adapters import _bodies

    real = _bodies._payload_chunks

    def interrupted(segment: Any) -> Iterator[bytes]:
        chunks = real(segment)
        yield next(chunks)
        raise KeyboardInterrupt

    monkeypatch.setattr(_bodies, "_payload_chunks", interrupted)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_before_the_body_was_sent_whole_says_the_provider_cannot_have_taken_it(
    serve: Callable[[Callable[[socket.socket, bytes], None]], Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stopped mid-body, in the thread that sends: the provider has part of a request whose
    # Content-Length says more was to come. It cannot run (nor bill) it: as a write timeout,
    # proven not taken. The note said "may have taken it, and may bill it".
    received: list[tuple[int, int]] = []
    server = serve(_reads_all(received))
    request = _with_a_large_image(tmp_path)
    _interrupted_after_one_slice(monkeypatch)
    with (
        FluxClient("laozhang", api_key=KEY, base_url=server.url, max_retries=0) as client,
        pytest.raises(KeyboardInterrupt) as caught,
    ):
        client.edit(request)
    assert caught.value.__notes__ == CANNOT_HAVE_TAKEN_IT
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    [(taken, length)] = received
    assert taken < length  # the provider indeed never had the whole request


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_once_the_body_was_sent_whole_says_the_provider_may_have_taken_it(
    serve: Callable[[Callable[[socket.socket, bytes], None]], Server], tmp_path: Path
) -> None:
    received: list[tuple[int, int]] = []
    server = serve(_reads_all(received))  # the whole body read, then Ctrl-C
    request = _with_a_large_image(tmp_path)
    with (
        FluxClient("laozhang", api_key=KEY, base_url=server.url, max_retries=0) as client,
        pytest.raises(KeyboardInterrupt) as caught,
    ):
        client.edit(request)
    assert caught.value.__notes__ == MAY_HAVE_TAKEN_IT
    [(taken, length)] = received
    assert taken == length


def test_ctrl_c_mid_body_on_a_callers_client_cannot_tell_and_says_it_may_have_been_taken(
    serve: Callable[[Callable[[socket.socket, bytes], None]], Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A caller's httpx client sends on a worker thread, which may go on writing on a connection
    # of its pool after the caller stopped: how far the body got is no proof.
    received: list[tuple[int, int]] = []
    server = serve(_reads_all(received))
    request = _with_a_large_image(tmp_path)
    _interrupted_after_one_slice(monkeypatch)
    with httpx.Client() as http:
        client = FluxClient("laozhang", api_key=KEY, base_url=server.url, http_client=http)
        with pytest.raises(KeyboardInterrupt) as caught:
            client.edit(request)
    assert caught.value.__notes__ == MAY_HAVE_TAKEN_IT


class _AnswersBeforeTheBodyEnds(httpx.BaseTransport):
    """A provider that reads part of the body, then answers 200 (httpcore stops writing on a
    write error, and reads the answer the server sent before it stopped reading): Ctrl-C while
    the answer's body comes in."""

    def __init__(self) -> None:
        self.read = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        self.read = len(next(iter(request.stream)))  # part of the body, never its end

        def dripping() -> Iterator[bytes]:
            yield b'{"data": ['
            raise KeyboardInterrupt

        return httpx.Response(200, headers={"content-type": "application/json"}, content=dripping())


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_after_an_answer_came_before_the_body_ended_says_the_provider_may_have_it(
    tmp_path: Path,
) -> None:
    # The provider stopped reading the body and answered (200): whatever the body's count, it
    # may have taken a job, and the note may not say "cannot have taken it, and bills nothing".
    # An answer that comes early is judged by its status, as after a write that failed.
    from flux_adapters import _transport

    provider = _AnswersBeforeTheBodyEnds()
    request = _with_a_large_image(tmp_path)
    with httpx.Client(transport=provider) as http:
        _transport._BOUNDED.add(http)  # sends in this thread, as FluxClient's own client
        client = FluxClient(
            "laozhang", api_key=KEY, base_url="https://api.example", http_client=http
        )
        with pytest.raises(KeyboardInterrupt) as caught:
            client.edit(request)
    assert provider.read > 0
    assert caught.value.__notes__ == MAY_HAVE_TAKEN_IT


def _answers_and_hangs_up_mid_body(connection: socket.socket, head: bytes) -> None:
    """A provider that reads part of the body, answers 200 and hangs up (a reset): the client's
    next write fails, and httpcore goes on to read the answer."""
    connection.recv(65536)  # part of the body, never its end
    connection.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    connection.close()


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_while_an_answer_is_awaited_after_a_failed_write_says_it_may_have_been_taken(
    serve: Callable[[Callable[[socket.socket, bytes], None]], Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The body's write failed part way (the provider hung up); httpcore then reads the answer
    # the provider may have sent first (a 200, a job): Ctrl-C there is past the body's part,
    # and the note may not say "cannot have taken it".
    import httpcore._sync.http11 as http11

    def interrupted(self: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(http11.HTTP11Connection, "_receive_response_headers", interrupted)
    server = serve(_answers_and_hangs_up_mid_body)
    request = _with_a_large_image(tmp_path)
    with (
        FluxClient("laozhang", api_key=KEY, base_url=server.url, max_retries=0) as client,
        pytest.raises(KeyboardInterrupt) as caught,
    ):
        client.edit(request)
    assert caught.value.__notes__ == MAY_HAVE_TAKEN_IT
