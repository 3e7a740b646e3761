"""Choosing a provider, failing over, and never paying twice for one image.

An image generation is a paid POST that is not idempotent: these resellers generate
synchronously and a call that reached them may be billed even if the answer never arrives. So
each failure is judged by what it *proves* about the job, by one table, `BILLING_RULES`, applied
in one place, `billing_rule`:

- **not taken** (the connection was never made; the provider answered 429, 402, 401/403 or 503;
  a status the provider's own document says is not billed): retry the same provider when that
  may help (a refused connection, a 429 with a short ``Retry-After`` or none, a 503 when no other
  provider is left to try), else fail over to the next;
- **ambiguous** (any other 5xx, 502 and 504 included; a read timeout or a drop after the body
  was sent; a 2xx whose body cannot be read): the provider may have made, and billed, the image.
  Final by default; fail over only with ``failover_on_ambiguous=True``;
- **final** (moderation, a request the provider rejected as invalid): trying elsewhere would
  not help. Never fails over.

Asynchronous providers (`flux_adapters.jobs`) are judged per job, not per HTTP exchange: a poll
that fails is tried again in place (it is free), and once a submit was accepted the job is the
provider's. Whatever happens after that is final (the error carries ``job``, to resume), except
a failure the provider documents as not charged, which fails over.

The status code decides, never the text of a body: a 500 that says "insufficient quota" is
still a 500. Text only tells apart the kinds of a 4xx, which is a refusal either way, and finds
moderation, at any status: that is final (the table's first row), never a failover or a retry.

Retries are the client's ``max_retries`` (`RoutingPolicy.retries`), per provider: never after
a failure that may have been billed. The wait before each is the provider's ``Retry-After`` when
it gave one no longer than `RoutingPolicy.max_retry_wait` (a longer one fails over instead),
else exponential backoff with full jitter (``flux_adapters._backoff``).

The routing logic is one generator (`route`) that yields `Try` and `Wait` instructions and
receives each attempt's outcome; `FluxClient` and `AsyncFluxClient` drive it, so they cannot
drift apart. It logs each decision to the ``flux_adapters`` logger (``flux_adapters._log``). A
`Breaker` keeps a cooldown per (provider, model), shared by concurrent calls, so a provider that
just failed is skipped at once instead of being waited on.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Final, Literal, TypeAlias, get_args

from attrs import define, field, frozen

from flux_adapters._backoff import backoff
from flux_adapters._flows import Outcome, resolve
from flux_adapters._ids import Routing
from flux_adapters._log import LOGGER, note
from flux_adapters._redact import redact
from flux_adapters.errors import (
    AllProvidersFailed,
    BudgetExceeded,
    ConfigurationError,
    ContentModerated,
    FluxError,
    InsufficientBalance,
    JobError,
    JobFailed,
    ModelUnavailable,
    Moderated,
    ProviderError,
    RequestError,
    StateUnavailable,
    TransportError,
)
from flux_adapters.limits import Plan
from flux_adapters.prices import Price, estimate
from flux_adapters.providers import AnyAdapter
from flux_adapters.request import EditRequest
from flux_adapters.result import Attempt

__all__ = [
    "BILLING_RULES",
    "Admit",
    "Admitted",
    "BillingRule",
    "Breaker",
    "Denied",
    "Pass",
    "Routing",
    "RoutingPolicy",
    "Settle",
    "Try",
    "Wait",
    "billing_rule",
    "disposition",
    "proven",
    "route",
]

Disposition: TypeAlias = Literal["retry", "next", "ambiguous", "final"]
Proves: TypeAlias = Literal["not taken", "not billed", "may be billed", "refused"]


@frozen(kw_only=True)
class BillingRule:
    """One row of the billing table: a kind of failure, what it proves, and what follows.

    Attributes:
        name: Stable id of the row, e.g. ``"server-error"``.
        failure: The failure, in words.
        proves: ``"not taken"`` (the provider never took the job: repeating it cannot bill
            twice), ``"not billed"`` (it took the job, which ended in a way its document says is
            not charged), ``"may be billed"`` (the job may have been done), or ``"refused"``
            (the provider looked at the request and refused it).
        disposition: What the router does: ``"retry"`` the same provider (then fail over),
            fail over to the ``"next"``, stop as ``"ambiguous"`` (fail over only when the caller
            opted in), or stop as ``"final"``.
        reason: Why.
    """

    name: str
    failure: str
    proves: Proves
    disposition: Disposition
    reason: str


BILLING_RULES: Final[tuple[BillingRule, ...]] = (
    BillingRule(
        name="moderated",
        failure="moderation (any status, or a job's moderated status)",
        proves="refused",
        disposition="final",
        reason="another provider's filter would most likely block it too",
    ),
    BillingRule(
        name="job-not-billed",
        failure="a job the provider accepted failed in a way its document says is not charged",
        proves="not billed",
        disposition="next",
        reason="the job is over and unpaid (fal: server errors of an app are never charged), "
        "so another provider may do it",
    ),
    BillingRule(
        name="job-accepted",
        failure="any other failure after an asynchronous provider accepted the job (but "
        "moderation): it failed, is unknown, passed its deadline, or a poll was refused or "
        "unreadable",
        proves="may be billed",
        disposition="final",
        reason="the job is the provider's now and may still be billed: it is never submitted "
        "again, anywhere; `client.resume(error.job)` polls it again",
    ),
    BillingRule(
        name="not-connected",
        failure="connection refused or reset before sending, DNS failure, connect or pool "
        "timeout, body not fully written",
        proves="not taken",
        disposition="retry",
        reason="the provider never received a complete request, so it cannot have started the job",
    ),
    BillingRule(
        name="provider-rule",
        failure="a status the provider's own document says is not billed",
        proves="not taken",
        disposition="next",
        reason="the adapter cites the document (`Adapter.not_taken`); none of the resellers "
        "documents one",
    ),
    BillingRule(
        name="rate-limited",
        failure="429",
        proves="not taken",
        disposition="retry",
        reason="the provider refused the request before taking it; wait `Retry-After` (up to "
        "`max_retry_wait`) and retry, else fail over",
    ),
    BillingRule(
        name="no-balance",
        failure="402",
        proves="not taken",
        disposition="next",
        reason="the account cannot pay, so the provider did not do the job",
    ),
    BillingRule(
        name="key-refused",
        failure="401, 403",
        proves="not taken",
        disposition="next",
        reason="the provider refused the key before doing anything",
    ),
    BillingRule(
        name="overloaded",
        failure="503",
        proves="not taken",
        disposition="next",
        reason="the server says it cannot handle the request now (RFC 9110, 15.6.4); "
        "when no other provider is left to try, it is retried like a 429",
    ),
    BillingRule(
        name="refused-model-or-balance",
        failure="another 4xx that names the model as unavailable or the balance as exhausted",
        proves="refused",
        disposition="next",
        reason="a 4xx is a refusal, so nothing was done; another provider may offer the model "
        "or have balance",
    ),
    BillingRule(
        name="invalid",
        failure="any other 4xx",
        proves="refused",
        disposition="final",
        reason="the provider found the request invalid; check its limits (`flux_adapters.check`)",
    ),
    BillingRule(
        name="refused-locally",
        failure="the request breaks a limit, or cannot be sent as given (raised here)",
        proves="not taken",
        disposition="final",
        reason="nothing was sent; other providers were already checked against their own limits",
    ),
    BillingRule(
        name="server-error",
        failure="500, 502, 504 and every other 5xx but 503",
        proves="may be billed",
        disposition="ambiguous",
        reason="the provider, or a gateway in front of it, failed; the upstream may have "
        "finished and billed the image (a 502/504 gateway often gives up on an upstream that "
        "completes). The text of the body never changes this",
    ),
    BillingRule(
        name="answer-lost",
        failure="read timeout, connection dropped after sending, deadline passed while waiting",
        proves="may be billed",
        disposition="ambiguous",
        reason="the provider had the whole request and may have done the job",
    ),
    BillingRule(
        name="unreadable-answer",
        failure="a 2xx whose body is not the documented shape, too large, or reports an error; "
        "any other status",
        proves="may be billed",
        disposition="ambiguous",
        reason="the provider answered success (or something unknown): the job was probably done",
    ),
)
"""The billing table, in the order `billing_rule` checks it (docs/routing.md shows it)."""

_RULES: Final = {rule.name: rule for rule in BILLING_RULES}


@frozen(kw_only=True)
class RoutingPolicy:
    """How a client with several providers chooses, retries and fails over.

    Attributes:
        routing: ``"ordered"`` tries providers in the configured order; ``"cheapest"`` by
            estimated price (providers without a known price last, in configured order).
        failover_on_ambiguous: Fail over after an ambiguous failure (500, a timeout or a drop
            after sending, an unreadable 200), accepting that the first provider may bill too.
        max_cost_usd: Skip a provider whose estimate for the call exceeds this.
        unknown_price: With *max_cost_usd*, whether a provider without a known price may be
            used (``"allow"``) or is skipped (``"refuse"``). Under a cumulative ``budget_usd``
            it is always skipped: it could not be counted.
        retries: Further tries at the same provider (0 to 10) after a failure that proves the
            job was not taken and may pass: a refused connection, a 429 (with a ``Retry-After``
            no longer than *max_retry_wait*, or none), a 503 when no other provider is left to
            try. Never after a failure that may have been billed. A client's ``max_retries``.
        backoff: The ceiling of the first wait when the provider asked for none; it doubles for
            each further retry, up to *max_retry_wait*, and each wait is drawn at random below
            it (full jitter), so clients that failed together do not retry together.
        max_retry_wait: The longest wait before a retry; a longer ``Retry-After`` fails over
            instead. A client never waits longer than its deadline either.
        cooldown: Seconds a (provider, model) is skipped after a failure that shows it is not
            taking jobs (or the provider's ``Retry-After``, if longer). 0 disables it.

    Raises:
        ConfigurationError: A value of the wrong kind or out of range.
    """

    routing: Routing = "ordered"
    failover_on_ambiguous: bool = False
    max_cost_usd: float | None = None
    unknown_price: Literal["allow", "refuse"] = "allow"
    retries: int = 1
    backoff: float = 0.5
    max_retry_wait: float = 10.0
    cooldown: float = 30.0

    def __attrs_post_init__(self) -> None:
        from flux_adapters._options import is_number

        values: dict[str, object] = {name: getattr(self, name) for name in _POLICY_FIELDS}
        problems = []
        if not (isinstance(values["routing"], str) and values["routing"] in get_args(Routing)):
            problems.append("routing must be 'ordered' or 'cheapest'")
        choice = values["unknown_price"]
        if not (isinstance(choice, str) and choice in ("allow", "refuse")):
            problems.append("unknown_price must be 'allow' or 'refuse'")
        if not isinstance(values["failover_on_ambiguous"], bool):
            problems.append("failover_on_ambiguous must be True or False")
        retries = values["retries"]
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            problems.append("retries must be a whole number from 0 to 10")
        budget = values["max_cost_usd"]
        if budget is not None and not (is_number(budget) and budget >= 0):
            problems.append("max_cost_usd must be a number >= 0, or None")
        for name in ("backoff", "max_retry_wait", "cooldown"):
            seconds = values[name]
            if not (is_number(seconds) and 0 <= seconds <= 86_400):
                problems.append(f"{name} must be a number of seconds from 0 to 86400")
        if problems:
            raise ConfigurationError("RoutingPolicy: " + "; ".join(problems))


_POLICY_FIELDS: Final = (
    "routing",
    "failover_on_ambiguous",
    "max_cost_usd",
    "unknown_price",
    "retries",
    "backoff",
    "max_retry_wait",
    "cooldown",
)


@define
class _Circuit:
    opened_until: float = 0.0
    probing: bool = False


@frozen
class Pass:
    """Leave to send to a (provider, model); ``probe`` when it is the one half-open probe."""

    key: tuple[str, str]
    probe: bool = False


@functools.lru_cache(maxsize=256)
def _open_pass(key: tuple[str, str]) -> Pass:
    """``Pass(key)``, made once per key: a closed circuit's pass, immutable, for every call."""
    return Pass(key)


@define
class Breaker:
    """Cooldowns per (provider, model), shared by every call of a client; thread-safe.

    A failure that shows the provider is not taking jobs, or is failing, opens the circuit for
    the cooldown. Once it has passed, one call may probe (half-open): its success closes the
    circuit, its failure opens it again; other calls skip the provider while the probe is out.
    A probe that ends any other way (a final error, cancellation, an exception) is released, so
    the provider is never skipped for longer than its cooldown.
    """

    cooldown: float = 30.0
    max_pause: float = 900.0
    """The longest cooldown a provider's ``Retry-After`` can ask for."""
    clock: Callable[[], float] = time.monotonic
    _circuits: dict[tuple[str, str], _Circuit] = field(factory=dict, init=False)
    _lock: threading.Lock = field(factory=threading.Lock, init=False)

    def state(self, key: tuple[str, str]) -> Literal["closed", "open", "half-open"]:
        """The circuit's state for *key* = (provider, model)."""
        with self._lock:
            circuit = self._circuits.get(key)
            if circuit is None:
                return "closed"
            if self.clock() < circuit.opened_until:
                return "open"
            return "half-open"

    def acquire(self, key: tuple[str, str]) -> Pass | float:
        """Ask to send to *key*.

        Returns a `Pass` when allowed (the probe, when half-open), else the seconds left before
        it may be tried (0 while another call's probe is out). Every pass must end in `success`,
        `failure` or `release`.
        """
        if key not in self._circuits:  # closed: nothing to change, so no lock to take
            return _open_pass(key)
        with self._lock:
            circuit = self._circuits.get(key)
            if circuit is None:
                return Pass(key)
            left = circuit.opened_until - self.clock()
            if left > 0:
                return left
            if circuit.probing:
                return 0.0
            circuit.probing = True
            return Pass(key, probe=True)

    def success(self, key: tuple[str, str]) -> None:
        """The call to *key* succeeded: close the circuit."""
        if key not in self._circuits:  # already closed (a lookup is atomic: no lock for it)
            return
        with self._lock:
            self._circuits.pop(key, None)

    def failure(self, key: tuple[str, str], retry_after: float | None = None) -> float | None:
        """The call to *key* showed it is not taking jobs: open the circuit.

        Returns the seconds it stays open, ``None`` when cooldowns are off.
        """
        if self.cooldown <= 0:
            return None
        asked = _seconds_asked(retry_after)
        with self._lock:
            pause = max(self.cooldown, min(asked, self.max_pause) if asked is not None else 0.0)
            self._circuits[key] = _Circuit(opened_until=self.clock() + pause)
        return pause

    def release(self, granted: Pass) -> None:
        """*granted* ended without showing either way; a probe lets the next call probe."""
        if not granted.probe:
            return
        with self._lock:
            circuit = self._circuits.get(granted.key)
            if circuit is not None:
                circuit.probing = False


def billing_rule(error: FluxError, not_taken: Mapping[int, str] | None = None) -> BillingRule:
    """The row of `BILLING_RULES` that *error* falls under.

    Args:
        error: A failed attempt.
        not_taken: Statuses the provider's own document says are not billed, each with the
            document it comes from (`Adapter.not_taken`).
    """
    if isinstance(error, ContentModerated | Moderated):
        return _RULES["moderated"]
    if error.job is not None or isinstance(error, JobError):  # after an accepted submit
        if isinstance(error, JobFailed) and error.billed is False:
            return _RULES["job-not-billed"]
        return _RULES["job-accepted"]
    if isinstance(error, TransportError):
        return _RULES["answer-lost" if error.sent else "not-connected"]
    if not isinstance(error, ProviderError):
        return _RULES["refused-locally"]  # RequestError and the other errors raised here
    status = error.status_code
    # Only a refusal or a server error can be declared "not taken" (checked when the adapter is
    # loaded, and here again: an adapter may change its data later). A 2xx that could not be
    # read may have been billed, whatever the adapter says.
    if not_taken and 400 <= status < 600 and status in not_taken:
        return _RULES["provider-rule"]
    named = {429: "rate-limited", 402: "no-balance", 401: "key-refused", 403: "key-refused"}
    if status in named:
        return _RULES[named[status]]
    if status == 503:
        return _RULES["overloaded"]
    if 400 <= status < 500:
        refused = isinstance(error, ModelUnavailable | InsufficientBalance)
        return _RULES["refused-model-or-balance" if refused else "invalid"]
    if 500 <= status < 600:
        return _RULES["server-error"]
    return _RULES["unreadable-answer"]


def disposition(error: FluxError, not_taken: Mapping[int, str] | None = None) -> Disposition:
    """What the router does after *error*: see `billing_rule` and the module docstring."""
    return billing_rule(error, not_taken).disposition


@frozen
class Try:
    """Send the request to *candidate* (a client binding) and reply with the outcome or error."""

    candidate: object
    plan: Plan


@frozen
class Wait:
    """Sleep *seconds*, then reply with ``None``."""

    seconds: float


@frozen
class Admitted:
    """The shared state's leave to send (`flux_adapters.state`).

    *granted* is the breaker's pass (``None`` when no circuit was asked about), *reservation*
    the budget's (``None`` without a budget).
    """

    granted: Pass | None
    reservation: object = None


DeniedKind: TypeAlias = Literal["cooling", "probing", "paused", "paced", "budget"]


@frozen
class Denied:
    """The shared state's refusal.

    The circuit is open (``cooling``, *seconds* left) or being probed by another call
    (``probing``); the provider key is paused by a 429 (``paused``) or out of tokens
    (``paced``), *seconds* before it may go; or the budget has no room (``budget``: *spent_usd*
    of *limit_usd* in *scope* over *period*).
    """

    kind: DeniedKind
    seconds: float = 0.0
    spent_usd: float = 0.0
    scope: str = ""
    limit_usd: float = 0.0
    period: str = "total"


@frozen
class Admit:
    """Ask the shared state for leave to send to *candidate*; reply `Admitted` or `Denied`.

    *key* is the circuit, *estimate* the price to reserve.
    """

    candidate: object
    key: tuple[str, str]
    estimate: float | None


Charge: TypeAlias = Literal["actual", "keep", "refund"]


@frozen
class Settle:
    """Tell the shared state how the admitted try ended; reply with the cooldown started, if any.

    *result*: ``"success"`` closes the circuit, ``"failure"`` opens it (for the provider's
    *retry_after*, if longer than the cooldown), ``"release"`` frees a probe, ``"none"`` leaves
    it. *charge*: the reservation becomes the call's ``"actual"`` cost (the provider's figure,
    else the estimate), stays as reserved (``"keep"``: the job may have been billed), or is
    refunded (``"refund"``: the failure proves nothing was billed). *pause_s*: pause the
    provider key for everyone (a 429's ``Retry-After``).
    """

    candidate: object
    admitted: Admitted
    result: Literal["success", "failure", "release", "none"]
    charge: Charge = "keep"
    outcome: Outcome | None = None
    retry_after: float | None = None
    pause_s: float | None = None


Instruction: TypeAlias = Try | Wait | Admit | Settle
Reply: TypeAlias = Outcome | FluxError | Admitted | Denied | float | None


@frozen
class Routed:
    """The route's result: which candidate served it, its outcome, every attempt, its price.

    ``estimated`` is the price the route ranked the candidate by (`flux_adapters.prices`), or
    ``None`` when none is known.
    """

    candidate: object
    outcome: Outcome
    attempts: tuple[Attempt, ...]
    estimated: float | None = None


def _with_attempts(error: FluxError, attempts: list[Attempt]) -> FluxError:
    error.attempts = tuple(attempts)
    return error


def _state_lost(error: StateUnavailable, attempts: list[Attempt]) -> FluxError:
    """*error* (the state did not answer before a try), with the tries made before it.

    Nothing was sent for this try; but with ``failover_on_ambiguous`` an earlier one may have
    been billed: the error says so, and its attempts show it (`billing_rule` of each).
    """
    billed = [
        a.provider
        for a in attempts
        if a.outcome == "failed"
        and a.error is not None
        and billing_rule(a.error).proves == "may be billed"
    ]
    if billed:
        error = StateUnavailable(
            f"{error} for the next try; but the try before it, at {billed[-1]}, may have done "
            "and billed the job: do not resend it blindly"
        )
    return _with_attempts(error, attempts)


def route(
    request: EditRequest,
    candidates: Sequence[object],
    adapter_of: Callable[[object], AnyAdapter],
    policy: RoutingPolicy,
    breaker: Breaker,
    prices: Mapping[tuple[str, str], Price] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    *,
    scrub: Callable[[str], str] = redact,
    draw: Callable[[], float] = random.random,
    shared: bool = False,
) -> Generator[Instruction, Reply, Routed]:
    """Try *candidates* for *request* as *policy* says; yields instructions, returns `Routed`.

    Each decision is logged to the ``flux_adapters`` logger (see ``flux_adapters._log``), every
    line through *scrub* (the client's `Redactor`). *draw* gives the backoff its jitter.

    With *shared*, *breaker* is not used: the cooldowns, the provider keys' rate limits and the
    budget are the shared state's (`flux_adapters.state`), asked through `Admit` before each
    candidate and told through `Settle` after it; the driver performs both (it is the only one
    that does I/O), and releases an admission still open when the route is closed.

    Raises:
        FluxError: A final or ambiguous error (with ``.attempts``); or, when nothing is left to
            try, the single provider's error, `BudgetExceeded` when the budget refused every
            candidate and nothing was sent, or `AllProvidersFailed` with every attempt.
    """
    attempts: list[Attempt] = []
    ranked: list[tuple[float | None, int, object, Plan, AnyAdapter]] = []
    model = request.model
    for index, candidate in enumerate(candidates):
        adapter = adapter_of(candidate)
        try:
            plan = resolve(adapter, request)
        except RequestError as error:
            if len(candidates) == 1:
                raise  # one provider: its own refusal is the answer, as with a plain client
            attempts.append(_skipped(adapter.name, model, error, "its limits refuse the request"))
            _note_skip(scrub, attempts[-1], error)
            continue
        cost = estimate(request, plan, prices, getattr(adapter, "prices", None))
        if policy.max_cost_usd is not None:
            if cost is None and policy.unknown_price == "refuse":
                attempts.append(
                    _skipped(adapter.name, model, None, "no known price, and a budget is set")
                )
                _note_skip(scrub, attempts[-1], None)
                continue
            if cost is not None and cost > policy.max_cost_usd:
                reason = f"estimated ${cost:.4f} exceeds the budget of ${policy.max_cost_usd:.4f}"
                attempts.append(_skipped(adapter.name, model, None, reason))
                _note_skip(scrub, attempts[-1], None)
                continue
        ranked.append((cost, index, candidate, plan, adapter))
    if policy.routing == "cheapest":
        ranked.sort(key=lambda item: (item[0] is None, item[0] or 0.0, item[1]))
    if len(candidates) > 1 and LOGGER.isEnabledFor(logging.DEBUG):
        note(
            logging.DEBUG,
            "candidates",
            scrub,
            "%s (%s): %s",
            model,
            policy.routing,
            ", ".join(
                f"{adapter.name} ({'no price' if cost is None else f'${cost:.4f}'})"
                for cost, _, _, _, adapter in ranked
            )
            or "none left",
        )

    last: FluxError | None = None
    over_budget: Denied | None = None
    for position, (cost, _, candidate, plan, adapter) in enumerate(ranked):
        name = adapter.name
        key = (name, model)
        if last is not None:
            note(logging.INFO, "failover", scrub, "%s: failing over to %s", model, name)
        admitted: Admitted | None = None
        if shared:
            try:
                answer = yield Admit(candidate, key, cost)
                waited = 0.0
                while isinstance(answer, Denied) and answer.kind in ("paused", "paced"):
                    if waited + answer.seconds > policy.max_retry_wait:
                        break
                    waited += max(answer.seconds, 0.001)
                    yield Wait(answer.seconds)
                    answer = yield Admit(candidate, key, cost)
            except StateUnavailable as lost:  # thrown in by the client: the state did not answer
                raise _state_lost(lost, attempts) from None
            if isinstance(answer, Denied):
                if answer.kind == "budget":
                    over_budget = answer
                attempts.append(
                    _skipped(
                        name,
                        model,
                        None,
                        _denied_reason(answer, cost),
                        None if answer.kind == "budget" else answer.seconds,
                    )
                )
                _note_skip(scrub, attempts[-1], None)
                continue
            assert isinstance(answer, Admitted)
            admitted = answer
            granted = answer.granted if answer.granted is not None else Pass(key)
        else:
            acquired = breaker.acquire(key)
            if not isinstance(acquired, Pass):
                reason = f"cooling down for {acquired:.1f} s after failures"
                attempts.append(_skipped(name, model, None, reason, acquired))
                _note_skip(scrub, attempts[-1], None)
                continue
            granted = acquired
        if granted.probe:
            note(logging.INFO, "probe", scrub, "%s: %s cooled down; trying it again", model, name)
        settled = False
        try:
            tries = 0
            while True:
                if LOGGER.isEnabledFor(logging.DEBUG):  # every call passes here: no arguments built
                    note(
                        logging.DEBUG,
                        "try",
                        scrub,
                        "%s: trying %s (try %d)",
                        model,
                        name,
                        tries + 1,
                    )
                started = clock()
                reply = yield Try(candidate, plan)
                elapsed = clock() - started
                if isinstance(reply, Outcome):
                    if admitted is None:
                        breaker.success(key)
                    else:
                        yield Settle(candidate, admitted, "success", "actual", reply)
                    settled = True
                    # Made as Attempt(...) makes it, without the dict of keyword arguments a
                    # class call builds (a third of the cost; tests/test_async_per_edit.py holds
                    # why it is the same).
                    served = object.__new__(Attempt)
                    Attempt.__init__(
                        served, provider=name, model=model, outcome="ok", elapsed_s=elapsed
                    )
                    attempts.append(served)
                    if LOGGER.isEnabledFor(logging.INFO):
                        note(
                            logging.INFO,
                            "served",
                            scrub,
                            "%s: served by %s in %.2f s (%d attempt%s)",
                            model,
                            name,
                            elapsed,
                            len(attempts),
                            "" if len(attempts) == 1 else "s",
                        )
                    return Routed(candidate, reply, tuple(attempts), cost)
                assert isinstance(reply, FluxError)
                last = reply
                rule = billing_rule(reply, getattr(adapter, "not_taken", None))
                attempts.append(
                    Attempt(
                        provider=name,
                        model=model,
                        outcome="failed",
                        elapsed_s=elapsed,
                        error=reply,
                        billing=rule.name,
                    )
                )
                if LOGGER.isEnabledFor(logging.INFO):
                    note(
                        logging.INFO,
                        "failed",
                        scrub,
                        "%s: %s failed after %.2f s: %s: %s (row %s: %s)",
                        model,
                        name,
                        elapsed,
                        type(reply).__name__,
                        _shown(reply),
                        rule.name,
                        rule.proves,
                    )
                # A 503 fails over at once (quicker than waiting); with nowhere left to go it is
                # retried like a 429: both say "not now", and neither took the job.
                retried = rule.disposition == "retry" or (
                    rule.name == "overloaded" and position == len(ranked) - 1
                )
                if retried and tries < policy.retries:
                    pause = _retry_pause(reply, policy, tries, draw)
                    if admitted is not None and rule.name == "rate-limited":
                        asked = _told_state(reply)
                        if asked:  # every worker on this provider key waits it, not only this one
                            yield Settle(candidate, admitted, "none", pause_s=asked)
                    if pause is not None:
                        tries += 1
                        note(
                            logging.INFO,
                            "retry",
                            scrub,
                            "%s: retrying %s in %.2f s (retry %d of %d)",
                            model,
                            name,
                            pause,
                            tries,
                            policy.retries,
                        )
                        yield Wait(pause)
                        continue
                    note(
                        logging.INFO,
                        "no-retry",
                        scrub,
                        "%s: not waiting for %s: it asked for %s s, longer than %g s",
                        model,
                        name,
                        _asked(reply),
                        policy.max_retry_wait,
                    )
                if rule.disposition == "final":
                    note(logging.INFO, "give-up", scrub, "%s: %s", model, rule.reason)
                    if admitted is not None:
                        settled = True
                        yield Settle(candidate, admitted, "release", _charge(rule, reply))
                    raise _with_attempts(reply, attempts)
                # Not taken, or failing in a way that may have billed: either way the provider
                # is not serving now, so later calls skip it for the cooldown.
                if admitted is None:
                    pause_for = breaker.failure(key, _seconds_asked(_asked(reply)))
                else:
                    asked = _told_state(reply)
                    told = yield Settle(
                        candidate,
                        admitted,
                        "failure",
                        _charge(rule, reply),
                        retry_after=asked,
                        pause_s=asked if rule.name == "rate-limited" else None,
                    )
                    pause_for = told if isinstance(told, float) else None
                settled = True
                if pause_for is not None:
                    note(
                        logging.INFO,
                        "cooldown",
                        scrub,
                        "%s: %s is skipped for %.1f s (cooldown)",
                        model,
                        name,
                        pause_for,
                    )
                if rule.disposition == "ambiguous" and not policy.failover_on_ambiguous:
                    note(
                        logging.INFO,
                        "give-up",
                        scrub,
                        "%s: not failing over: %s may have done, and billed, the job "
                        "(failover_on_ambiguous=False)",
                        model,
                        name,
                    )
                    raise _with_attempts(reply, attempts)
                break
        finally:
            # A final error, a cancelled call, an exception in the driver: a shared admission
            # is released by the driver (a generator being closed cannot ask for I/O).
            if not settled and admitted is None:
                breaker.release(granted)
    if last is not None and len(candidates) == 1:
        raise _with_attempts(last, attempts)
    # The budget's refusal only when nothing else is in the way: a provider skipped for a while
    # (cooling down, its key paused or paced) may fit the budget once it can be tried again.
    if over_budget is not None and all(
        a.outcome == "skipped" and a.available_in_s is None for a in attempts
    ):
        left = max(0.0, over_budget.limit_usd - over_budget.spent_usd)
        skipped = "; ".join(f"{a.provider}: {a.reason}" for a in attempts)
        message = (
            f"the budget of ${over_budget.limit_usd:.4f} ({over_budget.scope}, "
            f"{over_budget.period}) has ${left:.4f} left, not enough for this call "
            f"({skipped}); nothing was sent"
        )
        note(logging.INFO, "over-budget", scrub, "%s: %s", model, message)
        raise _with_attempts(
            BudgetExceeded(
                message,
                scope=over_budget.scope,
                limit_usd=over_budget.limit_usd,
                spent_usd=over_budget.spent_usd,
                period=over_budget.period,
            ),
            attempts,
        )
    tried = ", ".join(f"{a.provider} ({a.reason or type(a.error).__name__})" for a in attempts)
    note(
        logging.INFO,
        "all-failed",
        scrub,
        "%s: no provider produced the image: %s",
        model,
        tried or "no provider configured",
    )
    raise AllProvidersFailed(
        f"no provider produced the image: {tried or 'no provider configured'}", attempts=attempts
    )


def proven(rule: BillingRule, error: FluxError) -> Proves:
    """What *error*, under *rule* (`billing_rule`), proves of the job's billing.

    ``rule.proves``, except for a refusal of a job the provider had accepted (moderated after
    its submit was taken): fal bills that, BFL does not, so it "may be billed", the side that
    cannot pay twice or overspend. The budget (`_charge`) and the batch journal both read it.
    """
    if rule.proves == "refused" and (error.job is not None or isinstance(error, JobError)):
        return "may be billed"
    return rule.proves


def _charge(rule: BillingRule, error: FluxError) -> Charge:
    """What a failed try costs the budget: nothing only when it proves the job was not billed.

    A refusal refunds when it came before a job was accepted; a job the provider accepted and
    then moderated keeps its reservation (`proven`).
    """
    return "keep" if proven(rule, error) == "may be billed" else "refund"


def _denied_reason(denied: Denied, cost: float | None) -> str:
    if denied.kind == "cooling":
        return f"cooling down for {denied.seconds:.1f} s after failures"
    if denied.kind == "probing":
        return "cooling down: another call is probing it"
    if denied.kind == "paused":
        return f"its key is paused for {denied.seconds:.1f} s (the provider's Retry-After)"
    if denied.kind == "paced":
        return f"its key's rate limit allows the next call in {denied.seconds:.1f} s"
    if cost is None:
        return "no known price, and a cumulative budget is set"
    left = max(0.0, denied.limit_usd - denied.spent_usd)
    return f"estimated ${cost:.4f}, more than the ${left:.4f} left in the budget ({denied.scope})"


def _asked(error: FluxError) -> object:
    """The wait the provider asked for with *error* (``Retry-After``), as the adapter gave it."""
    return getattr(error, "retry_after", None) if isinstance(error, ProviderError) else None


def _seconds_asked(value: object) -> float | None:
    """*value* as seconds to wait, whatever an adapter (perhaps of another package) put there.

    ``None`` for no number (NaN, a string), 0 for a time in the past, infinity for a number too
    large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float: longer than any wait
        return float("inf")
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _told_state(error: FluxError) -> float | None:
    """The provider's ``Retry-After`` with *error*, as the shared state is told it.

    At most the longest pause the state takes (`flux_adapters.state.MAX_SECONDS`, a day).
    Uncapped, an endless one (a provider package's ``float("inf")``) paused the provider key for
    every worker for ever, and a skip's ``available_in_s`` became infinite.
    """
    from flux_adapters.state import MAX_SECONDS  # loaded: only a call with a state gets here

    asked = _seconds_asked(_asked(error))
    return asked if asked is None else min(asked, MAX_SECONDS)


def _retry_pause(
    error: FluxError, policy: RoutingPolicy, tries: int, draw: Callable[[], float]
) -> float | None:
    """Seconds before retrying after *error*; ``None`` when the provider asked for too long."""
    asked = _seconds_asked(_asked(error))
    if asked is not None:
        return asked if asked <= policy.max_retry_wait else None
    return backoff(tries, policy.backoff, max(policy.max_retry_wait, policy.backoff), draw)


def _shown(error: FluxError) -> str:
    try:
        return str(error)[:300]
    except Exception:  # an error of another package whose __str__ fails
        return type(error).__name__


def _note_skip(scrub: Callable[[str], str], attempt: Attempt, error: FluxError | None) -> None:
    if not LOGGER.isEnabledFor(logging.INFO):
        return
    note(
        logging.INFO,
        "skip",
        scrub,
        "%s: skipping %s: %s%s",
        attempt.model,
        attempt.provider,
        attempt.reason,
        f" ({_shown(error)})" if error is not None else "",
    )


def _skipped(
    provider: str,
    model: str,
    error: FluxError | None,
    reason: str,
    available_in: float | None = None,
) -> Attempt:
    return Attempt(
        provider=provider,
        model=model,
        outcome="skipped",
        elapsed_s=0.0,
        error=error,
        reason=reason,
        available_in_s=None if available_in is None else max(0.0, available_in),
    )
