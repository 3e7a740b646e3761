"""The aiohttp driver: ``AsyncFluxClient`` sending with aiohttp directly (the ``fast`` extra).

httpx on top of aiohttp (httpx-aiohttp) costs more CPU per request than aiohttp itself: httpx
builds and parses its own request, URL, headers and response objects around aiohttp's. This
driver hands aiohttp the `flux_adapters._drivers.Exchange` the client computed, and reads the
answer with the same `flux_adapters._transport.AnswerBody` as the httpx driver. What it keeps:

- bodies streamed slice by slice with their length announced (`_Body`), each slice's write bounded
  by the write timeout; multipart bodies encoded by httpx's encoder, so both drivers send the same
  parts in the same order;
- answers read within their cap and the exchange's deadline, compressed ones inflated a bounded
  slice at a time (aiohttp's own decompression is off: it inflates each chunk whole);
- timeouts per phase as aiohttp keeps them (`AiohttpDriver._timeout`): pool and connect, connect,
  read (from the end of the body to the first byte of the answer, then between bytes), and the
  deadline over all of them; write per slice of the body (`_Body`);
- ``sent`` on every failure: ``False`` only when the provider cannot have the whole request (no
  connection, a pool, connect or write timeout, or the deadline before the last byte of the body
  went out), as httpx's mapping says (`flux_adapters._transport.proves_not_sent`);
- no cookies kept (a provider's cookie never goes to another host, nor a CDN's), no proxy: the
  driver is chosen only when the environment names none (`flux_adapters._drivers.choose`), and
  the certificates httpx trusts (``httpx.create_ssl_context``).

Imported only when a client chooses this driver: ``import flux_adapters`` and `FluxClient` never
load aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Final

import aiohttp
import httpx
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from yarl import URL

from flux_adapters._bodies import json_segments, segment_chunks, segments_length
from flux_adapters._drivers import (
    CONNECTIONS,
    KEEPALIVE,
    Exchange,
    multipart_request,
    not_sent_by_deadline,
    unsendable,
)
from flux_adapters._transport import (
    AnswerBody,
    UnusableURL,
    adecoded,
    deadline_error,
    transport_error,
)
from flux_adapters.errors import ClientClosedError, FluxError, Timeout
from flux_adapters.wire import HttpResponse, JsonBody, MultipartBody

__all__ = ["AiohttpDriver"]

_PLAIN_URL: Final = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
"""A URL made only of characters that need no quoting (and whole %-escapes, which httpx keeps as
they are): sent exactly as written. A signed result URL's query is full of escapes."""
_SMALL_WRITE: Final = 64 * 1024
"""A slice this small goes into aiohttp's buffer without waiting (its limit is 64 KiB)."""


class _Headers:
    """An aiohttp answer's headers, read the way `flux_adapters._transport.HeadHeaders` says."""

    __slots__ = ("_headers",)

    def __init__(self, headers: Any) -> None:
        self._headers = headers  # aiohttp's CIMultiDictProxy: any case, in the order received

    def get(self, key: str, default: Any = None) -> Any:
        values = self._headers.getall(key, None)
        if values is None:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)  # as httpx joins them

    def get_list(self, key: str, split_commas: bool = False) -> list[str]:
        values: list[str] = list(self._headers.getall(key, ()))
        if not split_commas:
            return values
        return [part.strip() for value in values for part in value.split(",")]

    def multi_items(self) -> list[tuple[str, str]]:
        return [(name.lower(), value) for name, value in self._headers.items()]


class _Head:
    """An aiohttp answer as a `flux_adapters._transport.Head`."""

    __slots__ = ("headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status_code = response.status
        self.headers = _Headers(response.headers)


class _Body(Payload):
    """A request body of known length, written slice by slice; it knows how far it got.

    ``complete`` once its last byte was handed to the connection: from then on the provider may
    have the whole request. A slice that cannot be written within *write* seconds (the server
    stopped reading) ends the exchange with ``write_timed_out``; a `FluxError` raised while
    producing a slice (a file that changed) is kept in ``error`` (aiohttp wraps what a body
    raises).
    """

    def __init__(
        self, chunks: Iterator[bytes], size: int, content_type: str, write: float | None
    ) -> None:
        super().__init__(chunks, content_type=content_type)
        self._chunks = chunks
        self._size = self._length = size
        self._write = write
        self._handed = 0
        self._transport: asyncio.BaseTransport | None = None
        self.write_timed_out = False
        self.error: FluxError | None = None

    @property
    def complete(self) -> bool:
        """Whether every byte was handed to the connection."""
        return self._handed >= self._length

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a streamed body is not kept in memory")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        # Kept: once aiohttp gives up on the connection, its protocol no longer holds it.
        self._transport = getattr(writer, "transport", None)
        try:
            for chunk in self._chunks:
                self._handed += len(chunk)
                if self._write is None or len(chunk) <= _SMALL_WRITE:
                    await writer.write(chunk)
                else:
                    async with asyncio.timeout(self._write):
                        await writer.write(chunk)
        except TimeoutError:
            self.write_timed_out = True
            self.abort()
            raise
        except FluxError as error:
            self.error = error
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the connection this body was going out on, unless it went out whole.

        Abort, not close: a close waits to flush what is buffered, which a server that stopped
        reading never takes; the connection would linger, half sent, until the loop ends. What
        was buffered is dropped too, so the provider cannot get the rest of the request.
        """
        transport = self._transport
        if transport is not None and not self.complete and isinstance(transport, asyncio.Transport):
            transport.abort()


_MOST_URLS: Final = 256
"""URLs a driver keeps read (`AiohttpDriver._url`): polling URLs differ per job."""


def _yarl(url: str) -> URL:
    """*url* as aiohttp takes it, sent as httpx would send it.

    A URL that needs no quoting is sent exactly as written (``encoded=True``: yarl would otherwise
    re-quote it, which can break a signed query). Any other is normalised by httpx first.

    Raises:
        httpx.InvalidURL: httpx cannot read it.
        httpx.UnsupportedProtocol: Not an http(s) URL with a host (nothing is sent).
    """
    if not (url.isascii() and _PLAIN_URL.fullmatch(url)):
        url = str(httpx.URL(url))
    parsed = URL(url, encoded=True)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        scheme = parsed.scheme or "no scheme"
        raise httpx.UnsupportedProtocol(f"Request URL has an unsupported protocol '{scheme}://'.")
    return parsed


_IPV4_STYLE: Final = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
"""A host httpx reads as an IPv4 address, and refuses unless it is a valid one."""


def _fetchable(url: str) -> URL:
    """`_yarl` of a download's *url*, refused where httpx would refuse to build its request.

    Raises:
        UnusableURL: httpx (or yarl) cannot read it: not a URL, a bad port or IPv4 address.
        httpx.UnsupportedProtocol: Not an http(s) URL with a host (nothing is sent).
    """
    try:
        parsed = _yarl(url)
        host = parsed.raw_host or ""
        if _IPV4_STYLE.fullmatch(host):
            _check_ipv4(host)
        parsed.port  # noqa: B018 - yarl checks the port when it is read
    except httpx.UnsupportedProtocol:
        raise
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UnusableURL(str(exc)) from exc
    return parsed


@functools.lru_cache(maxsize=64)
def _check_ipv4(host: str) -> None:
    """Raise ValueError unless *host* is an IPv4 address (a few hosts serve every download)."""
    ipaddress.IPv4Address(host)


_UNSENDABLE: Final = re.compile(r"[^\x20-\x7e]")
"""What a header may not hold: anything but printable ASCII (httpx refuses the others too)."""


def _checked_headers(exchange: Exchange) -> dict[str, str]:
    """The exchange's headers, each printable ASCII.

    Raises:
        RequestError: A header that cannot be sent (a line break, a control character).
    """
    headers = exchange.headers
    if _UNSENDABLE.search("".join(headers.values())) or _UNSENDABLE.search("".join(headers)):
        bad = next(name for name, value in headers.items() if _UNSENDABLE.search(name + value))
        problem = ValueError(f"the header {bad!r} cannot be sent as it is")
        raise unsendable(exchange.provider, exchange.scrub, problem, "aiohttp")
    return headers


class AiohttpDriver:
    """Sends with one ``aiohttp.ClientSession``, made inside the event loop on first use.

    Args:
        connections: Most connections open at once, and exchanges in flight (the rest wait in
            the client's queue, within the pool timeout).
    """

    name: Final = "aiohttp"

    def __init__(self, connections: int = CONNECTIONS) -> None:
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}
        self._urls: dict[str, URL] = {}

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is not None:
            return session
        if self._closed:
            raise ClientClosedError("the connection pool is closed; nothing was sent")
        connector = aiohttp.TCPConnector(
            limit=self._connections,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE,
            ssl=httpx.create_ssl_context(),  # the certificates httpx trusts (certifi)
        )
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # inflated here, in bounded slices (adecoded)
            timeout=aiohttp.ClientTimeout(total=None),  # every exchange passes its own
            trust_env=False,  # no proxy (see choose), and no ~/.netrc credentials to a CDN
        )
        self._session = session
        return session

    def _url(self, url: str) -> URL:
        """`_yarl` of *url*, read once: a client sends to the same endpoint again and again.

        Kept by the driver, not the process: a URL may carry a key (in its query).
        """
        found = self._urls.get(url)
        if found is None:
            if len(self._urls) >= _MOST_URLS:
                self._urls.clear()
            found = self._urls[url] = _yarl(url)
        return found

    def _timeout(self, timeout: httpx.Timeout, seconds: float | None) -> aiohttp.ClientTimeout:
        """Aiohttp's timeouts for *timeout*'s phases and the deadline *seconds* (made once).

        The deadline is aiohttp's ``total`` (its timer already runs for every request, and it
        covers reading the body). The pool timeout is its ``connect``: waiting for a free
        connection, and opening one, within it (aiohttp times them together, and the wait costs
        a timer only when there is one); opening one is also within the connect timeout
        (``sock_connect``). ``sock_read`` starts when the body has gone out, and again with each
        piece of the answer. The write phase is `_Body`'s.
        """
        key = (timeout.connect, timeout.read, timeout.pool, seconds)
        found = self._timeouts.get(key)
        if found is None:
            found = self._timeouts[key] = aiohttp.ClientTimeout(
                total=seconds,
                connect=timeout.pool,
                sock_connect=timeout.connect,
                sock_read=timeout.read,
            )
        return found

    def _body(
        self, exchange: Exchange, files: contextlib.ExitStack | None
    ) -> tuple[dict[str, str], _Body | None]:
        """The headers and the body to send.

        Raises:
            RequestError: The request cannot be sent as built.
        """
        headers = _checked_headers(exchange)
        body, write = exchange.body, exchange.timeout.write
        if isinstance(body, JsonBody):
            segments = json_segments(body)
            first = segments[0]
            if len(segments) == 1 and isinstance(first, bytes):  # no local image: one slice
                return headers, _Body(iter((first,)), len(first), "application/json", write)
            size = segments_length(segments)
            return headers, _Body(segment_chunks(segments), size, "application/json", write)
        if isinstance(body, MultipartBody):
            assert files is not None
            encoded = multipart_request(exchange, body, files)
            stream: Any = encoded.stream  # httpx's multipart stream: iterable, sized
            headers = {**headers, "Content-Type": encoded.headers["Content-Type"]}
            size = int(encoded.headers["Content-Length"])
            return headers, _Body(iter(stream), size, headers["Content-Type"], write)
        return headers, None

    async def exchange(self, exchange: Exchange) -> HttpResponse:
        """See `flux_adapters._drivers.AsyncDriver.exchange`."""
        name, scrub = exchange.provider, exchange.scrub
        body: _Body | None = None
        # Upload files stay open until the body is sent; a JSON body opens its own as it goes.
        files = contextlib.ExitStack() if isinstance(exchange.body, MultipartBody) else None
        try:
            try:
                url = self._url(exchange.url)
            except httpx.InvalidURL as exc:
                raise unsendable(name, scrub, exc) from None
            except httpx.UnsupportedProtocol as exc:
                raise transport_error(exc, name, scrub) from exc
            headers, body = self._body(exchange, files)
            session = self._open()
            try:
                response = await session.request(
                    exchange.method,
                    url,
                    headers=headers,
                    data=body,
                    timeout=self._timeout(exchange.timeout, exchange.seconds),
                    allow_redirects=False,  # a redirected POST would be sent (and paid) again
                )
            except FluxError:
                raise
            except Exception as exc:
                raise self._failure(exc, exchange, body) from exc
            try:
                return await self._read(response, exchange, body)
            finally:
                response.release()  # to the pool only when read to its end; else closed
        except BaseException:
            if body is not None:
                body.abort()  # given up with the body cut short: drop the rest of it
            raise
        finally:
            if files is not None:
                files.close()

    async def _read(
        self, response: aiohttp.ClientResponse, exchange: Exchange, body: _Body | None
    ) -> HttpResponse:
        """The answer, read within its cap (`AnswerBody`)."""
        head = _Head(response)
        answer = AnswerBody(head, exchange.provider, exchange.seconds, None, exchange.scrub)
        try:
            if "content-encoding" in response.headers:
                async for piece in adecoded(head, _Chunks(response.content)):
                    if not answer.take(piece):
                        break
            else:
                content = response.content
                # at_eof: a body whose declared length has all come needs no read of its end.
                while chunk := await content.readany():
                    if not answer.take(chunk) or content.at_eof():
                        break
        except httpx.DecodingError as exc:
            raise answer.unreadable("the answer could not be decoded") from exc
        except FluxError:
            raise
        except Exception as exc:
            raise self._failure(exc, exchange, body) from exc
        return answer.finish()

    def _failure(self, exc: Exception, exchange: Exchange, body: _Body | None) -> FluxError:
        """The typed error for *exc*, judged by how far the request got."""
        if body is not None and body.error is not None:
            return body.error  # the body itself failed (a file that changed while it was sent)
        whole = body is None or body.complete
        if body is not None and body.write_timed_out and not whole:
            return Timeout(
                "timed out before the request was sent (WriteTimeout)",
                provider=exchange.provider,
                sent=False,
            )
        if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ServerTimeoutError):
            # aiohttp's total, which is the deadline (its connect and read timeouts are
            # ServerTimeoutErrors): before the body's last byte went out, nothing can be billed.
            if not whole:
                return not_sent_by_deadline(exchange)
            return deadline_error(exchange.provider, exchange.seconds)
        if isinstance(exc, RuntimeError) and self._closed:  # "Session is closed"
            return ClientClosedError("the connection pool is closed; nothing was sent")
        return transport_error(exc, exchange.provider, exchange.scrub)

    def get(self, url: str, headers: Mapping[str, str], timeout: httpx.Timeout) -> _Getting:
        """See `flux_adapters._drivers.AsyncDriver.get` (transport failures as aiohttp raises them).

        No ``httpx.Request`` is made: the URL is read as `_yarl` reads it, and refused where
        httpx would refuse it (`_fetchable`). Result URLs differ per job: none is kept.
        """
        return _Getting(self, _fetchable(url), headers, self._timeout(timeout, None))

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _Getting:
    """A download's GET while its block runs (`AiohttpDriver.get`): the answer's head and body.

    A class, not ``contextlib.asynccontextmanager``: a batch makes one per image.
    """

    __slots__ = ("_driver", "_headers", "_response", "_target", "_timeout")

    def __init__(
        self,
        driver: AiohttpDriver,
        target: URL,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        self._driver = driver
        self._target = target
        self._headers = headers
        self._timeout = timeout
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> tuple[_Head, AsyncIterator[bytes]]:
        session = self._driver._open()
        response = self._response = await session.request(
            "GET", self._target, headers=self._headers, timeout=self._timeout, allow_redirects=False
        )
        head = _Head(response)
        chunks = _Chunks(response.content)
        return head, (adecoded(head, chunks) if "content-encoding" in response.headers else chunks)

    async def __aexit__(self, *_: object) -> None:
        if self._response is not None:
            self._response.release()  # to the pool only when read to its end; else closed


class _Chunks:
    """An answer's body as it comes (aiohttp's ``readany``), as an async iterator.

    Not an async generator: asyncio keeps each of those in a set until it ends.
    """

    __slots__ = ("_content",)

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self._content = content

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._content.readany()
        if not chunk:
            raise StopAsyncIteration
        return chunk
