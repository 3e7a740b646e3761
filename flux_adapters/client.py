"""`FluxClient` and `AsyncFluxClient`: the only code that sends anything.

Both drive the same flows (``flux_adapters._flows``) over httpx, so they cannot drift apart.
They add the credentials (only to the provider's own base URL), stream request bodies, map
httpx failures to `TransportError` with ``sent`` saying whether the provider may have received
the request, and attach a downloader to each result image.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self
from urllib.parse import urlsplit

import attrs
import httpx

from flux_adapters._bodies import StreamedJson, json_segments, segments_length
from flux_adapters._flows import Flow, Outcome, edit_flow
from flux_adapters.errors import (
    ConfigurationError,
    ProviderRejected,
    ProviderUnavailable,
    ResponseFormatError,
    ResultExpired,
    Timeout,
    TransportError,
)
from flux_adapters.prices import price_for
from flux_adapters.providers import Adapter, get_adapter
from flux_adapters.request import DataUrlImage, EditRequest, FileImage, LocalImage
from flux_adapters.result import Attempt, EditResult
from flux_adapters.wire import HttpRequest, HttpResponse, JsonBody, MultipartBody

__all__ = ["DEFAULT_TIMEOUT", "DOWNLOAD_TIMEOUT", "AsyncFluxClient", "FluxClient", "HttpDownloader"]

DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=10.0, read=300.0, write=120.0, pool=60.0)
"""Generation is synchronous at these providers and FLUX.2 [max] with eight references can take
minutes; the documents' own examples wait 120 to 240 s. Connecting should still be quick."""

DOWNLOAD_TIMEOUT: Final = httpx.Timeout(60.0, connect=10.0)
MAX_DOWNLOAD_BYTES: Final = 100 * 1024 * 1024
"""A result image larger than this is refused rather than written to disk or memory."""


@attrs.frozen
class _Binding:
    """One provider as configured: adapter, base URL and key (kept out of every repr)."""

    adapter: Adapter
    base_url: str
    api_key: str = attrs.field(repr=False)

    @classmethod
    def create(cls, provider: str, api_key: str | None, base_url: str | None) -> _Binding:
        adapter = get_adapter(provider)
        key = api_key if api_key is not None else os.environ.get(f"{adapter.env_prefix}_API_KEY")
        if not key:
            raise ConfigurationError(
                f"no API key for {provider}: pass api_key= or set {adapter.env_prefix}_API_KEY"
            )
        base = (
            base_url or os.environ.get(f"{adapter.env_prefix}_BASE_URL") or adapter.default_base_url
        )
        return cls(adapter=adapter, base_url=_normalise_base_url(base), api_key=key)

    def owns(self, url: str) -> bool:
        """Whether *url* is on this provider's own origin (and may carry the key)."""
        mine, theirs = urlsplit(self.base_url), urlsplit(url)
        return (mine.scheme, mine.netloc) == (theirs.scheme, theirs.netloc)


def _normalise_base_url(url: str) -> str:
    # Accept the OpenAI-SDK habit of a base URL ending in /v1; adapters add /v1/... themselves.
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _as_timeout(timeout: httpx.Timeout | float | None) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


def _open_upload(image: LocalImage, files: contextlib.ExitStack) -> IO[bytes]:
    if isinstance(image, FileImage):
        return files.enter_context(image.path.open("rb"))
    if isinstance(image, DataUrlImage):
        return io.BytesIO(image.decode())
    # BytesIO, not bytes: httpx then streams it in 64 KiB slices instead of one large write.
    return io.BytesIO(image.data)


def _build_httpx_request(
    http: httpx.Client | httpx.AsyncClient,
    binding: _Binding,
    outgoing: HttpRequest,
    timeout: httpx.Timeout,
    files: contextlib.ExitStack,
) -> httpx.Request:
    headers = dict(outgoing.headers)
    headers.setdefault("Accept", "application/json")
    if binding.owns(outgoing.url):
        headers["Authorization"] = f"Bearer {binding.api_key}"
    body = outgoing.body
    if isinstance(body, MultipartBody):
        uploads = [
            (
                part.name,
                (part.filename, _open_upload(part.image, files), part.image.info.media_type),
            )
            for part in body.files
        ]
        return http.build_request(
            outgoing.method,
            outgoing.url,
            headers=headers,
            data=dict(body.fields),
            files=uploads,
            timeout=timeout,
        )
    if isinstance(body, JsonBody):
        headers["Content-Type"] = "application/json"
        segments = json_segments(body)
        if len(segments) == 1 and isinstance(segments[0], bytes):
            return http.build_request(
                outgoing.method, outgoing.url, headers=headers, content=segments[0], timeout=timeout
            )
        # build_request applies the caller's client defaults; a fresh Request then carries the
        # stream (replacing .stream on a built request would leave its empty .content behind).
        base = http.build_request(outgoing.method, outgoing.url, headers=headers, timeout=timeout)
        base.headers["Content-Length"] = str(segments_length(segments))
        return httpx.Request(
            base.method,
            base.url,
            headers=base.headers,
            stream=StreamedJson(segments),
            extensions=base.extensions,
        )
    return http.build_request(outgoing.method, outgoing.url, headers=headers, timeout=timeout)


def _received(response: httpx.Response) -> HttpResponse:
    return HttpResponse(
        status_code=response.status_code, headers=dict(response.headers), content=response.content
    )


def _proves_not_sent(exc: BaseException) -> bool:
    """Whether a transport failure proves the provider never received the request."""
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) and exc.__cause__ else exc
    if type(cause).__module__.partition(".")[0] == "aiohttp":
        # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout, including a
        # disconnect after the body was sent; only aiohttp's connector errors prove it unsent.
        import aiohttp

        return isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    # A write timeout means the body was not fully written, so the job cannot have been taken.
    return isinstance(
        exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.WriteTimeout
    )


def _transport_error(exc: Exception, provider: str) -> TransportError:
    sent = not _proves_not_sent(exc)
    if isinstance(exc, httpx.TimeoutException | TimeoutError) or isinstance(
        exc.__cause__, TimeoutError
    ):
        what = (
            "timed out waiting for the answer" if sent else "timed out before the request was sent"
        )
        return Timeout(f"{what} ({type(exc).__name__})", provider=provider, sent=sent)
    what = "the connection failed" if sent else "could not connect"
    return TransportError(f"{what} ({type(exc).__name__}: {exc})", provider=provider, sent=sent)


@contextlib.contextmanager
def _mapped_transport_errors(provider: str) -> Iterator[None]:
    """Re-raise transport failures as ours, saying whether the provider may have the request."""
    try:
        yield
    except httpx.TransportError as exc:
        raise _transport_error(exc, provider) from exc
    except (TimeoutError, OSError) as exc:
        # Raw failures some transports let through (asyncio timeouts, aiohttp client errors).
        raise _transport_error(exc, provider) from exc
    except Exception as exc:
        if type(exc).__module__.partition(".")[0] != "aiohttp":
            raise
        raise _transport_error(exc, provider) from exc


def _drive_sync(flow: Flow, send: _SyncSend) -> Outcome:
    try:
        outgoing = next(flow)
        while True:
            outgoing = flow.send(send(outgoing))
    except StopIteration as finished:
        outcome: Outcome = finished.value
        return outcome
    finally:
        flow.close()


class _SyncSend:
    def __init__(self, http: httpx.Client, binding: _Binding, timeout: httpx.Timeout) -> None:
        self._http, self._binding, self._timeout = http, binding, timeout

    def __call__(self, outgoing: HttpRequest) -> HttpResponse:
        with contextlib.ExitStack() as files, _mapped_transport_errors(self._binding.adapter.name):
            request = _build_httpx_request(
                self._http, self._binding, outgoing, self._timeout, files
            )
            return _received(self._http.send(request))


def _result(
    binding: _Binding, outcome: Outcome, downloader: HttpDownloader, started: float
) -> EditResult:
    elapsed = time.perf_counter() - started
    limits = outcome.plan.limits
    images = tuple(attrs.evolve(image, downloader=downloader) for image in outcome.answer.images)
    price = price_for(binding.adapter.name, limits.model)
    return EditResult(
        provider=binding.adapter.name,
        model=limits.model,
        images=images,
        usage=outcome.answer.usage,
        cost_usd=price.usd_per_call * len(images) if price else None,
        warnings=outcome.plan.warnings,
        attempts=(
            Attempt(
                provider=binding.adapter.name, model=limits.model, outcome="ok", elapsed_s=elapsed
            ),
        ),
        elapsed_s=elapsed,
    )


class _ClientBase:
    """What both clients share: the provider binding, the timeout, and a key-free repr."""

    def __init__(
        self,
        provider: str,
        api_key: str | None,
        base_url: str | None,
        timeout: httpx.Timeout | float | None,
    ) -> None:
        self._binding = _Binding.create(provider, api_key, base_url)
        self._timeout = _as_timeout(timeout)

    def __repr__(self) -> str:
        base_url = self._binding.base_url
        return f"{type(self).__name__}(provider={self.provider!r}, base_url={base_url!r})"

    @property
    def provider(self) -> str:
        """The provider id this client sends to."""
        return self._binding.adapter.name


class FluxClient(_ClientBase):
    """Send `EditRequest` values to one provider and return `EditResult` values.

    Args:
        provider: Provider id: ``"laozhang"``, ``"apiyi"``, ``"apiyi-multipart"`` or ``"aimlapi"``.
        api_key: The key; read from ``<PROVIDER>_API_KEY`` (``APIYI_API_KEY`` for both apiyi
            dialects) when not given.
        base_url: The provider's base URL, with or without ``/v1``; read from
            ``<PROVIDER>_BASE_URL`` when not given, else the provider's real one.
        http_client: An ``httpx.Client`` of yours (proxies, transports, tests). It is not
            closed by this client.
        timeout: Per-call timeout; defaults to `DEFAULT_TIMEOUT`, suited to image generation.

    Raises:
        ConfigurationError: Unknown provider, or no API key.
    """

    def __init__(
        self,
        provider: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: httpx.Client | None = None,
        timeout: httpx.Timeout | float | None = None,
    ) -> None:
        super().__init__(provider, api_key, base_url, timeout)
        self._own_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()
        self._downloader = HttpDownloader(provider=provider, sync_client=self._http)

    def edit(self, request: EditRequest) -> EditResult:
        """Send *request* and return the images.

        Raises:
            RequestError: The request breaks the provider's limits; nothing was sent.
            ProviderError: The provider answered with an error (a subclass says which).
            TransportError: No usable answer; ``sent`` says whether it may be billed.
        """
        binding = self._binding
        started = time.perf_counter()
        flow = edit_flow(binding.adapter, request, binding.base_url, (binding.api_key,))
        outcome = _drive_sync(flow, _SyncSend(self._http, binding, self._timeout))
        return _result(binding, outcome, self._downloader, started)

    def close(self) -> None:
        """Close the HTTP client, if this client created it."""
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _default_async_http() -> httpx.AsyncClient:
    """An AsyncClient on aiohttp when the ``aiohttp`` extra is installed, else plain httpx.

    httpx's own async pool slows down sharply with many requests in flight (about 5x fewer
    requests per second than aiohttp at 50 in flight on loopback; benchmarks/run.py e).
    """
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        return httpx.AsyncClient()
    return httpx.AsyncClient(transport=AiohttpTransport())


class AsyncFluxClient(_ClientBase):
    """Async twin of `FluxClient`: same arguments, same flows, same errors.

    ``http_client`` is an ``httpx.AsyncClient``.
    """

    def __init__(
        self,
        provider: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout | float | None = None,
    ) -> None:
        super().__init__(provider, api_key, base_url, timeout)
        self._own_http = http_client is None
        self._http = http_client if http_client is not None else _default_async_http()
        self._downloader = HttpDownloader(provider=provider, async_client=self._http)

    async def edit(self, request: EditRequest) -> EditResult:
        """Send *request* and return the images; see `FluxClient.edit`."""
        binding = self._binding
        started = time.perf_counter()
        flow = edit_flow(binding.adapter, request, binding.base_url, (binding.api_key,))
        try:
            outgoing = next(flow)
            while True:
                outgoing = flow.send(await self._send(outgoing))
        except StopIteration as finished:
            outcome: Outcome = finished.value
        finally:
            flow.close()
        return _result(binding, outcome, self._downloader, started)

    async def _send(self, outgoing: HttpRequest) -> HttpResponse:
        with contextlib.ExitStack() as files, _mapped_transport_errors(self._binding.adapter.name):
            request = _build_httpx_request(
                self._http, self._binding, outgoing, self._timeout, files
            )
            return _received(await self._http.send(request))

    async def aclose(self) -> None:
        """Close the HTTP client, if this client created it."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()


class HttpDownloader:
    """Downloads result URLs with the client's httpx client, or a short-lived one if it is closed.

    Result URLs are signed and need no credentials, so none are ever sent with them.
    """

    def __init__(
        self,
        *,
        provider: str = "download",
        sync_client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._provider = provider
        self._sync = sync_client
        self._async = async_client

    def _check(self, response: httpx.Response, url: str) -> None:
        status = response.status_code
        if status < 400:
            length = response.headers.get("content-length")
            if length and length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
                raise self._too_large(status)
            return
        parts = urlsplit(url)
        location = f"{parts.netloc}{parts.path}"
        if status in (403, 404, 410):
            raise ResultExpired(
                "the result URL has expired or is gone (result URLs live about 10 minutes)",
                status_code=status,
                location=location,
            )
        kind = ProviderUnavailable if status >= 500 else ProviderRejected
        raise kind(
            f"downloading the result failed ({location})",
            provider=self._provider,
            status_code=status,
        )

    def _too_large(self, status: int) -> ResponseFormatError:
        return ResponseFormatError(
            f"the result is larger than {MAX_DOWNLOAD_BYTES // (1024 * 1024)} MB",
            provider=self._provider,
            status_code=status,
        )

    @contextlib.contextmanager
    def _sync_client(self) -> Iterator[httpx.Client]:
        if self._sync is not None and not self._sync.is_closed:
            yield self._sync
        else:
            with httpx.Client() as client:
                yield client

    def read(self, url: str) -> bytes:
        """Return the body at *url*."""
        chunks = bytearray()
        with (
            self._sync_client() as http,
            _mapped_transport_errors(self._provider),
            http.stream("GET", url, timeout=DOWNLOAD_TIMEOUT) as response,
        ):
            self._check(response, url)
            for chunk in response.iter_bytes():
                chunks += chunk
                if len(chunks) > MAX_DOWNLOAD_BYTES:
                    raise self._too_large(response.status_code)
        return bytes(chunks)

    def save(self, url: str, path: Path) -> None:
        """Stream the body at *url* into *path*, which appears only once complete."""
        partial = path.with_name(path.name + ".part")
        try:
            with (
                self._sync_client() as http,
                _mapped_transport_errors(self._provider),
                http.stream("GET", url, timeout=DOWNLOAD_TIMEOUT) as response,
            ):
                self._check(response, url)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        if out.tell() > MAX_DOWNLOAD_BYTES:
                            raise self._too_large(response.status_code)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def _async_client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._async is not None and not self._async.is_closed:
            yield self._async
        else:
            async with httpx.AsyncClient() as client:
                yield client

    async def read_async(self, url: str) -> bytes:
        """Return the body at *url*."""
        chunks = bytearray()
        async with self._async_client() as http:
            with _mapped_transport_errors(self._provider):
                async with http.stream("GET", url, timeout=DOWNLOAD_TIMEOUT) as response:
                    self._check(response, url)
                    async for chunk in response.aiter_bytes():
                        chunks += chunk
                        if len(chunks) > MAX_DOWNLOAD_BYTES:
                            raise self._too_large(response.status_code)
        return bytes(chunks)

    async def save_async(self, url: str, path: Path) -> None:
        """Stream the body at *url* into *path*, which appears only once complete."""
        partial = path.with_name(path.name + ".part")
        try:
            async with self._async_client() as http:
                with _mapped_transport_errors(self._provider):
                    async with http.stream("GET", url, timeout=DOWNLOAD_TIMEOUT) as response:
                        self._check(response, url)
                        with partial.open("wb") as out:
                            async for chunk in response.aiter_bytes():
                                out.write(chunk)
                                if out.tell() > MAX_DOWNLOAD_BYTES:
                                    raise self._too_large(response.status_code)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
