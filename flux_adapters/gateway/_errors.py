"""The library's errors as OpenAI-shaped error answers, with the billing judgement kept.

OpenAI's shape is ``{"error": {"message", "type", "param", "code"}}``; we add ``violations``
(for a 400 about the request: every one, per provider), ``provider``, ``provider_status``,
``may_be_billed`` and ``attempts``. The OpenAI SDKs retry 408, 409, 429 and 5xx by
themselves unless the answer says ``x-should-retry: false``: every answer after which a second
try could pay twice says so, and every answer that proves nothing was taken says
``x-should-retry: true``. docs/gateway.md has the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from attrs import frozen

from flux_adapters import errors
from flux_adapters.result import Attempt

__all__ = [
    "Answer",
    "error_answer",
    "kept_tries",
    "openai_error",
    "violations_answer",
]


@frozen
class Answer:
    """An error answer: status, JSON body, extra headers."""

    status: int
    body: dict[str, object]
    headers: dict[str, str]


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    retry: bool | None = None,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> Answer:
    """An answer in OpenAI's error shape; *retry* sets ``x-should-retry``."""
    body: dict[str, object] = {"message": message, "type": type_, "param": param, "code": code}
    body.update(extra)
    out = dict(headers or {})
    if retry is not None:
        out["x-should-retry"] = "true" if retry else "false"
    return Answer(status, {"error": body}, out)


def shutting_down() -> Answer:
    """The answer to a call the gateway takes no more, as it stops: nothing was sent."""
    return openai_error(
        503,
        "the gateway is shutting down (nothing sent)",
        type_="server_error",
        code="shutting_down",
        retry=True,
        may_be_billed=False,
    )


def _violation(v: errors.Violation, provider: str | None) -> dict[str, object]:
    return {
        "provider": provider,
        "field": v.field,
        "message": v.message,
        "limit": v.limit,
        "value": v.value,
    }


def violations_answer(
    found: Sequence[tuple[errors.Violation, str | None]], *, note: str = ""
) -> Answer:
    """A 400 listing every violation (each with the provider whose limit it breaks, if any)."""
    lines = "; ".join(
        (f"{provider}: " if provider else "") + str(violation) for violation, provider in found
    )
    count = len(found)
    return openai_error(
        400,
        f"{count} problem{'s' if count != 1 else ''} with the request{note}: {lines}",
        code="invalid_request",
        param=found[0][0].field if found else None,
        retry=False,
        violations=[_violation(v, p) for v, p in found],
    )


_MAY_BE_BILLED: Final = (
    " The provider may have done, and billed, the job: it was not retried elsewhere; "
    "do not resend it blindly."
)
_FAILED_OVER_MAY_BE_BILLED: Final = (
    " A provider tried may have done, and billed, the job before the next was tried "
    "(failover_on_ambiguous; see attempts); do not resend it blindly."
)


def _may_be_billed(error: errors.FluxError) -> bool:
    from flux_adapters.routing import billing_rule

    return billing_rule(error).proves == "may be billed"


def kept_tries(attempts: Sequence[Attempt], error: errors.FluxError | None = None) -> int:
    """How many tries of a call (its *attempts*, and *error*, its end) a budget keeps.

    Each is a try that may have been billed, by the router's own rule, as the library's budgets
    count them (each try reserves its own estimate): with ``failover_on_ambiguous`` a call can
    pay more than once. Wider than ``may_be_billed``: a job the provider accepted and then
    moderated is not "may be billed" for a resend (it will not pass anywhere), but fal bills
    it, so a budget keeps its reservation (`flux_adapters.routing`).
    """
    from flux_adapters.routing import _charge, billing_rule

    failures = [a.error for a in attempts if a.outcome == "failed" and a.error is not None]
    if error is None or isinstance(error, errors.AllProvidersFailed):
        pass  # no end of its own: every try is in its attempts
    elif not any(failure is error for failure in failures):
        failures.append(error)
    return sum(1 for e in failures if _charge(billing_rule(e), e) == "keep")


def _attempts(attempts: Sequence[Attempt]) -> list[dict[str, object]]:
    return [
        {
            "provider": a.provider,
            "outcome": a.outcome,
            "billing": a.billing or None,
            "error": None if a.error is None else type(a.error).__name__,
            "status": getattr(a.error, "status_code", None),
            "reason": a.reason or None,
            "available_in_s": a.available_in_s,
        }
        for a in attempts
    ]


def _retry_after(error: errors.FluxError) -> dict[str, str]:
    seconds = getattr(error, "retry_after", None)
    if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0:
        return {"retry-after": str(max(1, math.ceil(seconds)))}
    return {}


def error_answer(error: errors.FluxError) -> Answer:
    """The answer for *error*, raised by `AsyncFluxClient.edit`.

    Marked ``may_be_billed`` when any try of the call may have been billed: with
    ``failover_on_ambiguous`` an earlier provider's 500 may be followed by a final refusal of
    the next one, and the refusal alone would say that nothing was billed.
    """
    if isinstance(error, errors.AllProvidersFailed):
        return _all_failed(error)
    answer = _answer(error)
    if answer.body["error"].get("may_be_billed") is True:  # type: ignore[attr-defined]
        return answer
    attempts: Sequence[Attempt] = getattr(error, "attempts", ()) or ()
    return _marked(answer, str(error), attempts) if _billed_before(attempts) else answer


def _billed_before(attempts: Sequence[Attempt]) -> bool:
    """Whether a try among *attempts* failed in a way that may have billed the job."""
    return any(
        a.outcome == "failed" and a.error is not None and _may_be_billed(a.error) for a in attempts
    )


def _answer(error: errors.FluxError) -> Answer:
    """The answer for *error* itself, not AllProvidersFailed (see `error_answer`)."""
    attempts: Sequence[Attempt] = getattr(error, "attempts", ()) or ()
    extra: dict[str, Any] = {"attempts": _attempts(attempts)} if attempts else {}
    if isinstance(error, errors.RequestError):
        return violations_answer([(v, error.provider) for v in error.violations])
    provider = getattr(error, "provider", None)
    status = getattr(error, "status_code", None)
    common: dict[str, Any] = {"provider": provider, "provider_status": status, **extra}
    text = str(error)
    if isinstance(error, errors.BudgetExceeded):  # the configured (client) budget: nothing sent
        return openai_error(
            429,
            text,
            type_="insufficient_quota",
            code="gateway_budget_exceeded",
            retry=False,
            may_be_billed=False,
        )
    if isinstance(error, errors.StateUnavailable):  # raised before sending: nothing sent
        billed = [
            a.error
            for a in attempts
            if a.outcome == "failed" and a.error is not None and _may_be_billed(a.error)
        ]
        if billed:  # ... this time; an earlier try (failover_on_ambiguous) may have been billed
            return _ambiguous(billed[-1], text, common)
        return openai_error(
            503,
            text,
            type_="server_error",
            code="state_unavailable",
            retry=True,
            may_be_billed=False,
        )
    if isinstance(error, errors.ClientClosedError):  # its clients closed as it stops
        return shutting_down()
    if isinstance(error, errors.ConfigurationError):
        return openai_error(400, text, code="invalid_request", retry=False)
    if isinstance(error, errors.ContentModerated | errors.Moderated):
        return openai_error(
            400, text, code="content_policy_violation", retry=False, may_be_billed=False, **common
        )
    if _may_be_billed(error):  # a job already accepted, whatever a poll was then told
        return _ambiguous(error, text, common)
    if isinstance(error, errors.RateLimited):
        return openai_error(
            429,
            text,
            type_="rate_limit_error",
            code="provider_rate_limited",
            retry=True,
            headers=_retry_after(error),
            may_be_billed=False,
            **common,
        )
    if isinstance(error, errors.InsufficientBalance):
        return openai_error(
            402,
            text,
            type_="insufficient_quota",
            code="provider_insufficient_balance",
            retry=False,
            may_be_billed=False,
            **common,
        )
    if isinstance(error, errors.AuthenticationFailed):
        # The gateway's own key for the provider was refused: no fault of the caller's key.
        return openai_error(
            502,
            f"{provider}: the provider refused the gateway's key (HTTP {status})",
            type_="server_error",
            code="provider_key_refused",
            retry=False,
            may_be_billed=False,
            **common,
        )
    if isinstance(error, errors.ModelUnavailable):
        return openai_error(
            503,
            text,
            type_="server_error",
            code="model_unavailable",
            retry=True,
            may_be_billed=False,
            **common,
        )
    if isinstance(error, errors.ProviderRejected):
        return openai_error(
            400, text, code="provider_rejected", retry=False, may_be_billed=False, **common
        )
    if isinstance(error, errors.JobFailed) and error.billed is False:
        return openai_error(
            502,
            text,
            type_="server_error",
            code="job_failed",
            retry=True,
            may_be_billed=False,
            **common,
        )
    if isinstance(error, errors.TransportError) and not error.sent:
        return openai_error(
            503,
            text,
            type_="server_error",
            code="provider_unreachable",
            retry=True,
            may_be_billed=False,
            **common,
        )
    if isinstance(error, errors.ProviderUnavailable) and status == 503:
        return openai_error(
            503,
            text,
            type_="server_error",
            code="provider_overloaded",
            retry=True,  # no Retry-After: a provider's 503 is backed off from, not waited out
            may_be_billed=False,
            **common,
        )
    # Everything left may have been billed: a 5xx, a lost or unreadable answer, a job that
    # ended badly after it was accepted, a result that expired before it could be kept.
    return _ambiguous(error, text, common)


def _ambiguous(error: errors.FluxError, text: str, common: dict[str, Any]) -> Answer:
    timeout = isinstance(error, errors.Timeout | errors.JobTimeout)
    return openai_error(
        504 if timeout else 502,
        text + _MAY_BE_BILLED,
        type_="server_error",
        code="provider_timeout_may_be_billed" if timeout else "provider_error_may_be_billed",
        retry=False,
        may_be_billed=True,
        **common,
    )


def _all_failed(error: errors.AllProvidersFailed) -> Answer:
    attempts = error.attempts
    tried = [a for a in attempts if a.outcome == "failed" and a.error is not None]
    refused = [
        (v, a.provider)
        for a in attempts
        if a.outcome == "skipped" and isinstance(a.error, errors.RequestError)
        for v in a.error.violations
    ]
    if not tried and refused:
        return violations_answer(refused, note=" for every configured provider")
    last = tried[-1].error if tried else None
    if last is not None:
        answer = _answer(last)
        status, body, headers = answer.status, answer.body, dict(answer.headers)
    else:  # every provider skipped (cooling down, no price under the budget, ...)
        status, body, headers = (
            503,
            {"error": {"type": "server_error", "param": None, "code": "no_provider_available"}},
            {"x-should-retry": "true"},
        )
        waits = [a.available_in_s for a in attempts if a.available_in_s is not None]
        if waits:  # when the first of them may be tried again: clients wait that long
            headers["retry-after"] = str(max(1, math.ceil(min(waits))))
    answer = Answer(status, body, headers)
    if _billed_before(attempts):
        return _marked(answer, str(error), attempts)
    inner = dict(body["error"])  # type: ignore[call-overload]
    inner.update(message=str(error), may_be_billed=False, attempts=_attempts(attempts))
    return Answer(status, {"error": inner}, headers)


def _marked(answer: Answer, message: str, attempts: Sequence[Attempt]) -> Answer:
    """*answer*, of a call one of whose tries may have been billed, saying so: never retried.

    Only a call that failed over after an ambiguous failure gets here (otherwise the ambiguous
    failure ends it, and is its own answer): "not retried elsewhere" would be false.
    """
    inner = dict(answer.body["error"])  # type: ignore[call-overload]
    inner.update(
        message=message + _FAILED_OVER_MAY_BE_BILLED,
        may_be_billed=True,
        attempts=_attempts(attempts),
        code="provider_error_may_be_billed",
    )
    headers = dict(answer.headers)
    headers["x-should-retry"] = "false"
    status = answer.status if answer.status in (502, 504) else 502
    return Answer(status, {"error": inner}, headers)
