"""How an exchange goes out: the request as it goes on the wire, and the async clients' drivers.

`Exchange` is what a client computed for one `HttpRequest` of a flow: the URL and headers with
the key added only where the adapter allows it, the body description, the per-phase timeouts and
the exchange's deadline. Sending it is all that is left, and a driver does that:

- `HttpxDriver`: an ``httpx.AsyncClient``, the caller's (``http_client=``), or the library's own
  small pools with a queue of ours in front, so that requests wait for a connection there
  rather than in httpcore's pool, which slows down sharply as it grows and as requests wait;
- ``flux_adapters._aiohttp.AiohttpDriver``: aiohttp directly (the ``fast`` extra), without
  httpx's request and response machinery on top, which costs more CPU than aiohttp itself.

Both read the answer with the same `flux_adapters._transport.AnswerBody` (size cap, error prefix,
bounded inflating) and map failures to the same typed errors, with ``sent`` saying whether the
provider may have the request (docs/routing.md). `choose` decides which one an
``AsyncFluxClient`` uses. `FluxClient` sends with httpx only (`httpx_request`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Final,
    Literal,
    NamedTuple,
    Protocol,
    TypeAlias,
    get_args,
)

import httpx

from flux_adapters._bodies import MeasuredFile, StreamedJson, json_segments, segments_length
from flux_adapters._transport import (
    AnswerBody,
    ParsedUrls,
    aiter_decoded,
    deadline_error,
    mapped_transport_errors,
    shared_ssl_context,
    with_answer,
)
from flux_adapters.errors import (
    ClientClosedError,
    ConfigurationError,
    FluxError,
    RequestError,
    Timeout,
    Violation,
)
from flux_adapters.request import DataUrlImage, FileImage, LocalImage
from flux_adapters.wire import HttpResponse, JsonBody, MultipartBody

if TYPE_CHECKING:
    from flux_adapters._download import Incoming

__all__ = [
    "CONNECTIONS",
    "DRIVER_VARIABLE",
    "AsyncDriver",
    "DriverName",
    "Exchange",
    "HttpxDriver",
    "check_headers",
    "choose",
    "counted_body",
    "httpx_request",
    "multipart_request",
    "not_sent_by_deadline",
    "open_upload",
    "refuse_headers",
    "unsendable",
]

DriverName: TypeAlias = Literal["aiohttp", "httpx"]
"""Which library an ``AsyncFluxClient`` sends with."""
_ASKED: Final = ("auto", *get_args(DriverName))

DRIVER_VARIABLE: Final = "FLUX_ASYNC_DRIVER"
"""The environment variable that picks the driver when ``driver=`` is not given."""

CONNECTIONS: Final = 100
"""Connections a client's own driver keeps open at most, and exchanges it lets in flight at
once; more wait in the client's queue (for as long as the pool timeout allows), where waiting
costs nothing per request. aiohttp's own default is 100 too."""

PER_POOL: Final = 8
"""Connections per httpx pool of the library's own httpx driver (see `HttpxDriver`)."""

KEEPALIVE: Final = 5.0
"""Seconds an idle connection is kept: httpx's default, for both drivers. A server that closes
an idle connection as a request goes out on it makes that request ambiguous (it may have
arrived), so this is kept short."""


class Exchange(NamedTuple):
    """One request as it goes on the wire, key included: what a driver sends.

    A named tuple rather than an attrs class: one is made for every exchange, and a tuple is
    built several times faster than a frozen attrs instance.

    Attributes:
        method: The HTTP method.
        url: The full URL (with the key in its query when the adapter sends it there).
        headers: Every header of ours: the adapter's, ``Accept``, ``Accept-Encoding``, the
            ``Content-Type`` of a JSON body, the key.
        body: What to send (streamed), or ``None``.
        timeout: Per-phase timeouts, none longer than *seconds*.
        seconds: The deadline of the whole exchange, answer included.
        provider: The provider's id, for errors.
        scrub: Removes the client's keys from a message.
    """

    method: str
    url: str
    headers: dict[str, str]
    body: JsonBody | MultipartBody | None
    timeout: httpx.Timeout
    seconds: float
    provider: str
    scrub: Callable[[str], str]

    def __repr__(self) -> str:  # the headers hold the key
        return f"Exchange({self.method} {self.provider}, {self.seconds:g} s)"


def unsendable(
    provider: str, scrub: Callable[[str], str], exc: BaseException, by: str = "httpx"
) -> RequestError:
    """The error for a request that *by* cannot send as built (a bad URL or header); not sent."""
    why = scrub(f"{type(exc).__name__}: {exc}")[:200]
    violation = Violation(
        "request", f"{provider} built a request {by} cannot send", "valid HTTP", why
    )
    return RequestError([violation], provider=provider)


def not_sent_by_deadline(exchange: Exchange) -> Timeout:
    """The error for a deadline that passed before the request went out whole (not billed)."""
    return Timeout(
        f"the request could not be sent within the deadline of {exchange.seconds:g} s",
        provider=exchange.provider,
        sent=False,
    )


def open_upload(image: LocalImage, files: contextlib.ExitStack) -> io.RawIOBase | IO[bytes]:
    """*image* as a binary file object, closed with *files*.

    A local file is read as measured (`MeasuredFile`): one changed or unreadable since is a
    `RequestError` before its part goes out whole, as in a JSON body.
    """
    if isinstance(image, FileImage):
        return files.enter_context(MeasuredFile(image))
    if isinstance(image, DataUrlImage):
        return io.BytesIO(image.decode())
    # BytesIO, not bytes: httpx then streams it in 64 KiB slices instead of one large write.
    return io.BytesIO(image.data)


def _uploads(body: MultipartBody, files: contextlib.ExitStack) -> list[tuple[str, Any]]:
    return [
        (part.name, (part.filename, open_upload(part.image, files), part.image.info.media_type))
        for part in body.files
    ]


def multipart_request(
    exchange: Exchange, body: MultipartBody, files: contextlib.ExitStack
) -> httpx.Request:
    """A client-less httpx request carrying *body*: its stream and headers are the encoding.

    The same encoder for both drivers: the parts, their order and the announced length are
    httpx's whichever library sends them.

    Raises:
        RequestError: httpx cannot encode what the adapter built (a bad URL or header).
    """
    try:
        return httpx.Request(
            exchange.method,
            exchange.url,
            headers=exchange.headers,
            data=dict(body.fields),
            files=_uploads(body, files),
        )
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise unsendable(exchange.provider, exchange.scrub, exc) from None


_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""A header's name: an HTTP token (RFC 9110, 5.6.2)."""
_SOUND_NAMES: Final[set[str]] = set()
"""Header names found to be tokens (a few, repeated on every exchange); bounded."""


def check_headers(exchange: Exchange, by: str) -> None:
    """Refuse a header that cannot be sent, before anything is, on every driver alike.

    A name must be an HTTP token; a value printable ASCII (no line break, no control character).

    Raises:
        RequestError: A header that cannot be sent.
    """
    headers = exchange.headers
    try:
        values = "".join(headers.values())
    except TypeError:  # a value that is not text (an int, bytes, None): named below
        values = "\n"
    if values.isascii() and values.isprintable() and _SOUND_NAMES.issuperset(headers):
        return
    refuse_headers(headers.items(), exchange.provider, exchange.scrub, by)


def refuse_headers(
    headers: Iterable[tuple[object, object]], provider: str, scrub: Callable[[str], str], by: str
) -> None:
    """Raise the `RequestError` for the first of *headers* that cannot be sent, if any."""
    for name, value in headers:
        problem = _header_problem(name, value)
        if problem is not None:
            raise unsendable(provider, scrub, problem, by)


def _header_problem(name: object, value: object) -> Exception | None:
    """Why a header cannot be sent (``None``: it can); adapters may build any type."""
    if not isinstance(name, str) or not isinstance(value, str):
        return TypeError(f"the header {name!r} is not text: {type(value).__name__}")
    if name not in _SOUND_NAMES:
        if not _TOKEN.fullmatch(name):
            return ValueError(f"the header name {name!r} is not an HTTP token")
        if len(_SOUND_NAMES) >= 256:
            _SOUND_NAMES.clear()
        _SOUND_NAMES.add(name)
    if not (value.isascii() and value.isprintable()):
        return ValueError(f"the header {name!r} cannot be sent as it is")
    return None


def httpx_request(
    http: httpx.Client | httpx.AsyncClient,
    exchange: Exchange,
    files: contextlib.ExitStack,
    urls: ParsedUrls,
) -> httpx.Request:
    """The httpx request for *exchange*, with *http*'s own defaults applied; its URL from *urls*.

    Raises:
        RequestError: httpx cannot send what the adapter built (a bad URL or header).
    """
    check_headers(exchange, "httpx")
    try:
        return _httpx_request(http, exchange, urls(exchange.url), files)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise unsendable(exchange.provider, exchange.scrub, exc) from None


def _httpx_request(
    http: httpx.Client | httpx.AsyncClient,
    exchange: Exchange,
    url: httpx.URL,
    files: contextlib.ExitStack,
) -> httpx.Request:
    body, headers, timeout = exchange.body, exchange.headers, exchange.timeout
    if isinstance(body, MultipartBody):
        return http.build_request(
            exchange.method,
            url,
            headers=headers,
            data=dict(body.fields),
            files=_uploads(body, files),
            timeout=timeout,
        )
    if isinstance(body, JsonBody):
        segments = json_segments(body)
        if len(segments) == 1 and isinstance(segments[0], bytes):
            return http.build_request(
                exchange.method, url, headers=headers, content=segments[0], timeout=timeout
            )
        length = str(segments_length(segments))
        stream = StreamedJson(segments)
        files.callback(stream.close)  # a body left part-sent: its file closed with the call
        if isinstance(http, httpx.Client):
            # One request, the body an iterable of known length: httpx sends it as it comes
            # (as ``content=`` a generator of one's own), with this Content-Length.
            return http.build_request(
                exchange.method,
                url,
                headers={**headers, "Content-Length": length},
                content=stream,
                timeout=timeout,
            )
        # build_request applies the caller's client defaults; a fresh Request then carries the
        # stream (replacing .stream on a built request would leave its empty .content behind),
        # which an async client takes as it is (it would read an iterable given as content=
        # as a synchronous one).
        base = http.build_request(exchange.method, url, headers=headers, timeout=timeout)
        base.headers["Content-Length"] = length
        return httpx.Request(
            base.method,
            base.url,
            headers=base.headers,
            stream=stream,
            extensions=base.extensions,
        )
    return http.build_request(exchange.method, url, headers=headers, timeout=timeout)


class AsyncDriver(Protocol):
    """What an ``AsyncFluxClient`` sends with: exchanges, and the downloads of its results."""

    @property
    def name(self) -> DriverName:
        """The library it sends with."""

    @property
    def is_closed(self) -> bool:
        """Whether it can no longer send."""

    def needs_lookup(self, url: str) -> bool:
        """Whether a provider-given *url*'s host is to be resolved and checked before sending.

        ``False`` when it is checked where it is connected to (``flux_adapters._addresses``).
        """

    async def exchange(self, exchange: Exchange) -> HttpResponse:
        """Send *exchange* and read its answer within the cap and the deadline.

        Raises:
            TransportError: No usable answer; ``sent`` says whether the provider may have it
                (a `Timeout` for a timeout or the deadline).
            ResponseFormatError: An answer too large, or that cannot be decoded.
            RequestError: The request cannot be sent as built; nothing was sent.
            ClientClosedError: The driver was closed; nothing was sent.
        """

    def get(
        self, url: str, headers: Mapping[str, str], timeout: httpx.Timeout
    ) -> AbstractAsyncContextManager[Incoming]:
        """See `flux_adapters._download.AsyncGetter.get` (a download)."""

    async def aclose(self) -> None:
        """Close its connections; any later exchange raises `ClientClosedError`."""


def _closed(http_is_yours: bool) -> ClientClosedError:
    # The client replaces this with its own message (flux_adapters.client, _closed_instead).
    what = "the httpx client" if http_is_yours else "the connection pool"
    return ClientClosedError(f"{what} is closed; nothing was sent")


class _Counted(httpx.AsyncByteStream):
    """A request body that knows whether its last byte was handed to httpx.

    Until then, the provider cannot have the whole request: a deadline that ends the exchange
    earlier proves it was not sent (as httpx's own write timeout does).
    """

    def __init__(self, inner: httpx.AsyncByteStream, length: int) -> None:
        self._inner = inner
        self._left = length

    @property
    def complete(self) -> bool:
        """Whether every byte was handed over."""
        return self._left <= 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._left -= len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def _counted(request: httpx.Request) -> _Counted | None:
    """*request*'s streamed body, now counted; ``None`` for a body held whole (or none)."""
    try:
        request.content  # noqa: B018 - raises for a streamed body
    except httpx.RequestNotRead:
        length = request.headers.get("content-length", "")
        if not (length.isascii() and length.isdigit()) or not isinstance(
            request.stream, httpx.AsyncByteStream
        ):
            return None
        counted = _Counted(request.stream, int(length))
        request.stream = counted
        return counted
    return None


class CountedBody(httpx.SyncByteStream):
    """A sync request body that knows whether its last byte was handed to httpx.

    Until then the provider cannot have the whole request (its ``Content-Length`` says more is
    to come): a send cut short earlier, in the thread that sends, proves it was not taken.
    """

    def __init__(self, inner: httpx.SyncByteStream, length: int) -> None:
        self._inner = inner
        self._left = length
        self._answer_awaited = False

    @property
    def complete(self) -> bool:
        """Whether every byte was handed over."""
        return self._left <= 0

    @property
    def cut_short(self) -> bool:
        """Whether the send is stopped within the body's part (no answer awaited yet).

        Its last byte was not handed over, and no answer is awaited: httpcore awaits one once
        the body is sent, and also after a write that failed part way (the server hung up),
        to read the answer the server may have sent first (a 200 with a job among them).
        Stopped there, the count proves nothing.
        """
        return self._left > 0 and not self._answer_awaited

    def trace(self, event: str, info: Mapping[str, object]) -> None:
        """Note when the answer's head is awaited (httpcore's ``trace`` extension)."""
        if event.endswith(".receive_response_headers.started"):
            self._answer_awaited = True

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._left -= len(chunk)
            yield chunk

    def close(self) -> None:
        self._inner.close()


def counted_body(request: httpx.Request) -> CountedBody | None:
    """*request*'s streamed sync body, now counted; ``None`` for a body held whole (or none).

    A body held whole goes out in one write, which an interruption may cut anywhere: how much
    of it went cannot be told.
    """
    stream = request.stream
    if type(stream) is httpx.ByteStream or not isinstance(stream, httpx.SyncByteStream):
        return None  # held whole (httpx's stream of a body given as bytes), or not sync
    length = request.headers.get("content-length", "")
    if not (length.isascii() and length.isdigit()):
        return None
    counted = CountedBody(stream, int(length))
    request.stream = counted
    traced = request.extensions.get("trace")
    if traced is None:
        request.extensions = {**request.extensions, "trace": counted.trace}
    else:  # a caller's own trace: both are told

        def both(event: str, info: Mapping[str, object]) -> None:
            counted.trace(event, info)
            traced(event, info)

        request.extensions = {**request.extensions, "trace": both}
    return counted


class _Pool:
    """One ``httpx.AsyncClient`` of the library's, and how many exchanges it has in flight."""

    __slots__ = ("busy", "http")

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.busy = 0


class HttpxDriver:
    """Sends with httpx: the caller's ``httpx.AsyncClient`` as it is, or the library's own pools.

    The library's own (*http* not given): up to *connections* connections, in pools of
    *per_pool* (an ``httpx.AsyncClient`` each, made as the load needs them, every connection
    kept alive), and at most *connections* exchanges in flight; the rest wait their turn in a
    queue of ours, for no longer than the pool timeout (then a `Timeout` with ``sent=False``).

    Small pools, because httpcore looks at every connection of a pool, and at every request
    waiting in it, each time a request starts or ends (``_assign_requests_to_connections``):
    its cost per request grows with the square of the pool's size, and each request waiting in
    httpcore's queue makes every other one slower. One pool of 100 connections with 500
    requests in flight spent milliseconds of CPU per request there (benchmarks/run.py e).

    Args:
        http: The caller's client: every exchange goes to it, with no queue of ours (its pool
            is the caller's to size).
        connections: Most connections, and exchanges in flight, of the library's own pools.
        per_pool: Connections per pool.
    """

    name: Final = "httpx"

    def __init__(
        self,
        http: httpx.AsyncClient | None = None,
        *,
        connections: int = CONNECTIONS,
        per_pool: int = PER_POOL,
    ) -> None:
        self._own = http is None
        self._per_pool = per_pool
        self._pools = [_Pool(http if http is not None else self._new_client())]
        self.http = self._pools[0].http
        """The first pool's client (the caller's, if given); it builds every request."""
        self._urls = ParsedUrls()
        import asyncio  # here, not above: FluxClient uses this module and never needs asyncio

        most = -(-connections // per_pool) * per_pool
        self._queue = asyncio.Semaphore(most) if self._own else None
        self._closed = False

    def _new_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self._per_pool,
            max_keepalive_connections=self._per_pool,
            keepalive_expiry=KEEPALIVE,
        )
        from flux_adapters._bounded import bound_async  # checks provider-given hosts

        return bound_async(httpx.AsyncClient(limits=limits, verify=shared_ssl_context()))

    @property
    def is_closed(self) -> bool:
        return self._closed if self._own else self.http.is_closed

    def needs_lookup(self, url: str) -> bool:
        """See `AsyncDriver.needs_lookup`: its own pools check where they connect, a proxy not."""
        from flux_adapters._bounded import needs_lookup

        return needs_lookup(self.http, url)

    async def _enter(self, pool: float | None) -> _Pool:
        """A pool with room, after a turn in the queue, waited for no longer than *pool* seconds.

        Raises:
            httpx.PoolTimeout: No turn within *pool* seconds (nothing was sent).
        """
        queue = self._queue
        if queue is None:
            return self._pools[0]
        if not queue.locked():
            await queue.acquire()  # a free place: taken without waiting
        else:
            import asyncio

            wait = asyncio.timeout(pool)
            try:
                async with wait:
                    await queue.acquire()
            except TimeoutError:
                if not wait.expired():
                    raise
                raise httpx.PoolTimeout(
                    "no connection became free within the pool timeout"
                ) from None
        # The queue lets no more in than the pools can take: one has room, or one can be made.
        for chosen in self._pools:  # the first with room: its connections are the warmest
            if chosen.busy < self._per_pool:
                break
        else:
            if self._closed:
                queue.release()
                raise _closed(False)
            chosen = _Pool(self._new_client())
            self._pools.append(chosen)
        chosen.busy += 1
        return chosen

    def _leave(self, chosen: _Pool) -> None:
        if self._queue is not None:
            chosen.busy -= 1
            self._queue.release()

    async def exchange(self, exchange: Exchange) -> HttpResponse:
        """See `AsyncDriver.exchange`."""
        import asyncio

        name, seconds, scrub = exchange.provider, exchange.seconds, exchange.scrub
        deadline = asyncio.timeout(seconds)
        waiting = True  # in the queue: nothing sent yet
        body: _Counted | None = None
        response: httpx.Response | None = None
        answer: AnswerBody | None = None
        try:
            async with deadline:
                with contextlib.ExitStack() as files, mapped_transport_errors(name, scrub):
                    request = httpx_request(self.http, exchange, files, self._urls)
                    body = _counted(request)
                    chosen = await self._enter(exchange.timeout.pool)
                    waiting = False
                    try:
                        response = await self._send(chosen.http, request)
                        try:
                            answer = AnswerBody(response, name, seconds, None, scrub)
                            return await _read(response, answer)
                        finally:
                            await response.aclose()
                    finally:
                        self._leave(chosen)
        except TimeoutError as exc:  # transport timeouts are mapped inside: this is the deadline
            if not deadline.expired():
                raise
            if waiting or (body is not None and not body.complete):
                raise not_sent_by_deadline(exchange) from exc
            if answer is not None and answer.judged_by_status():
                return answer.finish()  # an error's head came: its status decides
            error = deadline_error(name, seconds)
            if response is not None:
                with_answer(error, response, scrub)
            raise error from exc
        except FluxError as error:  # the answer was cut short: its head names it (request id)
            if response is not None:
                with_answer(error, response, scrub)
            raise

    async def _send(self, http: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        try:
            # Never the caller's client-level auth (it would replace the provider's key), never
            # a redirect (a 307/308 would send the paid POST again; a 3xx is judged by its status).
            return await http.send(request, stream=True, auth=None, follow_redirects=False)
        except RuntimeError as exc:  # httpx refuses a closed client before sending anything
            if not http.is_closed:
                raise
            raise _closed(not self._own) from exc

    @contextlib.asynccontextmanager
    async def get(
        self, url: str, headers: Mapping[str, str], timeout: httpx.Timeout
    ) -> AsyncIterator[Incoming]:
        """See `AsyncDriver.get`."""
        from flux_adapters._download import bare_get, httpx_get

        request = bare_get(url, headers, timeout)  # an unusable URL takes no connection
        chosen = await self._enter(timeout.pool)
        try:
            async with httpx_get(chosen.http, request) as incoming:
                yield incoming
        finally:
            self._leave(chosen)

    async def aclose(self) -> None:
        self._closed = True
        for each in self._pools:
            await each.http.aclose()


async def _read(response: httpx.Response, body: AnswerBody) -> HttpResponse:
    """The answer *response* heads, read into *body* within its cap."""
    try:
        async for chunk in aiter_decoded(response):
            if not body.take(chunk):
                break
    except httpx.DecodingError as exc:
        if body.judged_by_status():
            return body.finish()
        raise body.unreadable("the answer could not be decoded") from exc
    except httpx.TransportError:
        if body.judged_by_status():  # an error's head came: its status says what became of it
            return body.finish()
        raise
    return body.finish()


def _installed(module: str) -> bool:
    """Whether *module* can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken installation counts as none
        return False


def _proxied() -> bool:
    """Whether the environment names a proxy (``HTTPS_PROXY``, ``ALL_PROXY``...), as httpx reads it."""
    return any(scheme in ("http", "https", "all") for scheme in urllib.request.getproxies())


def choose(
    asked: object, http_client: object, environ: Mapping[str, str] | None = None
) -> DriverName:
    """The driver for an ``AsyncFluxClient``: ``driver=`` as *asked*, else ``$FLUX_ASYNC_DRIVER``.

    ``"auto"`` (the default) is aiohttp when it is installed (the ``fast`` extra), no
    *http_client* was passed and no proxy is set in the environment (httpx honours
    ``HTTPS_PROXY`` and the like; the aiohttp driver does not read them), else httpx.

    Raises:
        ConfigurationError: A value that is not a driver, or ``"aiohttp"`` with an httpx
            *http_client* (which driver would send?).
        MissingExtraError: ``"aiohttp"`` asked for, and aiohttp is not installed.
    """
    env = os.environ if environ is None else environ
    source = "driver="
    if asked is None:
        asked = env.get(DRIVER_VARIABLE, "").strip().lower() or "auto"
        source = f"${DRIVER_VARIABLE}"
    if not isinstance(asked, str) or asked not in _ASKED:
        from flux_adapters._display import render_value

        raise ConfigurationError(
            f"{source} must be 'auto', 'aiohttp' or 'httpx', not {render_value(asked)}"
        )
    if asked == "httpx":
        return "httpx"
    if http_client is not None:
        if asked == "aiohttp" and source == "driver=":
            raise ConfigurationError(
                "driver='aiohttp' sends with aiohttp, and http_client= is an httpx client: "
                "pass one or the other"
            )
        return "httpx"  # the caller's client is used as given, whatever the environment says
    installed = _installed("aiohttp")
    if asked == "aiohttp":
        if not installed:
            from flux_adapters._extras import missing_extra

            error = missing_extra(ModuleNotFoundError("No module named 'aiohttp'", name="aiohttp"))
            assert error is not None
            raise error
        return "aiohttp"
    return "aiohttp" if installed and not _proxied() else "httpx"
