"""Downloading result images: verified, bounded, retried in place, never with credentials.

A download succeeds only with a 2xx whose bytes are a png, jpeg or webp image (checked from the
first bytes, before anything is kept, and from the last: a whole one) of at most
`MAX_IMAGE_BYTES`, within a deadline.
Redirects are followed by hand, at most `MAX_REDIRECTS`, each to an ``http(s)`` URL. A 302 to a
login page, an HTML error page with status 200, an empty body: each is a typed error, never a
saved "image". Result URLs are signed and need no key, so none is ever sent with them. A result URL, and each
redirect from it, may lead only to a public address unless the provider is trusted
(``flux_adapters._addresses``): else `AddressRefused`, and nothing is sent there.

A download is an idempotent GET: a failure that may pass (no connection, a 5xx, a 429, a
timeout) is retried in place a few times, after a jittered wait (``flux_adapters._backoff``), so a
paid image is not lost to one network blip.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, TypeAlias
from urllib.parse import urljoin, urlsplit

import httpx

from flux_adapters._backoff import backoff
from flux_adapters._display import escape_controls
from flux_adapters._files import (
    IMAGE_FORMATS,
    SNIFF_BYTES,
    TAIL_BYTES,
    ImageFile,
    atomic_image,
    format_name,
    image_format,
    image_is_whole,
)
from flux_adapters._redact import redact
from flux_adapters._transport import (
    ACCEPT_ENCODING,
    Head,
    LoopBinding,
    UnusableURL,
    aiter_decoded,
    bounded_by,
    bounded_http_client,
    deadline_error,
    declared_length,
    iter_decoded,
    mapped_transport_errors,
    phase_timeouts,
    send_within,
    shared_ssl_context,
    with_answer,
)
from flux_adapters._version import __version__
from flux_adapters.errors import (
    FluxError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    ResponseFormatError,
    ResultExpired,
    TransportError,
)
from flux_adapters.result import MAX_IMAGE_BYTES

if TYPE_CHECKING:
    from flux_adapters._addresses import Guard, Target

__all__ = [
    "DOWNLOAD_DEADLINE",
    "DOWNLOAD_TIMEOUT",
    "MAX_REDIRECTS",
    "AsyncGetter",
    "HttpDownloader",
    "Incoming",
    "bare_get",
    "httpx_get",
]

DOWNLOAD_TIMEOUT: Final = httpx.Timeout(60.0, connect=10.0)
DOWNLOAD_DEADLINE: Final = 120.0
"""Seconds one download may take in all, redirects and retries included."""
MAX_REDIRECTS: Final = 5
RETRIES: Final = 2
"""Further tries of a download after a failure that may pass."""
_BACKOFF: Final = 0.5
"""The ceiling of the first wait before a retry, doubled for each further one (full jitter)."""
_HEADERS: Final = {
    "Accept": "image/*",
    "Accept-Encoding": ACCEPT_ENCODING,
    "User-Agent": f"flux-adapters/{__version__}",
}


def _location(url: str, scrub: Callable[[str], str]) -> str:
    """Host and path of *url* for messages, scrubbed of the client's keys.

    The signed query string and any user name or password stay out.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "an unusable URL"
    return scrub(f"{parts.netloc.rpartition('@')[2]}{parts.path}")


class _ImageBody:
    """Checks a download as it streams: size, deadline, and that it starts like an image."""

    def __init__(
        self,
        response: Head,
        url: str,
        provider: str,
        sink: Callable[[bytes], None],
        deadline: float,
        ends: float | None,
        scrub: Callable[[str], str] = redact,
    ) -> None:
        self._response = response
        self._url = url
        self._scrub = scrub
        self._provider = provider
        self._sink = sink
        self._deadline = deadline
        self._ends = ends
        self._head = b""
        self._tail = b""
        self._size = 0
        self._verified = False
        declared = declared_length(response)
        if declared is not None and declared > MAX_IMAGE_BYTES:
            raise self._too_large()

    def _too_large(self) -> ResponseFormatError:
        error = ResponseFormatError(
            f"the result image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB "
            f"({_location(self._url, self._scrub)})",
            provider=self._provider,
            status_code=self._response.status_code,
        )
        return with_answer(error, self._response, self._scrub)

    def _not_image(self) -> ResponseFormatError:
        kind = escape_controls(self._response.headers.get("content-type", "no content type")[:60])
        found = image_format(self._head)
        if not self._size:
            what = "empty"
        elif found is not None:  # an image, but in a format no provider here returns
            what = f"a {format_name(found)} image, not png, jpeg or webp ({self._size}+ bytes)"
        else:
            what = f"not an image ({kind}, {self._size}+ bytes)"
        error = ResponseFormatError(
            f"the download from {_location(self._url, self._scrub)} is {what}",
            provider=self._provider,
            status_code=self._response.status_code,
            excerpt=escape_controls(self._scrub(self._head[:120].decode("utf-8", "replace"))),
        )
        return with_answer(error, self._response, self._scrub)

    def take(self, chunk: bytes) -> None:
        """Check and pass on *chunk*."""
        self._size += len(chunk)
        if self._size > MAX_IMAGE_BYTES:
            raise self._too_large()
        self._tail = (self._tail + chunk[-TAIL_BYTES:])[-TAIL_BYTES:]
        if self._ends is not None and time.monotonic() > self._ends:
            raise deadline_error(self._provider, self._deadline)
        if self._verified:
            self._sink(chunk)
            return
        self._head += chunk
        if len(self._head) >= SNIFF_BYTES:
            self._verify()

    def _verify(self) -> None:
        if image_format(self._head) not in IMAGE_FORMATS:
            raise self._not_image()
        self._verified = True
        self._sink(self._head)

    def finish(self) -> None:
        """The body ended: a short or empty one must still be an image, and a whole one."""
        if not self._verified:
            self._verify()
        if not image_is_whole(self._head, self._tail, self._size):
            error = ResponseFormatError(
                f"the download from {_location(self._url, self._scrub)} is cut short "
                f"(not a whole {image_format(self._head)} image: {self._size} bytes)",
                provider=self._provider,
                status_code=self._response.status_code,
            )
            raise with_answer(error, self._response, self._scrub)


def _next_url(response: Head, url: str, provider: str, scrub: Callable[[str], str]) -> str | None:
    """The URL to go on to for a redirect, ``None`` for a 2xx; else the typed error.

    The error carries the answer's headers and request id (`FluxError.response_headers`).
    """
    try:
        return _followed(response, url, provider, scrub)
    except FluxError as error:
        with_answer(error, response, scrub)
        raise


def _followed(response: Head, url: str, provider: str, scrub: Callable[[str], str]) -> str | None:
    status = response.status_code
    if 200 <= status < 300:
        return None
    location = _location(url, scrub)
    if 300 <= status < 400:
        target = response.headers.get("location")
        try:
            following = urljoin(url, target) if target else ""
            scheme = urlsplit(following).scheme
        except ValueError:  # "http://[" and the like
            scheme = ""
        if scheme not in ("http", "https"):
            raise ResponseFormatError(
                f"the download from {location} redirected nowhere usable",
                provider=provider,
                status_code=status,
            )
        return following
    if status in (403, 404, 410):
        raise ResultExpired(
            "the result URL has expired or is gone (result URLs live about 10 minutes)",
            status_code=status,
            location=location,
        )
    if status == 429:
        raise RateLimited(
            f"downloading the result was rate limited ({location})",
            provider=provider,
            status_code=status,
        )
    kind = ProviderUnavailable if status >= 500 else ProviderRejected
    raise kind(f"downloading the result failed ({location})", provider=provider, status_code=status)


def _may_pass(error: FluxError) -> bool:
    """Whether trying the same download again may succeed (the deadline still bounds it)."""
    if isinstance(error.__cause__, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return False  # the URL itself cannot be fetched
    return isinstance(error, TransportError | ProviderUnavailable | RateLimited)


def _too_many_redirects(
    url: str, provider: str, status: int, scrub: Callable[[str], str]
) -> ResponseFormatError:
    return ResponseFormatError(
        f"the download from {_location(url, scrub)} redirected more than {MAX_REDIRECTS} times",
        provider=provider,
        status_code=status,
    )


Incoming: TypeAlias = tuple[Head, AsyncIterator[bytes]]
"""An answer being received: its head, and its body decoded (`flux_adapters._transport.adecoded`)."""


class AsyncGetter(Protocol):
    """Sends one bare GET and streams its answer: what the async downloader needs of a driver."""

    @property
    def is_closed(self) -> bool:
        """Whether it can no longer send."""

    def get(
        self, url: str, headers: Mapping[str, str], timeout: httpx.Timeout
    ) -> AbstractAsyncContextManager[Incoming]:
        """GET *url* with *headers* only (never following a redirect); the answer in the block.

        Raises:
            UnusableURL: *url* cannot be sent as it is (httpx refuses it); nothing was sent.
            httpx.HTTPError, OSError, TimeoutError: Or the driver's own transport failures,
                which `flux_adapters._transport.mapped_transport_errors` maps.
        """


def bare_get(url: str, headers: Mapping[str, str], timeout: httpx.Timeout) -> httpx.Request:
    """An httpx GET of *url* with *headers* only: none of a client's defaults go to a CDN.

    Raises:
        UnusableURL: httpx cannot send *url* as it is.
    """
    try:
        return httpx.Request("GET", url, headers=headers, extensions={"timeout": timeout.as_dict()})
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UnusableURL(str(exc)) from exc


@contextlib.asynccontextmanager
async def httpx_get(http: httpx.AsyncClient, request: httpx.Request) -> AsyncIterator[Incoming]:
    """Send *request* (`bare_get`) with an ``httpx.AsyncClient``: never its auth, no redirect."""
    response = await http.send(request, stream=True, auth=None, follow_redirects=False)
    try:
        yield response, aiter_decoded(response)
    finally:
        await response.aclose()


class _HttpxGetter:
    """An ``httpx.AsyncClient`` as an `AsyncGetter`."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    def needs_lookup(self, url: str) -> bool:
        """See `flux_adapters._bounded.needs_lookup`."""
        from flux_adapters._bounded import needs_lookup

        return needs_lookup(self._http, url)

    def get(
        self, url: str, headers: Mapping[str, str], timeout: httpx.Timeout
    ) -> AbstractAsyncContextManager[Incoming]:
        return httpx_get(self._http, bare_get(url, headers, timeout))


def _needs_lookup(getter: AsyncGetter, url: str) -> bool:
    """Whether *url*'s host is to be checked before *getter* sends (see `needs_lookup`).

    A getter that does not say (one made by hand) connects by its own means: ``False``.
    """
    method = getattr(getter, "needs_lookup", None)
    return bool(method(url)) if method is not None else False


class HttpDownloader:
    """Downloads result URLs with the client's httpx client, or a short-lived one if it is closed.

    Args:
        provider: The provider the images came from, for error messages.
        sync_client: The httpx client of a `FluxClient`.
        async_client: The httpx client of an `AsyncFluxClient`, or its driver (`AsyncGetter`).
        async_loop: The event loop *async_client*'s connections belong to (the client's).
        deadline: Seconds one download may take in all (default `DOWNLOAD_DEADLINE`).
        scrub: Removes the client's keys from messages (a hostile provider may put one in a
            result URL); by default, text shaped like a key.
        sleep: How a sync download's pause between tries is spent (a `FluxClient` passes its
            ``_download_sleep``, which a conformance replay spends without waiting).
        guard: Where result URLs may lead (``flux_adapters._addresses``); ``None``: anywhere
            (a URL the caller gave, a trusted provider). See `guarded`.
    """

    def __init__(
        self,
        *,
        provider: str = "download",
        sync_client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | AsyncGetter | None = None,
        async_loop: LoopBinding | None = None,
        deadline: float = DOWNLOAD_DEADLINE,
        scrub: Callable[[str], str] = redact,
        sleep: Callable[[float], None] = time.sleep,
        guard: Guard | None = None,
    ) -> None:
        self._provider = provider
        self._guard = guard
        self._guarded: dict[Guard, HttpDownloader] = {}
        self._scrub = scrub
        self._sync = sync_client
        self._async: AsyncGetter | None = (
            _HttpxGetter(async_client)
            if isinstance(async_client, httpx.AsyncClient)
            else async_client
        )
        self._async_loop = async_loop or LoopBinding()
        self._deadline = deadline
        self._timeout = phase_timeouts(DOWNLOAD_TIMEOUT, deadline)
        self._sleep = sleep

    def guarded(self, guard: Guard | None) -> HttpDownloader:
        """This downloader, its URLs checked by *guard* (the provider's that gave them).

        Shares this one's clients and settings; made once per guard.
        """
        if guard is self._guard:
            return self
        found = self._guarded.get(guard) if guard is not None else None
        if found is None:
            found = object.__new__(HttpDownloader)
            found.__dict__.update(self.__dict__)
            found._guard = guard
            found._guarded = {}
            if guard is not None:
                self._guarded[guard] = found
        return found

    def _target(self, url: str, hop: int) -> Target | None:
        """What to check where *url* is connected to; ``None``: nothing.

        Raises:
            AddressRefused: *url* names a non-public IP address.
        """
        guard = self._guard
        if guard is None:
            return None
        return guard.target(url, "result" if hop == 0 else "redirect (from a result)")

    @contextlib.contextmanager
    def _sync_client(self) -> Iterator[httpx.Client]:
        if self._sync is not None and not self._sync.is_closed:
            yield self._sync
        else:
            with bounded_http_client() as client:
                yield client

    def _own_getter(self) -> AsyncGetter | None:
        """The client's getter, if it is open and its connections belong to the running loop."""
        getter = self._async
        if getter is not None and not getter.is_closed and self._async_loop.claim():
            return getter
        return None

    def _fetch(self, url: str, sink: Callable[[bytes], None], restart: Callable[[], None]) -> None:
        ends = time.monotonic() + self._deadline
        attempt = 0
        while True:
            try:
                with (
                    self._sync_client() as http,
                    mapped_transport_errors(self._provider, self._scrub),
                    bounded_by(ends, self._provider, self._deadline),
                ):
                    self._follow(http, url, sink, ends)
                return
            except FluxError as error:
                pause = backoff(attempt, _BACKOFF, _BACKOFF * 2**RETRIES)
                if attempt == RETRIES or not _may_pass(error) or time.monotonic() + pause > ends:
                    raise
            attempt += 1
            restart()
            self._sleep(pause)

    def _unusable(self) -> TransportError:
        """The error for a URL that cannot be fetched as it is (``sent=False``; not retried)."""
        return TransportError(
            "could not send the request (the result URL cannot be fetched as given)",
            provider=self._provider,
            sent=False,
        )

    def _follow(
        self, http: httpx.Client, url: str, sink: Callable[[bytes], None], ends: float
    ) -> None:
        from flux_adapters._addresses import GUARDED

        status = 0
        for hop in range(MAX_REDIRECTS + 1):
            # A bare GET (none of the caller's client defaults), sent so that a server dripping
            # its headers cannot hold it past the deadline.
            try:
                request = bare_get(url, _HEADERS, self._timeout)
            except UnusableURL as refused:
                # httpx.InvalidURL is what _may_pass reads as "cannot pass".
                raise self._unusable() from httpx.InvalidURL(str(refused))
            target = self._target(url, hop)
            if target is not None:
                from flux_adapters._bounded import needs_lookup

                if needs_lookup(http, url):
                    target.check_resolved()
            token = GUARDED.set(target)
            try:
                response = send_within(http, request, ends, self._provider, self._deadline)
            finally:
                GUARDED.reset(token)
            try:
                status = response.status_code
                following = _next_url(response, url, self._provider, self._scrub)
                if following is None:
                    body = self._body(response, url, sink, ends)
                    for chunk in iter_decoded(response):
                        body.take(chunk)
                    body.finish()
                    return
            finally:
                response.close()
            url = following
        raise _too_many_redirects(url, self._provider, status, self._scrub)

    def _body(
        self, response: Head, url: str, sink: Callable[[bytes], None], ends: float | None
    ) -> _ImageBody:
        return _ImageBody(
            response, url, self._provider, sink, self._deadline, ends, scrub=self._scrub
        )

    async def _fetch_async(
        self, url: str, sink: Callable[[bytes], None], restart: Callable[[], None]
    ) -> None:
        from flux_adapters._deadline import DeadlinePassed, within

        try:
            await within(self._deadline, self._attempts_async(url, sink, restart))
        except DeadlinePassed as exc:
            raise deadline_error(self._provider, self._deadline) from exc

    async def _attempts_async(
        self, url: str, sink: Callable[[bytes], None], restart: Callable[[], None]
    ) -> None:
        import asyncio

        attempt = 0
        while True:
            try:
                own = self._own_getter()
                with mapped_transport_errors(self._provider, self._scrub):
                    if own is not None:
                        await self._follow_async(own, url, sink)
                    else:  # closed, or its connections belong to another event loop
                        from flux_adapters._bounded import bound_async

                        own = _HttpxGetter(
                            bound_async(httpx.AsyncClient(verify=shared_ssl_context()))
                        )
                        async with own._http:
                            await self._follow_async(own, url, sink)
                return
            except FluxError as error:
                if attempt == RETRIES or not _may_pass(error):
                    raise
            restart()
            await asyncio.sleep(backoff(attempt, _BACKOFF, _BACKOFF * 2**RETRIES))
            attempt += 1

    async def _follow_async(
        self, http: AsyncGetter, url: str, sink: Callable[[bytes], None]
    ) -> None:
        from flux_adapters._addresses import GUARDED

        status = 0
        for hop in range(MAX_REDIRECTS + 1):
            target = self._target(url, hop)
            if target is not None and _needs_lookup(http, url):
                await target.acheck_resolved()
            token = GUARDED.set(target)
            try:
                async with http.get(url, _HEADERS, self._timeout) as (response, chunks):
                    status = response.status_code
                    following = _next_url(response, url, self._provider, self._scrub)
                    if following is None:
                        body = self._body(response, url, sink, None)
                        async for chunk in chunks:
                            body.take(chunk)
                        body.finish()
                        return
            except UnusableURL as refused:
                # httpx.InvalidURL is what _may_pass reads as "cannot pass".
                raise self._unusable() from httpx.InvalidURL(str(refused))
            finally:
                GUARDED.reset(token)
            url = following
        raise _too_many_redirects(url, self._provider, status, self._scrub)

    def read(self, url: str) -> bytes:
        """Return the image at *url*."""
        chunks: list[bytes] = []
        self._fetch(url, chunks.append, chunks.clear)
        return b"".join(chunks)

    def save(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        """Stream the image at *url* into *path*, which appears only once complete.

        With *add_suffix*, the file is *path* plus the image's real extension. Returns the path.

        Raises:
            ExtensionMismatch: *path*'s extension names another format than the image's
                (`flux_adapters._files.check_extension`); nothing is written.
        """
        return self.write(url, path, add_suffix=add_suffix).target

    def write(self, url: str, path: Path, *, add_suffix: bool = False) -> ImageFile:
        """`save`, returning what was written: its path (`ImageFile.target`), first bytes, size.

        The bytes were checked as they came (`_ImageBody`) and the name against them
        (`atomic_image`): the caller has no need to open the file again.
        """
        with atomic_image(path, add_suffix=add_suffix) as out:
            self._fetch(url, out.write, out.restart)
        return out

    async def read_async(self, url: str) -> bytes:
        """Return the image at *url*."""
        chunks: list[bytes] = []
        await self._fetch_async(url, chunks.append, chunks.clear)
        return b"".join(chunks)

    async def save_async(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        """Async twin of `save`."""
        return (await self.write_async(url, path, add_suffix=add_suffix)).target

    async def write_async(self, url: str, path: Path, *, add_suffix: bool = False) -> ImageFile:
        """Async twin of `write`."""
        with atomic_image(path, add_suffix=add_suffix) as out:
            await self._fetch_async(url, out.write, out.restart)
        return out
