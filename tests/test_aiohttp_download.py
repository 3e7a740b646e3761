"""The aiohttp driver's downloads keep their read timeout on the driver's clock, as httpx does.

`flux_adapters._aiohttp._Getting` times a download's reads on a `_Clock` (the driver's one
timer of the loop) instead of aiohttp's ``sock_read`` (a timer of the loop per piece). Each
case runs the same server behaviour under both getters, httpx's (the general path) and the
aiohttp driver's, and must end the same way: the image, or a `Timeout` saying the provider had
the request. The read phase starts when the request went out, not when it was asked for: a
download that waited for a free connection longer than its read timeout is not timed out.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from flux_adapters import _download, errors
from flux_adapters._aiohttp import AiohttpDriver
from flux_adapters._download import HttpDownloader
from tests.conftest import image_bytes

PNG = image_bytes(40, 30)
READ = 0.3
"""The read timeout of these downloads (their deadline is far longer)."""


def _respond(connection: socket.socket, pieces: list[tuple[float, bytes]]) -> None:
    """Answer with the bytes of *pieces*, each after its pause."""
    for pause, data in pieces:
        time.sleep(pause)
        connection.sendall(data)


def _head(length: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % length


HEAD = _head(len(PNG))
GZIPPED = gzip.compress(PNG)
GZIP_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Encoding: gzip\r\n"
    b"Content-Length: %d\r\n\r\n" % len(GZIPPED)
)
SERVED: dict[str, list[tuple[float, bytes]]] = {
    "at once": [(0, _head(len(PNG)) + PNG)],
    "head late, within the read timeout": [(READ / 2, _head(len(PNG)) + PNG)],
    "head past the read timeout": [(READ * 5, _head(len(PNG)) + PNG)],
    # Past it, within twice it: the aiohttp driver once handed a head with no byte yet to
    # aiohttp's own timer when its clock ran out, a whole read timeout more.
    "head a little past the read timeout": [(READ * 1.7, _head(len(PNG)) + PNG)],
    "body stalls past the read timeout": [(0, _head(len(PNG)) + PNG[:16]), (READ * 5, PNG[16:])],
    # Each piece within the read timeout, all of them together well past it.
    "pieces steady, slower than the read timeout in all": [
        (0, _head(len(PNG)) + PNG[:16]),
        *((READ / 3, PNG[start : start + 16]) for start in range(16, 16 + 16 * 6, 16)),
        (READ / 3, PNG[16 + 16 * 6 :]),
    ],
    # The head in pieces, each within the read timeout, all of them well past it: httpx's read
    # timeout restarts with each read, as aiohttp's sock_read with each piece.
    "head in pieces, slower than the read timeout in all": [
        *((READ / 3 if start else 0, HEAD[start : start + 8]) for start in range(0, 56, 8)),
        (READ / 3, HEAD[56:] + PNG),
    ],
    "head in pieces, then stalls past the read timeout": [
        *((READ / 3 if start else 0, HEAD[start : start + 8]) for start in range(0, 56, 8)),
        (READ * 5, HEAD[56:] + PNG),
    ],
    "head in pieces past the read timeout in all, then the body stalls past it": [
        *((READ / 3 if start else 0, HEAD[start : start + 8]) for start in range(0, 64, 8)),
        (READ * 5, PNG),
    ],
    "a compressed body stalls past the read timeout": [
        (0, GZIP_HEAD + GZIPPED[:20]),
        (READ * 5, GZIPPED[20:]),
    ],
}


class _Server:
    """A loopback HTTP server: reads each request's head, then answers as *served* says."""

    def __init__(self, served: list[tuple[float, bytes]]) -> None:
        self._served = served
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/a.png"
        self.requests = 0
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
            try:
                while True:  # keep-alive: one answer per request
                    head = b""
                    while b"\r\n\r\n" not in head:
                        received = connection.recv(65536)
                        if not received:
                            return
                        head += received
                    self.requests += 1
                    _respond(connection, self._served)
            except OSError:  # the client gave up
                return

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[list[tuple[float, bytes]]], _Server]]:
    servers: list[_Server] = []

    def start(served: list[tuple[float, bytes]]) -> _Server:
        servers.append(_Server(served))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def _read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # A short read timeout; the pool's and the connect's long (a download may wait its turn).
    monkeypatch.setattr(_download, "DOWNLOAD_TIMEOUT", httpx.Timeout(READ, pool=10, connect=10))
    # A timed-out download is tried twice more after a jittered wait of up to 0.5 s, then 1 s:
    # how long it waits is not what these tests are about (their outcome is the same), and at
    # its own ceiling it was most of their time.
    monkeypatch.setattr(_download, "_BACKOFF", 0.01)


def _outcome(found: object) -> object:
    if isinstance(found, errors.Timeout):
        return ("Timeout", found.sent, "timed out waiting for the answer" in str(found))
    if isinstance(found, BaseException):
        return (type(found).__name__, str(found))
    return found


def _read(kind: str, urls: list[str], connections: int = 10) -> list[object]:
    """Download each of *urls* at once with *kind*'s getter; what each ended with."""

    async def main() -> list[object]:
        getter: Any
        if kind == "aiohttp":
            getter = AiohttpDriver(connections=connections)
        else:
            limits = httpx.Limits(max_connections=connections)
            getter = httpx.AsyncClient(limits=limits)
        try:
            downloader = HttpDownloader(provider="cdn", async_client=getter, deadline=20)
            found = await asyncio.gather(
                *(downloader.read_async(url) for url in urls), return_exceptions=True
            )
        finally:
            await getter.aclose()
        return [_outcome(each) for each in found]

    return asyncio.run(main())


@pytest.mark.parametrize("served", list(SERVED))
def test_a_download_ends_as_under_httpx(
    served: str, serve: Callable[[list[tuple[float, bytes]]], _Server]
) -> None:
    url = serve(SERVED[served]).url
    expected = {
        "head past the read timeout": ("Timeout", True, True),
        "head a little past the read timeout": ("Timeout", True, True),
        "body stalls past the read timeout": ("Timeout", True, True),
        "head in pieces, then stalls past the read timeout": ("Timeout", True, True),
        "head in pieces past the read timeout in all, then the body stalls past it": (
            "Timeout",
            True,
            True,
        ),
        "a compressed body stalls past the read timeout": ("Timeout", True, True),
    }.get(served, PNG)
    assert _read("httpx", [url]) == [expected]
    assert _read("aiohttp", [url]) == [expected]


def test_the_read_timeout_is_aiohttps_own_error_as_it_was(
    serve: Callable[[list[tuple[float, bytes]]], _Server],
) -> None:
    """The clock's read timeout reads as aiohttp's ``sock_read`` did: the same message."""
    url = serve(SERVED["body stalls past the read timeout"]).url

    async def main() -> errors.Timeout:
        driver = AiohttpDriver()
        try:
            downloader = HttpDownloader(provider="cdn", async_client=driver, deadline=20)
            with pytest.raises(errors.Timeout) as caught:
                await downloader.read_async(url)
            task = asyncio.current_task()
            assert task is not None
            assert task.cancelling() == 0  # the cancellation taken back
        finally:
            await driver.aclose()
        return caught.value

    error = asyncio.run(main())
    assert str(error) == (
        "cdn: timed out waiting for the answer (SocketTimeoutError) (the request may have reached it)"
    )
    assert error.sent is True


def test_waiting_for_a_connection_is_not_the_read_timeout(
    serve: Callable[[list[tuple[float, bytes]]], _Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One connection, three downloads each slower than the read timeout in all: the last waits
    longer than the read timeout for its turn, and is not timed out for it (nor tried again)."""
    attempts: list[str] = []
    following = HttpDownloader._follow_async

    async def counted(self: HttpDownloader, http: Any, url: str, sink: Any) -> None:
        attempts.append(url)
        await following(self, http, url, sink)

    monkeypatch.setattr(HttpDownloader, "_follow_async", counted)
    for kind in ("httpx", "aiohttp"):
        attempts.clear()
        server = serve(SERVED["pieces steady, slower than the read timeout in all"])
        assert _read(kind, [server.url] * 3, connections=1) == [PNG] * 3, kind
        assert (len(attempts), server.requests) == (3, 3), kind  # none timed out and tried again


def test_a_callers_cancel_of_an_aiohttp_download_stays_a_cancel(
    serve: Callable[[list[tuple[float, bytes]]], _Server],
) -> None:
    url = serve(SERVED["body stalls past the read timeout"]).url

    async def main() -> str:
        driver = AiohttpDriver()
        try:
            downloader = HttpDownloader(provider="cdn", async_client=driver, deadline=20)
            task = asyncio.create_task(downloader.read_async(url))
            await asyncio.sleep(READ / 3)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            except errors.FluxError as error:
                return type(error).__name__
            return "done"
        finally:
            await driver.aclose()

    assert asyncio.run(main()) == "cancelled"


def test_a_caller_cancelling_as_the_read_timeout_passes_stays_a_cancel(
    serve: Callable[[list[tuple[float, bytes]]], _Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's cancel in the same turn of the loop as the clock's wins, as under
    ``asyncio.timeout``."""
    from flux_adapters import _aiohttp

    passing = _aiohttp._Clock.check

    def with_the_callers(clock: _aiohttp._Clock, now: float) -> float | None:
        soonest = passing(clock, now)
        if soonest is None:
            clock._task.cancel()
        return soonest

    monkeypatch.setattr(_aiohttp._Clock, "check", with_the_callers)
    url = serve(SERVED["body stalls past the read timeout"]).url

    async def main() -> str:
        driver = AiohttpDriver()
        try:
            downloader = HttpDownloader(provider="cdn", async_client=driver, deadline=20)
            try:
                await asyncio.create_task(downloader.read_async(url))
            except asyncio.CancelledError:
                return "cancelled"
            return "done"
        finally:
            await driver.aclose()

    assert asyncio.run(main()) == "cancelled"
