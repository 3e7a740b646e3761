"""AsyncFluxClient's two drivers: aiohttp directly, and httpx (flux_adapters._drivers).

Each hostile answer a real socket can send is met by FluxClient and by AsyncFluxClient on each
driver, and must give the same typed error and the same ``sent``: that flag decides whether a
router may fail over without paying twice (docs/routing.md). Then the aiohttp driver's own error
mapping on its own, the queue and pools in front of the connections, and how a driver is chosen.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, errors
from flux_adapters._drivers import DRIVER_VARIABLE, Exchange, HttpxDriver, choose
from flux_adapters._redact import redact
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.wire import ERROR_BODY_BYTES, MAX_ANSWER_BYTES, JsonBody
from tests.conftest import ASYNC_DRIVERS, CLIENT_KINDS, driver

KEY = "sk-drivers-5Hq8Lw2Zt7Nc4Vb1Xm9R"
REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")
OK = b'{"created": 1, "data": [{"url": "http://127.0.0.1:9/result.png"}]}'
Respond = Callable[[socket.socket, bytes, bytes], None]
"""A server's answer to one request: the connection, the request's head, and its body."""


class Server:
    """A loopback HTTP/1.1 server on raw sockets that answers each request with *respond*.

    It reads each request whole (head, then as many bytes as its Content-Length says) and counts
    what it received and sent, and the connections open at once.
    """

    def __init__(self, respond: Respond) -> None:
        self._respond = respond
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.requests = 0
        self.sent = 0
        self.open = 0
        self.most_open = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with self._lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            with connection:
                connection.settimeout(30)
                buffered = b""
                while True:  # one request after another on a kept-alive connection
                    while b"\r\n\r\n" not in buffered:
                        received = connection.recv(65536)
                        if not received:
                            return
                        buffered += received
                    head, _, buffered = buffered.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buffered) < length:
                        received = connection.recv(1024 * 1024)
                        if not received:
                            return
                        buffered += received
                    body, buffered = buffered[:length], buffered[length:]
                    with self._lock:
                        self.requests += 1
                    self._respond(connection, head, body)
        except OSError:  # the client gave up, or the answer closed the connection
            return
        finally:
            with self._lock:
                self.open -= 1

    def send(self, connection: socket.socket, data: bytes) -> None:
        """Send *data*, counted."""
        connection.sendall(data)
        with self._lock:
            self.sent += len(data)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Server, socket.socket, bytes, bytes], None]], Server]]:
    servers: list[Server] = []

    def start(respond: Callable[[Server, socket.socket, bytes, bytes], None]) -> Server:
        holder: list[Server] = []
        server = Server(lambda connection, head, body: respond(holder[0], connection, head, body))
        holder.append(server)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def answer(status: int, body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{header}\r\n" for header in headers)
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def edit(kind: str, base_url: str, request: EditRequest = REQUEST, **options: Any) -> object:
    """The result of an edit by a client of *kind*, or the FluxError it raised."""
    try:
        if kind == "sync":
            with FluxClient("laozhang", api_key=KEY, base_url=base_url, **options) as client:
                return client.edit(request)

        async def main() -> object:
            async with AsyncFluxClient(
                "laozhang", api_key=KEY, base_url=base_url, driver=driver(kind), **options
            ) as client:
                return await client.edit(request)

        return asyncio.run(main())
    except errors.FluxError as error:
        return error


def judged(outcome: object) -> tuple[str, bool | None, int | None]:
    return (
        type(outcome).__name__,
        getattr(outcome, "sent", None),
        getattr(outcome, "status_code", None),
    )


# --- hostile answers: the same typed error and `sent` on every client ------------------------


def drop_after_body(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    connection.shutdown(socket.SHUT_RDWR)  # the whole request arrived: it may be billed


def drop_mid_answer(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    server.send(connection, b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"data": [')
    connection.shutdown(socket.SHUT_RDWR)


def gateway(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    server.send(connection, answer(502, b"<html><title>502 Bad Gateway</title></html>"))


def garbled(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    server.send(connection, b"HTTP/1.1 2000 \x1b[2J OK\r\n\r\n")


def rate_limited(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    server.send(connection, answer(429, b'{"error": {"message": "slow down"}}', "Retry-After: 30"))


def redirect(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    server.send(connection, answer(307, b"", "Location: /elsewhere"))


def not_json(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    server.send(connection, answer(200, b"<html>hello</html>", "Content-Type: text/html"))


def unasked_encoding(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    server.send(connection, answer(200, b"\x0b\x02\x80{}\x03", "Content-Encoding: br"))


HOSTILE = {
    "drop-after-body": drop_after_body,
    "drop-mid-answer": drop_mid_answer,
    "502": gateway,
    "garbled-status": garbled,
    "429": rate_limited,
    "307-not-followed": redirect,
    "html-200": not_json,
    "unasked-encoding": unasked_encoding,
}


@pytest.mark.parametrize("behaviour", HOSTILE, ids=list(HOSTILE))
def test_every_client_meets_a_hostile_answer_with_the_same_error_and_sent(
    behaviour: str, serve: Callable[..., Server]
) -> None:
    server = serve(HOSTILE[behaviour])
    seen = {kind: judged(edit(kind, server.url)) for kind in CLIENT_KINDS}
    assert seen["aiohttp"] == seen["sync"], seen
    assert seen["httpx"] == seen["sync"], seen
    assert seen["sync"][0] != "EditResult"
    assert server.requests == len(CLIENT_KINDS)  # one POST each: nothing retried or followed


def test_a_refused_connection_is_not_sent_on_every_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once closed
    for kind in CLIENT_KINDS:
        outcome = edit(kind, url)
        assert isinstance(outcome, errors.TransportError), (kind, outcome)
        assert outcome.sent is False, kind


def drip_body(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    """The head at once, then the body a byte every 20 ms: 4 s for 200 bytes."""
    server.send(connection, b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n")
    for _ in range(200):
        server.send(connection, b" ")
        time.sleep(0.02)


def test_an_answer_dripping_past_the_deadline_is_a_timeout_that_may_be_billed(
    serve: Callable[..., Server],
) -> None:
    """Each byte well within the read timeout: only the deadline ends it, after the request."""
    server = serve(drip_body)
    for kind in CLIENT_KINDS:
        outcome = edit(kind, server.url, deadline=0.5)
        assert isinstance(outcome, errors.Timeout), (kind, outcome)
        assert outcome.sent is True, kind
        assert "deadline of 0.5 s" in str(outcome), kind


def _socket_buffers() -> int:
    """The most bytes the kernel may hold in flight on one loopback connection, unread.

    The sender's buffer and the receiver's, which Linux grows by itself up to the largest
    ``tcp_rmem`` (32 MiB on some machines) while the reader is slow: a client that stopped
    reading at its cap still leaves the server's sends returning until both are full.
    """
    try:
        most = [
            int(Path(f"/proc/sys/net/ipv4/tcp_{kind}").read_text().split()[2])
            for kind in ("rmem", "wmem")
        ]
    except (OSError, ValueError, IndexError):
        return 16 * 1024 * 1024
    return max(16 * 1024 * 1024, sum(most))


def endless(
    status: int, declared: int | None, *headers: str
) -> Callable[[Server, socket.socket, bytes, bytes], None]:
    """An answer that never ends: 1 MB pieces until the client hangs up."""

    def respond(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        length = f"Content-Length: {declared}" if declared is not None else "Connection: close"
        extra = "".join(f"{header}\r\n" for header in headers)
        server.send(connection, f"HTTP/1.1 {status} X\r\n{length}\r\n{extra}\r\n".encode())
        piece = b"x" * (1024 * 1024)
        while True:
            server.send(connection, piece)

    return respond


@pytest.mark.parametrize("kind", CLIENT_KINDS)
@pytest.mark.parametrize(
    ("status", "declared", "error", "most"),
    [
        (200, MAX_ANSWER_BYTES + 1, errors.ResponseFormatError, 0),
        (200, None, errors.ResponseFormatError, MAX_ANSWER_BYTES),
        (500, None, errors.ProviderUnavailable, ERROR_BODY_BYTES),
    ],
    ids=["declared-too-large", "endless-200", "endless-500"],
)
def test_an_answer_over_its_cap_is_refused_without_reading_it_all(
    kind: str,
    status: int,
    declared: int | None,
    error: type[errors.FluxError],
    most: int,
    serve: Callable[..., Server],
) -> None:
    server = serve(endless(status, declared))
    outcome = edit(kind, server.url, timeout=30)
    assert isinstance(outcome, error), outcome
    if isinstance(outcome, errors.ResponseFormatError):
        assert "larger than" in str(outcome)
    # The client hung up soon after its cap; the socket buffers hold the rest. One that read
    # on would have had gigabytes sent within its 30 s timeout.
    assert server.sent <= most + _socket_buffers(), server.sent


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_a_compressed_answer_is_capped_as_it_inflates(
    kind: str, serve: Callable[..., Server]
) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    megabyte = bytes(1024 * 1024)
    bomb = b"".join([*(compressor.compress(megabyte) for _ in range(64)), compressor.flush()])

    def respond(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        server.send(connection, answer(200, bomb, "Content-Encoding: gzip"))

    outcome = edit(kind, serve(respond).url)
    assert isinstance(outcome, errors.ResponseFormatError), outcome
    assert "larger than" in str(outcome)


def test_every_client_reads_the_same_retry_after(serve: Callable[..., Server]) -> None:
    server = serve(rate_limited)
    waits = set()
    for kind in CLIENT_KINDS:
        outcome = edit(kind, server.url)
        assert isinstance(outcome, errors.RateLimited), outcome
        waits.add(outcome.retry_after)
    assert waits == {30.0}


# A request id's bytes that are no UTF-8 (Latin-1's é, 0xE9), in UTF-8 (0xC3 0xA9), and UTF-8 in
# an answer whose other header is no UTF-8: read as httpx reads headers, UTF-8 when every header
# of the answer is, else each byte one character (Latin-1, HTTP's historical charset).
REQUEST_IDS = {
    "latin-1": ((b"x-request-id: caf\xe9",), "caf\xe9"),
    "utf-8": ((b"x-request-id: caf\xc3\xa9",), "caf\xe9"),
    "utf-8-beside-latin-1": ((b"x-request-id: caf\xc3\xa9", b"x-note: \xe9t\xe9"), "caf\xc3\xa9"),
}


@pytest.mark.parametrize("kind", CLIENT_KINDS)
@pytest.mark.parametrize("status", [200, 502])
@pytest.mark.parametrize("case", REQUEST_IDS, ids=list(REQUEST_IDS))
def test_a_request_id_that_is_not_ascii_reads_the_same_on_every_client(
    kind: str, status: int, case: str, serve: Callable[..., Server]
) -> None:
    # The id a user quotes to the provider's support: the same text whichever client read it
    # (aiohttp's own reading was 'caf\udce9', a lone surrogate no terminal or JSON shows).
    lines, shown = REQUEST_IDS[case]
    body = OK if status == 200 else b'{"error": {"message": "upstream"}}'

    def respond(server: Server, connection: socket.socket, head: bytes, _: bytes) -> None:
        extra = b"".join(line + b"\r\n" for line in lines)
        server.send(
            connection,
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, len(body), extra, body),
        )

    outcome = edit(kind, serve(respond).url, max_retries=0)
    if status == 200:
        assert isinstance(outcome, EditResult), outcome
        assert outcome.request_id == shown
    else:
        assert isinstance(outcome, errors.ProviderError), outcome
        assert outcome.request_id == shown
        assert outcome.response_headers["x-request-id"] == shown
        assert f"request id {shown}" in str(outcome)


# --- downloads of result images, on each driver ------------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.mark.parametrize("download", ["html", "empty", "redirect", "redirect-loop", "not-image"])
def test_a_result_that_is_no_image_is_the_same_error_on_every_client(
    download: str, emulator: Emulator
) -> None:
    def fetch(kind: str) -> str:
        emulator.inject("laozhang", Fault(download=download))
        try:
            base = emulator.base_url("laozhang")
            if kind == "sync":
                with FluxClient("laozhang", api_key=KEY, base_url=base) as client:
                    client.edit(REQUEST).images[0].read()
            else:

                async def main() -> None:
                    async with AsyncFluxClient(
                        "laozhang", api_key=KEY, base_url=base, driver=driver(kind)
                    ) as client:
                        await (await client.edit(REQUEST)).images[0].read_async()

                asyncio.run(main())
        except errors.FluxError as error:
            # Each job's result has a file name of its own.
            return re.sub(r"/files/\S+", "/files/...", f"{type(error).__name__}: {error}")
        finally:
            emulator.clear_faults()
        raise AssertionError(f"{kind} read a result that is no image")

    seen = {kind: fetch(kind) for kind in CLIENT_KINDS}
    assert seen["aiohttp"] == seen["sync"]
    assert seen["httpx"] == seen["sync"]


@pytest.mark.parametrize("kind", ASYNC_DRIVERS)
def test_an_image_downloads_through_the_clients_own_connections(
    kind: str, emulator: Emulator
) -> None:
    async def main() -> bytes:
        async with AsyncFluxClient(
            "laozhang", api_key=KEY, base_url=emulator.base_url("laozhang"), driver=driver(kind)
        ) as client:
            result = await client.edit(REQUEST)
            return await result.images[0].read_async()

    assert asyncio.run(main())[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1")


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example/a\x00.png",
        "https://cdn.example:port/a.png",
        "http://999.1.1.1/a.png",
        "http://[::1/a.png",
        "ftp://cdn.example/a.png",
    ],
)
def test_a_result_url_that_cannot_be_fetched_fails_alike_on_both_drivers(
    url: str,
) -> None:
    from flux_adapters._download import HttpDownloader

    async def read(kind: str) -> tuple[str, bool, str]:
        getter = aiohttp_driver() if kind == "aiohttp" else HttpxDriver()
        try:
            await HttpDownloader(async_client=getter).read_async(url)
        except errors.TransportError as error:
            return type(error.__cause__).__name__, error.sent, str(error)
        finally:
            await getter.aclose()
        raise AssertionError(f"{kind} fetched {url!r}")

    seen = {kind: asyncio.run(read(kind)) for kind in ASYNC_DRIVERS}
    assert seen["aiohttp"] == seen["httpx"]
    cause, sent, _ = seen["httpx"]
    assert sent is False  # nothing could be sent
    assert cause in ("InvalidURL", "UnsupportedProtocol")  # which the downloader never retries


# --- the aiohttp driver's own mapping, exchange by exchange -----------------------------------


def exchange(url: str, body: JsonBody | None = None, **timeouts: float) -> Exchange:
    phases = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0} | timeouts
    return Exchange(
        "POST" if body is not None else "GET",
        url,
        {"Authorization": f"Bearer {KEY}", "Accept": "application/json"},
        body,
        httpx.Timeout(**phases),
        10.0,
        "laozhang",
        redact,
    )


def aiohttp_driver(connections: int = 100) -> Any:
    from flux_adapters._aiohttp import AiohttpDriver

    return AiohttpDriver(connections)


async def _answer(sender: Any, item: Exchange) -> object:
    """*item*'s answer from *sender*, or the FluxError it ended with."""
    try:
        return await sender.exchange(item)
    except errors.FluxError as error:
        return error


def on_driver(make: Callable[[], Any], *exchanges: Exchange) -> list[object]:
    """Each exchange's answer or FluxError, sent at once by one driver made by *make*."""

    async def main() -> list[object]:
        sender = make()
        try:
            return list(await asyncio.gather(*(_answer(sender, item) for item in exchanges)))
        finally:
            await sender.aclose()

    return asyncio.run(main())


def queued_behind(
    make: Callable[[], Any], first: Exchange, queued: Exchange, released: threading.Event
) -> list[object]:
    """*first* and *queued* sent at once by one driver made by *make*, as `on_driver` sends
    them; *released* is set once *queued* has ended, for the server to answer *first* only
    then: *queued* waits for the connection *first* holds for as long as it takes, not for a
    fixed time."""

    async def main() -> list[object]:
        sender = make()
        try:
            holding = asyncio.ensure_future(_answer(sender, first))
            waiting = asyncio.ensure_future(_answer(sender, queued))
            try:
                ended = await waiting
            finally:
                released.set()
            return [await holding, ended]
        finally:
            await sender.aclose()

    return asyncio.run(main())


BODY = JsonBody({"model": "flux-2-pro", "prompt": "a robot"})


def test_aiohttp_a_refused_connection_is_not_sent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    [outcome] = on_driver(aiohttp_driver, exchange(url, BODY))
    assert type(outcome) is errors.TransportError
    assert outcome.sent is False
    assert "could not send the request" in str(outcome)


def test_aiohttp_a_drop_after_the_request_body_may_have_been_sent(
    serve: Callable[..., Server],
) -> None:
    server = serve(drop_after_body)
    [outcome] = on_driver(aiohttp_driver, exchange(f"{server.url}/v1", BODY))
    assert type(outcome) is errors.TransportError
    assert outcome.sent is True
    assert server.requests == 1


def test_aiohttp_an_answer_over_the_cap_is_the_httpx_drivers_error_unread(
    serve: Callable[..., Server],
) -> None:
    server = serve(endless(200, None))
    [aio] = on_driver(aiohttp_driver, exchange(f"{server.url}/v1", BODY, read=30.0))
    read_by_aiohttp = server.sent
    [plain] = on_driver(HttpxDriver, exchange(f"{server.url}/v1", BODY, read=30.0))
    assert isinstance(aio, errors.ResponseFormatError)
    assert isinstance(plain, errors.ResponseFormatError)
    assert (str(aio), aio.status_code) == (str(plain), plain.status_code)
    assert read_by_aiohttp <= MAX_ANSWER_BYTES + _socket_buffers()


def test_aiohttp_a_read_timeout_after_the_body_is_sent_and_a_timeout(
    serve: Callable[..., Server],
) -> None:
    def stall(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        time.sleep(3)

    server = serve(stall)
    [outcome] = on_driver(aiohttp_driver, exchange(f"{server.url}/v1", BODY, read=0.3))
    assert isinstance(outcome, errors.Timeout)
    assert outcome.sent is True


def test_aiohttp_the_read_timeout_restarts_with_each_piece_of_the_answer(
    serve: Callable[..., Server],
) -> None:
    """A byte every 20 ms never waits out a read timeout of 0.3 s: the deadline ends it."""
    server = serve(drip_body)
    dripping = exchange(f"{server.url}/v1", BODY, read=0.3)._replace(seconds=1.0)
    [outcome] = on_driver(aiohttp_driver, dripping)
    assert isinstance(outcome, errors.Timeout)
    assert outcome.sent is True
    assert "deadline of 1 s" in str(outcome)


def drip_head(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    """The answer's head four bytes every 100 ms (about 2 s), then its body at once."""
    whole = answer(200, OK)
    start, _, rest = whole.partition(b"\r\n\r\n")
    for at in range(0, len(start), 4):
        server.send(connection, start[at : at + 4])
        time.sleep(0.1)
    server.send(connection, b"\r\n\r\n" + rest)


@pytest.mark.parametrize("body", [BODY, None], ids=["post", "no-body"])
@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
def test_the_read_timeout_restarts_with_each_piece_of_the_answers_head(
    make: Callable[..., Any], body: JsonBody | None, serve: Callable[..., Server]
) -> None:
    """Each piece of the head well within the read timeout: the answer is read. The aiohttp
    driver timed a POST's head whole, from the body's last byte: a paid answer whose head came
    slower than the read timeout in all was a ReadTimeout (may have been billed, final)."""
    server = serve(drip_head)
    [outcome] = on_driver(make, exchange(f"{server.url}/v1", body, read=0.5))
    assert getattr(outcome, "status_code", None) == 200, outcome


@pytest.mark.parametrize("body", [BODY, None], ids=["post", "no-body"])
@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
def test_a_head_that_never_comes_ends_at_the_read_timeout_not_twice_it(
    make: Callable[..., Any], body: JsonBody | None, serve: Callable[..., Server]
) -> None:
    """No byte of the answer: the read timeout (1 s) ends it, before the deadline (1.7 s). The
    aiohttp driver handed the head to aiohttp's own timer when its clock ran out, which waited
    a whole read timeout more: a caller's timeout=30 waited 60 s (here: the deadline)."""

    def silent(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        time.sleep(3)

    server = serve(silent)
    slow = exchange(f"{server.url}/v1", body, read=1.0)._replace(seconds=1.7)
    [outcome] = on_driver(make, slow)
    assert isinstance(outcome, errors.Timeout), outcome
    assert "deadline" not in str(outcome), outcome


def test_aiohttp_exchanges_in_flight_together_each_keep_their_own_timeouts(
    serve: Callable[..., Server],
) -> None:
    """The driver watches every exchange's deadline and read timeout on one timer: an exchange
    with shorter timeouts than those already in flight still ends on time, a timeout ends only
    its own exchange, and exchanges sent after others timed out are still watched."""

    released = threading.Event()

    def slow(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        if head.startswith(b"POST /v1/longest "):
            released.wait(10)  # in flight until the others timed out, not a fixed 1.5 s
        else:
            time.sleep(1.5)  # past each of the others' timeouts
        server.send(connection, answer(200, OK))

    server = serve(slow)
    url = f"{server.url}/v1"

    async def main() -> list[object]:
        sender = aiohttp_driver()

        def one(item: Exchange) -> Any:
            return _answer(sender, item)

        try:
            longest = asyncio.ensure_future(one(exchange(f"{url}/longest", BODY)))  # 10 s, read 5 s
            try:
                shorter = await asyncio.gather(
                    one(exchange(url, BODY)._replace(seconds=0.3)),
                    one(exchange(url, BODY, read=0.3)),
                )
            finally:
                released.set()
            together = [await longest, *shorter]
            later = await one(exchange(url, BODY)._replace(seconds=0.4))
            return [*together, later]
        finally:
            await sender.aclose()

    answered, deadline, read, later = asyncio.run(main())
    assert getattr(answered, "status_code", None) == 200
    assert isinstance(deadline, errors.Timeout)
    assert "deadline of 0.3 s" in str(deadline)
    assert isinstance(read, errors.Timeout)
    assert "ReadTimeout" in str(read)
    assert read.sent is True
    assert isinstance(later, errors.Timeout)
    assert "deadline of 0.4 s" in str(later)


def test_aiohttp_a_callers_own_cancellation_is_no_timeout(serve: Callable[..., Server]) -> None:
    def stall(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        time.sleep(2)

    server = serve(stall)

    async def main() -> None:
        sender = aiohttp_driver()
        try:
            await asyncio.wait_for(sender.exchange(exchange(f"{server.url}/v1", BODY)), 0.3)
        finally:
            await sender.aclose()

    with pytest.raises(TimeoutError) as raised:  # wait_for's own, not the driver's Timeout
        asyncio.run(main())
    assert not isinstance(raised.value, errors.FluxError)


@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
def test_a_wait_for_a_free_connection_past_the_pool_timeout_is_not_sent(
    make: Callable[..., Any], serve: Callable[..., Server]
) -> None:
    released = threading.Event()

    def slow(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        released.wait(10)  # until the second has waited for the connection past its timeout
        server.send(connection, answer(200, OK))

    server = serve(slow)
    one = (lambda: make(connections=1, per_pool=1)) if make is HttpxDriver else lambda: make(1)
    first, second = queued_behind(
        one,
        exchange(f"{server.url}/v1", BODY),
        exchange(f"{server.url}/v1", BODY, pool=0.2),
        released,
    )
    assert getattr(first, "status_code", None) == 200
    assert isinstance(second, errors.Timeout)
    assert second.sent is False
    assert "before the request was sent" in str(second)
    assert server.requests == 1


@pytest.mark.parametrize("body", [BODY, None], ids=["post", "no-body"])
@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
def test_a_deadline_that_passes_in_the_queue_is_not_sent(
    make: Callable[..., Any], body: JsonBody | None, serve: Callable[..., Server]
) -> None:
    # A request with no body (a job's poll) too: the aiohttp driver said it may have reached
    # the provider, as if aiohttp had written it, while it waited for a connection.
    released = threading.Event()

    def slow(server: Server, connection: socket.socket, head: bytes, _: bytes) -> None:
        released.wait(10)  # until the second's deadline passed while it waited its turn
        server.send(connection, answer(200, OK))

    server = serve(slow)
    one = (lambda: make(connections=1, per_pool=1)) if make is HttpxDriver else lambda: make(1)
    queued = exchange(f"{server.url}/v1", body)._replace(seconds=0.3)
    first, second = queued_behind(one, exchange(f"{server.url}/v1", body), queued, released)
    assert getattr(first, "status_code", None) == 200
    assert isinstance(second, errors.Timeout)
    assert second.sent is False
    assert str(second) == (
        "laozhang: the request could not be sent within the deadline of 0.3 s"
        " (the request was not sent)"
    )
    assert server.requests == 1


@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
def test_a_deadline_that_passes_after_a_request_with_no_body_went_out_may_be_billed(
    make: Callable[..., Any], serve: Callable[..., Server]
) -> None:
    def stall(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        time.sleep(1.0)

    server = serve(stall)
    [outcome] = on_driver(make, exchange(f"{server.url}/v1")._replace(seconds=0.3))
    assert isinstance(outcome, errors.Timeout)
    assert outcome.sent is True
    assert "no complete answer within the deadline of 0.3 s" in str(outcome)


@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
def test_no_more_connections_than_the_driver_allows(
    make: Callable[..., Any], serve: Callable[..., Server]
) -> None:
    def slow(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        time.sleep(0.05)
        server.send(connection, answer(200, OK))

    server = serve(slow)
    four = (lambda: make(connections=4, per_pool=2)) if make is HttpxDriver else lambda: make(4)
    outcomes = on_driver(four, *(exchange(f"{server.url}/v1", BODY) for _ in range(40)))
    assert [getattr(outcome, "status_code", None) for outcome in outcomes] == [200] * 40
    assert server.most_open <= 4


@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Trace", "a\r\nX-Injected: yes"),
        ("X-Trace", "a\x00b"),
        ("X Trace", "a"),  # an adapter's header names: JSON keys, say, never checked
        ("", "a"),
        ("X-Trace:", "a"),
        ("X-Träce", "a"),
    ],
    ids=["line-break", "nul", "space-in-name", "empty-name", "colon-in-name", "non-ascii-name"],
)
def test_a_header_that_cannot_be_sent_is_a_request_error_and_sends_nothing(
    make: Callable[..., Any], name: str, value: str, serve: Callable[..., Server]
) -> None:
    # On either driver: never sent, so never a TransportError that may have been billed.
    server = serve(gateway)
    bad = exchange(f"{server.url}/v1", BODY)
    bad.headers[name] = value
    [outcome] = on_driver(make, bad)
    assert isinstance(outcome, errors.RequestError), outcome
    assert server.requests == 0


@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
@pytest.mark.parametrize(
    ("name", "value"),
    [("X-Seed", 5), ("X-Trace", b"abc"), ("X-Trace", None), (b"X-Trace", "a"), (7, "a")],
    ids=["int-value", "bytes-value", "none-value", "bytes-name", "int-name"],
)
def test_a_header_that_is_not_text_is_a_request_error_and_sends_nothing(
    make: Callable[..., Any], name: object, value: object, serve: Callable[..., Server]
) -> None:
    # An adapter's header built from its options (a seed, a None left in): the check joined
    # the values and matched the names as text, a bare TypeError out of the driver.
    server = serve(gateway)
    bad = exchange(f"{server.url}/v1", BODY)
    headers: dict[Any, Any] = bad.headers
    headers[name] = value
    [outcome] = on_driver(make, bad)
    assert isinstance(outcome, errors.RequestError), outcome
    assert server.requests == 0


@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
def test_a_url_that_is_no_http_url_is_not_sent(make: Callable[..., Any]) -> None:
    [outcome] = on_driver(make, exchange("ftp://127.0.0.1:9/v1", BODY))
    assert type(outcome) is errors.TransportError
    assert outcome.sent is False


@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
@pytest.mark.parametrize("port", ["99999", "9:9"], ids=["out-of-range", "not-a-number"])
def test_a_url_whose_port_cannot_be_is_a_request_error_on_both_drivers(
    make: Callable[..., Any], port: str
) -> None:
    # A provider's polling URL, say: the aiohttp driver let yarl's bare ValueError out of the
    # client (no FluxError, the job it polled lost), the httpx driver tried to connect and
    # called the failure one that may have reached the provider.
    [outcome] = on_driver(make, exchange(f"http://127.0.0.1:{port}/v1", BODY))
    assert isinstance(outcome, errors.RequestError), outcome
    assert "cannot send" in str(outcome)


@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
@pytest.mark.parametrize("where", ["path", "query"])
def test_a_url_holding_a_lone_surrogate_is_a_request_error_on_both_drivers(
    make: Callable[..., Any], where: str, serve: Callable[..., Server]
) -> None:
    # A job's polling URL read from JSON that escapes half a surrogate pair ("\\ud800"): no
    # URL can carry it (it has no UTF-8). The aiohttp driver let httpx's bare
    # UnicodeEncodeError out of the client: no FluxError, and the job it polled lost with it.
    server = serve(gateway)
    url = f"{server.url}/v1/get_result\ud800" if where == "path" else f"{server.url}/v1?id=\ud800"
    [outcome] = on_driver(make, exchange(url))
    assert isinstance(outcome, errors.RequestError), outcome
    assert "cannot send" in str(outcome)
    assert server.requests == 0


def test_aiohttp_a_host_aiohttp_refuses_to_connect_to_is_not_sent() -> None:
    # aiohttp refuses 127.1 (an IPv4 address it will not read) before it connects: the driver
    # called that a failure that may have reached the provider, which is never failed over.
    [outcome] = on_driver(aiohttp_driver, exchange("http://127.1:9/v1", BODY))
    assert type(outcome) is errors.TransportError, outcome
    assert outcome.sent is False
    assert "could not send the request (InvalidUrlClientError: 127.1" in str(outcome)


def test_aiohttp_a_signed_query_is_sent_as_written(serve: Callable[..., Server]) -> None:
    """yarl would re-quote a URL; a signed one must reach the server byte for byte."""
    heads: list[bytes] = []

    def record(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        heads.append(head)
        server.send(connection, answer(200, OK))

    server = serve(record)
    path = "/v1/a%2Fb/c?sig=A%2Bb%3D%3D&x=%7E&y=a+b"
    on_driver(aiohttp_driver, exchange(f"{server.url}{path}"))
    on_driver(HttpxDriver, exchange(f"{server.url}{path}"))
    assert [head.split(b" ")[1].decode() for head in heads] == [path, path]


def test_aiohttp_a_closed_driver_sends_nothing() -> None:
    async def main() -> None:
        sender = aiohttp_driver()
        await sender.aclose()
        await sender.exchange(exchange("http://127.0.0.1:9/v1", BODY))

    with pytest.raises(errors.ClientClosedError):
        asyncio.run(main())


# --- the client: which driver, copies, closing -------------------------------------------------


def test_the_client_says_which_driver_it_sends_with(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DRIVER_VARIABLE, raising=False)
    for proxy in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(proxy, raising=False)
    default = AsyncFluxClient("laozhang", api_key=KEY)
    assert default.driver == "aiohttp"
    assert repr(default).endswith("driver='aiohttp')")
    assert AsyncFluxClient("laozhang", api_key=KEY, driver="httpx").driver == "httpx"
    monkeypatch.setenv(DRIVER_VARIABLE, "httpx")
    assert AsyncFluxClient("laozhang", api_key=KEY).driver == "httpx"
    assert AsyncFluxClient("laozhang", api_key=KEY, driver="aiohttp").driver == "aiohttp"
    monkeypatch.setenv(DRIVER_VARIABLE, "auto")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert AsyncFluxClient("laozhang", api_key=KEY).driver == "httpx"  # aiohttp reads no proxy


def test_a_callers_http_client_is_always_sent_with_as_it_is() -> None:
    async def main() -> None:
        async with httpx.AsyncClient() as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            assert client.driver == "httpx"
            assert client._driver.http is http  # type: ignore[attr-defined]

    asyncio.run(main())
    with pytest.raises(errors.ConfigurationError, match="pass one or the other"):
        AsyncFluxClient("laozhang", api_key=KEY, http_client=httpx.AsyncClient(), driver="aiohttp")


@pytest.mark.parametrize("value", ["fast", "", "AIOHTTP", 1, None.__class__])
def test_a_driver_that_is_none_is_refused(value: object) -> None:
    with pytest.raises(errors.ConfigurationError, match="driver= must be"):
        AsyncFluxClient("laozhang", api_key=KEY, driver=value)  # type: ignore[arg-type]


def test_the_driver_variable_is_read_leniently_and_refused_naming_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DRIVER_VARIABLE, " HTTPX ")
    assert AsyncFluxClient("laozhang", api_key=KEY).driver == "httpx"
    monkeypatch.setenv(DRIVER_VARIABLE, "fast")
    with pytest.raises(errors.ConfigurationError, match=f"\\${DRIVER_VARIABLE} must be"):
        AsyncFluxClient("laozhang", api_key=KEY)


def test_aiohttp_asked_for_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flux_adapters._drivers._installed", lambda module: False)
    assert choose(None, None, {}) == "httpx"  # auto: falls back, silently
    with pytest.raises(errors.MissingExtraError, match=r"pip install 'flux-adapters\[fast\]'"):
        choose("aiohttp", None, {})


@pytest.mark.parametrize("kind", ASYNC_DRIVERS)
def test_copies_share_the_drivers_connections_and_close_with_their_maker(
    kind: str, emulator: Emulator
) -> None:
    async def main() -> None:
        client = AsyncFluxClient(
            "laozhang", api_key=KEY, base_url=emulator.base_url("laozhang"), driver=driver(kind)
        )
        async with client.with_options(timeout=20) as copy:
            assert copy._driver is client._driver
            assert (await copy.edit(REQUEST)).provider == "laozhang"
        assert not client.is_closed  # closing the copy left the connections open
        assert (await client.edit(REQUEST)).provider == "laozhang"
        other = client.with_options(max_retries=1)
        await client.aclose()
        for closed in (client, other):
            with pytest.raises(errors.ClientClosedError):
                await closed.edit(REQUEST)

    asyncio.run(main())


def test_aiohttp_is_loaded_only_by_an_async_client_that_sends_with_it() -> None:
    code = (
        "import sys\n"
        "import flux_adapters\n"
        "from flux_adapters import FluxClient, AsyncFluxClient, EditRequest\n"
        "FluxClient('laozhang', api_key='test-key')\n"
        "AsyncFluxClient('laozhang', api_key='test-key', driver='httpx')\n"
        "print('aiohttp' in sys.modules)\n"
        "AsyncFluxClient('laozhang', api_key='test-key', driver='aiohttp')\n"
        "print('aiohttp' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("kind", ASYNC_DRIVERS)
def test_a_key_echoed_by_a_failing_connection_never_shows(
    kind: str, serve: Callable[..., Server]
) -> None:
    def echo(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
        # The request's head, key included, as a status line no parser takes: quoted back.
        server.send(connection, b"HTTP/1.1 2000 " + head.replace(b"\r\n", b" ") + b"\r\n\r\n")

    outcome = edit(kind, serve(echo).url)
    assert isinstance(outcome, errors.TransportError), outcome
    shown = f"{outcome} {outcome!r}"
    assert [KEY[i : i + 8] for i in range(len(KEY) - 7) if KEY[i : i + 8] in shown] == []


# --- a caller's httpx client on aiohttp (httpx-aiohttp): its errors still say what they prove --


@pytest.mark.parametrize(
    "behaviour", ["refused", "drop-after-body", "garbled-status", "502"], ids=str
)
def test_a_callers_httpx_client_on_aiohttp_is_judged_as_the_drivers_are(
    behaviour: str, serve: Callable[..., Server]
) -> None:
    """httpx-aiohttp files every aiohttp connection error under httpx.ConnectTimeout, a hang-up
    after the body included: the cause, not that class, decides ``sent``."""
    from httpx_aiohttp import AiohttpTransport

    if behaviour == "refused":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    else:
        url = serve(HOSTILE[behaviour]).url

    async def main() -> object:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, base_url=url, http_client=http)
            try:
                return await client.edit(REQUEST)
            except errors.FluxError as error:
                return error

    assert judged(asyncio.run(main())) == judged(edit("aiohttp", url))


def test_the_aiohttp_driver_keeps_few_timeouts_however_many_deadlines_it_meets() -> None:
    """Polls near their job's deadline each have their phases cut to the time left: a
    long-running worker must not keep one set of timeouts per poll."""
    from flux_adapters._aiohttp import _MOST_URLS, AiohttpDriver

    made = AiohttpDriver()
    base = httpx.Timeout(10.0, connect=5.0)
    first = made._timeout(base, True)
    assert made._timeout(base, True) is first  # made once per set of phases
    assert (first.sock_read, first.sock_connect, first.connect) == (10.0, 5.0, 10.0)
    for n in range(3 * _MOST_URLS):
        left = 1 + n / 1000
        cut = made._timeout(httpx.Timeout(left), True)
        assert cut.sock_read == left
    assert len(made._timeouts) <= _MOST_URLS


def _no_json() -> dict[str, object]:
    holds_itself: dict[str, object] = {"model": "flux-2-pro"}
    holds_itself["again"] = holds_itself
    return holds_itself


@pytest.mark.parametrize(
    "value",
    [{"prompt": "a robot", "tags": {"a", "b"}}, {"prompt": b"bytes"}, _no_json()],
    ids=["a set", "bytes", "holds itself"],
)
@pytest.mark.parametrize("make", [aiohttp_driver, HttpxDriver], ids=ASYNC_DRIVERS)
def test_a_body_json_cannot_hold_is_a_request_error_on_both_drivers_and_sends_nothing(
    value: dict[str, Any], make: Callable[..., Any], serve: Callable[..., Server]
) -> None:
    """An adapter's mistake, refused before anything goes out (not a bare TypeError)."""
    server = serve(gateway)
    [outcome] = on_driver(make, exchange(f"{server.url}/v1", JsonBody(value)))
    assert isinstance(outcome, errors.RequestError)
    assert "cannot send" in str(outcome)
    assert server.requests == 0


def many_headers(server: Server, connection: socket.socket, head: bytes, body: bytes) -> None:
    # A CDN's or a proxy's headers piled on a paid answer: more than aiohttp's default 128.
    server.send(connection, answer(200, OK, *(f"X-Hop-{n}: {n}" for n in range(300))))


def test_an_answer_with_many_headers_is_read_by_every_client(serve: Callable[..., Server]) -> None:
    """h11 counts no header lines; the aiohttp driver read at most 128, failing a paid answer
    ("Too many headers received", may have been billed) that the other clients return."""
    server = serve(many_headers)
    for kind in CLIENT_KINDS:
        outcome = edit(kind, server.url)
        assert isinstance(outcome, EditResult), (kind, outcome)
    assert server.requests == len(CLIENT_KINDS)


def rate_limited_then_dropped(
    server: Server, connection: socket.socket, head: bytes, body: bytes
) -> None:
    server.send(connection, b'HTTP/1.1 429 X\r\nContent-Length: 100\r\nRetry-After: 7\r\n\r\n{"err')
    connection.shutdown(socket.SHUT_RDWR)


def refused_key_then_dropped(
    server: Server, connection: socket.socket, head: bytes, body: bytes
) -> None:
    server.send(connection, b'HTTP/1.1 401 X\r\nContent-Length: 100\r\n\r\n{"err')
    connection.shutdown(socket.SHUT_RDWR)


def rate_limited_undecodable(
    server: Server, connection: socket.socket, head: bytes, body: bytes
) -> None:
    server.send(connection, answer(429, b"no gzip", "Content-Encoding: gzip", "Retry-After: 7"))


ERROR_HEADS = {
    "429-dropped": (rate_limited_then_dropped, errors.RateLimited),
    "401-dropped": (refused_key_then_dropped, errors.AuthenticationFailed),
    "429-undecodable": (rate_limited_undecodable, errors.RateLimited),
}


@pytest.mark.parametrize("case", ERROR_HEADS, ids=list(ERROR_HEADS))
def test_an_error_status_whose_body_is_cut_short_is_judged_by_its_status(
    case: str, serve: Callable[..., Server]
) -> None:
    """A 429's or a 401's head proves the provider did not take the job: a body cut short after
    it (a drop, bytes that do not inflate) was a TransportError that may have been billed, or
    an unreadable answer, on every client, and a router never failed over from it."""
    respond, error = ERROR_HEADS[case]
    server = serve(respond)
    for kind in CLIENT_KINDS:
        outcome = edit(kind, server.url, max_retries=0)
        assert type(outcome) is error, (kind, outcome)
        if isinstance(outcome, errors.RateLimited):
            assert outcome.retry_after == 7.0, kind
    assert server.requests == len(CLIENT_KINDS)


def rate_limited_then_stalled(
    server: Server, connection: socket.socket, head: bytes, body: bytes
) -> None:
    server.send(connection, b'HTTP/1.1 429 X\r\nContent-Length: 100\r\nRetry-After: 7\r\n\r\n{"err')
    time.sleep(3)


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0.5, "deadline": 5}, {"timeout": 5, "deadline": 0.5}],
    ids=["read-timeout", "deadline"],
)
def test_an_error_status_whose_body_stalls_is_judged_by_its_status(
    options: dict[str, float], serve: Callable[..., Server]
) -> None:
    # The async drivers' read timeout (aiohttp's clock) and deadline after a 429's head were a
    # Timeout that may have been billed; FluxClient's ReadTimeout is a transport error.
    server = serve(rate_limited_then_stalled)
    for kind in CLIENT_KINDS:
        outcome = edit(kind, server.url, REQUEST, max_retries=0, **options)
        assert type(outcome) is errors.RateLimited, (kind, outcome)
        assert outcome.retry_after == 7.0, kind
