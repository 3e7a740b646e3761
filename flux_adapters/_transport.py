"""What both clients and the downloader share to talk HTTP safely.

- httpx (and aiohttp) failures become `TransportError` with ``sent`` saying whether the provider
  may have the request, with every message scrubbed of the client's keys;
- per-phase timeouts never outlast the overall deadline of an exchange;
- a body is read within a size cap and a deadline: a slow-drip server or a 2 GB answer cannot
  hold a call or fill memory;
- a compressed body is inflated a bounded slice at a time (`iter_decoded`), so the cap applies
  to the decoded bytes as they come: httpx inflates each chunk whole, and a 64 KiB chunk of
  gzip can hold 64 MB (of gzip within gzip, gigabytes).

A deadline is enforced exactly by the async client (``asyncio.timeout``). Per-read timeouts
alone cannot end a server that drips its headers a byte at a time, so the sync client bounds
every socket operation of its own httpx client by the time left (`bounded_http_client`,
`bounded_by`); with a caller's httpx client, whose transport it cannot reach, it sends on a
worker thread and stops waiting for the answer's head at the deadline (`send_within`); both are
in ``flux_adapters._bounded``. It then checks the deadline after every chunk of the body and
caps each phase's timeout at it.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import sys
import threading
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar

import httpx

from flux_adapters._display import escape_controls
from flux_adapters._redact import answer_headers, redact, request_id
from flux_adapters.errors import (
    FluxError,
    ResponseFormatError,
    Timeout,
    TransportError,
    attach_response,
)
from flux_adapters.wire import ERROR_BODY_BYTES, MAX_ANSWER_BYTES, HttpResponse

if TYPE_CHECKING:
    import asyncio  # at run time only where a loop runs: FluxClient never loads it
    import ssl

__all__ = [
    "ACCEPT_ENCODING",
    "ENDS",
    "AnswerBody",
    "Head",
    "HeadHeaders",
    "LoopBinding",
    "ParsedUrls",
    "UnusableURL",
    "adecoded",
    "aiter_decoded",
    "bounded_by",
    "bounded_http_client",
    "deadline_error",
    "iter_decoded",
    "mapped_transport_errors",
    "phase_timeouts",
    "proves_not_sent",
    "send_within",
    "sends_here",
    "transport_error",
    "with_answer",
]

_MB: Final = 1024 * 1024

ACCEPT_ENCODING: Final = "gzip, deflate"
"""The encodings asked for: one layer of gzip or deflate, which `iter_decoded` inflates in bounded
slices (httpx would also ask for br and zstd when their packages are installed)."""
DECODED_SLICE: Final = 256 * 1024
"""The most bytes one step of inflating produces before the reader checks its cap."""
_WBITS: Final = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


def phase_timeouts(timeout: httpx.Timeout, deadline: float) -> httpx.Timeout:
    """*timeout* with no phase (connect, write, read, pool) longer than *deadline*."""

    def cap(value: float | None) -> float:
        return deadline if value is None else min(value, deadline)

    return httpx.Timeout(
        connect=cap(timeout.connect),
        read=cap(timeout.read),
        write=cap(timeout.write),
        pool=cap(timeout.pool),
    )


class UnusableURL(Exception):
    """A URL that cannot be sent as it is (a download's getter refuses it before sending)."""


def proves_not_sent(exc: BaseException) -> bool:
    """Whether a transport failure proves the provider never received the whole request."""
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) and exc.__cause__ else exc
    if type(cause).__module__.partition(".")[0] == "aiohttp":
        # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout, including a
        # disconnect after the body was sent; only aiohttp's connector errors prove it unsent.
        import aiohttp

        if isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return True
        # A URL aiohttp will not send to (a host it reads no address from, 127.1 say) is refused
        # before it connects; only one met following a redirect comes after a request went out.
        return isinstance(cause, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError) and not (
            isinstance(cause, aiohttp.RedirectClientError)
        )
    # A write timeout or a local protocol error means the body was not fully written, so the
    # provider cannot have a complete request; a proxy error happens before it is forwarded.
    return isinstance(
        exc,
        httpx.ConnectError
        | httpx.ConnectTimeout
        | httpx.PoolTimeout
        | httpx.WriteTimeout
        | httpx.LocalProtocolError
        | httpx.UnsupportedProtocol
        | httpx.ProxyError,
    )


def _timed_out(exc: BaseException) -> bool:
    """Whether a transport failure was a timeout (rather than a refusal or a drop)."""
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) and exc.__cause__ else exc
    if type(cause).__module__.partition(".")[0] == "aiohttp":
        # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout, a server that
        # hung up included; aiohttp's own timeouts are TimeoutErrors.
        return isinstance(cause, TimeoutError)
    return isinstance(exc, httpx.TimeoutException | TimeoutError) or isinstance(
        exc.__cause__, TimeoutError
    )


def transport_error(exc: BaseException, provider: str, scrub: Callable[[str], str]) -> FluxError:
    """The `Timeout` or `TransportError` for a transport failure *exc* (httpx's or aiohttp's)."""
    sent = not proves_not_sent(exc)
    if _timed_out(exc):
        what = (
            "timed out waiting for the answer" if sent else "timed out before the request was sent"
        )
        return Timeout(f"{what} ({type(exc).__name__})", provider=provider, sent=sent)
    what = "the connection failed" if sent else "could not send the request"
    # aiohttp's own error, not the httpx class httpx-aiohttp filed it under (ConnectTimeout).
    cause = exc.__cause__ if type(exc.__cause__).__module__.startswith("aiohttp") else exc
    # One line, escaped: aiohttp's messages span lines and quote what the server sent.
    detail = escape_controls(" ".join(scrub(f"{type(cause).__name__}: {cause}").split()))[:300]
    return TransportError(f"{what} ({detail})", provider=provider, sent=sent)


def mapped_transport_errors(
    provider: str, scrub: Callable[[str], str] = redact
) -> _MappedTransportErrors:
    """Re-raise transport failures as ours, saying whether the provider may have the request.

    *scrub* removes the client's keys from the message (an ``Illegal header value`` error
    quotes the header it refused).
    """
    return _MappedTransportErrors(provider, scrub)


class _MappedTransportErrors:
    """`mapped_transport_errors`' ``with`` block, written out.

    Not made by ``contextlib.contextmanager``: every exchange and every download goes through
    one, and the generator and its wrapper cost more than the block's own work.
    """

    __slots__ = ("_provider", "_scrub")

    def __init__(self, provider: str, scrub: Callable[[str], str]) -> None:
        self._provider = provider
        self._scrub = scrub

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: object, exc: BaseException | None, traceback: object
    ) -> Literal[False]:
        if exc is None or isinstance(exc, FluxError) or not isinstance(exc, Exception):
            return False  # nothing, ours already, or not a failure (a cancel, an interrupt)
        provider, scrub = self._provider, self._scrub
        if isinstance(exc, httpx.TransportError):
            raise transport_error(exc, provider, scrub) from exc
        if isinstance(exc, httpx.HTTPError | httpx.InvalidURL | httpx.StreamError):
            # TooManyRedirects, DecodingError, stream errors, or InvalidURL (no HTTPError),
            # which httpx raises from send() for an answer's Location header it cannot parse,
            # even when not following it: the request went out and may be billed. (A URL of
            # ours that httpx refuses fails earlier, when the request is built, as a
            # RequestError.)
            message = scrub(f"the answer could not be read ({type(exc).__name__}: {exc})")[:300]
            raise TransportError(message, provider=provider, sent=True) from exc
        if isinstance(exc, TimeoutError | OSError):
            # Raw failures some transports let through (asyncio timeouts, aiohttp client errors).
            raise transport_error(exc, provider, scrub) from exc
        if type(exc).__module__.partition(".")[0] == "aiohttp":
            raise transport_error(exc, provider, scrub) from exc
        # Anything else a caller's transport raised: say what, never as "not sent" (which
        # would retry or fail over), since nothing tells when it failed.
        message = scrub(f"the transport failed ({type(exc).__name__}: {exc})")[:300]
        raise TransportError(message, provider=provider, sent=True) from exc


def deadline_error(provider: str, deadline: float) -> Timeout:
    """The error for an exchange that passed its overall deadline (the job may be done)."""
    return Timeout(
        f"no complete answer within the deadline of {deadline:g} s", provider=provider, sent=True
    )


class LoopBinding:
    """The event loop an ``httpx.AsyncClient``'s connections belong to: the first it is used in.

    Its connections (aiohttp's session, httpcore's pool) cannot be used from another loop; after
    ``asyncio.run`` returns, they fail with ``RuntimeError: Event loop is closed``.
    """

    def __init__(self) -> None:
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Whether the running loop is the one (binding it on first use)."""
        # asyncio is loaded wherever a loop runs: found there rather than by an import
        # statement, which costs about a microsecond a call (see flux_adapters.client).
        module: Any = sys.modules.get("asyncio")
        if module is None:
            import asyncio as module
        running = module.get_running_loop()
        bound = self._loop
        if bound is not None:  # set once, never unset: no lock needed to read it
            return bound() is running
        with self._lock:
            if self._loop is None:
                self._loop = weakref.ref(running)
                return True
            return self._loop() is running


ENDS: contextvars.ContextVar[float | None] = contextvars.ContextVar("flux_ends", default=None)
"""When (`time.monotonic`) the exchange under way in this context must be over (`bounded_by`)."""


def shared_ssl_context() -> ssl.SSLContext:
    """The TLS settings ``httpx.Client()`` would make, made once per process.

    Those are certifi's certificates, or those ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` name: one
    context per value of those variables. Loading the certificates costs about 20 ms of CPU, which every client the library made for
    itself paid again: each `FluxClient`, each async pool, each conformance scenario. A context
    is safe to share between clients and threads.
    """
    return _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return httpx.create_ssl_context()  # reads the two variables itself, as httpx.Client() does


_BOUNDED: weakref.WeakSet[httpx.Client] = weakref.WeakSet()
"""The httpx clients made by `bounded_http_client` whose every transport is bounded."""


class ParsedUrls:
    """Each URL a client sends to, as httpx parsed it the first time.

    httpx parses a URL string anew for every request it builds (about a third of building one),
    and a client sends to the same endpoint again and again. Kept by a client, not the process:
    a URL may carry a key (in its query). A dict, as `flux_adapters._aiohttp.AiohttpDriver`
    keeps its own (yarl's): reading and adding are atomic, so threads can share it.
    """

    MOST: Final = 256
    """URLs kept at most (then it starts afresh): the endpoints, and polling URLs of jobs."""

    def __init__(self) -> None:
        self._urls: dict[str, httpx.URL] = {}

    def __call__(self, url: str) -> httpx.URL:
        """*url* parsed (once).

        Raises:
            httpx.InvalidURL: httpx cannot parse *url*.
        """
        found = self._urls.get(url)
        if found is None:
            if len(self._urls) >= self.MOST:
                self._urls.clear()
            parsed = httpx.URL(url)
            port = parsed.port
            if port is not None and port > 65535:  # httpx takes it; the connect then fails
                raise httpx.InvalidURL(f"Invalid port: {port} (most 65535)")
            found = self._urls[url] = parsed
        return found


def bounded_http_client() -> httpx.Client:
    """An ``httpx.Client`` (proxies from the environment included) whose sockets keep deadlines.

    Within `bounded_by`, each read, write and connect waits no longer than the time left. The
    backend is set on httpx's own connection pools, which httpx does not let one pass in; if a
    future httpx moves them, the client still works and `send_within` uses a worker thread.
    """
    from flux_adapters._bounded import bound  # lazy: httpx loads httpcore only for a client

    client = httpx.Client(verify=shared_ssl_context())
    if bound(client):
        if hasattr(os, "register_at_fork"):
            _forget_connections_at_fork()
        _BOUNDED.add(client)
    return client


@functools.cache
def _forget_connections_at_fork() -> None:
    """Have `_forget_connections` run in each forked child: registered once per process."""
    os.register_at_fork(after_in_child=_forget_connections)


def _forget_connections() -> None:
    """In a forked child: drop the connections the parent's clients (`_BOUNDED`) keep alive.

    The child has copies of its parent's sockets: a request from each at once on one kept-alive
    connection goes out interleaved, and each may read the other's answer (a paid image handed
    to the wrong call) or garbage. The child makes its own connections instead. Nothing is sent
    or shut down on the dropped ones: the child's copies of their sockets are closed as they are
    collected, which leaves the parent's connections as they were. A pool's lock, which another
    thread may have held when the process forked, is made anew.
    """
    import httpcore  # loaded with any bounded client

    from flux_adapters._bounded import connection_pools

    for client in list(_BOUNDED):
        for pool in connection_pools(client):
            if isinstance(pool, httpcore.ConnectionPool):
                pool._connections = []
                pool._requests = []
                pool._optional_thread_lock = type(pool._optional_thread_lock)()


def bounded_by(ends: float, provider: str, deadline: float) -> _BoundedBy:
    """End the exchange in this block at *ends* (`time.monotonic`): a `Timeout` after it.

    Sockets of a `bounded_http_client` wait no longer than the time left. A connect, pool or
    write timeout at the deadline stays what it is: it proves the request was not sent whole.
    """
    return _BoundedBy(ends, provider, deadline)


class _BoundedBy:
    """`bounded_by`'s ``with`` block, written out.

    Not made by ``contextlib.contextmanager``: every sync exchange and download goes through
    one, and the generator and its wrapper cost more than the block's own work.
    """

    __slots__ = ("_deadline", "_ends", "_provider", "_token")

    def __init__(self, ends: float, provider: str, deadline: float) -> None:
        self._ends = ends
        self._provider = provider
        self._deadline = deadline

    def __enter__(self) -> None:
        self._token = ENDS.set(self._ends)

    def __exit__(
        self, kind: object, exc: BaseException | None, traceback: object
    ) -> Literal[False]:
        try:
            if (
                isinstance(exc, httpx.TimeoutException)
                and time.monotonic() >= self._ends
                and not proves_not_sent(exc)
            ):
                raise deadline_error(self._provider, self._deadline) from exc
        finally:
            ENDS.reset(self._token)
        return False


def sends_here(http: httpx.Client) -> bool:
    """Whether `send_within` sends with *http* in the caller's thread (a `bounded_http_client`).

    Then an interruption (Ctrl-C) stops the send where it is: httpcore closes a connection left
    mid-request, and no byte of the request goes out after it. Any other client sends on a
    worker thread, which may go on writing on a connection taken from its pool.
    """
    return http in _BOUNDED


def send_within(
    http: httpx.Client, request: httpx.Request, ends: float, provider: str, deadline: float
) -> httpx.Response:
    """``http.send(request, stream=True)``, given up at *ends*.

    Never with the caller's client-level auth (it would replace the provider's key, or reach a
    CDN), and never following a redirect (a redirected POST would be sent, and paid, again).

    A `bounded_http_client` sends in this thread (within `bounded_by`, its sockets keep the
    deadline). Any other client sends on a worker thread while the caller waits for the answer's
    head no longer than the time left (`time.monotonic` clock); given up, the connection it
    opened is shut down so the worker ends too, and an answer that comes later is closed unread.

    Raises:
        Timeout: *ends* passed first (``sent=True``: the provider may have the request).
        Exception: Whatever ``http.send`` raised.
    """
    if http in _BOUNDED:
        return http.send(request, stream=True, auth=None, follow_redirects=False)
    from flux_adapters._bounded import send_on_worker  # lazy: only a caller's client needs it

    return send_on_worker(http, request, ends, provider, deadline)


class HeadHeaders(Protocol):
    """The headers of an answer as the readers here use them (``httpx.Headers`` is one)."""

    def get(self, key: str, default: Any = None) -> Any:
        """The value of *key* (any case); several values joined with ``", "``."""

    def get_list(self, key: str, split_commas: bool = False) -> list[str]:
        """Every value of *key* (any case)."""

    def multi_items(self) -> list[tuple[str, str]]:
        """Every header, names in lower case, in the order received."""


class Head(Protocol):
    """The head of an answer: its status and headers (an ``httpx.Response`` is one).

    The readers here (`AnswerBody`, the downloader's checks) take this rather than an
    ``httpx.Response``, so that a driver on another HTTP library feeds them the same way.
    """

    @property
    def status_code(self) -> int:
        """The status code."""

    @property
    def headers(self) -> HeadHeaders:
        """The headers."""


class _Inflater:
    """Inflates one gzip or deflate body, never more than `DECODED_SLICE` bytes per step."""

    def __init__(self, coding: str) -> None:
        self._raw_fallback = coding == "deflate"  # "deflate" sent without its zlib wrapper
        self._inflate = zlib.decompressobj(_WBITS[coding])

    def feed(self, data: bytes) -> Iterator[bytes]:
        more = False
        while (data or more) and not self._inflate.eof:
            try:
                out = self._inflate.decompress(data, DECODED_SLICE)
            except zlib.error as exc:
                if not self._raw_fallback:
                    raise httpx.DecodingError(f"bad compressed data ({exc})") from exc
                # Some servers send raw deflate; httpx retries the first bytes the same way.
                self._raw_fallback = False
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self._raw_fallback = False
            data = self._inflate.unconsumed_tail
            more = len(out) == DECODED_SLICE  # the step was full: there may be more waiting
            if out:
                yield out


def _inflater(response: Head) -> _Inflater | None:
    """The inflater for *response*'s ``Content-Encoding`` (``None``: not encoded).

    Raises:
        httpx.DecodingError: An encoding that was not asked for (br, zstd, a chain of two).
    """
    codings = [
        value.strip().lower()
        for value in response.headers.get_list("content-encoding", split_commas=True)
    ]
    codings = [coding for coding in codings if coding and coding != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in _WBITS:
        shown = ", ".join(codings)[:60]
        raise httpx.DecodingError(f"an encoding that was not asked for ({shown})")
    return _Inflater(codings[0])


def _already_read(response: httpx.Response) -> Iterator[bytes] | None:
    """The body in slices, when a transport (a test's MockTransport) has already read it."""
    try:
        content = response.content
    except httpx.ResponseNotRead:
        return None
    return (
        content[start : start + DECODED_SLICE] for start in range(0, len(content), DECODED_SLICE)
    )


def iter_decoded(response: httpx.Response) -> Iterator[bytes]:
    """The body of a streamed *response*, decoded; inflated pieces hold at most `DECODED_SLICE`.

    Raises:
        httpx.DecodingError: An encoding that was not asked for, or bad compressed data.
    """
    read = _already_read(response)
    if read is not None:
        yield from read
        return
    inflater = _inflater(response)
    for raw in response.iter_raw():
        if inflater is None:
            yield raw
        else:
            yield from inflater.feed(raw)


async def aiter_decoded(response: httpx.Response) -> AsyncIterator[bytes]:
    """Async twin of `iter_decoded`."""
    read = _already_read(response)
    if read is not None:
        for piece in read:
            yield piece
        return
    async for piece in adecoded(response, response.aiter_raw()):
        yield piece


async def adecoded(head: Head, raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body *raw* (as received) of the answer *head*, decoded as `iter_decoded` does.

    Raises:
        httpx.DecodingError: An encoding that was not asked for, or bad compressed data.
    """
    inflater = _inflater(head)
    async for chunk in raw:
        if inflater is None:
            yield chunk
        else:
            for piece in inflater.feed(chunk):
                yield piece


_E = TypeVar("_E", bound=FluxError)


def with_answer(error: _E, response: Head, scrub: Callable[[str], str] = redact) -> _E:
    """*error* carrying *response*'s headers (made safe by *scrub*) and the provider's request id."""
    headers = dict(response.headers.multi_items())
    attach_response(error, answer_headers(headers, scrub), request_id(headers, scrub))
    return error


def declared_length(response: Head) -> int | None:
    """The ``Content-Length`` the server declared, when it is a plain number."""
    value = response.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


class AnswerBody:
    """Reads the answer to a POST within its size cap and deadline.

    A 2xx is read up to `MAX_ANSWER_BYTES` (more is an error); an error status up to
    `ERROR_BODY_BYTES` (the rest is not read: the status already says enough).

    Feed it the body's chunks with `take` until it returns ``False``, then call `finish`.
    """

    def __init__(
        self,
        response: Head,
        provider: str,
        deadline: float,
        ends: float | None,
        scrub: Callable[[str], str] = redact,
    ) -> None:
        self._response = response
        self._scrub = scrub
        self._provider = provider
        self._deadline = deadline
        self._ends = ends
        self._success = 200 <= response.status_code < 300
        self._chunks: list[bytes] = []
        self._size = 0
        declared = declared_length(response)
        if self._success and declared is not None and declared > MAX_ANSWER_BYTES:
            raise self.too_large()
        if ends is not None:  # the aiohttp driver keeps its deadline on its own clock
            self._check_time()

    def _check_time(self) -> None:
        if self._ends is not None and time.monotonic() > self._ends:
            raise with_answer(
                deadline_error(self._provider, self._deadline), self._response, self._scrub
            )

    def too_large(self) -> ResponseFormatError:
        """The error for an answer over the cap."""
        error = ResponseFormatError(
            f"the answer is larger than {math.ceil(MAX_ANSWER_BYTES / _MB)} MB",
            provider=self._provider,
            status_code=self._response.status_code,
        )
        return with_answer(error, self._response, self._scrub)

    def unreadable(self, why: str) -> ResponseFormatError:
        """The error for an answer whose body cannot be decoded."""
        error = ResponseFormatError(
            why, provider=self._provider, status_code=self._response.status_code
        )
        return with_answer(error, self._response, self._scrub)

    def take(self, chunk: bytes) -> bool:
        """Keep *chunk*; ``False`` when no more of the body is wanted."""
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._success and self._size > MAX_ANSWER_BYTES:
            raise self.too_large()
        if self._ends is not None:
            self._check_time()
        return self._success or self._size <= ERROR_BODY_BYTES

    def judged_by_status(self) -> bool:
        """Whether the answer's status decides it, whatever became of its body.

        An error status (4xx, 5xx): its body is read only for the message, and a 429's or a
        401's head proves the provider did not take the job even when the body that follows is
        cut short (a drop, a read timeout) or cannot be decoded. What was read is the answer.
        """
        return self._response.status_code >= 400

    def finish(self) -> HttpResponse:
        """The answer as read."""
        # Made as HttpResponse(...) makes it, without the dict of keyword arguments a class call
        # builds (a third of the cost; tests/test_async_per_edit.py holds why it is the same).
        response = object.__new__(HttpResponse)
        HttpResponse.__init__(
            response,
            status_code=self._response.status_code,
            # multi_items() walks the headers once; dict(headers) looks each name up again.
            headers=dict(self._response.headers.multi_items()),
            content=b"".join(self._chunks),
        )
        return response
