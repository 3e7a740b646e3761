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
- timeouts per phase: the deadline over everything, and read (from the last byte of the body
  to the answer's head, then between its pieces), kept by a `_Clock` per exchange, all of a
  loop's clocks on a single timer (`flux_adapters._deadline.Watch`); a head slower than the
  read timeout in all is handed to aiohttp's ``sock_read``, which sees its pieces come
  (`_Response.hand_over`), so each piece restarts it, as under httpx; pool
  (waiting for a free connection, and opening one) and connect as aiohttp keeps them
  (`AiohttpDriver._timeout`), each timer made only when there is a wait or a new connection;
  write per slice of the body (`_Body`);
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
import contextvars
import functools
import ipaddress
import math
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Final

import aiohttp
import httpx
from aiohttp.abc import AbstractStreamWriter, ResolveResult
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.payload import Payload
from aiohttp.tracing import Trace
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from flux_adapters._addresses import GUARDED
from flux_adapters._bodies import json_segments, segment_chunks, segments_length
from flux_adapters._deadline import Watch
from flux_adapters._drivers import (
    CONNECTIONS,
    KEEPALIVE,
    Exchange,
    check_headers,
    multipart_request,
    not_sent_by_deadline,
    unsendable,
)
from flux_adapters._transport import (
    AnswerBody,
    UnusableURL,
    adecoded,
    deadline_error,
    shared_ssl_context,
    transport_error,
    with_answer,
)
from flux_adapters.errors import ClientClosedError, FluxError, Timeout
from flux_adapters.wire import HttpResponse, JsonBody, MultipartBody

__all__ = ["AiohttpDriver"]

_PLAIN_URL: Final = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
"""A URL made only of characters that need no quoting (and whole %-escapes, which httpx keeps as
they are): sent exactly as written. A signed result URL's query is full of escapes."""
_SMALL_WRITE: Final = 64 * 1024
"""A slice this small goes into aiohttp's buffer without waiting (its limit is 64 KiB)."""


def _not_utf8(text: str) -> bool:
    """Whether aiohttp's *text* was read from bytes that are no UTF-8 (it keeps them escaped)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: aiohttp's "surrogateescape" of a byte
        return True
    return False


class _Headers:
    r"""An aiohttp answer's headers, read the way `flux_adapters._transport.HeadHeaders` says.

    Their text is httpx's (`httpx.Headers.encoding`): UTF-8 when every name and value of the
    answer is UTF-8, else Latin-1 (each byte one character, HTTP's historical charset) for all
    of them. aiohttp reads each as UTF-8 with undecodable bytes escaped (``caf\udce9``, which
    neither a terminal nor JSON can show); such bytes are read back as they came. An ASCII value
    reads the same either way: only a value that is not ASCII asks which (once per answer).
    """

    __slots__ = ("_headers", "_latin")

    def __init__(self, headers: Any) -> None:
        self._headers = headers  # aiohttp's CIMultiDictProxy: any case, in the order received
        self._latin: bool | None = None

    def _text(self, value: str) -> str:
        if value.isascii():
            return value
        if self._latin is None:
            self._latin = any(
                _not_utf8(name) or _not_utf8(text) for name, text in self._headers.items()
            )
        return value.encode("utf-8", "surrogateescape").decode("latin-1") if self._latin else value

    def get(self, key: str, default: Any = None) -> Any:
        values = self._headers.getall(key, None)
        if values is None:
            return default
        text = values[0] if len(values) == 1 else ", ".join(values)  # as httpx joins them
        return self._text(text)

    def get_list(self, key: str, split_commas: bool = False) -> list[str]:
        values: list[str] = [self._text(value) for value in self._headers.getall(key, ())]
        if not split_commas:
            return values
        return [part.strip() for value in values for part in value.split(",")]

    def multi_items(self) -> list[tuple[str, str]]:
        items = [(name.lower(), value) for name, value in self._headers.items()]  # every answer's
        if all(value.isascii() for _, value in items):  # names are tokens: ASCII, or refused
            return items
        return [(self._text(name), self._text(value)) for name, value in items]


class _Head:
    """An aiohttp answer as a `flux_adapters._transport.Head`."""

    __slots__ = ("headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status_code = response.status
        self.headers = _Headers(response.headers)


class _Body(Payload):
    """A request body of known length, written slice by slice; it knows how far it got.

    ``complete`` once its last byte was handed to the connection: from then on the provider may
    have the whole request, and the exchange's read phase begins (*clock*). A slice that cannot
    be written within *write* seconds (the server stopped reading) ends the exchange with
    ``write_timed_out``; a `FluxError` raised while producing a slice (a file that changed) is
    kept in ``error`` (aiohttp wraps what a body raises).
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        size: int,
        content_type: str,
        write: float | None,
        clock: _Clock | None,
    ) -> None:
        # Payload's own __init__ is not run: it makes a CIMultiDict per body for the one header
        # aiohttp copies from it (Content-Type, which the exchange's headers already carry, so
        # the copy is skipped). One read-only set per content type stands in for it.
        self._encoding = None
        self._filename = None
        self._value = chunks
        self._headers = _payload_headers(content_type)  # type: ignore[assignment]  # read-only
        self._chunks = chunks
        self._size = self._length = size
        self._write = write
        self._clock = clock
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
        finally:
            self.close_chunks()
        clock = self._clock
        if clock is not None and self._handed >= self._length:  # complete: the read phase
            clock.read_from = clock.time()

    def close_chunks(self) -> None:
        """Close what the slices come from (a file being read), if left part-way.

        A write that fails leaves the generator suspended, its file open, for as long as the
        error is kept (its traceback holds this body).
        """
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def abort(self) -> None:
        """Drop the connection this body was going out on, unless it went out whole.

        Abort, not close: a close waits to flush what is buffered, which a server that stopped
        reading never takes; the connection would linger, half sent, until the loop ends. What
        was buffered is dropped too, so the provider cannot get the rest of the request.
        """
        transport = self._transport
        if transport is not None and not self.complete and isinstance(transport, asyncio.Transport):
            # A transport that already finished closing (the session closed meanwhile, its
            # buffer drained) has nothing left to drop; asyncio's then fails on its loop, gone.
            with contextlib.suppress(AttributeError):
                transport.abort()


@functools.lru_cache(maxsize=8)
def _payload_headers(content_type: str) -> CIMultiDictProxy[str]:
    """The headers a `_Body` of *content_type* carries, as ``Payload.__init__`` would set them.

    Read-only, and shared by every body of that type (aiohttp only reads them).
    """
    return CIMultiDictProxy(CIMultiDict({"Content-Type": content_type}))


_LONGEST_HEAD: Final = 16 * 1024
"""The longest status or header line read: h11's bound on a head still coming in (httpx)."""
_MOST_HEADERS: Final = _LONGEST_HEAD // 4
"""The most header lines read: as many as a head of `_LONGEST_HEAD` holds (4 bytes a line at
least: a name of one character, the colon, the line break)."""


class _Clock:
    """The deadline and the read timeout of one exchange, watched by its loop's `Watch`.

    The read timeout runs from the body's last byte to the answer's head, then from one piece
    of the answer to the next. The watch looks at the clock at the earliest moment either could
    pass; it usually looks early (the read phase began later than it could have) and looks
    again when what is left could pass. An exchange that ends in time costs no timer of its
    own. (aiohttp's own ``total`` and ``sock_read`` cost a timer each, and ``sock_read`` another
    per piece.)

    When one passes, the exchange's task is cancelled, as ``asyncio.timeout`` does, and
    `expired` says which; the exchange turns the cancellation into the typed error.

    Args:
        read: The read timeout, or ``None`` when aiohttp keeps it (a request with no body: only
            aiohttp knows when it went out).
    """

    __slots__ = (
        "_read",
        "_task",
        "_watch",
        "cancelling",
        "ends",
        "expired",
        "heading",
        "read_from",
        "time",
        "writes",
    )

    def __init__(
        self,
        watch: Watch,
        task: asyncio.Task[Any],
        seconds: float,
        read: float | None,
        writes: bool = False,
    ) -> None:
        self._watch = watch
        self.time = watch.time
        """The loop's clock (its bound ``time``, made once per loop by the watch)."""
        self._task = task
        self.cancelling = task.cancelling()
        now = watch.time()
        self.ends = ends = now + seconds
        self._read = read
        self.read_from: float | None = None
        """When the read phase began, or last received a piece of the answer."""
        self.expired: str | None = None
        """``"deadline"`` or ``"read"``: what passed (the task was cancelled)."""
        self.heading: _Response | None = None
        """An answer whose head is still coming (`_Response`), else ``None``."""
        self.writes = writes
        """Whether a body is sent: its last byte, not the answer's making, starts the read phase."""
        watch.add(self, ends if read is None else min(ends, now + read))

    def check(self, now: float) -> float | None:
        """The soonest the deadline or the read timeout could pass, seen at *now*.

        ``None`` once either passed: the exchange's task is cancelled (once).
        """
        if self.expired is not None:
            return None
        read, since = self._read, self.read_from
        if now >= self.ends:
            self.expired = "deadline"
        elif read is not None and since is not None and now >= since + read:
            heading = self.heading
            if heading is not None and heading.hand_over(read, since):
                # Pieces of the head came in the meantime: aiohttp times the rest of it from
                # here, restarted by each piece (as httpx's read timeout is, per read). None:
                # the read timeout passed, not twice it.
                self.heading = self.read_from = None
                return min(self.ends, now + read)  # the body's read phase may begin by then
            self.expired = "read"
        else:  # a read phase that has not begun begins now at the soonest
            return self.ends if read is None else min(self.ends, (since or now) + read)
        self._task.cancel()
        return None

    def stop(self) -> None:
        """The exchange is over: no longer watched."""
        self._watch.remove(self)

    def passed(self) -> bool:
        """Whether a cancellation of the task is this clock's own (and the only one pending).

        Called once, with the ``CancelledError``: it takes the cancellation back.
        """
        return self.expired is not None and self._task.uncancel() <= self.cancelling


_MOST_URLS: Final = 256
"""URLs a driver keeps read (`AiohttpDriver._url`): polling URLs differ per job. Also the most
timeouts it keeps made (`AiohttpDriver._timeout`)."""


def _yarl(url: str) -> URL:
    """*url* as aiohttp takes it, sent as httpx would send it.

    A URL that needs no quoting is sent exactly as written (``encoded=True``: yarl would otherwise
    re-quote it, which can break a signed query). Any other is normalised by httpx first.

    Raises:
        httpx.InvalidURL: httpx cannot read it, or it holds what no URL can carry (a lone
            surrogate, which has no UTF-8: httpx raises a bare UnicodeEncodeError for it).
        httpx.UnsupportedProtocol: Not an http(s) URL with a host (nothing is sent).
    """
    if not (url.isascii() and _PLAIN_URL.fullmatch(url)):
        try:
            url = str(httpx.URL(url))
        except UnicodeError as exc:  # httpx_request reads it as a ValueError: "cannot send"
            raise httpx.InvalidURL(str(exc)) from None
    parsed = URL(url, encoded=True)
    try:
        host = parsed.host  # yarl reads the netloc here: a port out of range or no number
    except ValueError as exc:
        raise httpx.InvalidURL(str(exc)) from None
    if parsed.scheme not in ("http", "https") or not host:
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


class _Handler(ResponseHandler):
    """aiohttp's connection protocol, noting when bytes last came (`_Response.hand_over`)."""

    received_at = -math.inf
    """When (the loop's clock) bytes last came on this connection."""

    def data_received(self, data: bytes) -> None:
        self.received_at = self._loop.time()
        super().data_received(data)


class _GuardedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, refusing a provider-given host that leads to a non-public address.

    Where the connection is made: the addresses checked are the ones aiohttp connects to (DNS
    rebinding gains nothing). Not in the resolver: aiohttp keeps an answer (its DNS cache) and
    shares one lookup between concurrent requests for a host and port, made in the context of
    the first; a check there would pass a trusted lookup to a guarded request, and fail a
    trusted request that joined a guarded one's lookup with the other's refusal. So the
    addresses a request is given are checked in its own context (`_resolve_host`, before any
    connection to them), and so is the peer of the connection it is handed (`connect`: a
    kept-alive one is reused with no lookup at all). Literal IP hosts skip the lookup; the
    downloader and the client refuse non-public ones first, and `connect` sees their peer.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # As aiohttp makes its own (a private attribute: tests/test_async_drivers.py fails if
        # it is renamed).
        self._factory = functools.partial(_Handler, loop=self._loop)  # type: ignore[assignment]

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Trace] | None = None
    ) -> list[ResolveResult]:
        found = await super()._resolve_host(host, port, traces)
        target = GUARDED.get()
        if target is not None:
            target.check(entry["host"] for entry in found)
        return found

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        target = GUARDED.get()
        if target is None:
            return connection
        transport = connection.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(peer, tuple) and peer:
            try:
                target.check((str(peer[0]),))
            except BaseException:
                connection.release()  # nothing was written on it: kept for whoever opened it
                raise
        return connection


class AiohttpDriver:
    """Sends with one ``aiohttp.ClientSession``, made inside the event loop on first use.

    Args:
        connections: Most connections open at once, and exchanges in flight (the rest wait for
            a free connection, within the pool timeout).
    """

    name: Final = "aiohttp"

    def __init__(self, connections: int = CONNECTIONS) -> None:
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}
        self._urls: dict[str, URL] = {}
        self._watch: Watch | None = None

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is not None:
            return session
        if self._closed:
            raise ClientClosedError("the connection pool is closed; nothing was sent")
        connector = _GuardedConnector(
            limit=self._connections,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE,
            ssl=shared_ssl_context(),  # the certificates httpx trusts (certifi), loaded once
        )
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # inflated here, in bounded slices (adecoded)
            timeout=aiohttp.ClientTimeout(total=None),  # every exchange passes its own
            trust_env=False,  # no proxy (see choose), and no ~/.netrc credentials to a CDN
            # A header line as long as httpx (h11) reads in any head: aiohttp's own 8,190 bytes
            # lost a paid answer (a long request id, a CDN's cookie) that httpx returns.
            max_line_size=_LONGEST_HEAD,
            max_field_size=_LONGEST_HEAD,
            # As many header lines as such a head holds: h11 counts none, and aiohttp's own 128
            # lost a paid answer carrying more ("Too many headers received") that httpx returns.
            max_headers=_MOST_HEADERS,
            response_class=_Response,  # starts a download's read phase on its clock
        )
        self._session = session
        return session

    def _watch_in(self, loop: asyncio.AbstractEventLoop) -> Watch:
        """The watch of this driver's clocks in *loop* (made in the loop that sends)."""
        watch = self._watch
        if watch is None or watch.loop is not loop:
            watch = self._watch = Watch(loop)
        return watch

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

    def _timeout(self, timeout: httpx.Timeout, read: bool) -> aiohttp.ClientTimeout:
        """The timeouts aiohttp keeps for *timeout*'s phases (made once); *read* too if asked.

        The pool timeout is aiohttp's ``connect``: waiting for a free connection, and opening
        one, within it (aiohttp times them together, and starts that timer only when there is
        a wait or a new connection); opening one is also within the connect timeout
        (``sock_connect``). ``sock_read`` is asked for requests with no body, whose read phase
        starts when aiohttp has written them; the others' is the exchange's `_Clock`, which
        keeps the deadline too (no ``total``).
        """
        key = (timeout.connect, timeout.pool, timeout.read if read else None)
        found = self._timeouts.get(key)
        if found is None:
            # A poll near its job's deadline has phases cut to the time left: one of its own.
            if len(self._timeouts) >= _MOST_URLS:
                self._timeouts.clear()
            found = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, connect=key[1], sock_connect=key[0], sock_read=key[2]
            )
        return found

    def _body(
        self, exchange: Exchange, files: contextlib.ExitStack | None, clock: _Clock
    ) -> tuple[dict[str, str], _Body | None]:
        """The headers and the body to send.

        Raises:
            RequestError: The request cannot be sent as built.
        """
        headers = exchange.headers
        body, write = exchange.body, exchange.timeout.write
        if isinstance(body, JsonBody):
            try:
                segments = json_segments(body)
            except FluxError:
                raise
            except (TypeError, ValueError) as exc:  # what the adapter built is no JSON
                raise unsendable(exchange.provider, exchange.scrub, exc, "aiohttp") from None
            first = segments[0]
            if len(segments) == 1 and isinstance(first, bytes):  # no local image: one slice
                return headers, _Body(iter((first,)), len(first), "application/json", write, clock)
            size = segments_length(segments)
            chunks = segment_chunks(segments)
            return headers, _Body(chunks, size, "application/json", write, clock)
        if isinstance(body, MultipartBody):
            assert files is not None
            encoded = multipart_request(exchange, body, files)
            stream: Any = encoded.stream  # httpx's multipart stream: iterable, sized
            kind = encoded.headers["Content-Type"]
            headers = {**headers, "Content-Type": kind}
            size = int(encoded.headers["Content-Length"])
            return headers, _Body(iter(stream), size, kind, write, clock)
        return headers, None

    async def exchange(self, exchange: Exchange) -> HttpResponse:
        """See `flux_adapters._drivers.AsyncDriver.exchange`."""
        name, scrub, timeout = exchange.provider, exchange.scrub, exchange.timeout
        try:
            url = self._url(exchange.url)
        except httpx.InvalidURL as exc:
            raise unsendable(name, scrub, exc) from None
        except httpx.UnsupportedProtocol as exc:
            raise transport_error(exc, name, scrub) from exc
        check_headers(exchange, "aiohttp")
        session = self._open()
        has_body = exchange.body is not None
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None  # an exchange runs in a task (asyncio.run makes one)
        watch = self._watch_in(loop)
        clock = _Clock(watch, task, exchange.seconds, timeout.read if has_body else None, has_body)
        body: _Body | None = None
        head: _Head | None = None  # once it came, a failure carries its headers (request id)
        answer: AnswerBody | None = None
        # Upload files stay open until the body is sent; a JSON body opens its own as it goes.
        files = contextlib.ExitStack() if isinstance(exchange.body, MultipartBody) else None
        try:
            headers, body = self._body(exchange, files, clock)
            # aiohttp makes the response (`_Response`) once the request's head is written: a
            # request with no body has gone out then (a deadline passing earlier, waiting for a
            # connection, proves it unsent), and a head slower than the read timeout in all,
            # coming in pieces, can be handed to aiohttp's own timer, which sees them come.
            sending = _SENDING.set(clock)
            try:
                response = await session.request(
                    exchange.method,
                    url,
                    headers=headers,
                    data=body,
                    timeout=self._timeout(timeout, not has_body),
                    allow_redirects=False,  # a redirected POST would be sent (and paid) again
                )
            except FluxError:
                raise
            except Exception as exc:
                raise self._failure(exc, exchange, body) from exc
            finally:
                _SENDING.reset(sending)
            heading = clock.heading
            if heading is not None:  # the head came: no timer of aiohttp's left on it
                clock.heading = None
                heading.head_in()
            # The answer, read within its cap (`AnswerBody`) and its read timeout (*clock*);
            # here, not in a coroutine of its own: one less on the path of every exchange.
            try:
                head = _Head(response)
                answer = AnswerBody(head, name, exchange.seconds, None, scrub)
                content = response.content
                if "content-encoding" in response.headers:
                    async for piece in adecoded(head, _Chunks(content, clock)):
                        if not answer.take(piece):
                            break
                else:
                    # at_eof: a body whose declared length has all come needs no read of its end.
                    while True:
                        clock.read_from = clock.time()
                        chunk = await content.readany()
                        if not chunk or not answer.take(chunk) or content.at_eof():
                            break
                return answer.finish()
            except httpx.DecodingError as exc:
                assert answer is not None  # raised while inflating it
                if answer.judged_by_status():
                    return answer.finish()
                raise answer.unreadable("the answer could not be decoded") from exc
            except FluxError:
                raise
            except Exception as exc:
                if answer is not None and answer.judged_by_status():
                    return answer.finish()  # an error's head came: its status decides
                failure = self._failure(exc, exchange, body)
                raise (failure if head is None else with_answer(failure, head, scrub)) from exc
            finally:
                response.release()  # to the pool only when read to its end; else closed
        except BaseException as exc:
            if clock.heading is not None:  # no timer left on a connection aiohttp keeps
                clock.heading.head_in()
            if body is not None:
                body.abort()  # given up with the body cut short: drop the rest of it
                # Its file too: aiohttp's writer task, cancelled, may not have run yet.
                body.close_chunks()
            if clock.expired is None:
                raise
            if not clock.passed() and isinstance(exc, asyncio.CancelledError):
                raise  # the caller cancelled too: that wins
            if answer is not None and answer.judged_by_status():
                return answer.finish()  # an error's head came: its status decides
            # The clock cancelled the task (whatever aiohttp made of the cancellation).
            expired = self._expired(clock, exchange, body)
            raise (expired if head is None else with_answer(expired, head, scrub)) from None
        finally:
            watch.remove(clock)  # the exchange is over (clock.stop, without its call)
            if files is not None:
                files.close()

    def _expired(self, clock: _Clock, exchange: Exchange, body: _Body | None) -> FluxError:
        """The `Timeout` for what *clock* saw pass."""
        if clock.expired == "read":  # it starts once the whole body went out
            return Timeout(
                "timed out waiting for the answer (ReadTimeout)",
                provider=exchange.provider,
                sent=True,
            )
        if (body is not None and not body.complete) or (body is None and clock.read_from is None):
            # Before the body's last byte went out (waiting for a connection, say), or before a
            # request with no body was written (`_Response` starts its read phase): nothing can
            # be billed.
            return not_sent_by_deadline(exchange)
        return deadline_error(exchange.provider, exchange.seconds)

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
        if isinstance(exc, aiohttp.SocketTimeoutError):  # the read timeout, handed a slow head
            return Timeout(
                "timed out waiting for the answer (ReadTimeout)",
                provider=exchange.provider,
                sent=True,
            )
        if isinstance(exc, RuntimeError) and self._closed:  # "Session is closed"
            return ClientClosedError("the connection pool is closed; nothing was sent")
        return transport_error(exc, exchange.provider, exchange.scrub)

    def needs_lookup(self, url: str) -> bool:
        """Never: no proxy, and every connection goes through `_GuardedConnector`."""
        return False

    def get(self, url: str, headers: Mapping[str, str], timeout: httpx.Timeout) -> _Getting:
        """See `flux_adapters._drivers.AsyncDriver.get` (transport failures as aiohttp raises them).

        No ``httpx.Request`` is made: the URL is read as `_yarl` reads it, and refused where
        httpx would refuse it (`_fetchable`). Result URLs differ per job: none is kept. The
        read timeout is kept by a `_Clock` (`_Getting`), the pool and connect timeouts by
        aiohttp.
        """
        aiohttp_keeps = self._timeout(timeout, False)  # pool and connect
        return _Getting(self, _fetchable(url), headers, aiohttp_keeps, timeout.read)

    async def aclose(self) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()


_SENDING: Final[contextvars.ContextVar[_Clock | None]] = contextvars.ContextVar(
    "flux_aiohttp_sending", default=None
)
"""The clock of the download (`_Getting`), or of the exchange with no body, whose request the
running task is sending: `_Response` notes on it when the request went out."""


class _Response(aiohttp.ClientResponse):
    """aiohttp's response, which starts a download's read phase (`_Getting`) when it is made.

    aiohttp makes it right after writing a request with no body, where its own ``sock_read``
    timer would start. A head that takes longer than the read timeout in all is handed over to
    that timer (`hand_over`): only aiohttp sees the pieces of a head come in.
    """

    _handed: Any = None
    """The connection's protocol whose ``sock_read`` times the rest of the head, if handed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        clock = _SENDING.get()
        if clock is not None:
            if not clock.writes:  # else the body's last byte starts it (`_Body`)
                clock.read_from = clock.time()
            clock.heading = self

    def hand_over(self, read: float, since: float) -> bool:
        """Have aiohttp time the rest of the head, *read* from now and from each piece.

        Only if a piece of it came after *since* (the read phase's start, on the loop's
        clock): ``False`` if none did (the read timeout has passed).
        """
        connection = self.connection
        protocol = None if connection is None else connection.protocol
        if not isinstance(protocol, _Handler) or protocol.received_at < since:
            return False
        protocol.read_timeout = read
        protocol.start_timeout()
        self._handed = protocol
        return True

    def head_in(self) -> None:
        """The head came: aiohttp's timer, if it was handed the head, is dropped."""
        protocol = self._handed
        if protocol is not None:
            self._handed = None
            protocol.read_timeout = None
            protocol.start_timeout()  # with no read timeout: drops the timer


class _Getting:
    """A download's GET while its block runs (`AiohttpDriver.get`): the answer's head and body.

    Its read timeout (from the request's head going out to the answer's head, then between
    pieces of the body) is a `_Clock` on the driver's `Watch`, not aiohttp's ``sock_read``:
    that one takes a timer of the loop when the request goes out and another for each piece
    that comes (three a download of a small image), each cancelled again. The read phase
    begins when aiohttp makes the response object, right after it wrote the request
    (`_Response`), as its ``sock_read`` would begin. A head that takes longer than the read
    timeout is handed to ``sock_read`` for the rest of it (`_Response.hand_over`): only aiohttp
    sees its pieces come, and each restarts the read timeout, as under httpx. When the clock
    passes, the task is cancelled, and the cancellation is taken back and raised as the error
    aiohttp raises for its own read timeout (``SocketTimeoutError``): the download maps it as
    before. A cancellation of the caller's stays a cancellation.

    A class, not ``contextlib.asynccontextmanager``: a batch makes one per image.
    """

    __slots__ = ("_clock", "_driver", "_headers", "_read", "_response", "_target", "_timeout")

    def __init__(
        self,
        driver: AiohttpDriver,
        target: URL,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
        read: float | None,
    ) -> None:
        self._driver = driver
        self._target = target
        self._headers = headers
        self._timeout = timeout
        self._read = read
        self._response: aiohttp.ClientResponse | None = None
        self._clock: _Clock | None = None

    async def __aenter__(self) -> tuple[_Head, AsyncIterator[bytes]]:
        driver = self._driver
        session = driver._open()
        clock = None
        if self._read is not None:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            assert task is not None  # a download runs in a task (asyncio.run makes one)
            clock = self._clock = _Clock(driver._watch_in(loop), task, math.inf, self._read)
        sending = _SENDING.set(clock)
        try:
            response = self._response = await session.request(
                "GET",
                self._target,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except BaseException as exc:
            if clock is not None:
                clock.stop()
                if clock.heading is not None:  # no timer left on a connection aiohttp keeps
                    clock.heading.head_in()
                _read_timed_out(clock, exc)
            raise
        finally:
            _SENDING.reset(sending)
        if clock is not None:
            clock.heading = None
            if isinstance(response, _Response):
                response.head_in()
        head = _Head(response)
        chunks = _Chunks(response.content, clock)
        return head, (adecoded(head, chunks) if "content-encoding" in response.headers else chunks)

    async def __aexit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if self._response is not None:
            self._response.release()  # to the pool only when read to its end; else closed
        clock = self._clock
        if clock is not None:
            clock.stop()
            if exc is not None:
                _read_timed_out(clock, exc)


def _read_timed_out(clock: _Clock, exc: BaseException) -> None:
    """Raise aiohttp's read timeout if *clock* cancelled the task that *exc* ended.

    A cancellation of the caller's too (or instead) goes on as it is.
    """
    if clock.expired is None:
        return
    if not clock.passed() and isinstance(exc, asyncio.CancelledError):
        return  # the caller cancelled too: that wins
    raise aiohttp.SocketTimeoutError("Timeout on reading data from socket") from None


class _Chunks:
    """An answer's body as it comes (aiohttp's ``readany``), as an async iterator.

    Each piece restarts *clock*'s read timeout, if one is given. Not an async generator: asyncio keeps each of those in a set until it ends.
    """

    __slots__ = ("_clock", "_content")

    def __init__(self, content: aiohttp.StreamReader, clock: _Clock | None = None) -> None:
        self._content = content
        self._clock = clock

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        clock = self._clock
        if clock is not None:  # each piece restarts the read timeout
            clock.read_from = clock.time()
        chunk = await self._content.readany()
        if not chunk:
            raise StopAsyncIteration
        return chunk
