"""`FluxClient` and `AsyncFluxClient`: the only code that sends anything.

Both drive the same flows (``flux_adapters._flows``) over httpx, so they cannot drift apart.
They add the credentials (only to the provider's own base URL), stream request bodies, map
httpx failures to `TransportError` with ``sent`` saying whether the provider may have received
the request, and attach a downloader to each result image.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import os
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self
from urllib.parse import urlsplit

import attrs
import httpx

from flux_adapters._bodies import StreamedJson, json_segments, segments_length
from flux_adapters._flows import Flow, Outcome, edit_flow
from flux_adapters.config import ProviderSettings, load_config
from flux_adapters.errors import (
    ConfigurationError,
    FluxError,
    ProviderRejected,
    ProviderUnavailable,
    ResponseFormatError,
    ResultExpired,
    Timeout,
    TransportError,
)
from flux_adapters.limits import Plan
from flux_adapters.prices import Price, estimate
from flux_adapters.providers import Adapter, get_adapter
from flux_adapters.request import DataUrlImage, EditRequest, FileImage, LocalImage
from flux_adapters.result import BatchItem, EditResult, ResultImage
from flux_adapters.routing import (
    Breaker,
    Instruction,
    Reply,
    Routed,
    Routing,
    RoutingPolicy,
    Wait,
    route,
)
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
    """One provider as configured: adapter, base URL, timeout and key (kept out of every repr)."""

    adapter: Adapter
    base_url: str
    timeout: httpx.Timeout
    api_key: str = attrs.field(repr=False)

    @classmethod
    def create(
        cls,
        provider: str | Adapter,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: httpx.Timeout | float | None = None,
        settings: ProviderSettings | None = None,
    ) -> _Binding:
        """Bind *provider*: explicit arguments, then the environment, then its settings."""
        adapter = get_adapter(provider) if isinstance(provider, str) else provider
        variable = (settings and settings.api_key_env) or f"{adapter.env_prefix}_API_KEY"
        key = api_key if api_key is not None else os.environ.get(variable)
        if not key:
            raise ConfigurationError(
                f"no API key for {adapter.name}: pass api_key= or set {variable}"
            )
        base = (
            base_url
            or os.environ.get(f"{adapter.env_prefix}_BASE_URL")
            or (settings and settings.base_url)
            or adapter.default_base_url
        )
        chosen = timeout if timeout is not None else settings.timeout if settings else None
        return cls(
            adapter=adapter,
            base_url=_normalise_base_url(base),
            timeout=_as_timeout(chosen),
            api_key=key,
        )

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
        # multi_items() walks the headers once; dict(headers) looks each name up again (quadratic).
        status_code=response.status_code,
        headers=dict(response.headers.multi_items()),
        content=response.content,
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


def _drive_sync(flow: Flow, send: Callable[[HttpRequest], HttpResponse]) -> Outcome:
    try:
        outgoing = next(flow)
        while True:
            outgoing = flow.send(send(outgoing))
    except StopIteration as finished:
        outcome: Outcome = finished.value
        return outcome
    finally:
        flow.close()


_GATES: ContextVar[Mapping[str, asyncio.Semaphore] | None] = ContextVar("flux_gates", default=None)
"""Per-provider concurrency limits of the `edit_many` batch the current task belongs to."""


def _default_policy(provider_count: int, **settings: Any) -> RoutingPolicy:
    # One provider: no retries and no cooldown, so each call reports its own outcome.
    single = provider_count == 1
    return RoutingPolicy(retries=0 if single else 1, cooldown=0.0 if single else 30.0, **settings)


class _ClientBase:
    """What both clients share: bindings, routing policy, breaker, prices, and a key-free repr."""

    def __init__(
        self,
        provider: str | Adapter | None,
        providers: Sequence[str | Adapter] | None,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout: httpx.Timeout | float | None,
        routing: Routing,
        max_cost_usd: float | None,
        failover_on_ambiguous: bool,
        policy: RoutingPolicy | None,
        prices: Mapping[tuple[str, str], Price] | None,
        settings: Mapping[str, ProviderSettings] | None,
    ) -> None:
        if (provider is None) == (providers is None):
            raise ConfigurationError("pass either provider= (one) or providers= (a failover list)")
        if providers is not None and (api_key is not None or base_url is not None):
            raise ConfigurationError(
                "api_key= and base_url= go with a single provider=; for several providers, "
                "set <PROVIDER>_API_KEY / <PROVIDER>_BASE_URL or use a configuration file"
            )
        names = [provider] if provider is not None else list(providers or ())
        if not names:
            raise ConfigurationError("providers= is empty")
        known = settings or {}
        self._bindings = tuple(
            _Binding.create(
                name,
                api_key=api_key,
                base_url=base_url,
                timeout=timeout,
                settings=known.get(name if isinstance(name, str) else name.name),
            )
            for name in names
        )
        if policy is None:
            policy = _default_policy(
                len(names),
                routing=routing,
                max_cost_usd=max_cost_usd,
                failover_on_ambiguous=failover_on_ambiguous,
            )
        self._policy = policy
        self._breaker = Breaker(cooldown=policy.cooldown)
        self._prices = dict(prices or {})

    @classmethod
    def from_env(
        cls,
        *,
        config: str | os.PathLike[str] | None = None,
        http_client: Any = None,
    ) -> Self:
        """Build a client from ``flux-adapters.toml`` (or *config*) and the environment.

        ``$FLUX_PROVIDERS`` (comma-separated, in failover order), ``$FLUX_ROUTING``,
        ``$FLUX_MAX_COST_USD``, ``$FLUX_TIMEOUT``, ``$<PROVIDER>_API_KEY`` and
        ``$<PROVIDER>_BASE_URL`` override the file; see `flux_adapters.config`.

        Raises:
            ConfigurationError: Nothing or something invalid is configured, or a key is missing.
        """
        loaded = load_config(config)
        names = [settings.name for settings in loaded.providers]
        policy = _default_policy(
            len(names),
            routing=loaded.routing,
            max_cost_usd=loaded.max_cost_usd,
            unknown_price="refuse" if loaded.unknown_price == "refuse" else "allow",
            failover_on_ambiguous=loaded.failover_on_ambiguous,
        )
        options: dict[str, Any] = {
            "providers": names,
            "http_client": http_client,
            "timeout": loaded.timeout,
            "policy": policy,
            "prices": loaded.prices,
            "settings": {settings.name: settings for settings in loaded.providers},
        }
        return cls(**options)

    def __repr__(self) -> str:
        if len(self._bindings) == 1:
            binding = self._bindings[0]
            return f"{type(self).__name__}(provider={binding.adapter.name!r}, base_url={binding.base_url!r})"
        return f"{type(self).__name__}(providers={list(self.providers)!r}, routing={self._policy.routing!r})"

    @property
    def provider(self) -> str:
        """The provider this client sends to (the first, when it has several)."""
        return self._bindings[0].adapter.name

    @property
    def providers(self) -> tuple[str, ...]:
        """Every provider this client may send to, in configured order."""
        return tuple(binding.adapter.name for binding in self._bindings)

    def _route(self, request: EditRequest) -> Generator[Instruction, Reply, Routed]:
        return route(
            request, self._bindings, _adapter_of, self._policy, self._breaker, self._prices
        )

    def _result(
        self, request: EditRequest, routed: Routed, started: float, downloader: HttpDownloader
    ) -> EditResult:
        binding = routed.candidate
        assert isinstance(binding, _Binding)
        outcome = routed.outcome
        images = tuple(
            attrs.evolve(image, downloader=downloader) for image in outcome.answer.images
        )
        return EditResult(
            provider=binding.adapter.name,
            model=outcome.plan.limits.model,
            images=images,
            usage=outcome.answer.usage,
            cost_usd=estimate(request, outcome.plan, self._prices),
            warnings=outcome.plan.warnings,
            attempts=routed.attempts,
            elapsed_s=time.perf_counter() - started,
        )


def _adapter_of(binding: object) -> Adapter:
    assert isinstance(binding, _Binding)
    return binding.adapter


class FluxClient(_ClientBase):
    """Send `EditRequest` values to one provider, or to several with failover.

    Args:
        provider: One provider id: ``"laozhang"``, ``"apiyi"``, ``"apiyi-multipart"`` or
            ``"aimlapi"``, or an adapter object (a provider from another package). Its errors are
            raised as they are.
        providers: Several provider ids, in failover order (see `flux_adapters.routing`).
        routing: ``"ordered"`` or ``"cheapest"`` (by the price table), with *providers*.
        api_key: The key, with *provider*; else read from ``<PROVIDER>_API_KEY``
            (``APIYI_API_KEY`` for both apiyi dialects).
        base_url: The base URL, with *provider*, with or without ``/v1``; else
            ``<PROVIDER>_BASE_URL``, else the provider's real one.
        http_client: An ``httpx.Client`` of yours (proxies, transports, tests); not closed here.
        timeout: Per-call timeout; defaults to `DEFAULT_TIMEOUT`, suited to image generation.
        max_cost_usd: Skip providers whose estimated price for the call exceeds this.
        failover_on_ambiguous: Fail over even after a failure that may have been billed.
        policy: Full routing settings (overrides *routing*, *max_cost_usd*, *failover_on_ambiguous*).
        prices: Price overrides by (provider, model).

    Raises:
        ConfigurationError: Unknown provider, or no API key.
    """

    def __init__(
        self,
        provider: str | Adapter | None = None,
        *,
        providers: Sequence[str | Adapter] | None = None,
        routing: Routing = "ordered",
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: httpx.Client | None = None,
        timeout: httpx.Timeout | float | None = None,
        max_cost_usd: float | None = None,
        failover_on_ambiguous: bool = False,
        policy: RoutingPolicy | None = None,
        prices: Mapping[tuple[str, str], Price] | None = None,
        settings: Mapping[str, ProviderSettings] | None = None,
    ) -> None:
        super().__init__(
            provider,
            providers,
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            routing=routing,
            max_cost_usd=max_cost_usd,
            failover_on_ambiguous=failover_on_ambiguous,
            policy=policy,
            prices=prices,
            settings=settings,
        )
        self._own_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()
        self._downloader = HttpDownloader(provider=self.provider, sync_client=self._http)

    def edit(self, request: EditRequest) -> EditResult:
        """Send *request* (failing over as configured) and return the images.

        Raises:
            RequestError: The request breaks the provider's limits; nothing was sent.
            ProviderError: The provider answered with an error (a subclass says which).
            TransportError: No usable answer; ``sent`` says whether it may be billed.
            AllProvidersFailed: With several providers, none produced the image.
        """
        started = time.perf_counter()
        router = self._route(request)
        try:
            instruction = next(router)
            while True:
                if isinstance(instruction, Wait):
                    time.sleep(instruction.seconds)
                    reply: Reply = None
                else:
                    reply = self._attempt(instruction.candidate, request, instruction.plan)
                instruction = router.send(reply)
        except StopIteration as done:
            routed: Routed = done.value
        return self._result(request, routed, started, self._downloader)

    def _attempt(self, binding: object, request: EditRequest, plan: Plan) -> Outcome | FluxError:
        assert isinstance(binding, _Binding)
        flow = edit_flow(binding.adapter, request, binding.base_url, (binding.api_key,), plan)
        try:
            return _drive_sync(flow, lambda outgoing: self._send(binding, outgoing))
        except FluxError as error:
            return error

    def _send(self, binding: _Binding, outgoing: HttpRequest) -> HttpResponse:
        with contextlib.ExitStack() as files, _mapped_transport_errors(binding.adapter.name):
            request = _build_httpx_request(self._http, binding, outgoing, binding.timeout, files)
            return _received(self._http.send(request))

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
    """An AsyncClient on aiohttp when the ``fast`` extra is installed, else plain httpx.

    httpx's own async pool slows down sharply with many requests in flight (about 3x fewer
    requests per second than aiohttp at 50 in flight on loopback; benchmarks/run.py e).
    """
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        return httpx.AsyncClient()
    return httpx.AsyncClient(transport=AiohttpTransport())


class AsyncFluxClient(_ClientBase):
    """Async twin of `FluxClient`: same arguments, same routing, same errors.

    ``http_client`` is an ``httpx.AsyncClient``. `edit_many` runs a batch.
    """

    def __init__(
        self,
        provider: str | Adapter | None = None,
        *,
        providers: Sequence[str | Adapter] | None = None,
        routing: Routing = "ordered",
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout | float | None = None,
        max_cost_usd: float | None = None,
        failover_on_ambiguous: bool = False,
        policy: RoutingPolicy | None = None,
        prices: Mapping[tuple[str, str], Price] | None = None,
        settings: Mapping[str, ProviderSettings] | None = None,
    ) -> None:
        super().__init__(
            provider,
            providers,
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            routing=routing,
            max_cost_usd=max_cost_usd,
            failover_on_ambiguous=failover_on_ambiguous,
            policy=policy,
            prices=prices,
            settings=settings,
        )
        self._own_http = http_client is None
        self._http = http_client if http_client is not None else _default_async_http()
        self._downloader = HttpDownloader(provider=self.provider, async_client=self._http)

    async def edit(self, request: EditRequest) -> EditResult:
        """Send *request* (failing over as configured) and return the images; see `FluxClient.edit`."""
        started = time.perf_counter()
        router = self._route(request)
        try:
            instruction = next(router)
            while True:
                if isinstance(instruction, Wait):
                    await asyncio.sleep(instruction.seconds)
                    reply: Reply = None
                else:
                    reply = await self._attempt(instruction.candidate, request, instruction.plan)
                instruction = router.send(reply)
        except StopIteration as done:
            routed: Routed = done.value
        return self._result(request, routed, started, self._downloader)

    async def _attempt(
        self, binding: object, request: EditRequest, plan: Plan
    ) -> Outcome | FluxError:
        assert isinstance(binding, _Binding)
        gates = _GATES.get()
        gate = gates.get(binding.adapter.name) if gates else None
        async with gate if gate is not None else contextlib.nullcontext():
            flow = edit_flow(binding.adapter, request, binding.base_url, (binding.api_key,), plan)
            try:
                outgoing = next(flow)
                while True:
                    outgoing = flow.send(await self._send(binding, outgoing))
            except StopIteration as finished:
                outcome: Outcome = finished.value
                return outcome
            except FluxError as error:
                return error
            finally:
                flow.close()

    async def _send(self, binding: _Binding, outgoing: HttpRequest) -> HttpResponse:
        with contextlib.ExitStack() as files, _mapped_transport_errors(binding.adapter.name):
            request = _build_httpx_request(self._http, binding, outgoing, binding.timeout, files)
            return _received(await self._http.send(request))

    async def edit_many(
        self,
        requests: Iterable[EditRequest],
        *,
        concurrency: int = 8,
        per_provider: int | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        names: Sequence[str] | None = None,
    ) -> AsyncIterator[BatchItem]:
        """Run many edits at once; yield each `BatchItem` as soon as it finishes.

        Args:
            requests: The edits, each routed as `edit` would.
            concurrency: Most edits in flight at once.
            per_provider: Most requests in flight at any one provider.
            output_dir: When given, each result image is saved there the moment it is ready
                (result URLs expire in minutes), as ``<name>.<format>`` (``<name>-2...`` for more).
            names: File names (without extension) for the requests, in order; default the index.

        A failed edit is yielded with its error; the batch goes on.
        """
        queue = list(requests)
        stems = (
            list(names) if names is not None else [f"{index:05d}" for index in range(len(queue))]
        )
        if len(stems) != len(queue):
            raise ValueError("names= must give one name per request")
        folder = Path(output_dir) if output_dir is not None else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        gate = asyncio.Semaphore(concurrency)
        # The batch's tasks run in their own context, so its per-provider gates stay its own.
        context = contextvars.copy_context()
        if per_provider is not None:
            context.run(
                _GATES.set, {name: asyncio.Semaphore(per_provider) for name in self.providers}
            )

        async def one(index: int, request: EditRequest) -> BatchItem:
            async with gate:
                try:
                    result = await self.edit(request)
                    saved: tuple[Path, ...] = ()
                    if folder is not None:
                        saved = tuple(
                            [
                                await _save(image, folder, stems[index], k)
                                for k, image in enumerate(result.images)
                            ]
                        )
                except FluxError as error:
                    return BatchItem(index=index, name=stems[index], request=request, error=error)
                return BatchItem(
                    index=index, name=stems[index], request=request, result=result, saved=saved
                )

        tasks = [
            asyncio.create_task(one(index, request), context=context)
            for index, request in enumerate(queue)
        ]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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


_SIGNATURES: Final = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpeg"), (b"RIFF", "webp"))


def image_extension(head: bytes) -> str:
    """The file extension for image bytes starting with *head* (``"bin"`` when unknown)."""
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), "bin")


async def _save(image: ResultImage, folder: Path, stem: str, index: int) -> Path:
    """Save *image* now, then name it after its real format."""
    partial = folder / f"{stem}{'' if index == 0 else f'-{index + 1}'}.download"
    await image.save_async(partial)
    with partial.open("rb") as stream:
        target = partial.with_suffix("." + image_extension(stream.read(16)))
    partial.replace(target)
    return target


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
