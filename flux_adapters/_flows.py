"""Interaction patterns, each written once as a generator the sync and async clients both drive.

A flow yields the `HttpRequest` it wants sent and receives the `HttpResponse`, the way httpx's
``Auth.auth_flow`` does; it returns its outcome through ``StopIteration``. It does no I/O, so
every provider limit is enforced before the first request is yielded.
"""

from __future__ import annotations

from collections.abc import Generator

from attrs import frozen

from flux_adapters._display import render_value, type_name
from flux_adapters._redact import redact
from flux_adapters.errors import (
    FluxError,
    ProviderError,
    RequestError,
    ResponseFormatError,
    Violation,
)
from flux_adapters.limits import Plan, plan
from flux_adapters.providers import Adapter, Answer, get_adapter
from flux_adapters.request import EditRequest
from flux_adapters.wire import HttpRequest, HttpResponse

__all__ = ["Flow", "Outcome", "check", "edit_flow", "resolve"]


@frozen
class Outcome:
    """What a finished flow produced."""

    plan: Plan
    answer: Answer


Flow = Generator[HttpRequest, HttpResponse, Outcome]


def _not_a_request(value: object, provider: str) -> RequestError:
    violation = Violation(
        "request",
        f"must be an EditRequest, not {type_name(value)}",
        "an EditRequest",
        render_value(value),
    )
    return RequestError([violation], provider=provider)


def resolve(adapter: Adapter, request: EditRequest) -> Plan:
    """Check *request* against *adapter*'s limits and resolve it.

    Raises:
        RequestError: *request* is not an `EditRequest`, the provider does not offer the model,
            or the request breaks its limits.
    """
    if not issubclass(type(request), EditRequest):  # the real type: callers may pass anything
        raise _not_a_request(request, adapter.name)
    limits = adapter.limits.get(request.model)
    if limits is None:
        offered = ", ".join(adapter.limits) or "none"
        violation = Violation(
            "model", f"{adapter.name} does not offer {request.model}", offered, request.model
        )
        raise RequestError([violation], provider=adapter.name, model=request.model)
    return plan(request, limits)


def check(request: EditRequest, provider: str) -> tuple[Violation, ...]:
    """Return every way *request* breaks *provider*'s limits; empty when it would be sent.

    Pure: nothing is sent. The same check runs inside every ``edit`` call. The provider is
    looked up first, so a bad provider id is reported even when *request* is bad too.

    Raises:
        ConfigurationError: *provider* is not a known provider id (whatever its type).
        RequestError: *request* is not an `EditRequest`.
    """
    adapter = get_adapter(provider)
    if not issubclass(type(request), EditRequest):
        raise _not_a_request(request, adapter.name)
    try:
        resolve(adapter, request)
    except RequestError as error:
        return error.violations
    return ()


def edit_flow(
    adapter: Adapter,
    request: EditRequest,
    base_url: str,
    secrets: tuple[str, ...] = (),
    plan: Plan | None = None,
) -> Flow:
    """One synchronous call: POST the request, read the images from the answer.

    *plan* is the request already resolved against *adapter*'s limits (the router has one);
    without it the flow resolves the request itself. An adapter (perhaps from another package)
    that fails with an exception of its own gets a typed error in its place: before anything is
    sent, a `RequestError`; once an answer came, a `ResponseFormatError` (it may be billed),
    also for a `FluxError` that is not a `ProviderError` (a "not sent" `TransportError`, say).
    A `ProviderError` keeps its kind but carries the status the provider really sent.

    Raises:
        RequestError: Before anything is yielded, when the request breaks the provider's limits.
        ProviderError: The provider answered with an error (details redacted of *secrets*).
    """
    resolved = plan if plan is not None else resolve(adapter, request)
    try:
        outgoing = adapter.build_request(request, resolved, base_url)
    except FluxError:
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc)[:120]}"
        violation = Violation(
            "request", f"{adapter.name} could not build it", "an adapter bug", why
        )
        raise RequestError([violation], provider=adapter.name, model=request.model) from exc
    response = yield outgoing
    try:
        if not 200 <= response.status_code < 300:
            raise adapter.parse_error(response)
        answer = adapter.parse_response(response)
    except ProviderError as error:
        # The status the provider sent decides what the error proves (routing.billing_rule):
        # an adapter may not report another, nor turn a billed 2xx or 5xx into a 402 or 429.
        error.status_code = response.status_code
        if error.detail:
            error.detail = redact(error.detail, secrets)
        if error.code:
            error.code = redact(error.code, secrets)
        if isinstance(error, ResponseFormatError):
            error.excerpt = redact(error.excerpt, secrets)
        raise
    except Exception as exc:
        # Any other error, typed ones too (an adapter raising RequestError or TransportError
        # while reading the answer): the provider did answer, so it is judged by that answer's
        # status, never as "nothing was sent" (which would retry, or send it again later).
        raise ResponseFormatError(
            f"the {adapter.name} adapter could not read the answer ({type(exc).__name__})",
            provider=adapter.name,
            status_code=response.status_code,
        ) from exc
    return Outcome(plan=resolved, answer=answer)
