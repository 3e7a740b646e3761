"""Choosing a provider, failing over, and never paying twice for one image.

An image generation is a paid POST that is not idempotent: these resellers generate
synchronously and a call that reached them may be billed even if the answer never arrives. So
each failure is sorted by what it proves:

- **not taken** (connection refused, connect or pool timeout, 429, 402, 401/403, 502/503/504
  from a gateway, model unavailable): the job was not accepted. Retry the same provider when that
  may help (refused connection, a short ``Retry-After``), else fail over to the next;
- **ambiguous** (a 500, a read timeout or a dropped connection after the body was sent, a 200
  whose body cannot be read): the provider may have made, and billed, the image. Final by
  default; fail over only with ``failover_on_ambiguous=True``;
- **final** (moderation, a request the provider rejected as invalid): trying elsewhere would
  not help. Never fails over.

The routing logic is one generator (`route`) that yields `Try` and `Wait` instructions and
receives each attempt's outcome; `FluxClient` and `AsyncFluxClient` drive it, so they cannot
drift apart. A `Breaker` keeps a cooldown per (provider, model), shared by concurrent calls, so
a provider that just failed is skipped at once instead of being waited on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Final, Literal, TypeAlias

from attrs import define, field, frozen

from flux_adapters._flows import Outcome, resolve
from flux_adapters.errors import (
    AllProvidersFailed,
    AuthenticationFailed,
    ContentModerated,
    FluxError,
    InsufficientBalance,
    ModelUnavailable,
    ProviderUnavailable,
    RateLimited,
    RequestError,
    TransportError,
)
from flux_adapters.limits import Plan
from flux_adapters.prices import Price, estimate
from flux_adapters.providers import Adapter
from flux_adapters.request import EditRequest
from flux_adapters.result import Attempt

__all__ = ["Breaker", "Routing", "RoutingPolicy", "Try", "Wait", "disposition", "route"]

Routing: TypeAlias = Literal["ordered", "cheapest"]
Disposition: TypeAlias = Literal["retry", "next", "ambiguous", "final"]

_GATEWAY_STATUSES: Final = frozenset({502, 503, 504})


@frozen(kw_only=True)
class RoutingPolicy:
    """How a client with several providers chooses, retries and fails over.

    Attributes:
        routing: ``"ordered"`` tries providers in the configured order; ``"cheapest"`` by
            estimated price (providers without a known price last, in configured order).
        failover_on_ambiguous: Fail over after an ambiguous failure (500, a timeout or a drop
            after sending, an unreadable 200), accepting that the first provider may bill too.
        max_cost_usd: Skip a provider whose estimate for the call exceeds this.
        unknown_price: Under a budget, whether a provider without a known price may be used.
        retries: Further tries at the same provider after a failure that proves the job was not
            taken and may pass (refused connection, 429 with a short ``Retry-After``).
        backoff: Seconds before the first such retry; doubled for each further one.
        max_retry_wait: The longest ``Retry-After`` honoured; a longer one fails over instead.
        cooldown: Seconds a (provider, model) is skipped after a failure that shows it is not
            taking jobs (or the provider's ``Retry-After``, if longer). 0 disables it.
    """

    routing: Routing = "ordered"
    failover_on_ambiguous: bool = False
    max_cost_usd: float | None = None
    unknown_price: Literal["allow", "refuse"] = "allow"
    retries: int = 1
    backoff: float = 0.5
    max_retry_wait: float = 10.0
    cooldown: float = 30.0


@define
class _Circuit:
    opened_until: float = 0.0
    probing: bool = False


@define
class Breaker:
    """Cooldowns per (provider, model), shared by every call of a client; thread-safe.

    A failure that shows the provider is not taking jobs opens the circuit for the cooldown.
    Once it has passed, one call may probe (half-open): its success closes the circuit, its
    failure opens it again; other calls skip the provider while the probe is out.
    """

    cooldown: float = 30.0
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

    def acquire(self, key: tuple[str, str]) -> float | None:
        """Ask to send to *key*.

        Returns ``None`` when allowed (taking the one probe when half-open), else the seconds
        left before it may be tried (0 while another call's probe is out).
        """
        with self._lock:
            circuit = self._circuits.get(key)
            if circuit is None:
                return None
            left = circuit.opened_until - self.clock()
            if left > 0:
                return left
            if circuit.probing:
                return 0.0
            circuit.probing = True
            return None

    def success(self, key: tuple[str, str]) -> None:
        """The call to *key* succeeded: close the circuit."""
        with self._lock:
            self._circuits.pop(key, None)

    def failure(self, key: tuple[str, str], retry_after: float | None = None) -> None:
        """The call to *key* showed it is not taking jobs: open the circuit."""
        if self.cooldown <= 0:
            return
        with self._lock:
            pause = max(self.cooldown, retry_after or 0.0)
            self._circuits[key] = _Circuit(opened_until=self.clock() + pause)

    def release(self, key: tuple[str, str]) -> None:
        """A probe ended without showing either way (an ambiguous or final error)."""
        with self._lock:
            circuit = self._circuits.get(key)
            if circuit is not None:
                circuit.probing = False


def disposition(error: FluxError) -> Disposition:
    """What *error* proves about the job: see the module docstring."""
    if isinstance(error, TransportError):
        return "ambiguous" if error.sent else "retry"
    if isinstance(error, RateLimited):
        return "retry"
    if isinstance(error, InsufficientBalance | AuthenticationFailed | ModelUnavailable):
        return "next"
    if isinstance(error, ContentModerated):
        return "final"
    if isinstance(error, ProviderUnavailable):
        return "next" if error.status_code in _GATEWAY_STATUSES else "ambiguous"
    if isinstance(error, RequestError):
        return "final"
    # ResponseFormatError (a 2xx we could not read) may have been billed; other 4xx are final.
    return "ambiguous" if getattr(error, "status_code", 0) < 300 else "final"


@frozen
class Try:
    """Send the request to *candidate* (a client binding) and reply with the outcome or error."""

    candidate: object
    plan: Plan


@frozen
class Wait:
    """Sleep *seconds*, then reply with ``None``."""

    seconds: float


Instruction: TypeAlias = Try | Wait
Reply: TypeAlias = Outcome | FluxError | None


@frozen
class Routed:
    """The route's result: which candidate served it, its outcome, and every attempt."""

    candidate: object
    outcome: Outcome
    attempts: tuple[Attempt, ...]


def _with_attempts(error: FluxError, attempts: list[Attempt]) -> FluxError:
    error.attempts = tuple(attempts)
    return error


def route(
    request: EditRequest,
    candidates: Sequence[object],
    adapter_of: Callable[[object], Adapter],
    policy: RoutingPolicy,
    breaker: Breaker,
    prices: Mapping[tuple[str, str], Price] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Generator[Instruction, Reply, Routed]:
    """Try *candidates* for *request* as *policy* says; yields instructions, returns `Routed`.

    Raises:
        FluxError: A final or ambiguous error (with ``.attempts``); or, when nothing is left to
            try, the single provider's error, or `AllProvidersFailed` with every attempt.
    """
    attempts: list[Attempt] = []
    ranked: list[tuple[float | None, int, object, Plan]] = []
    for index, candidate in enumerate(candidates):
        adapter = adapter_of(candidate)
        try:
            plan = resolve(adapter, request)
        except RequestError as error:
            if len(candidates) == 1:
                raise  # one provider: its own refusal is the answer, as with a plain client
            attempts.append(
                _skipped(adapter.name, request.model, error, "its limits refuse the request")
            )
            continue
        cost = estimate(request, plan, prices)
        if policy.max_cost_usd is not None:
            if cost is None and policy.unknown_price == "refuse":
                attempts.append(
                    _skipped(
                        adapter.name, request.model, None, "no known price, and a budget is set"
                    )
                )
                continue
            if cost is not None and cost > policy.max_cost_usd:
                reason = f"estimated ${cost:.4f} exceeds the budget of ${policy.max_cost_usd:.4f}"
                attempts.append(_skipped(adapter.name, request.model, None, reason))
                continue
        ranked.append((cost, index, candidate, plan))
    if policy.routing == "cheapest":
        ranked.sort(key=lambda item: (item[0] is None, item[0] or 0.0, item[1]))

    last: FluxError | None = None
    for _, _, candidate, plan in ranked:
        name = adapter_of(candidate).name
        key = (name, request.model)
        left = breaker.acquire(key)
        if left is not None:
            attempts.append(
                _skipped(name, request.model, None, f"cooling down for {left:.1f} s after failures")
            )
            continue
        tries = 0
        while True:
            started = clock()
            reply = yield Try(candidate, plan)
            elapsed = clock() - started
            if isinstance(reply, Outcome):
                breaker.success(key)
                attempts.append(
                    Attempt(provider=name, model=request.model, outcome="ok", elapsed_s=elapsed)
                )
                return Routed(candidate, reply, tuple(attempts))
            assert isinstance(reply, FluxError)
            last = reply
            attempts.append(
                Attempt(
                    provider=name,
                    model=request.model,
                    outcome="failed",
                    elapsed_s=elapsed,
                    error=reply,
                )
            )
            kind = disposition(reply)
            if kind == "retry" and tries < policy.retries:
                pause = _retry_pause(reply, policy, tries)
                if pause is not None:
                    tries += 1
                    yield Wait(pause)
                    continue
            if kind in ("retry", "next"):
                breaker.failure(key, reply.retry_after if isinstance(reply, RateLimited) else None)
                break
            breaker.release(key)
            if kind == "ambiguous" and policy.failover_on_ambiguous:
                break
            raise _with_attempts(reply, attempts)
    if last is not None and len(candidates) == 1:
        raise _with_attempts(last, attempts)
    tried = ", ".join(f"{a.provider} ({a.reason or type(a.error).__name__})" for a in attempts)
    raise AllProvidersFailed(
        f"no provider produced the image: {tried or 'no provider configured'}", attempts=attempts
    )


def _retry_pause(error: FluxError, policy: RoutingPolicy, tries: int) -> float | None:
    if isinstance(error, RateLimited) and error.retry_after is not None:
        return error.retry_after if error.retry_after <= policy.max_retry_wait else None
    return policy.backoff * 2.0**tries


def _skipped(provider: str, model: str, error: FluxError | None, reason: str) -> Attempt:
    return Attempt(
        provider=provider, model=model, outcome="skipped", elapsed_s=0.0, error=error, reason=reason
    )
