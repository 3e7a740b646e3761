"""The router, driven with canned outcomes (no I/O): ordering, skipping, retries, failover and
what is never failed over. The breaker is checked against a model with Hypothesis."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flux_adapters import EditRequest, errors
from flux_adapters._backoff import backoff
from flux_adapters._flows import Outcome, resolve
from flux_adapters.jobs import Job
from flux_adapters.prices import PerCall
from flux_adapters.providers import Adapter, Answer
from flux_adapters.result import ResultImage
from flux_adapters.routing import (
    BILLING_RULES,
    BillingRule,
    Breaker,
    Pass,
    Routed,
    RoutingPolicy,
    Try,
    Wait,
    billing_rule,
    disposition,
    route,
)
from tests.conftest import call_adapter

REQUEST = EditRequest(prompt="p", model="flux-2-pro")
MODEL = REQUEST.model


def adapter_of(candidate: object) -> Adapter:
    assert isinstance(candidate, str)
    return call_adapter(candidate)


def ok(provider: str, request: EditRequest = REQUEST) -> Outcome:
    plan = resolve(call_adapter(provider), request)
    return Outcome(plan=plan, answer=Answer(images=(ResultImage(url="https://cdn.example/a.png"),)))


def fail(kind: type[errors.ProviderError], status: int, **extra: object) -> errors.ProviderError:
    return kind("failed", provider="x", status_code=status, **extra)  # type: ignore[arg-type]


def drive(
    candidates: Sequence[str],
    replies: dict[str, list[object]],
    policy: RoutingPolicy | None = None,
    request: EditRequest = REQUEST,
    breaker: Breaker | None = None,
    prices: dict[tuple[str, str], PerCall] | None = None,
    draw: Callable[[], float] = lambda: 1.0,
) -> tuple[list[str], Routed]:
    """Run the router; each Try to provider P gets the next canned reply for P.

    *draw* is the backoff's jitter: by default the top of its range, so waits are the ceilings.
    """
    log: list[str] = []
    router: Generator[object, object, Routed] = route(
        request,
        candidates,
        adapter_of,
        policy or RoutingPolicy(),
        breaker or Breaker(),
        prices,
        draw=draw,
    )  # type: ignore[assignment]
    try:
        instruction = next(router)
        while True:
            if isinstance(instruction, Wait):
                log.append(f"wait {instruction.seconds:g}")
                instruction = router.send(None)
            else:
                assert isinstance(instruction, Try)
                name = str(instruction.candidate)
                log.append(name)
                reply = replies[name].pop(0)
                instruction = router.send(ok(name, request) if reply == "ok" else reply)
    except StopIteration as done:
        return log, done.value


def test_a_not_taken_failure_fails_over_and_both_attempts_are_recorded() -> None:
    for failure in [
        errors.TransportError("refused", provider="laozhang", sent=False),
        fail(errors.RateLimited, 429, retry_after=60.0),
        fail(errors.InsufficientBalance, 402),
        fail(errors.AuthenticationFailed, 401),
        fail(errors.ProviderUnavailable, 503),
        fail(errors.ModelUnavailable, 503),
    ]:
        policy = RoutingPolicy(retries=0)
        log, routed = drive(["laozhang", "apiyi"], {"laozhang": [failure], "apiyi": ["ok"]}, policy)
        assert log == ["laozhang", "apiyi"], failure
        assert [(a.provider, a.outcome) for a in routed.attempts] == [
            ("laozhang", "failed"),
            ("apiyi", "ok"),
        ]
        assert routed.attempts[0].error is failure


@pytest.mark.parametrize(
    "failure",
    [
        errors.Timeout("read timeout", provider="laozhang", sent=True),
        errors.TransportError("dropped", provider="laozhang", sent=True),
        fail(errors.ProviderUnavailable, 500),
        errors.ResponseFormatError("garbled", provider="laozhang", status_code=200),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_ambiguous_failure_is_final_unless_opted_in(failure: errors.FluxError) -> None:
    with pytest.raises(type(failure)) as caught:
        drive(["laozhang", "apiyi"], {"laozhang": [failure], "apiyi": ["ok"]})
    assert [a.provider for a in caught.value.attempts] == ["laozhang"]  # apiyi never tried
    log, routed = drive(
        ["laozhang", "apiyi"],
        {"laozhang": [failure], "apiyi": ["ok"]},
        RoutingPolicy(failover_on_ambiguous=True),
    )
    assert log == ["laozhang", "apiyi"]
    assert routed.attempts[-1].outcome == "ok"


@pytest.mark.parametrize(
    "failure", [fail(errors.ContentModerated, 400), fail(errors.ProviderRejected, 422)]
)
def test_moderation_and_invalid_requests_never_fail_over(failure: errors.FluxError) -> None:
    policy = RoutingPolicy(failover_on_ambiguous=True)
    with pytest.raises(type(failure)):
        drive(["laozhang", "apiyi"], {"laozhang": [failure], "apiyi": ["ok"]}, policy)


def test_retries_wait_for_retry_after_or_back_off() -> None:
    log, _ = drive(
        ["laozhang", "apiyi"], {"laozhang": [fail(errors.RateLimited, 429, retry_after=2.0), "ok"]}
    )
    assert log == ["laozhang", "wait 2", "laozhang"]
    refused = errors.TransportError("refused", provider="laozhang", sent=False)
    log, _ = drive(
        ["laozhang", "apiyi"],
        {"laozhang": [refused, refused, refused], "apiyi": ["ok"]},
        RoutingPolicy(retries=2),
    )
    assert log == ["laozhang", "wait 0.5", "laozhang", "wait 1", "laozhang", "apiyi"]
    too_long = fail(errors.RateLimited, 429, retry_after=120.0)
    log, _ = drive(["laozhang", "apiyi"], {"laozhang": [too_long], "apiyi": ["ok"]})
    assert log == ["laozhang", "apiyi"]


def test_retry_pauses_double_but_never_past_the_longest_wait() -> None:
    refused = errors.TransportError("refused", provider="laozhang", sent=False)
    policy = RoutingPolicy(retries=5, backoff=4.0, max_retry_wait=10.0)
    log, _ = drive(["laozhang", "apiyi"], {"laozhang": [refused] * 6, "apiyi": ["ok"]}, policy)
    assert [entry for entry in log if entry.startswith("wait")] == [
        "wait 4",
        "wait 8",
        "wait 10",
        "wait 10",
        "wait 10",
    ]
    # Full jitter: each wait is drawn from [0, ceiling), so clients that failed together spread.
    log, _ = drive(
        ["laozhang", "apiyi"],
        {"laozhang": [refused] * 6, "apiyi": ["ok"]},
        policy,
        draw=lambda: 0.25,
    )
    assert [entry for entry in log if entry.startswith("wait")] == [
        "wait 1",
        "wait 2",
        "wait 2.5",
        "wait 2.5",
        "wait 2.5",
    ]


@given(
    tries=st.integers(-5, 10_000),
    first=st.floats(0, 86_400),
    longest=st.floats(0, 86_400),
    drawn=st.floats(0, 1, exclude_max=True),
)
def test_backoff_is_full_jitter_below_a_doubling_ceiling(
    tries: int, first: float, longest: float, drawn: float
) -> None:
    wait = backoff(tries, first, longest, lambda: drawn)
    ceiling = min(longest, first * 2.0 ** min(max(tries, 0), 64))
    assert 0.0 <= wait <= ceiling
    assert wait == drawn * ceiling


def test_backoff_varies_between_calls() -> None:
    waits = {backoff(3, 0.5, 10.0) for _ in range(50)}
    assert len(waits) > 1
    assert all(0.0 <= wait < 4.0 for wait in waits)


def test_cheapest_orders_by_price_and_skips_what_the_limits_refuse() -> None:
    prices = {("aimlapi", "flux-2-pro"): PerCall(usd=0.01)}
    log, routed = drive(
        ["laozhang", "apiyi", "aimlapi"],
        {"aimlapi": ["ok"]},
        RoutingPolicy(routing="cheapest"),
        prices=prices,
    )
    assert log == ["aimlapi"]
    five = EditRequest(
        prompt="p", model="flux-2-pro", images=[f"https://ex.com/{n}.png" for n in range(5)]
    )
    log, routed = drive(
        ["laozhang", "apiyi", "aimlapi"],
        {"laozhang": ["ok"]},
        RoutingPolicy(routing="cheapest"),
        five,
        prices=prices,
    )
    assert log == ["laozhang"]  # aimlapi takes at most 3 references; unpriced apiyi sorts last
    skipped = routed.attempts[0]
    assert (skipped.provider, skipped.outcome, skipped.reason) == (
        "aimlapi",
        "skipped",
        "its limits refuse the request",
    )
    assert isinstance(skipped.error, errors.RequestError)
    assert skipped.error.violations[0].field == "images"


def test_a_budget_skips_providers_it_cannot_afford() -> None:
    prices = {("laozhang", "flux-2-max"): PerCall(usd=0.07)}
    maxed = EditRequest(prompt="p", model="flux-2-max")
    policy = RoutingPolicy(max_cost_usd=0.05, unknown_price="refuse")
    with pytest.raises(errors.AllProvidersFailed) as caught:
        drive(["laozhang", "apiyi"], {}, policy, maxed, prices=prices)
    reasons = [a.reason for a in caught.value.attempts]
    assert reasons == [
        "estimated $0.0700 exceeds the budget of $0.0500",
        "no known price, and a budget is set",
    ]
    log, _ = drive(
        ["laozhang", "apiyi"],
        {"apiyi": ["ok"]},
        RoutingPolicy(max_cost_usd=0.05),
        maxed,
        prices=prices,
    )
    assert log == ["apiyi"]  # unknown prices allowed by default


def test_an_open_breaker_skips_the_provider_without_trying_it() -> None:
    clock = [0.0]
    breaker = Breaker(cooldown=30.0, clock=lambda: clock[0])
    down = errors.TransportError("refused", provider="laozhang", sent=False)
    drive(
        ["laozhang", "apiyi"],
        {"laozhang": [down], "apiyi": ["ok"]},
        RoutingPolicy(retries=0),
        breaker=breaker,
    )
    log, routed = drive(["laozhang", "apiyi"], {"apiyi": ["ok"]}, breaker=breaker)
    assert log == ["apiyi"]
    assert routed.attempts[0].reason.startswith("cooling down for 30.0 s")
    assert routed.attempts[0].available_in_s == 30.0  # when it may be tried again
    assert routed.attempts[1].available_in_s is None
    clock[0] = 31.0  # half-open: one probe goes through and closes the circuit
    log, _ = drive(["laozhang", "apiyi"], {"laozhang": ["ok"]}, breaker=breaker)
    assert log == ["laozhang"]
    assert breaker.state(("laozhang", "flux-2-pro")) == "closed"


def test_a_single_provider_raises_its_own_error() -> None:
    with pytest.raises(errors.InsufficientBalance) as caught:
        drive(["laozhang"], {"laozhang": [fail(errors.InsufficientBalance, 402)]})
    assert len(caught.value.attempts) == 1
    with pytest.raises(errors.RequestError):
        drive(["aimlapi"], {}, request=EditRequest(prompt="p", model="flux-2-pro", seed=0))


def transport(sent: bool) -> errors.TransportError:
    return errors.TransportError("failed", provider="x", sent=sent)


# Every row of the billing table, with failures that must fall under it. Text in a body never
# moves an ambiguous status: a ModelUnavailable or InsufficientBalance at 500 or 200 stays there.
ACCEPTED = Job(provider="x", model="flux-2-pro", id="job-1", poll_url="https://x.example/poll")


def after_acceptance(error: errors.FluxError) -> errors.FluxError:
    """*error* as a job flow raises it once the provider accepted the job."""
    error.job = ACCEPTED
    return error


def job_failed(billed: bool | None) -> errors.JobFailed:
    return errors.JobFailed("failed", provider="x", job_id="job-1", billed=billed)


BILLING_EXAMPLES: dict[str, list[errors.FluxError]] = {
    "job-not-billed": [after_acceptance(job_failed(False)), job_failed(False)],
    "job-accepted": [
        after_acceptance(
            errors.JobTimeout("late", provider="x", job_id="job-1", waited=600, cancelled=None)
        ),
        after_acceptance(errors.JobNotFound("gone", provider="x", job_id="job-1")),
        after_acceptance(job_failed(None)),
        after_acceptance(job_failed(True)),
        # Whatever a poll meets after the submit was accepted: never "not taken" any more.
        after_acceptance(transport(False)),
        after_acceptance(fail(errors.ProviderUnavailable, 503)),
        after_acceptance(fail(errors.RateLimited, 429)),
        after_acceptance(errors.ResponseFormatError("garbled", provider="x", status_code=200)),
    ],
    "not-connected": [transport(False), errors.Timeout("connect", provider="x", sent=False)],
    "rate-limited": [
        fail(errors.RateLimited, 429, retry_after=1.0),
        fail(errors.ProviderError, 429),
    ],
    "no-balance": [fail(errors.InsufficientBalance, 402), fail(errors.ProviderRejected, 402)],
    "key-refused": [fail(errors.AuthenticationFailed, 401), fail(errors.AuthenticationFailed, 403)],
    "overloaded": [fail(errors.ProviderUnavailable, 503), fail(errors.ModelUnavailable, 503)],
    "provider-rule": [fail(errors.ProviderUnavailable, 599)],  # declared below for this test
    "refused-model-or-balance": [
        fail(errors.ModelUnavailable, 404),
        fail(errors.InsufficientBalance, 400),
    ],
    "moderated": [
        fail(errors.ContentModerated, 400),
        fail(errors.ContentModerated, 200),
        after_acceptance(errors.Moderated("m", provider="x", job_id="job-1", stage="request")),
        after_acceptance(errors.Moderated("m", provider="x", job_id="job-1", stage="content")),
    ],
    "invalid": [fail(errors.ProviderRejected, 400), fail(errors.ProviderRejected, 422)],
    "refused-locally": [
        errors.RequestError([errors.Violation("seed", "bad", ">= 1", "0")]),
        errors.ConfigurationError("no key"),
    ],
    "server-error": [
        fail(errors.ProviderUnavailable, 500),
        fail(errors.ProviderUnavailable, 502),
        fail(errors.ProviderUnavailable, 504),
        fail(errors.ModelUnavailable, 500),  # "model ... is unavailable" in a 500's body
        fail(errors.InsufficientBalance, 500),  # "insufficient quota" in a 500's body
    ],
    "answer-lost": [transport(True), errors.Timeout("read", provider="x", sent=True)],
    "unreadable-answer": [
        errors.ResponseFormatError("garbled", provider="x", status_code=200),
        fail(errors.InsufficientBalance, 200),  # an error report inside a 200
        fail(errors.ModelUnavailable, 200),
        fail(errors.ProviderRejected, 302),
    ],
}


def _rule(name: str) -> BillingRule:
    return next(row for row in BILLING_RULES if row.name == name)


def test_the_billing_table_is_walked_row_by_row() -> None:
    assert set(BILLING_EXAMPLES) == {row.name for row in BILLING_RULES}
    declared = {599: "https://provider.example/docs/errors (599: not billed)"}
    for row in BILLING_RULES:
        for error in BILLING_EXAMPLES[row.name]:
            found = billing_rule(error, declared)
            assert found == row, (row.name, error, found.name)
            assert disposition(error, declared) == row.disposition
    assert billing_rule(fail(errors.ProviderUnavailable, 599)).name == "server-error"  # undeclared
    ambiguous = {r.name for r in BILLING_RULES if r.disposition == "ambiguous"}
    billed = {r.name for r in BILLING_RULES if r.proves == "may be billed"}
    # An accepted job may be billed too, and is final: never sent anywhere again, even when the
    # caller accepts paying twice for an ambiguous failure (failover_on_ambiguous).
    assert ambiguous == billed - {"job-accepted"}
    assert _rule("job-accepted").disposition == "final"


# docs/routing.md shows BILLING_RULES as a table whose rows are "checked top to bottom": a failure
# that fits two rows must fall under the one higher in the table, or a reader of the table
# predicts the wrong outcome (a 503 whose body reports moderation is final, not failed over).
OVERLAPS: list[tuple[errors.FluxError, str]] = [
    (fail(errors.ContentModerated, 503), "overloaded"),
    (fail(errors.ContentModerated, 500), "server-error"),
    (fail(errors.ContentModerated, 502), "server-error"),
    (fail(errors.ContentModerated, 401), "key-refused"),
    (fail(errors.ContentModerated, 402), "no-balance"),
    (
        after_acceptance(errors.Moderated("m", provider="x", job_id="j", stage="content")),
        "job-accepted",
    ),
    (fail(errors.RateLimited, 429), "rate-limited"),  # 429 declared below
    (fail(errors.ProviderUnavailable, 503), "overloaded"),  # 503 declared below
    (fail(errors.AuthenticationFailed, 401), "key-refused"),  # 401 declared below
]


@pytest.mark.parametrize(
    ("error", "also_fits"), OVERLAPS, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_a_failure_fitting_two_rows_falls_under_the_higher_one(
    error: errors.FluxError, also_fits: str
) -> None:
    declared = dict.fromkeys((429, 503, 401), "https://provider.example/docs/errors")
    found = billing_rule(error, declared).name
    names = [row.name for row in BILLING_RULES]
    assert found != also_fits
    assert names.index(found) < names.index(also_fits), (found, also_fits)


# provider-rule needs an adapter that declares the status: the test after this one.
@pytest.mark.parametrize("name", [r.name for r in BILLING_RULES if r.name != "provider-rule"])
def test_each_row_does_what_it_says_in_a_failover(name: str) -> None:
    """Drive a two-provider route with the row's first example: only not-taken rows fail over."""
    row = next(r for r in BILLING_RULES if r.name == name)
    failure = BILLING_EXAMPLES[name][0]
    policy = RoutingPolicy(retries=0)
    replies: dict[str, list[object]] = {"laozhang": [failure], "apiyi": ["ok"]}
    if row.disposition in ("retry", "next"):
        log, routed = drive(["laozhang", "apiyi"], replies, policy)
        assert log == ["laozhang", "apiyi"]
        assert routed.attempts[0].billing == name
    else:
        with pytest.raises(type(failure)) as caught:
            drive(["laozhang", "apiyi"], replies, policy)
        assert [a.provider for a in caught.value.attempts] == ["laozhang"]  # apiyi never tried
        assert caught.value.attempts[0].billing == name


def test_a_provider_rule_citing_its_document_makes_a_status_not_taken() -> None:
    class Documented:
        def __init__(self, inner: Adapter) -> None:
            self._inner = inner
            self.not_taken = {599: "https://provider.example/docs/errors"}

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

    documented = Documented(call_adapter("laozhang"))

    def of(candidate: object) -> Adapter:
        return documented if candidate == "laozhang" else call_adapter(str(candidate))  # type: ignore[return-value]

    router = route(REQUEST, ["laozhang", "apiyi"], of, RoutingPolicy(retries=0), Breaker())
    assert isinstance(next(router), Try)
    second = router.send(fail(errors.ProviderUnavailable, 599))
    assert isinstance(second, Try)
    assert second.candidate == "apiyi"


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"backoff": float("nan")}, "backoff"),
        ({"cooldown": 10**400}, "cooldown"),
        ({"max_retry_wait": "10"}, "max_retry_wait"),
        ({"routing": "fastest"}, "routing"),
        ({"unknown_price": ["allow"]}, "unknown_price"),
        ({"failover_on_ambiguous": 1}, "failover_on_ambiguous"),
        ({"max_cost_usd": float("inf")}, "max_cost_usd"),
    ],
)
def test_a_routing_policy_refuses_values_it_cannot_use(
    settings: dict[str, object], problem: str
) -> None:
    with pytest.raises(errors.ConfigurationError, match=problem):
        RoutingPolicy(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("client_class", ["FluxClient", "AsyncFluxClient"])
@pytest.mark.parametrize(
    "beside",
    [{"max_cost_usd": 0.01}, {"routing": "cheapest"}, {"failover_on_ambiguous": True}],
)
def test_a_routing_setting_beside_a_policy_is_refused_not_silently_dropped(
    client_class: str, beside: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The policy holds these too: given beside it, the policy's own won without a word (a
    # cost cap of one cent dropped, the calls made at any price).
    import asyncio

    import flux_adapters

    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key-laozhang")
    monkeypatch.setenv("APIYI_API_KEY", "test-key-apiyi")
    make = getattr(flux_adapters, client_class)
    name = next(iter(beside))
    with pytest.raises(errors.ConfigurationError, match=f"{name}=.* beside policy="):
        make(providers=["laozhang", "apiyi"], policy=RoutingPolicy(), **beside)
    # With the policy alone, or max_retries beside it (documented to replace its retries), fine.
    client = make(providers=["laozhang", "apiyi"], policy=RoutingPolicy(**beside), max_retries=0)
    assert client._policy == RoutingPolicy(**beside, retries=0)
    if client_class == "FluxClient":
        client.close()
    else:
        asyncio.run(client.aclose())


class BreakerMachine(RuleBasedStateMachine):
    """The breaker against a simple model: per key, open until a time, and at most one probe.

    Calls go through the real router, so a probe that is cancelled (the generator closed while
    its attempt is out, as ``asyncio.wait_for`` does to an async edit) or that meets a final
    error must release the probe: the provider is never skipped beyond its cooldown.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.breaker = Breaker(cooldown=10.0, clock=lambda: self.now)
        self.opened_until: dict[str, float] = {}
        self.probing: set[str] = set()
        self.out: dict[str, list[tuple[Generator[object, object, Routed], bool]]] = {
            "laozhang": [],
            "apiyi": [],
        }

    keys = st.sampled_from(["laozhang", "apiyi"])

    def _model_ask(self, key: str) -> str:
        """What the model expects of an acquire: "pass", "probe" or "skip"."""
        until = self.opened_until.get(key)
        if until is None:
            return "pass"
        if self.now < until:
            return "skip"
        return "skip" if key in self.probing else "probe"

    @rule(seconds=st.floats(0, 25))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @rule(key=keys, retry_after=st.none() | st.floats(0, 40))
    def fail(self, key: str, retry_after: float | None) -> None:
        self.breaker.failure((key, MODEL), retry_after)
        self.opened_until[key] = self.now + max(10.0, retry_after or 0.0)
        self.probing.discard(key)

    @rule(key=keys)
    def succeed(self, key: str) -> None:
        self.breaker.success((key, MODEL))
        self.opened_until.pop(key, None)
        self.probing.discard(key)

    @rule(key=keys)
    def ask(self, key: str) -> None:
        expected = self._model_ask(key)
        granted = self.breaker.acquire((key, MODEL))
        if expected == "skip":
            assert not isinstance(granted, Pass)
            until = self.opened_until[key]
            assert abs(granted - max(0.0, until - self.now)) < 1e-6 or key in self.probing
        else:
            assert granted == Pass((key, MODEL), probe=expected == "probe")
            if expected == "probe":
                self.probing.add(key)
                self.breaker.release(granted)  # this probe ends undecided at once
                self.probing.discard(key)

    @rule(key=keys)
    def start_call(self, key: str) -> None:
        """A call reaches the router; it holds a pass (maybe the probe) until it ends."""
        expected = self._model_ask(key)
        router = route(
            REQUEST,
            [key],
            adapter_of,
            RoutingPolicy(retries=0),
            self.breaker,
        )
        if expected == "skip":
            with pytest.raises(errors.AllProvidersFailed):
                next(router)
            return
        assert isinstance(next(router), Try)
        if expected == "probe":
            self.probing.add(key)
        self.out[key].append((router, expected == "probe"))  # type: ignore[arg-type]

    @precondition(lambda self: any(self.out.values()))
    @rule(key=keys, how=st.sampled_from(["cancel", "final", "ok", "down"]))
    def end_call(self, key: str, how: str) -> None:
        if not self.out[key]:
            return
        router, probe = self.out[key].pop(0)
        if how == "cancel":
            router.close()  # GeneratorExit at the yield: the finally must release the probe
            if probe:
                self.probing.discard(key)
        elif how == "final":
            with pytest.raises(errors.ContentModerated):
                router.send(fail(errors.ContentModerated, 400))
            if probe:
                self.probing.discard(key)
        elif how == "ok":
            with pytest.raises(StopIteration):
                router.send(ok(key))
            self.opened_until.pop(key, None)
            self.probing.discard(key)
        else:
            with pytest.raises(errors.ProviderUnavailable):
                router.send(fail(errors.ProviderUnavailable, 503))
            self.opened_until[key] = self.now + 10.0
            self.probing.discard(key)

    @invariant()
    def states_agree(self) -> None:
        for key in ("laozhang", "apiyi"):
            until = self.opened_until.get(key)
            expected = "closed" if until is None else "open" if self.now < until else "half-open"
            assert self.breaker.state((key, MODEL)) == expected


TestBreaker = BreakerMachine.TestCase
