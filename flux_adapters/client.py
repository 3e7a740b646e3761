"""`FluxClient` and `AsyncFluxClient`: the only code that sends anything.

Both drive the same flows (``flux_adapters._flows``) and the same router over httpx, so they
cannot drift apart. They add the credentials the way each adapter declares (`KeyAuth`), only to
the hosts it allows, stream request bodies, read answers within a size cap and an overall
deadline, map httpx failures to `TransportError` with ``sent`` saying whether the provider may
have received the request, wait between a job's polls without blocking other work, cancel a job
whose caller stopped waiting, and attach a downloader to each result image. Every argument is
checked when a client is built.

Settings that behave as in the SDKs people know (OpenAI's, httpx): ``max_retries=`` on every
client (retries only where the billing rule proves the job was not taken), a caller's
``http_client`` timeout respected unless ``timeout=`` is given, ``with_options(...)`` for a
light copy sharing the connection pool, and a ``flux_adapters`` logger (``FLUX_LOG=info|debug``;
see ``flux_adapters._log``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import (
    AsyncGenerator,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from contextvars import ContextVar
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Literal,
    Protocol,
    Self,
    TypeAlias,
    TypeVar,
    cast,
    get_args,
)
from urllib.parse import urlsplit

import httpx

from flux_adapters._display import render_value, toml_key, type_name
from flux_adapters._files import image_format
from flux_adapters._ids import Routing
from flux_adapters._log import LOGGER, note  # FLUX_LOG applies once this module is imported
from flux_adapters._options import (
    base_url_for,
    check_key,
    check_seconds,
    check_timeout,
    did_you_mean,
    is_number,
)
from flux_adapters.errors import (
    ClientClosedError,
    ConfigurationError,
    FluxError,
    ProviderError,
    RequestError,
    StateUnavailable,
    Violation,
)
from flux_adapters.request import MODELS, EditRequest, _as_text

# What only sending, a result, several providers or a batch needs is imported where it is used,
# so that `from flux_adapters import EditRequest, FluxClient` loads neither the routing, the
# flows, the price table, configuration files nor asyncio (tests/test_public_api.py holds it).
# What every edit uses is bound once, by `_load_sending`.
if TYPE_CHECKING:
    import asyncio

    from attrs import field, frozen

    from flux_adapters._addresses import Guard, Target
    from flux_adapters._download import DOWNLOAD_DEADLINE, DOWNLOAD_TIMEOUT, HttpDownloader
    from flux_adapters._drivers import (
        AsyncDriver,
        CountedBody,
        DriverName,
        Exchange,
        counted_body,
        httpx_request,
        unsendable,
    )
    from flux_adapters._flows import Flow, Outcome, flow_for
    from flux_adapters._redact import Redactor, hide_in_httpx_log
    from flux_adapters._shared import Shared
    from flux_adapters._transport import (
        ACCEPT_ENCODING,
        AnswerBody,
        bounded_by,
        iter_decoded,
        mapped_transport_errors,
        phase_timeouts,
        send_within,
        sends_here,
        with_answer,
    )
    from flux_adapters.config import Config, ProviderSettings
    from flux_adapters.jobs import Accepted, Job, JobAdapter, Polling, StopJob
    from flux_adapters.limits import Plan
    from flux_adapters.prices import Price
    from flux_adapters.providers import Answer, AnyAdapter, KeyAuth, Provider
    from flux_adapters.result import Attempt, BatchItem, ConversionWarning, EditResult, Usage
    from flux_adapters.routing import (
        Admit,
        Admitted,
        Breaker,
        Instruction,
        Reply,
        Routed,
        RoutingPolicy,
        Settle,
        Try,
        Wait,
        route,
    )
    from flux_adapters.state import StateBackend
    from flux_adapters.wire import HttpRequest, HttpResponse, JsonBody, Sleep
else:  # _Binding is made an attrs class when the first client is: not on importing this module
    from flux_adapters._lazy_attrs import field, frozen

_sending_loaded = False


def _load_sending() -> None:
    """Bind what every edit and resume uses as names of this module, once (the first one).

    Not imported at the top, so that the named import and building a client load none of it;
    nor in each function that uses it: on the path every exchange takes, an import statement
    costs about a microsecond a call (Python 3.11 looks the module's ``__path__`` up, and
    formats the error it does not raise).
    """
    global _sending_loaded
    global ACCEPT_ENCODING, Accepted, AnswerBody, EditResult, Exchange, JsonBody, Sleep, Wait
    global Admit, Admitted, Try
    global bounded_by, flow_for, hide_in_httpx_log, httpx_request, iter_decoded
    global counted_body, mapped_transport_errors, phase_timeouts, route, send_within, sends_here
    global unsendable, with_answer
    from flux_adapters._drivers import Exchange, counted_body, httpx_request, unsendable
    from flux_adapters._flows import flow_for
    from flux_adapters._redact import hide_in_httpx_log
    from flux_adapters._transport import (
        ACCEPT_ENCODING,
        AnswerBody,
        bounded_by,
        iter_decoded,
        mapped_transport_errors,
        phase_timeouts,
        send_within,
        sends_here,
        with_answer,
    )
    from flux_adapters.jobs import Accepted
    from flux_adapters.result import EditResult
    from flux_adapters.routing import Admit, Admitted, Try, Wait, route
    from flux_adapters.wire import JsonBody, Sleep

    _sending_loaded = True


def _load_asyncio() -> None:
    """Bind ``asyncio`` as a name of this module, once, for the async client's methods.

    They use it on every call, where an import statement in each costs a lookup every time.
    Called by `AsyncFluxClient` only: `FluxClient` never loads asyncio.
    """
    global asyncio
    import asyncio


__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_TIMEOUT",
    "DOWNLOAD_DEADLINE",
    "DOWNLOAD_TIMEOUT",
    "MAX_RETRIES",
    "AsyncFluxClient",
    "FluxClient",
    "HttpDownloader",
]

DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=10.0, read=300.0, write=120.0, pool=60.0)
"""Generation is synchronous at these providers and FLUX.2 [max] with eight references can take
minutes; the documents' own examples wait 120 to 240 s. Connecting should still be quick."""

DEFAULT_DEADLINE: Final = 600.0
"""Seconds one exchange may take in all, from sending the request to the last byte of the
answer: a server that drips its answer a byte at a time cannot hold a call longer. A number
given as ``timeout=`` is also the deadline."""

MAX_RETRIES: Final = 10
"""The most ``max_retries=`` a client takes: each retry may wait up to ``max_retry_wait``."""

_HTTPX_DEFAULT_TIMEOUT: Final = httpx.Timeout(5.0)
"""What ``httpx.Client()`` has when its caller set no timeout: not taken as the caller's choice
(five seconds cannot wait for an image). The OpenAI SDK draws the same line, with the same edge:
a client made with ``timeout=5`` on purpose looks the same, and gets `DEFAULT_TIMEOUT` too."""


_T = TypeVar("_T")
if TYPE_CHECKING:
    _Steps: TypeAlias = Generator[HttpRequest | Sleep | Accepted, HttpResponse | None, _T]


def __getattr__(name: str) -> object:
    # The download settings and `HttpDownloader` are named here too (see __all__), loaded only
    # when asked for: a client imports flux_adapters._download when it first needs a downloader.
    if name in ("DOWNLOAD_DEADLINE", "DOWNLOAD_TIMEOUT", "HttpDownloader"):
        from flux_adapters import _download

        return getattr(_download, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@frozen
class _Binding:
    """One provider as configured: adapter, base URL, timeouts and key (kept out of every repr)."""

    adapter: AnyAdapter
    auth: KeyAuth
    """How the key is sent, and where it may go."""
    base_url: str
    timeout: httpx.Timeout
    """Per-phase timeouts, none longer than the deadline."""
    deadline: float
    api_key: str = field(repr=False)
    scrub: Redactor = field(repr=False, eq=False)
    """Removes this key, in any form, from every message."""
    key_only: Redactor = field(repr=False, eq=False)
    """Removes this key, in any form, and nothing else (so a change means it was there)."""
    origin: str | None = field(default=None, repr=False, eq=False)
    """``scheme://host[:port]/`` of the base URL, exactly as `KeyAuth.allows` compares it: a URL
    that starts with it is the base URL's origin without parsing it (every exchange asks)."""
    key_value: str = field(default="", repr=False, eq=False)
    """``auth.value(api_key)``: what carries the key (made once, not for every exchange)."""
    guard: Guard | None = field(default=None, repr=False, eq=False)
    """Where the URLs it gives (polls, results) may lead; ``None``: anywhere (trusted)."""

    @classmethod
    def create(
        cls,
        provider: str | AnyAdapter,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: httpx.Timeout | float | None = None,
        deadline: float | None = None,
        settings: ProviderSettings | None = None,
        inherited: httpx.Timeout | None = None,
        keyed_by_argument: bool = True,
    ) -> _Binding:
        """Bind *provider*: explicit arguments, then the environment, then its settings.

        Timeouts: *timeout*, else the settings' ``timeout``, else *inherited* (the caller's
        httpx client's), else `DEFAULT_TIMEOUT` (see `_timing`). *keyed_by_argument*: whether
        the client could have been given the key as ``api_key=`` (one ``provider=``), which the
        message for a missing key then suggests.

        Raises:
            ConfigurationError: Unknown provider, no key, or a key, URL or timeout that is not
                usable (the message names where it came from, never the key).
        """
        from flux_adapters._addresses import guard_for
        from flux_adapters._redact import Redactor, redactor_for
        from flux_adapters.providers import BEARER, KeyAuth, get_adapter

        adapter = get_adapter(provider) if isinstance(provider, str) else provider
        auth = getattr(adapter, "auth", None) or BEARER
        if not isinstance(auth, KeyAuth):
            raise ConfigurationError(
                f"adapter {adapter.name}: auth must be a flux_adapters.providers.KeyAuth, "
                f"not {type_name(auth)}"
            )
        variable = (settings and settings.api_key_env) or f"{adapter.env_prefix}_API_KEY"
        if api_key is not None:
            key = check_key(api_key, "api_key=")
        else:
            found = os.environ.get(variable)
            if not found:
                remedy = (
                    f"pass api_key= or set {variable}" if keyed_by_argument else f"set {variable}"
                )
                raise ConfigurationError(f"no API key for {adapter.name}: {remedy}")
            key = check_key(found, f"${variable}")
        base = base_url_for(adapter, base_url, settings)
        if timeout is not None:
            phases, seconds = _timing(timeout, "timeout=", deadline, inherited)
        elif settings is not None and settings.timeout is not None:
            where = f"timeout of [provider.{toml_key(adapter.name)}]"
            phases, seconds = _timing(settings.timeout, where, deadline, inherited)
        else:
            phases, seconds = _timing(None, "timeout=", deadline, inherited)
        scrub = redactor_for((key,))
        allow = settings is not None and settings.allow_private_urls is True
        return cls(
            adapter=adapter,
            auth=auth,
            base_url=base,
            timeout=phases,
            deadline=seconds,
            api_key=key,
            scrub=scrub,
            key_only=Redactor((key,), shapes=False),
            origin=_origin(base),
            key_value=auth.value(key),
            guard=guard_for(adapter.name, base, scrub, allow),
        )

    def retimed(self, timeout: httpx.Timeout | float, deadline: float | None) -> _Binding:
        """This binding with *timeout* (checked) and *deadline* (already checked, or ``None``)."""
        import attrs  # loaded with the providers already

        phases, seconds = _timing(timeout, "timeout=", deadline, None)
        return attrs.evolve(self, timeout=phases, deadline=seconds)

    def may_receive_key(self, url: str) -> bool:
        """Whether *url* may carry the key: the base URL's origin, or a host the adapter declares."""
        origin = self.origin
        return (origin is not None and url.startswith(origin)) or self.auth.allows(
            url, self.base_url
        )

    def limit(self, outgoing: HttpRequest) -> float:
        """Seconds *outgoing* may take in all: the client's deadline, or the flow's if shorter."""
        asked = outgoing.deadline
        return self.deadline if asked is None else max(0.0, min(self.deadline, asked))


def _say_key_withheld(binding: _Binding, last: object, error: FluxError) -> None:
    """Add to *error* why the key was not sent, when it is a refusal for the want of it.

    A URL the provider gave (a poll, a fetch) at another host than the base URL's is sent
    without the key unless the adapter declares that host and the base URL is itself at one of
    its declared hosts (`KeyAuth.allows`); the provider then answers 401 or 403, which alone
    reads as a revoked key.
    """
    from flux_adapters._display import escape_controls
    from flux_adapters.wire import HttpRequest

    if not isinstance(error, ProviderError) or error.status_code not in (401, 403):
        return
    if not isinstance(last, HttpRequest) or last.role == "submit":
        return
    url: object = last.url
    if not isinstance(url, str) or binding.may_receive_key(url):
        return
    try:
        host = urlsplit(url).hostname or "?"
        base = urlsplit(binding.base_url).hostname or "?"
    except ValueError:
        return
    name, hosts = binding.adapter.name, binding.auth.hosts
    own = (
        f"; {name}'s own hosts ({', '.join(hosts)}) receive it only when the base URL is one"
        " of them, and this base URL is another's (a reseller's or a proxy's): its key must not"
        " go to a third party"
        if hosts
        else ""
    )
    why = (
        f"the key was not sent to {host}, where the {last.role} URL {name} returned leads: it"
        f" goes only to the configured base URL's host ({base}){own}. No setting sends it"
        " further; if that host is meant to have it, point base_url at it, or use an adapter"
        " whose KeyAuth hosts include both"
    )
    shown = escape_controls(binding.scrub(why))
    error.args = (f"{error.args[0]} ({shown})", *error.args[1:])


def _origin(base_url: str) -> str | None:
    """``scheme://netloc/`` of *base_url* as ``urlsplit`` reads it; ``None`` if it has none."""
    try:
        parts = urlsplit(base_url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}/"


def _timing(
    chosen: object, source: str, deadline: float | None, inherited: httpx.Timeout | None
) -> tuple[httpx.Timeout, float]:
    """The per-phase timeouts and the deadline of one exchange.

    *chosen* (a number of seconds, or an ``httpx.Timeout``; ``None`` when not given) wins; else
    *inherited*, the caller's httpx client's own timeout; else `DEFAULT_TIMEOUT`. The deadline
    is *deadline* when given, else a number *chosen*, else `DEFAULT_DEADLINE`; no phase is
    longer than it.

    Raises:
        ConfigurationError: *chosen* is not a usable timeout (named by *source*).
    """
    from flux_adapters._transport import phase_timeouts

    if chosen is None:
        phases = inherited if inherited is not None else DEFAULT_TIMEOUT
    else:
        phases = check_timeout(chosen, source)
    if deadline is None:
        deadline = float(chosen) if is_number(chosen) else DEFAULT_DEADLINE
    return phase_timeouts(phases, deadline), deadline


def _callers_timeout(http: httpx.Client | httpx.AsyncClient | None) -> httpx.Timeout | None:
    """The timeout the caller set on their httpx client, or ``None`` when they set none.

    Raises:
        ConfigurationError: A phase that is not a usable number of seconds (0, or over a day).
    """
    if http is None:
        return None
    try:
        timeout: object = http.timeout
    except Exception as exc:  # a subclass of httpx's client whose property fails
        raise ConfigurationError(
            f"the timeout of http_client= could not be read ({type(exc).__name__})"
        ) from exc
    if isinstance(timeout, httpx.Timeout) and timeout == _HTTPX_DEFAULT_TIMEOUT:
        return None
    return check_timeout(timeout, "the timeout of http_client=")


def _configured_options(
    config: str | os.PathLike[str] | None, http_client: Any, max_retries: int | None
) -> dict[str, Any]:
    """The arguments `FluxClient.from_env` builds a client with (see it).

    Also for a caller that sets one of them first: a shared batch gives the client the batch's
    Redis as its state when the configuration names none.
    """
    from flux_adapters.config import load_config, timeouts, with_keys
    from flux_adapters.jobs import Polling

    loaded = load_config(config)
    usable = with_keys(loaded.providers)  # a provider without a key: skipped, with a warning
    timeout, usable = timeouts(loaded, usable)
    names = [settings.name for settings in usable]
    retries = None if max_retries is None else _check_retries(max_retries)
    options: dict[str, Any] = {
        "providers": names,
        "http_client": http_client,
        "timeout": timeout,
        "policy": _configured_policy(loaded, len(names), retries),
        "prices": loaded.prices,
        "settings": {settings.name: settings for settings in usable},
        "polling": None if loaded.job_deadline is None else Polling(deadline=loaded.job_deadline),
        "state": loaded.state_url,
        "budget_usd": loaded.budget_usd,
        "budget_period": loaded.budget_period,
        "budget_scope": loaded.budget_scope,
        "state_fallback": loaded.state_fallback,
    }
    return options


def _check_retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise ConfigurationError(
            f"max_retries= must be a whole number from 0 to {MAX_RETRIES}, not "
            f"{render_value(value)}"
        )
    return value


def _exchange(binding: _Binding, outgoing: HttpRequest) -> Exchange:
    """*outgoing* as it goes on the wire: the key added only where its adapter allows it.

    Raises:
        RequestError: The key goes in a query string httpx cannot build into the URL, the URL
            is not text, or the adapter's headers are not (name, value) pairs (nothing is sent).
    """
    try:
        headers = dict(outgoing.headers)
    except (TypeError, ValueError) as exc:  # an outside adapter's mistake: nothing was sent
        raise unsendable(binding.adapter.name, binding.scrub, exc) from None
    headers.setdefault("Accept", "application/json")
    headers["Accept-Encoding"] = ACCEPT_ENCODING  # what iter_decoded inflates within bounds
    if isinstance(outgoing.body, JsonBody):
        headers["Content-Type"] = "application/json"
    url: object = outgoing.url
    if not isinstance(url, str):  # an outside adapter's mistake: nothing was sent
        why = TypeError(f"the URL is {type(url).__name__}, not text")
        raise unsendable(binding.adapter.name, binding.scrub, why)
    auth = binding.auth
    if binding.may_receive_key(url):
        if auth.header is not None:
            headers[auth.header] = binding.key_value
        else:
            assert auth.query is not None
            try:
                url = str(httpx.URL(url).copy_merge_params({auth.query: binding.api_key}))
            except (httpx.InvalidURL, ValueError, TypeError) as exc:
                raise unsendable(binding.adapter.name, binding.scrub, exc) from None
            hide_in_httpx_log(binding.api_key)
    seconds = binding.limit(outgoing)
    timeout = (
        phase_timeouts(binding.timeout, seconds) if seconds < binding.deadline else binding.timeout
    )
    return Exchange(
        outgoing.method,
        url,
        headers,
        outgoing.body,
        timeout,
        seconds,
        binding.adapter.name,
        binding.scrub,
    )


_GATES: ContextVar[Mapping[str, asyncio.Semaphore] | None] = ContextVar("flux_gates", default=None)
"""Per-provider concurrency limits of the `edit_many` batch the current task belongs to."""


class Watcher(Protocol):
    """Told about each attempt of one edit (the batch journal): before it sends, and after."""

    async def sending(self, provider: str) -> None:
        """A request for the job is about to go to *provider*; raise to stop it going."""

    async def accepted(self, provider: str, job: Job) -> None:
        """*provider* accepted the request as *job*: keep it, so that it is polled, not re-sent."""

    def finished(
        self,
        provider: str,
        reply: Outcome | Answer | FluxError,
        not_taken: Mapping[int, str] | None,
        key_only: Callable[[str], str],
    ) -> None:
        """The attempt at *provider* ended with *reply*.

        *not_taken*: the statuses its adapter says are not billed; *key_only* masks the API key
        (and nothing else) in a text, so what the provider sent back can be kept without it.
        """


def _configured_policy(
    loaded: Config, provider_count: int, retries: int | None = None
) -> RoutingPolicy:
    """The routing policy of a client of *provider_count* providers, from its configuration."""
    return _default_policy(
        provider_count,
        routing=loaded.routing,
        max_cost_usd=loaded.max_cost_usd,
        unknown_price="refuse" if loaded.unknown_price == "refuse" else "allow",
        failover_on_ambiguous=loaded.failover_on_ambiguous,
        **({} if retries is None else {"retries": retries}),
    )


def _default_policy(provider_count: int, **settings: Any) -> RoutingPolicy:
    from flux_adapters.routing import RoutingPolicy

    # One provider: no retries unless asked (max_retries=) and no cooldown, so each call reports
    # its own outcome. Several: one retry of a provider before failing over.
    single = provider_count == 1
    settings.setdefault("retries", 0 if single else 1)
    return RoutingPolicy(cooldown=0.0 if single else 30.0, **settings)


def _within(policy: RoutingPolicy, bindings: Sequence[_Binding]) -> RoutingPolicy:
    """*policy* with no wait before a retry longer than the shortest deadline of *bindings*.

    A ``Retry-After`` longer than that then fails over (or is raised) instead of holding the
    call: whatever a provider asks, a call never waits beyond the client's deadline.
    """
    import attrs  # loaded with the providers already

    longest = min(binding.deadline for binding in bindings)
    if policy.max_retry_wait <= longest and policy.backoff <= longest:
        return policy
    return attrs.evolve(
        policy,
        max_retry_wait=min(policy.max_retry_wait, longest),
        backoff=min(policy.backoff, longest),
    )


def _provider_list(provider: object, providers: object) -> list[str | AnyAdapter]:
    if (provider is None) == (providers is None):
        raise ConfigurationError("pass either provider= (one) or providers= (a failover list)")
    if provider is not None:
        items: list[object] = [provider]
    else:
        if isinstance(providers, str | bytes) or not isinstance(providers, Iterable):
            raise ConfigurationError(
                "providers= must be a list of provider ids, e.g. ['laozhang', 'apiyi']"
            )
        try:
            items = list(providers)
        except Exception as exc:
            raise ConfigurationError(
                f"providers= could not be read ({type(exc).__name__})"
            ) from exc
        if not items:
            raise ConfigurationError("providers= is empty")
    from flux_adapters._options import check_adapter
    from flux_adapters.providers import get_adapter

    names: list[str | AnyAdapter] = []
    for item in items:
        if isinstance(item, str):  # any case, with a "did you mean" for a near miss
            names.append(get_adapter(item).name)
        else:
            names.append(check_adapter(item))  # type: ignore[arg-type]
    seen = [name if isinstance(name, str) else name.name for name in names]
    twice = sorted({name for name in seen if seen.count(name) > 1})
    if twice:
        raise ConfigurationError(f"providers= lists {', '.join(twice)} more than once")
    return names


def _check_prices(prices: object, providers: Sequence[str]) -> dict[tuple[str, str], Price]:
    """*prices* keyed by (canonical provider id, model id); a key that could never match is refused.

    The provider is one of *providers* (this client's) or any known id, in any case; the model
    one of `MODELS`. A misspelt key would otherwise be a price silently never used.
    """
    if prices is None:
        return {}
    if not isinstance(prices, Mapping):
        raise ConfigurationError("prices= must map (provider, model) to a price")
    from flux_adapters._declared import check_price
    from flux_adapters.providers import canonical_name

    mine = {name.lower(): name for name in providers}
    try:
        items = list(prices.items())
    except Exception as exc:
        raise ConfigurationError(f"prices= could not be read ({type(exc).__name__})") from exc
    checked: dict[tuple[str, str], Price] = {}
    for key, price in items:
        if not (
            isinstance(key, tuple) and len(key) == 2 and all(isinstance(part, str) for part in key)
        ):
            raise ConfigurationError("prices= keys must be (provider, model) pairs of strings")
        shown = render_value(key)
        check_price(price, f"prices=[{shown}]")  # a NaN or negative one would rank first
        provider, model = (str.__str__(part) for part in key)
        lowered = mine.get(provider.strip().lower())
        if lowered is None:
            try:
                lowered = canonical_name(provider)
            except ConfigurationError as error:
                raise ConfigurationError(f"prices=[{shown}]: {error}") from None
        if model not in MODELS:
            hint = did_you_mean(model, MODELS) if len(model) <= 64 else ""
            raise ConfigurationError(
                f"prices=[{shown}]: {render_value(model)} is not a FLUX model id{hint}"
            )
        if (lowered, model) in checked:
            raise ConfigurationError(f"prices= gives ({lowered!r}, {model!r}) twice")
        checked[(lowered, model)] = price
    return checked


def _check_one_setting(settings: ProviderSettings, where: str) -> None:
    """What `load_config` checks in a file, for `ProviderSettings` made in code."""
    from flux_adapters._declared import check_price
    from flux_adapters._options import check_rate_per_minute, check_variable_name

    if settings.api_key_env is not None:
        check_variable_name(settings.api_key_env, f"{where} api_key_env")
    priority: object = settings.priority
    if priority is not None and not (isinstance(priority, int) and not isinstance(priority, bool)):
        raise ConfigurationError(
            f"{where} priority must be a whole number (lower is tried first) or None, "
            f"not {render_value(priority)}"
        )
    if settings.rate_per_minute is not None:
        check_rate_per_minute(settings.rate_per_minute, f"{where} rate_per_minute")
    allow: object = settings.allow_private_urls
    if not isinstance(allow, bool):
        raise ConfigurationError(
            f"{where} allow_private_urls must be True or False, not {render_value(allow)}"
        )
    prices: object = settings.prices
    if not isinstance(prices, Mapping):
        raise ConfigurationError(f"{where} prices must map model ids to prices")
    for model, price in prices.items():
        if model not in MODELS:
            hint = (
                did_you_mean(model, MODELS) if isinstance(model, str) and len(model) <= 64 else ""
            )
            raise ConfigurationError(
                f"{where} prices: {render_value(model)} is not a FLUX model id{hint}"
            )
        check_price(price, f"{where} prices[{model!r}]")


def _check_settings(settings: object, names: Sequence[str]) -> dict[str, ProviderSettings]:
    """*settings* keyed by this client's provider ids (any case); a key for none is refused."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ConfigurationError("settings= must map provider ids to ProviderSettings")
    from flux_adapters.config import ProviderSettings

    try:
        items = list(settings.items())
    except Exception as exc:
        raise ConfigurationError(f"settings= could not be read ({type(exc).__name__})") from exc
    mine = {name.lower(): name for name in names}
    checked: dict[str, ProviderSettings] = {}
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, ProviderSettings):
            raise ConfigurationError("settings= must map provider ids to ProviderSettings")
        _check_one_setting(value, f"settings=[{render_value(key)}]")
        name = mine.get(str.__str__(key).strip().lower())
        if name is None:
            given = str.__str__(key).strip().lower()
            hint = did_you_mean(given, names) if len(given) <= 64 else ""
            raise ConfigurationError(
                f"settings= names {render_value(key)}, not a provider of this client "
                f"({', '.join(names)}){hint}"
            )
        checked[name] = value
    return checked


class _Lifetime:
    """Whether a client is closed: by its own ``close()``, or (a `with_options` copy) its maker's."""

    __slots__ = ("_closed", "_maker")

    def __init__(self, maker: _Lifetime | None = None) -> None:
        self._closed = False
        self._maker = maker

    def close(self) -> None:
        self._closed = True

    def why_closed(self) -> str | None:
        """``"closed"`` (itself), ``"maker closed"`` (the client it was copied from), or ``None``."""
        if self._closed:
            return "closed"
        if self._maker is not None and self._maker.why_closed() is not None:
            return "maker closed"
        return None


class _Cooldowns:
    """The `Breaker` a client shares with its `with_options` copies, made by the first call."""

    __slots__ = ("_breaker", "_lock")

    def __init__(self) -> None:
        self._breaker: Breaker | None = None
        self._lock = threading.Lock()

    def breaker(self, cooldown: float) -> Breaker:
        made = self._breaker
        if made is None:
            from flux_adapters.routing import Breaker

            with self._lock:  # two first calls at once must not each keep a breaker of their own
                if self._breaker is None:
                    self._breaker = Breaker(cooldown=cooldown)
                made = self._breaker
        return made


def _shared_for(
    state: object,
    budget_usd: object,
    budget_period: object,
    budget_scope: object,
    fallback: object,
    rates: Mapping[str, float],
) -> Shared:
    """The shared state of a client (`flux_adapters.state`), every argument checked.

    Raises:
        ConfigurationError: An argument is not usable (a NaN or negative budget, an odd scope).
        MissingExtraError: A Redis URL without the ``redis`` extra.
    """
    from flux_adapters._shared import Shared
    from flux_adapters.state import check_period, check_scope, check_usd, open_state

    budget = None
    if budget_usd is not None:
        budget = (
            check_scope(budget_scope),
            check_usd(budget_usd, "budget_usd="),
            check_period(budget_period),
        )
    if fallback not in ("none", "local"):
        raise ConfigurationError(
            f"state_fallback= must be 'none' or 'local', not {render_value(fallback)}"
        )
    owned = isinstance(state, str)
    if state is None or isinstance(state, str):
        backend: Any = open_state(state, fallback=fallback)
        owned = owned and state != "local"
    elif callable(getattr(state, "admit", None)) and hasattr(state, "blocking"):
        backend = state
    else:
        raise ConfigurationError(
            "state= must be a URL ('local', 'redis://...') or a flux_adapters.state backend, "
            f"not {type_name(state)}"
        )
    return Shared(backend, owned=owned, budget=budget, rates=rates)


def _plain(value: _T) -> _T:
    """*value*, or the plain ``str`` of its characters when it is a ``str`` subclass.

    Then none of the subclass's own methods (``__eq__``, ``__hash__``, ``__len__``, ``lower``,
    ...) runs when the argument is checked or used, as `EditRequest` takes its text fields.
    """
    text = _as_text(value)
    return value if text is None else text  # type: ignore[return-value]


class _ClientBase:
    """What both clients share: bindings, routing policy, breaker, prices, and a key-free repr."""

    _own_http: bool
    """Whether closing this client closes its connections (not a caller's ``http_client``, not
    a `with_options` copy's)."""
    _lifetime: _Lifetime

    def __init__(
        self,
        provider: Provider | None,
        providers: Sequence[Provider] | None,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout: httpx.Timeout | float | None,
        deadline: float | None,
        max_retries: int | None,
        routing: Routing,
        max_cost_usd: float | None,
        failover_on_ambiguous: bool,
        policy: RoutingPolicy | None,
        prices: Mapping[tuple[str, str], Price] | None,
        settings: Mapping[str, ProviderSettings] | None,
        polling: Polling | None,
        inherited: httpx.Timeout | None,
        state: object = None,
        budget_usd: float | None = None,
        budget_period: str = "total",
        budget_scope: str = "client:default",
        state_fallback: str = "none",
    ) -> None:
        self._lifetime = _Lifetime()
        provider, api_key, base_url, routing, state = (
            _plain(provider),
            _plain(api_key),
            _plain(base_url),
            _plain(routing),
            _plain(state),
        )
        budget_period, budget_scope, state_fallback = (
            _plain(budget_period),
            _plain(budget_scope),
            _plain(state_fallback),
        )
        names = _provider_list(provider, providers)
        if providers is not None and (api_key is not None or base_url is not None):
            raise ConfigurationError(
                "api_key= and base_url= go with a single provider=; for several providers, "
                "set <PROVIDER>_API_KEY / <PROVIDER>_BASE_URL or use a configuration file"
            )
        # Callers may pass anything, whatever the annotations say: check the values as objects.
        given: dict[str, object] = {
            "routing": routing,
            "budget": max_cost_usd,
            "failover": failover_on_ambiguous,
            "policy": policy,
            "settings": settings,
            "polling": polling,
        }
        chosen = given["routing"]
        if not (isinstance(chosen, str) and chosen in get_args(Routing)):
            hint = did_you_mean(chosen, get_args(Routing)) if isinstance(chosen, str) else ""
            raise ConfigurationError(
                f"routing= must be 'ordered' or 'cheapest', not {render_value(chosen)}{hint}"
            )
        budget = given["budget"]
        if budget is not None and not (is_number(budget) and budget >= 0):
            raise ConfigurationError(
                f"max_cost_usd= must be a number of dollars >= 0, or None, not {render_value(budget)}"
            )
        if not isinstance(given["failover"], bool):
            raise ConfigurationError(
                f"failover_on_ambiguous= must be True or False, not {render_value(given['failover'])}"
            )
        if given["policy"] is not None:
            from flux_adapters.routing import RoutingPolicy

            if not isinstance(given["policy"], RoutingPolicy):
                raise ConfigurationError("policy= must be a flux_adapters.routing.RoutingPolicy")
            beside = [
                f"{name}={render_value(value)}"
                for name, value, default in (
                    ("routing", routing, "ordered"),
                    ("max_cost_usd", max_cost_usd, None),
                    ("failover_on_ambiguous", failover_on_ambiguous, False),
                )
                if value != default
            ]
            if beside:  # the policy's own would silently win: a cost cap dropped, say
                raise ConfigurationError(
                    f"{', '.join(beside)} given beside policy=, which sets them itself: give "
                    "them in the RoutingPolicy (attrs.evolve(policy, ...)) instead"
                )
        retries = None if max_retries is None else _check_retries(max_retries)
        names_of = [name if isinstance(name, str) else name.name for name in names]
        known = _check_settings(given["settings"], names_of)
        if any(setting.priority is not None for setting in known.values()):
            from flux_adapters.config import by_priority

            order = by_priority([known.get(label) for label in names_of])
            names = [names[n] for n in order]
            names_of = [names_of[n] for n in order]
        if given["polling"] is not None:
            from flux_adapters.jobs import Polling

            checked = given["polling"]
            if not isinstance(checked, Polling):
                raise ConfigurationError("polling= must be a flux_adapters.jobs.Polling")
            self._polling = checked
        self._job_clock: Callable[[], float] = time.monotonic
        """The clock a job's deadline is kept on. Private: the conformance replay sets one that
        only the job's own waits move, so that a replay makes exactly the recorded polls."""
        if deadline is not None:
            deadline = check_seconds(deadline, "deadline=")
        self._deadline_given = deadline
        """``deadline=`` as given (checked), kept for `with_options`."""
        self._bindings = tuple(
            _Binding.create(
                name,
                api_key=api_key,
                base_url=base_url,
                timeout=timeout,
                deadline=deadline,
                settings=known.get(label),
                inherited=inherited,
                keyed_by_argument=providers is None,  # api_key= goes with provider= only
            )
            for name, label in zip(names, names_of, strict=True)
        )
        self._policy_settings: dict[str, object] = {
            "routing": routing,
            "max_cost_usd": max_cost_usd,
            "failover_on_ambiguous": failover_on_ambiguous,
            **({} if retries is None else {"retries": retries}),
        }
        """What `_policy` is built from when no ``policy=`` is given (each value checked above)."""
        if policy is not None:
            import attrs  # loaded with the providers already

            self._policy = policy if retries is None else attrs.evolve(policy, retries=retries)
        from flux_adapters._redact import redactor_for  # loaded by _Binding.create already

        self._scrub = redactor_for(tuple(binding.api_key for binding in self._bindings))
        """Removes every key of this client, in any form, from a message."""
        self._cooldowns = _Cooldowns()
        self._prices = _check_prices(prices, names_of)
        for name, configured in known.items():  # prices= first, then each provider's settings
            for model, price in configured.prices.items():
                self._prices.setdefault((name, model), price)
        rates = {
            name: settings.rate_per_minute / 60.0
            for name, settings in known.items()
            if settings.rate_per_minute is not None
        }
        self._shared: Shared | None = None
        """The shared state (`flux_adapters.state`), when a state, a budget or a rate limit is
        set; else ``None`` and the client's own `Breaker` keeps its cooldowns."""
        if state is not None or budget_usd is not None or rates:
            self._shared = _shared_for(
                state, budget_usd, budget_period, budget_scope, state_fallback, rates
            )

    # Built when first needed, not with the client: a client that was only built (a script that
    # checks its configuration) loads neither the routing nor the jobs module, and every value
    # they are built from was checked in __init__, so building them later cannot fail.

    @functools.cached_property
    def _policy(self) -> RoutingPolicy:
        """The routing policy as given (``policy=``), or built from the client's arguments."""
        return _default_policy(len(self._bindings), **self._policy_settings)

    @functools.cached_property
    def _route_policy(self) -> RoutingPolicy:
        """The policy the router follows: no wait before a retry longer than the deadline."""
        return _within(self._policy, self._bindings)

    @functools.cached_property
    def _polling(self) -> Polling:
        """How jobs are polled: ``polling=``, else `Polling()`."""
        from flux_adapters.jobs import Polling

        return Polling()

    @functools.cached_property
    def _downloader(self) -> HttpDownloader:
        """Downloads the images of this client's results."""
        return self._new_downloader()

    def _downloader_of(self, provider: str) -> HttpDownloader:
        """The downloader of result URLs *provider* gave, kept apart from their result.

        A batch journal's: its URLs checked as that provider's (``flux_adapters._addresses``).

        A provider this client does not have, or none recorded: every such URL is checked, as
        an untrusted provider's at no base URL would be. Which provider gave it is data from a
        file, but the URL itself came from a provider all the same.
        """
        from flux_adapters._addresses import strict

        for binding in self._bindings:
            if binding.adapter.name == provider:
                return self._downloader.guarded(binding.guard)
        # One guard per name: the downloader keeps one copy of itself per guard it is given.
        made: dict[str, Guard] = self.__dict__.setdefault("_strict_guards", {})
        guard = made.get(provider)
        if guard is None:
            shown = f"{provider!r:.60}, which this client does not have" if provider else "none"
            hint = (
                f"The record names the provider that gave it as {shown}: it is checked the "
                "strictest way (see docs/routing.md)"
            )
            guard = made[provider] = strict(provider or "unknown", hint, self._scrub)
        return self._downloader.guarded(guard)

    @property
    def _breaker(self) -> Breaker:
        """The cooldowns of this client's providers, shared with its `with_options` copies."""
        return self._cooldowns.breaker(self._policy.cooldown)

    @property
    def max_retries(self) -> int:
        """Further tries at the same provider after a failure that proves the job was not taken."""
        return self._policy.retries

    @property
    def timeout(self) -> httpx.Timeout:
        """The per-phase timeouts of an exchange with the (first) provider, as they apply."""
        return self._bindings[0].timeout

    @property
    def deadline(self) -> float:
        """Seconds one exchange with the (first) provider may take in all."""
        return self._bindings[0].deadline

    def _copy_with(self, timeout: object, max_retries: object) -> Self:
        """A shallow copy (same pool, breaker, keys) with other timeouts or retries."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        if timeout is not None:
            check_timeout(timeout, "timeout=")  # the message names the argument, not a provider
            copy._bindings = tuple(
                binding.retimed(timeout, self._deadline_given)  # type: ignore[arg-type]
                for binding in self._bindings
            )
        if max_retries is not None:
            import attrs  # loaded with the providers already

            copy._policy = attrs.evolve(self._policy, retries=_check_retries(max_retries))
        # Made again, from the copy's own bindings and policy, when first needed.
        copy.__dict__.pop("_route_policy", None)
        copy.__dict__.pop("_downloader", None)
        copy._own_http = False  # closing the copy leaves the shared pool open
        if self._shared is not None:  # the same state; closing the copy leaves it open
            copy._shared = self._shared.unowned()
        copy._lifetime = _Lifetime(self._lifetime)  # closed by its own close(), or by ours
        return copy

    @property
    def is_closed(self) -> bool:
        """Whether this client is closed (then every call raises `ClientClosedError`).

        It is once `close` was called (or its ``with`` block ended), once the client it was
        copied from (`with_options`) is closed, or once its httpx client is.
        """
        return self._lifetime.why_closed() is not None or self._sender_closed()

    def _sender_closed(self) -> bool:
        """Whether what this client sends with (its httpx client, its driver) is closed."""
        raise NotImplementedError

    def _closed_error(self) -> ClientClosedError | None:
        """The error for a call on this client once it is closed; ``None`` while it is open."""
        name = type(self).__name__
        why = self._lifetime.why_closed()
        if why == "closed":
            return ClientClosedError(
                f"this {name} is closed (by close() or the end of its with block); create a new one"
            )
        if why == "maker closed":
            return ClientClosedError(
                f"this {name} is a with_options() copy of a client that is closed; "
                "copies share its connections, so create a new client"
            )
        if self._sender_closed():
            return ClientClosedError(
                f"the httpx client of this {name} is closed (http_client= is yours: closing it "
                "ends this client too); create a new one"
            )
        return None

    def _check_open(self) -> None:
        """Raise `ClientClosedError` once this client is closed; nothing is sent."""
        lifetime = self._lifetime
        # Every exchange asks: the open case builds no message (and, for a client that is no
        # with_options copy, asks its lifetime nothing).
        if (
            not lifetime._closed and (lifetime._maker is None or lifetime.why_closed() is None)
        ) and not self._sender_closed():
            return
        error = self._closed_error()
        if error is not None:
            raise error

    def _closed_instead(self, exc: RuntimeError) -> BaseException:
        """What to raise for *exc*: this client's `ClientClosedError` when it is a refusal to send.

        httpx's ``RuntimeError`` for a closed client, or a driver's `ClientClosedError`: each is
        raised before anything is sent. Any other error is raised as it is.
        """
        error = self._closed_error()
        if error is None:
            return exc
        if isinstance(exc, ClientClosedError) or not isinstance(exc, FluxError):
            return error
        return exc

    @classmethod
    def from_env(
        cls,
        *,
        config: str | os.PathLike[str] | None = None,
        http_client: Any = None,
        max_retries: int | None = None,
    ) -> Self:
        """Build a client from ``flux-adapters.toml`` (or *config*) and the environment.

        ``$FLUX_PROVIDERS`` (comma-separated, in failover order), ``$FLUX_ROUTING``,
        ``$FLUX_MAX_COST_USD``, ``$FLUX_TIMEOUT``, ``$FLUX_JOB_DEADLINE``, ``$FLUX_STATE_URL``,
        ``$FLUX_STATE_FALLBACK``, ``$<PROVIDER>_API_KEY`` and ``$<PROVIDER>_BASE_URL`` override
        the file; see `flux_adapters.config`. A configured timeout (``$FLUX_TIMEOUT``, or
        ``timeout`` in the file) counts as ``timeout=``: it wins over *http_client*'s own.
        ``timeout`` in a ``[provider.NAME]`` section wins over the file's top-level one for
        that provider; ``$FLUX_TIMEOUT`` wins over both.
        *max_retries* is the client's (default: 0 for one provider, 1 for several).

        A configured provider whose key variable is unset or empty is left out, with a warning
        on the ``flux_adapters`` logger, when another one has a key (``client.providers`` says
        which are used).

        Raises:
            ConfigurationError: Nothing or something invalid is configured, no configured
                provider has a key (the message names each variable), or an argument is not
                usable.
        """
        return cls(**_configured_options(config, http_client, max_retries))

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

    def _start(self, request: EditRequest) -> Generator[Instruction, Reply, Routed]:
        """The router for *request*, once the request and the client are usable."""
        if not _sending_loaded:
            _load_sending()
        given: object = request  # callers may pass anything, whatever the annotation says
        if not issubclass(type(given), EditRequest):  # type() cannot be fooled; isinstance can
            violation = Violation(
                "request", "must be an EditRequest", "EditRequest(...)", type_name(request)
            )
            raise RequestError([violation])
        self._check_open()
        return route(
            request,
            self._bindings,
            _adapter_of,
            self._route_policy,
            self._breaker,
            self._prices,
            scrub=self._scrub,
            shared=self._shared is not None,
        )

    def _result(
        self, request: EditRequest, routed: Routed, started: float, downloader: HttpDownloader
    ) -> EditResult:
        binding = routed.candidate
        assert isinstance(binding, _Binding)
        outcome = routed.outcome
        return _result(
            binding,
            outcome.answer,
            outcome.job,
            downloader,
            started,
            model=outcome.plan.limits.model,
            estimated=routed.estimated,
            warnings=outcome.plan.warnings,
            attempts=routed.attempts,
            request_id=outcome.request_id,
            requested_format=request.output_format,
        )

    def _job_binding(self, job: object) -> _Binding:
        """The binding that polls *job*: the provider that accepted it.

        Raises:
            ConfigurationError: *job* is not a `Job`, or not one that can be polled
                (`flux_adapters.jobs.job_problem`), or this client has no such provider; a
                `ClientClosedError` when it is closed. Nothing was sent.
        """
        from flux_adapters._flows import is_job_adapter
        from flux_adapters.jobs import Job, job_problem, plain_texts

        if not _sending_loaded:
            _load_sending()
        if not isinstance(job, Job):
            raise ConfigurationError(
                f"resume() takes a flux_adapters.jobs.Job (an error's .job), not {type_name(job)}"
            )
        job = plain_texts(job)
        problem = job_problem(job)
        if problem:
            raise ConfigurationError(f"resume() cannot poll this job: {problem}")
        self._check_open()  # else each poll fails, and is tried again until the deadline
        for binding in self._bindings:
            if binding.adapter.name == job.provider and is_job_adapter(binding.adapter):
                return binding
        raise ConfigurationError(
            f"this client has no asynchronous provider {job.provider!r} to resume job {job.id} "
            f"at (it has {', '.join(self.providers)})"
        )

    def _flow(self, binding: _Binding, request: EditRequest, plan: Plan) -> Flow:
        """The flow that performs *request* at *binding*'s provider: one exchange, or a job."""
        secrets = (binding.api_key,)
        return flow_for(
            binding.adapter,
            request,
            binding.base_url,
            secrets,
            plan,
            polling=self._polling,
            clock=self._job_clock,
        )

    def _follow(self, binding: _Binding, job: Job) -> _Steps[Answer]:
        from flux_adapters._flows import follow_job

        adapter: JobAdapter = binding.adapter  # type: ignore[assignment]
        return follow_job(
            adapter, job, (binding.api_key,), polling=self._polling, clock=self._job_clock
        )

    def _downloader_deadline(self) -> float:
        from flux_adapters._download import DOWNLOAD_DEADLINE

        return min([DOWNLOAD_DEADLINE, *(binding.deadline for binding in self._bindings)])

    def _new_downloader(self) -> HttpDownloader:
        raise NotImplementedError

    def with_options(
        self,
        *,
        timeout: httpx.Timeout | float | None = None,
        max_retries: int | None = None,
    ) -> Self:
        """A copy of this client with other settings; an argument left ``None`` keeps this one's.

        The copy is light: it shares this client's connection pool, keys, cooldowns, prices and
        polling, so making one per call costs next to nothing
        (``client.with_options(timeout=30).edit(request)``). Closing the copy (``close()``, or
        leaving its ``with`` block) closes the copy only: it then raises `ClientClosedError`,
        while this client and the pool stay open (the pool belongs to this client, or to you
        when it is your ``http_client``). Closing this client closes every copy made from it.

        Args:
            timeout: Seconds (also the deadline of an exchange, unless the client was given
                ``deadline=``), or an ``httpx.Timeout`` per phase; see the client's *timeout*.
            max_retries: Further tries at the same provider, 0 to `MAX_RETRIES`; see the client's
                *max_retries*.

        Raises:
            ClientClosedError: This client is closed.
            ConfigurationError: A value that is not usable; nothing is copied.
        """
        self._check_open()
        return self._copy_with(timeout, max_retries)


_WHAT: Final = {"poll": "polling", "fetch": "result-fetch", "cancel": "cancel"}
"""How a message names the URL of each exchange of a job after its submit."""


def _target(binding: _Binding, outgoing: HttpRequest) -> Target | None:
    """What to check where *outgoing*, a URL *binding*'s provider gave, is connected to.

    Raises:
        AddressRefused: Its host is a literal non-public IP address (nothing was sent).
    """
    guard = binding.guard
    if guard is None:
        return None
    return guard.target(outgoing.url, _WHAT.get(outgoing.role, outgoing.role))


def _result(
    binding: _Binding,
    answer: Answer,
    job: Job | None,
    downloader: HttpDownloader,
    started: float,
    *,
    model: str,
    estimated: float | None,
    warnings: tuple[ConversionWarning, ...] = (),
    attempts: tuple[Attempt, ...] = (),
    request_id: str | None = None,
    requested_format: str | None = None,
) -> EditResult:
    """The `EditResult` of *answer*, its cost the provider's own figure where it can be.

    The provider's figure is believed only when it makes a dollar amount that can be one: finite
    and not negative (a hostile or broken answer cannot credit the caller or overflow a budget).
    """
    usage = _merged(job.usage if job is not None else None, answer.usage)
    guarded = downloader.guarded(binding.guard)  # its URLs checked as this provider's
    rate = getattr(binding.adapter, "usd_per_credit", None)
    cost: float | None = None
    source: Literal["provider", "price table"] | None = None
    reported = _reported_cost(usage, rate)
    if reported is not None:
        cost, source = reported, "provider"
    elif estimated is not None:
        cost, source = estimated, "price table"
    # Made as EditResult(...) makes it, without the dict of keyword arguments a class call
    # builds (a third of the cost; tests/test_async_per_edit.py holds why it is the same).
    result = object.__new__(EditResult)
    EditResult.__init__(
        result,
        provider=binding.adapter.name,
        model=model,
        images=tuple(
            [
                image.fetched_with(guarded, declared_format=requested_format)
                for image in answer.images
            ]
        ),
        usage=usage,
        cost_usd=cost,
        cost_source=source,
        warnings=warnings,
        attempts=attempts,
        elapsed_s=time.perf_counter() - started,
        job=job,
        request_id=request_id,
    )
    return result


def _reported_cost(usage: Usage | None, rate: object) -> float | None:
    """Dollars from the credits the provider reported, when they make a finite amount >= 0."""
    if usage is None or not is_number(usage.credits_used) or not is_number(rate):
        return None
    dollars = float(usage.credits_used) * float(rate)
    if not (math.isfinite(dollars) and dollars >= 0):
        return None
    return dollars + 0.0  # -0.0 becomes 0.0


def _merged(first: Usage | None, then: Usage | None) -> Usage | None:
    """*then*'s figures, and *first*'s where *then* has none (a job's submit, then its result)."""
    if first is None or then is None:
        return then or first
    from flux_adapters.result import Usage

    return Usage(
        **{
            name: getattr(then, name) if getattr(then, name) is not None else getattr(first, name)
            for name in ("credits_used", "tokens_used", "input_mp", "output_mp")
        }
    )


def _note_exchange(
    binding: _Binding, outgoing: HttpRequest, started: float, outcome: HttpResponse | FluxError
) -> None:
    """Log one exchange at DEBUG: what was sent where, and what came back (never the key)."""
    if not LOGGER.isEnabledFor(logging.DEBUG):
        return
    from flux_adapters.wire import HttpResponse

    seconds = time.perf_counter() - started
    if isinstance(outcome, HttpResponse):
        result = f"HTTP {outcome.status_code}"
    else:
        sent = getattr(outcome, "sent", None)
        result = f"{type(outcome).__name__}{'' if sent is None else f' (sent={sent})'}"
    note(
        logging.DEBUG,
        "exchange",
        binding.scrub,
        "%s %s %s %s -> %s in %.3f s",
        binding.adapter.name,
        outgoing.role,
        outgoing.method,
        outgoing.url,
        result,
        seconds,
    )


def _note_wait(binding: _Binding, sleep: Sleep) -> None:
    note(
        logging.DEBUG,
        "wait",
        binding.scrub,
        "%s: waiting %.2f s before asking about the job again",
        binding.adapter.name,
        sleep.seconds,
    )


def _note_accepted(binding: _Binding, accepted: Accepted) -> None:
    note(
        logging.INFO,
        "accepted",
        binding.scrub,
        "%s accepted the job as %s; it is polled, never submitted again",
        binding.adapter.name,
        accepted.job.id,
    )


def _noted(interruption: BaseException, stop: StopJob, scrub: Redactor) -> None:
    """Add to *interruption* (Ctrl-C, a cancelled task) what became of the job it cut short.

    A job the provider took is also the interruption's ``job``, as it is every `FluxError`'s
    after a submit: the note says it in words, this is what ``client.resume(job)`` takes (a job
    that goes on, at a provider with no cancel, is still billed).
    """
    from flux_adapters._display import escape_controls

    if stop.job is not None:
        interruption.job = stop.job  # type: ignore[attr-defined]
    said = stop.note(scrub)
    if said is not None:
        interruption.add_note(f"flux-adapters: {escape_controls(said)}")


def _submitting(
    stop: StopJob, binding: _Binding, instruction: object, *, unsent: bool = False
) -> StopJob:
    """*stop*, naming the provider when its paid request was under way and no job was taken.

    *instruction* is the flow's last: a submit (a synchronous provider's one call included) is
    under way from the moment the flow asked for it until the flow asks for something else.
    *unsent*: the submit was cut short before its body's last byte was handed over, in the
    thread that sends (`_Sending.unsent`): the provider cannot have it.
    """
    from flux_adapters.wire import HttpRequest

    if stop.job is None and isinstance(instruction, HttpRequest) and instruction.role == "submit":
        stop.submitting = binding.adapter.name
        stop.unsent = unsent
    return stop


class _Sending:
    """The counted body of the submit `FluxClient._drive` is sending, if it can be counted.

    Counted only when the client sends in the caller's thread (`sends_here`) and the body is
    streamed (`counted_body`): then Ctrl-C stops the send where it is, and a body whose last
    byte was not handed over proves the provider has no whole request (the money rule's "not
    taken", as a write timeout). Otherwise ``None``: it cannot be told.
    """

    __slots__ = ("body",)

    def __init__(self) -> None:
        self.body: CountedBody | None = None

    @property
    def unsent(self) -> bool:
        """Whether the body is counted and its send was stopped within the body's part.

        Not once an answer is awaited (`CountedBody.cut_short`), nor once one came
        (`FluxClient._send` forgets the body then).
        """
        return self.body is not None and self.body.cut_short


def _unanswered(stop: StopJob) -> StopJob:
    """*stop* when its job's cancel was itself cut short: no answer, the job may go on."""
    stop.cancelled = False
    return stop


def _adapter_of(binding: object) -> AnyAdapter:
    assert isinstance(binding, _Binding)
    return binding.adapter


class FluxClient(_ClientBase):
    """Send `EditRequest` values to one provider, or to several with failover.

    Args:
        provider: One provider: a built-in id (``"laozhang"``, ``"apiyi"``,
            ``"apiyi-multipart"``, ``"aimlapi"``, ``"bfl"``, ``"fal"``; any case at run time),
            ``ProviderName("nimbus")`` for one an installed package or ``register_provider``
            added, or an adapter object. Its errors are raised as they are.
        providers: Several of them, in failover order (see `flux_adapters.routing`).
        routing: ``"ordered"`` or ``"cheapest"`` (by the price table), with *providers*.
        api_key: The key, with *provider*; else read from ``<PROVIDER>_API_KEY``
            (``APIYI_API_KEY`` for both apiyi dialects). Whitespace or a line break around the
            key is refused (not stripped), naming the variable.
        base_url: The base URL, with *provider*, with or without ``/v1``; else
            ``<PROVIDER>_BASE_URL``, else the provider's real one.
        http_client: An ``httpx.Client`` of yours (proxies, transports, tests); not closed here.
            Its timeout is used unless *timeout* is given (see below).
        timeout: Seconds (also the deadline), or an ``httpx.Timeout`` per phase. Which applies,
            first found: this argument (`from_env`: the configured ``timeout``); the provider's
            ``timeout`` in *settings*; the timeout of *http_client*, unless it is httpx's own
            default (``httpx.Client()``'s five seconds, which cannot wait for an image); else
            `DEFAULT_TIMEOUT`, suited to image generation. No phase outlasts the deadline.
        deadline: Seconds one exchange may take in all, answer included (default: a number given
            as *timeout*, else `DEFAULT_DEADLINE`); bounds servers that answer a byte at a time.
        max_retries: Further tries at the same provider, 0 to `MAX_RETRIES`, after a failure
            that proves the job was not taken and may pass: a refused connection, a 429, a 503
            when no other provider is left (`flux_adapters.routing.BILLING_RULES`). Never after
            one that may have been billed (a 500, 502, 504, a timeout after sending). Each
            waits the provider's ``Retry-After`` (a longer one than ``policy.max_retry_wait``,
            or than the deadline, is not waited for), else a jittered backoff. Default: 0 with
            one provider, 1 with several; overrides ``policy.retries``.
        max_cost_usd: Skip providers whose estimated price for the call exceeds this.
        failover_on_ambiguous: Fail over even after a failure that may have been billed.
        policy: Full routing settings, *routing*, *max_cost_usd* and *failover_on_ambiguous*
            included (given beside it, any of those is a `ConfigurationError`).
        prices: Price overrides by (provider, model); each provider and model must be one that
            can match (any case for the provider).
        settings: `ProviderSettings` by provider id (any case), for this client's providers,
            checked as the configuration file is; their ``prices`` join *prices* (which win),
            and a ``priority`` orders the providers as in the file (lower first, then those
            without one, each group in the order given).
        polling: How jobs at asynchronous providers (``"bfl"``, ``"fal"``) are polled, and the
            deadline of a whole job (default `Polling()`: ten minutes).
        state: Where cooldowns, budgets and rate limits are kept and shared
            (`flux_adapters.state`): ``"local"`` (this process's), ``"redis://..."`` (every
            process using that Redis; the ``redis`` extra), or a backend object. Default: the
            client's own cooldowns only, unless *budget_usd* or a provider's
            ``rate_per_minute`` asks for the process's shared state. docs/scaling.md.
        budget_usd: A cumulative budget in dollars over *budget_period* (``"total"`` or
            ``"day"``, a UTC day by the state's clock) for *budget_scope*, shared by every
            client using the same state and scope: each try reserves its estimate before
            sending (a provider without a known price is skipped) and settles its actual cost
            after, so together they never pass it by more than one call's price. A call with no
            room raises `errors.BudgetExceeded` before anything is sent.
        state_fallback: ``"none"`` (default): when Redis does not answer in time, the call fails
            with `errors.StateUnavailable` before sending (fail closed); ``"local"``: this
            process's own state is used instead, with one WARNING.

    Every argument is checked here, whatever its type, so a mistake is a `ConfigurationError`
    now rather than a failure at the first call. For type checkers, *provider* is typed as
    ``ProviderId | ProviderName | adapter`` rather than ``str``: ``mypy --strict`` then flags
    ``FluxClient("laozang")``, while a provider known only at run time is named on purpose
    (``FluxClient(ProviderName("nimbus"))``, a name read from configuration likewise, or its
    adapter object). A plain ``str`` fallback would have let every typo through.

    `with_options` makes a light copy with another *timeout* or *max_retries*. The client logs
    its routing decisions to the ``flux_adapters`` logger (``FLUX_LOG=info|debug``).

    Raises:
        ConfigurationError: Unknown provider (with a "did you mean"), no API key, or any argument
            that is not usable.
    """

    _http: httpx.Client

    def _sender_closed(self) -> bool:
        return self._http.is_closed

    def __init__(
        self,
        provider: Provider | None = None,
        *,
        providers: Sequence[Provider] | None = None,
        routing: Routing = "ordered",
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: httpx.Client | None = None,
        timeout: httpx.Timeout | float | None = None,
        deadline: float | None = None,
        max_retries: int | None = None,
        max_cost_usd: float | None = None,
        failover_on_ambiguous: bool = False,
        policy: RoutingPolicy | None = None,
        prices: Mapping[tuple[str, str], Price] | None = None,
        settings: Mapping[str, ProviderSettings] | None = None,
        polling: Polling | None = None,
        state: str | StateBackend | None = None,
        budget_usd: float | None = None,
        budget_period: Literal["day", "total"] = "total",
        budget_scope: str = "client:default",
        state_fallback: Literal["none", "local"] = "none",
    ) -> None:
        if http_client is not None and not isinstance(http_client, httpx.Client):
            raise ConfigurationError(
                f"http_client= must be an httpx.Client, not {type(http_client).__name__}"
                + (" (use AsyncFluxClient)" if isinstance(http_client, httpx.AsyncClient) else "")
            )
        super().__init__(
            provider,
            providers,
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            deadline=deadline,
            max_retries=max_retries,
            routing=routing,
            max_cost_usd=max_cost_usd,
            failover_on_ambiguous=failover_on_ambiguous,
            policy=policy,
            prices=prices,
            settings=settings,
            polling=polling,
            inherited=_callers_timeout(http_client),
            state=state,
            budget_usd=budget_usd,
            budget_period=budget_period,
            budget_scope=budget_scope,
            state_fallback=state_fallback,
        )
        from flux_adapters._transport import ParsedUrls, bounded_http_client

        self._own_http = http_client is None
        self._http = http_client if http_client is not None else bounded_http_client()
        self._urls = ParsedUrls()  # shared with with_options copies: same pool, same endpoints
        self._job_sleep: Callable[[float], None] = time.sleep
        """How a job's waits are spent (private, with `_job_clock`)."""
        self._download_sleep: Callable[[float], None] = time.sleep
        """How the pauses between a download's tries are spent (private)."""

    def _new_downloader(self) -> HttpDownloader:
        from flux_adapters._download import HttpDownloader

        return HttpDownloader(
            provider=self.provider,
            sync_client=self._http,
            deadline=self._downloader_deadline(),
            scrub=self._scrub,
            sleep=lambda seconds: self._download_sleep(seconds),  # read when it waits
        )

    def edit(self, request: EditRequest) -> EditResult:
        """Send *request* (failing over as configured) and return the images.

        Raises:
            RequestError: The request breaks the provider's limits; nothing was sent.
            ProviderError: The provider answered with an error (a subclass says which).
            TransportError: No usable answer; ``sent`` says whether it may be billed.
            AllProvidersFailed: With several providers, none produced the image.
            ClientClosedError: The client is closed (also a `ConfigurationError`); nothing sent.
        """
        started = time.perf_counter()
        router = self._start(request)
        pending: Admitted | None = None  # a shared admission not yet settled
        try:
            instruction = next(router)
            while True:
                if isinstance(instruction, Try):
                    reply: Reply = self._attempt(instruction.candidate, request, instruction.plan)
                elif isinstance(instruction, Wait):
                    time.sleep(instruction.seconds)
                    reply = None
                elif isinstance(instruction, Admit):
                    try:
                        reply = self._admit(instruction)
                    except StateUnavailable as lost:  # the router adds the tries made before
                        router.throw(lost)
                        raise
                    pending = reply if isinstance(reply, Admitted) else None
                else:
                    reply = self._settle(instruction)
                    if instruction.result != "none":
                        pending = None
                instruction = router.send(reply)
        except StopIteration as done:
            routed: Routed = done.value
        finally:
            router.close()  # an exception here still ends the route (and releases its probe)
            if pending is not None:
                self._release(pending)
        return self._result(request, routed, started, self._downloader)

    def _admit(self, admit: Admit) -> Reply:
        assert self._shared is not None
        return self._shared.admit_blocking(admit, self._route_policy)

    def _settle(self, settle: Settle) -> Reply:
        assert self._shared is not None
        return self._shared.settle_blocking(settle, self._route_policy)

    def _release(self, pending: Admitted) -> None:
        assert self._shared is not None
        self._shared.release_blocking(pending)

    def resume(self, job: Job) -> EditResult:
        """Poll *job*, accepted earlier, until it is done, and return its images; nothing is paid.

        *job* is an error's ``job`` (`JobTimeout`, a lost connection, ...) or one a batch
        journal kept. The job gets a new deadline (``polling.deadline``) from now.

        Raises:
            ConfigurationError: *job* is not a `Job` that can be polled, or this client has not
                its provider; nothing was sent.
            ClientClosedError: The client is closed; nothing was sent.
            JobError: The job ended without an image (moderated, failed, unknown) or passed its
                deadline again.
            ProviderError: A poll was refused for good (a revoked key, say).
        """
        binding = self._job_binding(job)
        from flux_adapters._flows import job_request_id  # loaded by _job_binding
        from flux_adapters.jobs import _readable_job

        job = _readable_job(job)  # its odd usage or time must not lose the paid image
        started = time.perf_counter()
        answer = self._drive(binding, self._follow(binding, job))
        return _result(
            binding,
            answer,
            job,
            self._downloader,
            started,
            model=job.model,
            estimated=None,
            request_id=job_request_id(job, (binding.api_key,)),
        )

    def _attempt(self, binding: object, request: EditRequest, plan: Plan) -> Outcome | FluxError:
        assert isinstance(binding, _Binding)
        flow = self._flow(binding, request, plan)
        try:
            return self._drive(binding, flow)
        except ClientClosedError:
            raise  # no other provider can be tried either: the whole call ends here
        except FluxError as error:
            return error

    def _drive(self, binding: _Binding, flow: _Steps[_T]) -> _T:
        """Perform what *flow* asks, in this thread; its result.

        A failure to send or read an exchange is thrown into the flow: a job's poll is then
        tried again, and any error after its submit was accepted carries the job (so that it is
        never judged as a call of its own, which could fail over and pay twice). Ctrl-C lets the
        flow cancel its job, if the provider took one and can, before it propagates.
        """
        instruction: HttpRequest | Sleep | Accepted | None = None  # for an interruption
        accepted: Job | None = None  # the job the flow saw taken, if any: for an interruption
        sending = _Sending()
        try:
            instruction = next(flow)
            while True:
                sending.body = None
                if isinstance(instruction, Accepted):
                    accepted = instruction.job
                try:
                    reply = self._perform(binding, instruction, sending)
                except FluxError as error:  # the flow judges it, and attaches its job if any
                    instruction = flow.throw(error)
                else:
                    instruction = flow.send(reply)
        except StopIteration as finished:
            result: _T = finished.value
            return result
        except FluxError as error:
            _say_key_withheld(binding, instruction, error)
            raise
        except KeyboardInterrupt as interrupt:
            unsent = sending.unsent
            stop = self._stop(binding, flow, accepted)
            stop = _submitting(stop, binding, instruction, unsent=unsent)
            _noted(interrupt, stop, binding.key_only)
            raise
        finally:
            flow.close()

    def _perform(
        self, binding: _Binding, instruction: HttpRequest | Sleep | Accepted, sending: _Sending
    ) -> HttpResponse | None:
        if isinstance(instruction, Sleep):
            _note_wait(binding, instruction)
            self._job_sleep(instruction.seconds)
            return None
        if isinstance(instruction, Accepted):
            _note_accepted(binding, instruction)
            return None
        started = time.perf_counter()
        try:
            response = self._send(binding, instruction, sending)
        except FluxError as error:
            _note_exchange(binding, instruction, started, error)
            raise
        _note_exchange(binding, instruction, started, response)
        return response

    def _stop(self, binding: _Binding, flow: _Steps[Any], accepted: Job | None) -> StopJob:
        """The caller stopped waiting: let *flow* cancel its job (each cancel bounded).

        Ctrl-C may land in the flow's own code rather than in a wait or an exchange: the flow
        has then ended with it, and cannot cancel the job it had (*accepted*): the job is
        cancelled here instead, as the flow would have.

        Returns the `StopJob` thrown in, which says what became of the job.
        """
        from flux_adapters._flows import cancel_steps
        from flux_adapters.jobs import StopJob

        stop = StopJob()
        ended = getattr(flow, "gi_frame", False) is None  # the interruption ended it
        self._cancelling(binding, flow, stop, flow.throw, stop)
        if ended and stop.job is None and accepted is not None:
            stop.job = accepted
            adapter = cast("JobAdapter", binding.adapter)  # it took a job: it runs jobs
            steps = cancel_steps(adapter, accepted, stop)
            self._cancelling(binding, steps, stop, steps.send, None)
        return stop

    def _cancelling(
        self,
        binding: _Binding,
        steps: _Steps[Any],
        stop: StopJob,
        first: Callable[[Any], object],
        given: object,
    ) -> None:
        """Send the cancels *steps* ask for, starting with ``first(given)``, till they end."""
        from flux_adapters.jobs import StopJob
        from flux_adapters.wire import HttpRequest

        try:
            instruction = first(given)
            while isinstance(instruction, HttpRequest) and instruction.role == "cancel":
                try:
                    reply = self._send(binding, instruction)
                except FluxError as error:
                    instruction = steps.throw(error)
                except KeyboardInterrupt as again:  # Ctrl-C again: the job must still be named
                    _noted(again, _unanswered(stop), binding.key_only)
                    raise
                else:
                    instruction = steps.send(reply)
        except (StopJob, StopIteration, FluxError):
            pass

    def _send(
        self, binding: _Binding, outgoing: HttpRequest, sending: _Sending | None = None
    ) -> HttpResponse:
        if outgoing.role == "submit" or binding.guard is None:
            return self._send_now(binding, outgoing, sending)
        # A URL the provider gave (a poll, a fetch, a cancel): where it may lead is checked.
        from flux_adapters._addresses import GUARDED
        from flux_adapters._bounded import needs_lookup

        target = _target(binding, outgoing)
        if target is not None and needs_lookup(self._http, outgoing.url):
            target.check_resolved()
        token = GUARDED.set(target)
        try:
            return self._send_now(binding, outgoing, sending)
        finally:
            GUARDED.reset(token)

    def _send_now(
        self, binding: _Binding, outgoing: HttpRequest, sending: _Sending | None = None
    ) -> HttpResponse:
        name = binding.adapter.name
        seconds = binding.limit(outgoing)
        ends = time.monotonic() + seconds
        self._check_open()  # closed while a call was under way (by another thread)
        response: httpx.Response | None = None
        try:
            with (
                contextlib.ExitStack() as files,
                mapped_transport_errors(name, binding.scrub),
                bounded_by(ends, name, seconds),
            ):
                request = httpx_request(self._http, _exchange(binding, outgoing), files, self._urls)
                if sending is not None and outgoing.role == "submit":
                    counted = counted_body(request)  # how far it got, if Ctrl-C cuts it
                    if counted is not None and sends_here(self._http):
                        sending.body = counted
                # Redirects are never followed, whatever the caller's client says: a 307/308
                # would send the paid POST again (and its images to another origin); a 3xx is
                # judged by its status. A caller's client-level auth never replaces the
                # provider's key. A server dripping its headers cannot hold the call past the
                # deadline.
                try:
                    response = send_within(self._http, request, ends, name, seconds)
                except RuntimeError as exc:
                    instead = self._closed_instead(exc)
                    if instead is exc:
                        raise
                    raise instead from exc
                if sending is not None:
                    # An answer came, maybe before the body's end (a server may answer, and
                    # take a job, without reading all of it): the body's count proves no more.
                    sending.body = None
                try:
                    body = AnswerBody(response, name, seconds, ends, binding.scrub)
                    try:
                        for chunk in iter_decoded(response):
                            if not body.take(chunk):
                                break
                    except httpx.DecodingError as exc:
                        if body.judged_by_status():
                            return body.finish()
                        raise body.unreadable("the answer could not be decoded") from exc
                    except httpx.TransportError:
                        if body.judged_by_status():  # an error's head: its status decides
                            return body.finish()
                        raise
                    return body.finish()
                finally:
                    response.close()
        except FluxError as error:  # the answer was cut short: its head names it (request id)
            if response is not None:
                with_answer(error, response, binding.scrub)
            raise

    def close(self) -> None:
        """Close this client: any later call raises `ClientClosedError`.

        Closes its httpx client too when it made it (not one you passed as ``http_client``,
        nor the pool a `with_options` copy shares). Closing it again does nothing. Images of
        results already returned can still be saved: they download with a short-lived client.
        """
        self._lifetime.close()
        if self._own_http:
            self._http.close()
        if self._shared is not None:
            self._shared.close_blocking()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class AsyncFluxClient(_ClientBase):
    """Async twin of `FluxClient`: same arguments, same routing, same errors.

    ``http_client`` is an ``httpx.AsyncClient`` (its timeout is used unless *timeout* is given,
    as with `FluxClient`). `edit_many` runs a batch; `with_options` makes a light copy.

    It sends with one of two drivers, the same flows and errors on each (`driver` says which):

    - ``"aiohttp"``, when aiohttp is installed (the ``fast`` extra), no *http_client* is given
      and no proxy is set in the environment: aiohttp directly, without httpx's request and
      response objects on top (docs/benchmarks.md has the figures);
    - ``"httpx"`` otherwise: *http_client* as it is, or the library's own small httpx pools
      (8 connections each, up to 100, all kept alive) with a queue in front of them.

    *driver* (``"auto"``, ``"aiohttp"`` or ``"httpx"``; default ``$FLUX_ASYNC_DRIVER``, else
    ``"auto"``) forces one. Either way, without an *http_client*, at most 100 exchanges of a
    client are in flight at once; the rest wait their turn, no longer than the pool timeout
    (then a `errors.Timeout` with ``sent=False``).

    Raises:
        ConfigurationError: As `FluxClient`; or *driver* (or ``$FLUX_ASYNC_DRIVER``) is not a
            driver, or is ``"aiohttp"`` with an *http_client*.
        MissingExtraError: *driver* is ``"aiohttp"`` and aiohttp is not installed.
    """

    _driver: AsyncDriver

    def __init__(
        self,
        provider: Provider | None = None,
        *,
        providers: Sequence[Provider] | None = None,
        routing: Routing = "ordered",
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout | float | None = None,
        deadline: float | None = None,
        max_retries: int | None = None,
        max_cost_usd: float | None = None,
        failover_on_ambiguous: bool = False,
        policy: RoutingPolicy | None = None,
        prices: Mapping[tuple[str, str], Price] | None = None,
        settings: Mapping[str, ProviderSettings] | None = None,
        polling: Polling | None = None,
        state: str | StateBackend | None = None,
        budget_usd: float | None = None,
        budget_period: Literal["day", "total"] = "total",
        budget_scope: str = "client:default",
        state_fallback: Literal["none", "local"] = "none",
        driver: Literal["auto", "aiohttp", "httpx"] | None = None,
    ) -> None:
        if http_client is not None and not isinstance(http_client, httpx.AsyncClient):
            raise ConfigurationError(
                f"http_client= must be an httpx.AsyncClient, not {type(http_client).__name__}"
                + (" (use FluxClient)" if isinstance(http_client, httpx.Client) else "")
            )
        super().__init__(
            provider,
            providers,
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            deadline=deadline,
            max_retries=max_retries,
            routing=routing,
            max_cost_usd=max_cost_usd,
            failover_on_ambiguous=failover_on_ambiguous,
            policy=policy,
            prices=prices,
            settings=settings,
            polling=polling,
            inherited=_callers_timeout(http_client),
            state=state,
            budget_usd=budget_usd,
            budget_period=budget_period,
            budget_scope=budget_scope,
            state_fallback=state_fallback,
        )
        self._own_http = http_client is None
        _load_asyncio()
        from flux_adapters._drivers import HttpxDriver, choose
        from flux_adapters._transport import LoopBinding

        chosen = choose(_plain(driver), http_client)
        if http_client is not None:
            self._driver = HttpxDriver(http_client)
        elif chosen == "aiohttp":
            from flux_adapters._aiohttp import AiohttpDriver  # lazy: aiohttp only for this driver

            self._driver = AiohttpDriver()
        else:
            self._driver = HttpxDriver()
        self._loop = LoopBinding()

    @property
    def driver(self) -> DriverName:
        """What this client sends with: ``"aiohttp"`` or ``"httpx"`` (see the class)."""
        return self._driver.name

    def _sender_closed(self) -> bool:
        return self._driver.is_closed

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, driver={self.driver!r})"

    def _new_downloader(self) -> HttpDownloader:
        from flux_adapters._download import HttpDownloader

        return HttpDownloader(
            provider=self.provider,
            async_client=self._driver,
            async_loop=self._loop,
            deadline=self._downloader_deadline(),
            scrub=self._scrub,
        )

    async def edit(self, request: EditRequest) -> EditResult:
        """Send *request* (failing over as configured) and return the images; see `FluxClient.edit`."""
        return await self._edit(request, None)

    async def _edit(self, request: EditRequest, watcher: Watcher | None) -> EditResult:
        started = time.perf_counter()
        router = self._start(request)
        try:
            self._claim_loop()
        except ConfigurationError:
            router.close()
            raise
        pending: Admitted | None = None  # a shared admission not yet settled
        try:
            instruction = next(router)
            while True:
                if isinstance(instruction, Try):
                    reply: Reply = await self._attempt(
                        instruction.candidate, request, instruction.plan, watcher
                    )
                elif isinstance(instruction, Wait):
                    await asyncio.sleep(instruction.seconds)
                    reply = None
                elif isinstance(instruction, Admit):
                    try:
                        reply = await self._admit(instruction)
                    except StateUnavailable as lost:  # the router adds the tries made before
                        router.throw(lost)
                        raise
                    pending = reply if isinstance(reply, Admitted) else None
                else:
                    reply = await self._settle(instruction)
                    if instruction.result != "none":
                        pending = None
                instruction = router.send(reply)
        except StopIteration as done:
            routed: Routed = done.value
        finally:
            router.close()  # cancelled (asyncio.wait_for) or failed: the route releases its probe
            if pending is not None:
                await self._release(pending)
        return self._result(request, routed, started, self._downloader)

    async def _admit(self, admit: Admit) -> Reply:
        assert self._shared is not None
        return await self._shared.admit_async(admit, self._route_policy)

    async def _settle(self, settle: Settle) -> Reply:
        assert self._shared is not None
        return await self._shared.settle_async(settle, self._route_policy)

    async def _release(self, pending: Admitted) -> None:
        assert self._shared is not None
        await self._shared.release_async(pending)

    async def resume(self, job: Job) -> EditResult:
        """Poll *job*, accepted earlier, until it is done; see `FluxClient.resume`."""
        return await self._resume(job, None)

    async def _resume(self, job: Job, watcher: Watcher | None) -> EditResult:
        binding = self._job_binding(job)
        from flux_adapters._flows import job_request_id  # loaded by _job_binding
        from flux_adapters.jobs import _readable_job

        job = _readable_job(job)  # its odd usage or time must not lose the paid image
        self._claim_loop()
        started = time.perf_counter()
        name = binding.adapter.name
        try:
            answer = await self._drive(binding, self._follow(binding, job), watcher)
        except FluxError as error:
            if watcher is not None:
                watcher.finished(name, error, None, binding.key_only)
            raise
        if watcher is not None:
            watcher.finished(name, answer, None, binding.key_only)
        return _result(
            binding,
            answer,
            job,
            self._downloader,
            started,
            model=job.model,
            estimated=None,
            request_id=job_request_id(job, (binding.api_key,)),
        )

    async def _attempt(
        self, binding: object, request: EditRequest, plan: Plan, watcher: Watcher | None
    ) -> Outcome | FluxError:
        assert isinstance(binding, _Binding)
        name = binding.adapter.name
        gates = _GATES.get()
        gate = gates.get(name) if gates else None
        if gate is not None:
            await gate.acquire()
        try:
            flow = self._flow(binding, request, plan)
            reply: Outcome | FluxError
            try:
                reply = await self._drive(binding, flow, watcher)
            except ClientClosedError as error:  # no other provider can be tried either
                if watcher is not None:
                    watcher.finished(name, error, None, binding.key_only)
                raise
            except FluxError as error:
                reply = error
            if watcher is not None:
                not_taken = getattr(binding.adapter, "not_taken", None)
                watcher.finished(name, reply, not_taken, binding.key_only)
            return reply
        finally:
            if gate is not None:
                gate.release()

    async def _drive(self, binding: _Binding, flow: _Steps[_T], watcher: Watcher | None) -> _T:
        """Perform what *flow* asks; its result. See `FluxClient._drive`.

        The watcher hears of a submit before it goes (durably) and of the job it was accepted
        as. A cancelled task lets the flow cancel its job before the cancellation propagates.
        An exchange is performed here rather than in a coroutine of its own: one less coroutine
        on the path of every exchange; a wait and an accepted job go to `_between`.
        """
        instruction: HttpRequest | Sleep | Accepted | None = None  # for a cancellation
        try:
            instruction = next(flow)
            while True:
                try:
                    if isinstance(instruction, (Sleep, Accepted)):
                        await self._between(binding, instruction, watcher)
                        reply = None
                    else:
                        if instruction.role == "submit" and watcher is not None:
                            await watcher.sending(binding.adapter.name)  # durable before it goes
                        started = time.perf_counter()
                        try:
                            self._check_open()  # closed while a call was under way
                            try:
                                if instruction.role == "submit" or binding.guard is None:
                                    exchange = _exchange(binding, instruction)
                                    reply = await self._driver.exchange(exchange)
                                else:
                                    reply = await self._guarded(binding, instruction)
                            except RuntimeError as exc:  # a refusal to send: closed meanwhile
                                raise self._closed_instead(exc) from exc
                        except FluxError as error:
                            _note_exchange(binding, instruction, started, error)
                            raise
                        _note_exchange(binding, instruction, started, reply)
                except FluxError as error:  # the flow judges it, and attaches its job if any
                    instruction = flow.throw(error)
                else:
                    instruction = flow.send(reply)
        except StopIteration as finished:
            result: _T = finished.value
            return result
        except FluxError as error:
            _say_key_withheld(binding, instruction, error)
            raise
        except asyncio.CancelledError as cancelled:
            stop = await self._stop(binding, flow)
            _noted(cancelled, _submitting(stop, binding, instruction), binding.key_only)
            raise
        finally:
            flow.close()

    async def _between(
        self, binding: _Binding, instruction: Sleep | Accepted, watcher: Watcher | None
    ) -> None:
        """A wait the flow asked for, or a job it saw accepted (the watcher keeps it)."""
        if isinstance(instruction, Sleep):
            _note_wait(binding, instruction)
            await asyncio.sleep(instruction.seconds)
            return
        _note_accepted(binding, instruction)
        if watcher is not None:
            await watcher.accepted(binding.adapter.name, instruction.job)

    async def _stop(self, binding: _Binding, flow: _Steps[Any]) -> StopJob:
        """The caller stopped waiting: let *flow* cancel its job (each cancel bounded).

        Returns the `StopJob` thrown in, which says what became of the job.
        """
        from flux_adapters.jobs import StopJob
        from flux_adapters.wire import HttpRequest

        stop = StopJob()
        try:
            instruction = flow.throw(stop)
            while isinstance(instruction, HttpRequest) and instruction.role == "cancel":
                try:
                    reply = await self._send(binding, instruction)
                except FluxError as error:
                    instruction = flow.throw(error)
                except asyncio.CancelledError as again:  # cancelled again: still name the job
                    _noted(again, _unanswered(stop), binding.key_only)
                    raise
                else:
                    instruction = flow.send(reply)
        except (StopJob, StopIteration, FluxError):
            pass
        return stop

    async def _send(self, binding: _Binding, outgoing: HttpRequest) -> HttpResponse:
        self._check_open()  # closed while a call was under way
        try:
            if outgoing.role == "submit" or binding.guard is None:
                return await self._driver.exchange(_exchange(binding, outgoing))
            return await self._guarded(binding, outgoing)
        except RuntimeError as exc:  # a refusal to send on a client closed meanwhile
            raise self._closed_instead(exc) from exc

    async def _guarded(self, binding: _Binding, outgoing: HttpRequest) -> HttpResponse:
        """Send *outgoing*, a URL the provider gave (a poll...): where it may lead is checked."""
        from flux_adapters._addresses import GUARDED

        target = _target(binding, outgoing)
        if target is not None and self._driver.needs_lookup(outgoing.url):
            await target.acheck_resolved()
        token = GUARDED.set(target)
        try:
            return await self._driver.exchange(_exchange(binding, outgoing))
        finally:
            GUARDED.reset(token)

    def edit_many(
        self,
        requests: Iterable[EditRequest],
        *,
        concurrency: int = 8,
        per_provider: int | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        names: Iterable[str] | None = None,
        resend_unconfirmed: bool = False,
        force: bool = False,
        stop: asyncio.Event | None = None,
        grace: float = 30.0,
    ) -> AsyncGenerator[BatchItem, None]:
        """Run many edits at once; yield each `BatchItem` as soon as it finishes.

        With *output_dir*, each image is saved there the moment it is ready (result URLs expire
        in minutes) as ``<name>.<format>`` (``<name>-2.<format>`` ... for more), and a
        write-ahead journal in that folder (``.flux-journal.jsonl``) makes reruns safe: a job
        already saved is skipped; a job that may have been billed without an image saved
        (an ambiguous failure, or a crash after sending) is reported ``unconfirmed`` and not
        sent again unless *resend_unconfirmed*; a job whose request changed since it was sent is
        reported ``changed`` and not sent unless *force* (which also re-runs saved jobs).

        Args:
            requests: The edits, each routed as `edit` would; read lazily, one as a worker
                frees up. What the batch holds grows with the number of jobs only by a 16-byte
                digest of each name (to refuse one used twice: about 32 MB for a million) and,
                on a rerun, by a slot of 8 to 16 bytes for each job of earlier runs not yet
                taken up (what the journal knew of it waits in a file beside the journal, or in
                memory, about 300 bytes a job, where no file can be made there); the rest is
                bounded by *concurrency*.
            concurrency: Most edits in flight at once, 1 to 1000 (a worker task is made for
                each, however few the requests).
            per_provider: Most requests in flight at any one provider.
            output_dir: Where to save images and keep the journal.
            names: File names (without extension) for the requests, in order; default the
                index. Each must be a plain file name (no folder, no leading dot).
            resend_unconfirmed: Send again jobs that may have been billed already.
            force: Run again jobs already saved, and jobs whose request changed.
            stop: When set, no further job starts; those in flight get *grace* seconds to
                finish (their images are saved) before they are cancelled.
            grace: Seconds in-flight jobs may take after *stop* is set.

        Every failure of a job, of any kind, is yielded as that job's `BatchItem` with a typed
        error; the batch goes on.

        To stop reading early, close the iterator (``async with contextlib.aclosing(...)``, or
        ``await items.aclose()``): the jobs in flight are cancelled (a rerun reports those that
        were sent as unconfirmed) and the journal is released. An iterator left open but no
        longer read runs only the jobs in flight, and at most *concurrency* more whose items
        wait to be read.

        Raises:
            ClientClosedError: This client is closed.
            ConfigurationError: *requests* or *names* is not a list or iterable (one request, a
                string) or is in no order (a set; a dict as *requests*, which would give its
                keys), *concurrency*, *per_provider* or *grace* are not usable, the output
                folder cannot be used, another batch is writing to it, or a batch shared through
                Redis wrote to it and may have left jobs billed with no image (unless
                *resend_unconfirmed*); or, after the jobs already taken, *names* and
                *requests* turned out to have different lengths.
            Exception: Whatever the caller's *requests* or *names* iterable raised, once the
                jobs already taken have been yielded.
        """
        from flux_adapters._batch import run_batch  # lazy: only batches need it

        self._check_open()
        return run_batch(
            self,
            requests,
            concurrency=concurrency,
            per_provider=per_provider,
            output_dir=output_dir,
            names=names,
            resend_unconfirmed=resend_unconfirmed,
            force=force,
            stop=stop,
            grace=grace,
        )

    def _claim_loop(self) -> None:
        if not self._loop.claim():
            raise ConfigurationError(
                "this AsyncFluxClient was first used in another event loop, which its "
                "connections belong to; create the client inside the loop that uses it (in "
                "your async main, not around asyncio.run), or use FluxClient"
            )

    async def aclose(self) -> None:
        """Close this client: any later call raises `ClientClosedError`; see `FluxClient.close`.

        Its connections are closed in the event loop they belong to, the one that used the client
        first. Closed from another (``asyncio.run(client.aclose())`` after an
        ``asyncio.run(client.edit(...))``), it is closed for calls, and its connections are left
        to their loop, with a WARNING: they cannot be closed from here (httpx raised
        ``RuntimeError: Event loop is closed``).
        """
        self._lifetime.close()
        if self._own_http:
            if self._loop.claim():
                await self._driver.aclose()
            else:
                LOGGER.warning(
                    "an AsyncFluxClient was closed in another event loop than the one that used "
                    "it: its connections belong to that loop and are left to it; close the "
                    "client inside the loop that uses it (async with, in your async main)"
                )
        if self._shared is not None:
            await self._shared.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()


def image_extension(head: bytes) -> str:
    """The file extension for image bytes starting with *head* (``"bin"`` when unknown)."""
    return image_format(head) or "bin"
