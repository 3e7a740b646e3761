"""Client settings as in the SDKs people know: max_retries, with_options, the caller's http_client
timeout, the flux_adapters logger; each argument checked when the client is built.

Against the emulator where the network matters (retries, timeouts, the logger's routing
decisions), through httpx.MockTransport where an answer must be one no emulator sends (a
Retry-After that is a date or garbage, a key echoed in an error body or a polling URL).
"""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, ProviderName, errors
from flux_adapters._log import LOGGER, configure_from_env
from flux_adapters.client import DEFAULT_DEADLINE, DEFAULT_TIMEOUT
from flux_adapters.config import ProviderSettings
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.prices import PerCall
from flux_adapters.routing import RoutingPolicy
from tests.conftest import image_bytes

REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")
KEYS = {
    "laozhang": "sk-lz-SECRET-0123456789abcdef",
    "apiyi": "apiyiSECRETnotshapedlikeakey987654",  # no "sk-": only the client's own list finds it
    "aimlapi": "aiml-SECRET-key-ffffeeeeddddcccc",
}
ENV_PREFIX = {"laozhang": "LAOZHANG", "apiyi": "APIYI", "aimlapi": "AIMLAPI"}


@pytest.fixture(scope="module")
def running() -> Iterator[Emulator]:
    with run_emulator() as emulator:
        yield emulator


@pytest.fixture
def emulator(running: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    for provider, prefix in ENV_PREFIX.items():
        monkeypatch.setenv(f"{prefix}_API_KEY", KEYS[provider])
        monkeypatch.setenv(f"{prefix}_BASE_URL", running.base_url(provider))
    yield running
    running.clear_faults()


def posts(emulator: Emulator, provider: str) -> int:
    return len(emulator.calls(provider, "submit"))


# --- max_retries -------------------------------------------------------------------------------


def test_max_retries_retries_a_single_provider_after_a_429(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=429, retry_after=0, first=2))
    before = posts(emulator, "laozhang")
    with FluxClient("laozhang", max_retries=2) as client:
        result = client.edit(REQUEST)
    assert posts(emulator, "laozhang") == before + 3
    assert [a.outcome for a in result.attempts] == ["failed", "failed", "ok"]
    assert [a.billing for a in result.attempts] == ["rate-limited", "rate-limited", ""]


def test_max_retries_bounds_the_tries_and_the_default_is_none_for_one_provider(
    emulator: Emulator,
) -> None:
    emulator.inject("laozhang", Fault(status=429, retry_after=0))
    before = posts(emulator, "laozhang")
    with FluxClient("laozhang", max_retries=1) as client, pytest.raises(errors.RateLimited):
        client.edit(REQUEST)
    assert posts(emulator, "laozhang") == before + 2
    with FluxClient("laozhang") as client, pytest.raises(errors.RateLimited):
        client.edit(REQUEST)
    assert posts(emulator, "laozhang") == before + 3


def test_a_503_is_retried_when_no_other_provider_is_left(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=503, first=1))
    before = posts(emulator, "laozhang")
    with FluxClient("laozhang", max_retries=1) as client:
        result = client.edit(REQUEST)
    assert posts(emulator, "laozhang") == before + 2
    assert [a.billing for a in result.attempts] == ["overloaded", ""]


def test_a_503_fails_over_at_once_when_another_provider_can_serve(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=503))
    before = posts(emulator, "laozhang")
    with FluxClient(providers=["laozhang", "apiyi"], max_retries=3) as client:
        result = client.edit(REQUEST)
    assert result.provider == "apiyi"
    assert posts(emulator, "laozhang") == before + 1


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault(status=500), errors.ProviderUnavailable),
        (Fault(status=502), errors.ProviderUnavailable),
        (Fault(status=504), errors.ProviderUnavailable),
        (Fault(drop=True), errors.TransportError),
        (Fault(body="malformed"), errors.ResponseFormatError),
        (Fault(delay=2), errors.Timeout),
    ],
    ids=["500", "502", "504", "drop", "malformed-200", "read-timeout"],
)
def test_max_retries_never_retries_what_may_have_been_billed(
    emulator: Emulator, fault: Fault, error: type[errors.FluxError]
) -> None:
    emulator.inject("laozhang", fault)
    before = posts(emulator, "laozhang")
    billed = len(emulator.billed("laozhang"))
    with FluxClient("laozhang", max_retries=5, timeout=0.5) as client, pytest.raises(error):
        client.edit(REQUEST)
    assert posts(emulator, "laozhang") - before == 1  # one POST: never sent again
    assert len(emulator.billed("laozhang")) - billed <= 1


def test_a_retry_after_longer_than_the_longest_wait_is_not_waited_for(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=429, retry_after=3600))
    before = posts(emulator, "laozhang")
    started = time.monotonic()
    with FluxClient("laozhang", max_retries=3) as client, pytest.raises(errors.RateLimited):
        client.edit(REQUEST)
    assert posts(emulator, "laozhang") == before + 1
    assert time.monotonic() - started < 60  # not an hour: a bound, not a timing


def test_async_client_takes_max_retries(emulator: Emulator) -> None:
    emulator.inject("apiyi", Fault(status=429, retry_after=0, first=1))
    before = posts(emulator, "apiyi")

    async def main() -> list[str]:
        async with AsyncFluxClient("apiyi", max_retries=1) as client:
            result = await client.edit(REQUEST)
            return [a.outcome for a in result.attempts]

    assert asyncio.run(main()) == ["failed", "ok"]
    assert posts(emulator, "apiyi") == before + 2


# --- Retry-After of every shape, through MockTransport ------------------------------------------

OK_BODY = {"created": 1, "data": [{"url": "https://cdn.example/a.png"}]}


def scripted(answers: list[httpx.Response]) -> tuple[httpx.Client, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def reply(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        answer = answers.pop(0) if answers else httpx.Response(200, json=OK_BODY)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return httpx.Client(transport=httpx.MockTransport(reply)), sent


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Each wait the sync client makes between tries, recorded instead of slept.

    Only this thread's: `time.sleep` is the module's, and a thread another test left running
    (a server's, a journal's) still sleeps as it asked.
    """
    slept: list[float] = []
    real, here = time.sleep, threading.current_thread()

    def sleep(seconds: float) -> None:
        if threading.current_thread() is here:
            slept.append(seconds)
        else:
            real(seconds)

    monkeypatch.setattr("flux_adapters.client.time.sleep", sleep)
    return slept


@pytest.mark.parametrize(
    ("header", "retried", "longest"),
    [
        ("2", True, 2.0),  # seconds: waited as asked
        ("0", True, 0.0),
        ("-5", True, 0.5),  # not a number of seconds: the jittered backoff instead
        ("soon", True, 0.5),  # garbage: backoff
        ("1e400", True, 0.5),  # not the digits the header allows: backoff
        ("Wed, 21 Oct 2015 07:28:00 GMT", True, 0.0),  # a date in the past: at once
        ("Fri, 31 Dec 9999 23:59:59 GMT", False, 0.0),  # a date far ahead: not waited for
        ("99999", False, 0.0),  # over max_retry_wait (10 s): fails at once, not after a day
        ("9999999999", False, 0.0),
    ],
)
def test_every_retry_after_is_bounded(
    header: str, retried: bool, longest: float, waits: list[float]
) -> None:
    answer = httpx.Response(429, headers={"Retry-After": header}, json={"error": {"message": "x"}})
    http, sent = scripted([answer])
    client = FluxClient("laozhang", api_key="test-key", http_client=http, max_retries=1)
    if retried:
        assert client.edit(REQUEST).provider == "laozhang"
        assert len(sent) == 2
        [wait] = waits
        assert 0.0 <= wait <= longest
    else:
        with pytest.raises(errors.RateLimited):
            client.edit(REQUEST)
        assert len(sent) == 1
        assert waits == []


def test_no_wait_is_longer_than_the_clients_deadline(waits: list[float]) -> None:
    answer = httpx.Response(429, headers={"Retry-After": "5"}, json={"error": {"message": "x"}})
    http, sent = scripted([answer])
    client = FluxClient("laozhang", api_key="test-key", http_client=http, max_retries=2, timeout=2)
    with pytest.raises(errors.RateLimited):  # 5 s would be within max_retry_wait, not the 2 s
        client.edit(REQUEST)
    assert (len(sent), waits) == (1, [])
    http, sent = scripted([httpx.Response(503), httpx.Response(503)])
    slow = RoutingPolicy(retries=2, backoff=60.0, max_retry_wait=60.0, cooldown=0)
    client = FluxClient("laozhang", api_key="test-key", http_client=http, policy=slow, timeout=2)
    assert client.edit(REQUEST).provider == "laozhang"
    assert len(waits) == 2
    assert all(0.0 <= wait <= 2.0 for wait in waits)


def test_a_retry_after_an_adapter_of_another_package_made_up_is_bounded(
    waits: list[float],
) -> None:
    """retry_after as a str, NaN, infinity or a huge int: never a crash, never a long wait."""
    from flux_adapters.providers.laozhang import LaozhangAdapter

    for asked in ["5", math.nan, math.inf, -3.0, 10**400, True]:

        class Odd(LaozhangAdapter):
            said: object = asked

            def parse_error(self, response: Any) -> errors.ProviderError:
                return errors.RateLimited(
                    "slow down",
                    provider=self.name,
                    status_code=429,
                    retry_after=self.said,  # type: ignore[arg-type]
                )

        http, _ = scripted([httpx.Response(429)])
        waits.clear()
        client = FluxClient(Odd(), api_key="test-key", http_client=http, max_retries=1)
        if asked in (math.inf, 10**400):
            with pytest.raises(errors.RateLimited):
                client.edit(REQUEST)
            assert waits == []
        else:
            assert client.edit(REQUEST).provider == "laozhang"
            assert all(0.0 <= wait <= 0.5 for wait in waits), asked


# --- with_options ------------------------------------------------------------------------------


def test_with_options_is_a_light_copy_sharing_the_pool(emulator: Emulator) -> None:
    client = FluxClient("laozhang", timeout=30, max_retries=0)
    copy = client.with_options(timeout=5, max_retries=2)
    assert copy._http is client._http  # one connection pool
    assert copy._breaker is client._breaker
    assert (copy.max_retries, copy.deadline, copy.timeout.read) == (2, 5.0, 5.0)
    assert (client.max_retries, client.deadline, client.timeout.read) == (0, 30.0, 30.0)
    keep = client.with_options()
    assert (keep.max_retries, keep.timeout) == (client.max_retries, client.timeout)
    emulator.inject("laozhang", Fault(status=429, retry_after=0, first=1))
    with copy:
        assert copy.edit(REQUEST).provider == "laozhang"  # retried once, as the copy says
    assert not client._http.is_closed  # closing the copy left the pool open
    assert client.edit(REQUEST).provider == "laozhang"
    client.close()
    with pytest.raises(errors.ConfigurationError, match="closed"):
        copy.edit(REQUEST)  # the pool's owner closed it


def test_with_options_timeout_applies_to_the_copy_only(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(delay=1.0, first=1))
    with FluxClient("laozhang") as client:
        with pytest.raises(errors.Timeout) as caught:
            client.with_options(timeout=0.2).edit(REQUEST)
        assert caught.value.sent is True  # the provider may have it: never retried
        assert client.edit(REQUEST).provider == "laozhang"


def test_with_options_on_a_callers_http_client_never_closes_it(emulator: Emulator) -> None:
    with httpx.Client() as http:
        client = FluxClient("laozhang", http_client=http)
        with client.with_options(max_retries=1) as copy:
            copy.edit(REQUEST)
        client.close()
        assert not http.is_closed


def test_async_with_options_shares_the_pool_and_its_event_loop(emulator: Emulator) -> None:
    async def main() -> None:
        async with AsyncFluxClient("apiyi") as client:
            async with client.with_options(timeout=20, max_retries=1) as copy:
                assert copy._driver is client._driver
                assert copy._loop is client._loop
                assert (await copy.edit(REQUEST)).provider == "apiyi"
            assert not client._driver.is_closed
            assert (await client.edit(REQUEST)).provider == "apiyi"

    asyncio.run(main())


BAD_TIMEOUTS: list[object] = [
    math.nan,
    math.inf,
    -1,
    0,
    "30",
    True,
    10**400,
    86_401,
    httpx.Timeout(math.nan),
    httpx.Timeout(-1.0),
    httpx.Timeout(5.0, read=0.0),
    [30],
]
BAD_RETRIES: list[object] = [-1, True, False, 1e9, "3", 3.0, 11, 10**100, math.nan, [1]]


@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=repr)
def test_a_bad_timeout_fails_when_the_client_is_built_or_copied(value: object) -> None:
    with pytest.raises(errors.ConfigurationError, match="timeout="):
        FluxClient("laozhang", api_key="test-key", timeout=value)  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError, match="timeout="):
        AsyncFluxClient("laozhang", api_key="test-key", timeout=value)  # type: ignore[arg-type]
    client = FluxClient("laozhang", api_key="test-key")
    with pytest.raises(errors.ConfigurationError, match="timeout="):
        client.with_options(timeout=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", BAD_RETRIES, ids=repr)
def test_a_bad_max_retries_fails_when_the_client_is_built_or_copied(value: object) -> None:
    with pytest.raises(errors.ConfigurationError, match="max_retries="):
        FluxClient("laozhang", api_key="test-key", max_retries=value)  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError, match="max_retries="):
        AsyncFluxClient("laozhang", api_key="test-key", max_retries=value)  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError, match="max_retries="):
        FluxClient("laozhang", api_key="test-key").with_options(max_retries=value)  # type: ignore[arg-type]


def test_good_settings_are_taken_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.setenv("APIYI_API_KEY", "test-key")
    client = FluxClient("laozhang", api_key="test-key", max_retries=10, timeout=httpx.Timeout(7.0))
    assert (client.max_retries, client.timeout.read, client.deadline) == (10, 7.0, DEFAULT_DEADLINE)
    policy = RoutingPolicy(retries=4)
    assert FluxClient("laozhang", api_key="test-key", policy=policy).max_retries == 4
    assert FluxClient("laozhang", api_key="test-key", policy=policy, max_retries=1).max_retries == 1
    assert FluxClient(providers=["laozhang", "apiyi"]).max_retries == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"routing": "fastest"}, "routing= must be 'ordered' or 'cheapest', not 'fastest'"),
        ({"routing": "Cheapest"}, "did you mean 'cheapest'"),
        ({"deadline": "30"}, "deadline="),
        ({"max_cost_usd": math.nan}, "max_cost_usd="),
        ({"failover_on_ambiguous": 1}, "failover_on_ambiguous="),
        ({"polling": 30}, "polling="),
        ({"policy": {"retries": 3}}, "policy="),
        ({"settings": {"laozang": ProviderSettings(name="laozhang")}}, "did you mean 'laozhang'"),
        ({"prices": {("laozhang", "flux-2-por"): PerCall(usd=0.1)}}, "did you mean 'flux-2-pro'"),
        ({"prices": {("laozang", "flux-2-pro"): PerCall(usd=0.1)}}, "did you mean 'laozhang'"),
        ({"prices": {("laozhang", "flux-2-pro"): 0.1}}, "PerCall or PerMegapixel"),
    ],
    ids=lambda value: str(value)[:50],
)
def test_every_argument_is_checked_when_the_client_is_built(
    arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(errors.ConfigurationError, match=message.replace("(", r"\(")):
        FluxClient("laozhang", api_key="test-key", **arguments)


def test_provider_ids_take_any_case_and_settings_and_prices_follow() -> None:
    client = FluxClient(
        ProviderName("LaoZhang"),  # a plain "LaoZhang" works too; mypy wants the canonical id
        api_key="test-key",
        settings={"LAOZHANG": ProviderSettings(name="laozhang", timeout=12)},
        prices={("Laozhang", "flux-2-pro"): PerCall(usd=0.5)},
    )
    assert client.provider == "laozhang"
    assert client.timeout.read == 12.0
    assert client._prices == {("laozhang", "flux-2-pro"): PerCall(usd=0.5)}
    with pytest.raises(errors.ConfigurationError, match="did you mean 'aimlapi'"):
        FluxClient(providers=["laozhang", "AIMLAP"])  # type: ignore[list-item]


# --- the caller's http_client timeout --------------------------------------------------------


def timeouts_sent(client_timeout: Any, **options: Any) -> dict[str, float | None]:
    """The per-phase timeouts the client put on its request to the provider."""
    seen: list[dict[str, float | None]] = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json=OK_BODY)

    transport = httpx.MockTransport(reply)
    http = (
        httpx.Client(transport=transport)
        if client_timeout is None
        else httpx.Client(transport=transport, timeout=client_timeout)
    )
    with http:
        client = FluxClient("laozhang", api_key="test-key", http_client=http, **options)
        client.edit(REQUEST)
    [timeouts] = seen
    return timeouts


def test_the_callers_http_client_timeout_is_respected_unless_timeout_is_given() -> None:
    assert timeouts_sent(httpx.Timeout(7.0, connect=2.0)) == {
        "connect": 2.0,
        "read": 7.0,
        "write": 7.0,
        "pool": 7.0,
    }
    assert timeouts_sent(1)["read"] == 1.0  # httpx.Client(timeout=1): the issue's own example
    assert timeouts_sent(1, timeout=20)["read"] == 20.0  # timeout= wins
    # httpx.Client() without a timeout has httpx's 5 s default: not a choice, the library's.
    assert timeouts_sent(None) == DEFAULT_TIMEOUT.as_dict()
    # httpx.Client(timeout=None): no timeout per phase; the deadline still bounds each one.
    assert timeouts_sent(httpx.Timeout(None))["read"] == DEFAULT_DEADLINE
    with pytest.raises(errors.ConfigurationError, match="http_client="):
        FluxClient(
            "laozhang", api_key="test-key", http_client=httpx.Client(timeout=httpx.Timeout(0))
        )


def test_from_env_takes_max_retries_and_a_configured_timeout_wins_over_the_http_clients(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no flux-adapters.toml here
    monkeypatch.delenv("FLUX_CONFIG", raising=False)
    monkeypatch.delenv("FLUX_TIMEOUT", raising=False)
    monkeypatch.setenv("FLUX_PROVIDERS", "LAOZHANG")
    with httpx.Client(timeout=7) as http:
        client = FluxClient.from_env(http_client=http, max_retries=3)
        assert (client.providers, client.max_retries, client.timeout.read) == (
            ("laozhang",),
            3,
            7.0,
        )
        monkeypatch.setenv("FLUX_TIMEOUT", "45")
        assert FluxClient.from_env(http_client=http).timeout.read == 45.0
    with pytest.raises(errors.ConfigurationError, match="max_retries="):
        FluxClient.from_env(max_retries=-1)


def test_a_hostile_http_client_timeout_is_a_configuration_error() -> None:
    class Broken(httpx.Client):
        @property  # type: ignore[misc]
        def timeout(self) -> httpx.Timeout:
            raise RuntimeError("no")

    with pytest.raises(errors.ConfigurationError, match="http_client="):
        FluxClient("laozhang", api_key="test-key", http_client=Broken())


def test_the_callers_async_http_client_timeout_is_respected(emulator: Emulator) -> None:
    emulator.inject("aimlapi", Fault(delay=1.0, first=1))
    request = REQUEST

    async def main() -> None:
        async with httpx.AsyncClient(timeout=0.2) as http:
            client = AsyncFluxClient("aimlapi", http_client=http)
            assert client.timeout.read == 0.2
            with pytest.raises(errors.Timeout):
                await client.edit(request)
            patient = client.with_options(timeout=30)
            assert (await patient.edit(request)).provider == "aimlapi"

    asyncio.run(main())


def test_timeout_precedence_against_the_emulator(emulator: Emulator) -> None:
    # Every answer comes later than the caller's 0.2 s: the first by a wide margin (it must
    # time out however slow the machine), the others by enough to time out if 0.2 s applied.
    emulator.inject("laozhang", Fault(delay=1.0, first=1))
    emulator.inject("laozhang", Fault(delay=0.5))
    with httpx.Client(timeout=0.2) as http:
        with pytest.raises(errors.Timeout) as caught:  # the caller's 0.2 s: too short
            FluxClient("laozhang", http_client=http).edit(REQUEST)
        assert caught.value.sent is True
        patient = FluxClient("laozhang", http_client=http, timeout=30)  # timeout= wins
        assert patient.edit(REQUEST).provider == "laozhang"
        copy = FluxClient("laozhang", http_client=http).with_options(timeout=30)
        assert copy.edit(REQUEST).provider == "laozhang"


# --- the logger ----------------------------------------------------------------------------------


def every_text(records: list[logging.LogRecord]) -> str:
    return "\n".join(
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''} {vars(record)!r}"
        for record in records
    )


def test_the_logger_shows_each_routing_decision_and_never_a_key(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flux_adapters")
    emulator.inject("laozhang", Fault(status=429, retry_after=0))
    five = EditRequest(
        prompt="p", model="flux-2-pro", images=[f"https://ex.com/{n}.png" for n in range(5)]
    )
    with FluxClient(providers=["aimlapi", "laozhang", "apiyi"], max_retries=1) as client:
        first = client.edit(five)  # aimlapi takes 3 images: skipped; laozhang 429 twice: apiyi
        second = client.edit(five)  # laozhang cooling down: skipped
    assert (first.provider, second.provider) == ("apiyi", "apiyi")
    ours = [record for record in caplog.records if record.name == "flux_adapters"]
    events = [getattr(record, "flux_event", None) for record in ours]
    for event in [
        "skip",
        "candidates",
        "try",
        "exchange",
        "failed",
        "retry",
        "cooldown",
        "failover",
        "served",
    ]:
        assert event in events, event
    text = "\n".join(record.getMessage() for record in ours)
    assert "skipping aimlapi: its limits refuse the request" in text
    assert "laozhang failed" in text
    assert "RateLimited" in text
    assert "row rate-limited: not taken" in text
    assert "retrying laozhang in" in text
    assert "failing over to apiyi" in text
    assert "served by apiyi" in text
    assert "skipping laozhang: cooling down" in text
    assert {record.levelno for record in ours} == {logging.DEBUG, logging.INFO}
    everything = every_text(caplog.records)
    for key in KEYS.values():
        assert key not in everything
        assert key[:12] not in everything


def test_an_ambiguous_failure_is_logged_as_not_failed_over(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_adapters")
    emulator.inject("laozhang", Fault(status=502))
    with (
        FluxClient(providers=["laozhang", "apiyi"]) as client,
        pytest.raises(errors.ProviderUnavailable),
    ):
        client.edit(REQUEST)
    text = caplog.text
    assert "not failing over: laozhang may have done, and billed, the job" in text
    assert "may be billed" in text


def bfl_echoing_its_key(key: str) -> Callable[[httpx.Request], httpx.Response]:
    """A BFL whose polling URL and error bodies carry the key back (a hostile or buggy one)."""

    def reply(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(
                200,
                json={"id": "job-1", "polling_url": f"https://api.bfl.ai/v1/get_result?k={key}"},
            )
        if request.url.path.endswith(".png"):
            return httpx.Response(200, content=image_bytes(), headers={"content-type": "image/png"})
        return httpx.Response(
            401, json={"detail": f"key {key} is not valid; Authorization: Bearer {key}"}
        )

    return reply


def test_no_key_is_logged_even_at_debug_from_a_url_or_an_error_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flux_adapters")
    key = "plainBFLkey0123456789abcdefXYZ"
    from flux_adapters.jobs import Polling

    http = httpx.Client(transport=httpx.MockTransport(bfl_echoing_its_key(key)))
    client = FluxClient("bfl", api_key=key, http_client=http, polling=Polling(first=0.001))
    with pytest.raises(errors.FluxError) as caught:
        client.edit(REQUEST)
    assert key not in str(caught.value)
    records = [record for record in caplog.records if record.name == "flux_adapters"]
    assert any(getattr(record, "flux_event", None) == "exchange" for record in records)
    assert any("get_result" in record.getMessage() for record in records)
    everything = every_text(caplog.records)
    assert key not in everything
    assert key[:8] not in everything  # no fragment either
    assert key[-8:] not in everything


def test_a_log_line_holds_its_text_and_no_arguments(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flux_adapters")
    http, _ = scripted([])
    FluxClient("laozhang", api_key="test-key", http_client=http).edit(REQUEST)
    for record in caplog.records:
        if record.name == "flux_adapters":
            assert record.args in ((), None)
            assert "\n" not in record.getMessage()


def test_logging_costs_nothing_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert any(isinstance(handler, logging.NullHandler) for handler in LOGGER.handlers)
    formatted: list[str] = []

    def never(text: str) -> str:
        formatted.append(text)
        return text

    monkeypatch.setattr("flux_adapters._redact.redactor_for", lambda keys: never)
    LOGGER.setLevel(logging.WARNING)
    try:
        http, _ = scripted([])
        FluxClient("laozhang", api_key="test-key", http_client=http).edit(REQUEST)
    finally:
        LOGGER.setLevel(logging.NOTSET)
    assert formatted == []


def logger_state() -> tuple[int, bool, int]:
    """The level, whether records propagate, and how many handlers write somewhere."""
    writing = [h for h in LOGGER.handlers if not isinstance(h, logging.NullHandler)]
    return LOGGER.level, LOGGER.propagate, len(writing)


def test_flux_log_chooses_the_level_or_stays_off() -> None:
    try:
        assert configure_from_env({"FLUX_LOG": "debug"}) == logging.DEBUG
        assert logger_state() == (logging.DEBUG, False, 1)
        assert configure_from_env({"FLUX_LOG": " INFO "}) == logging.INFO
        assert logger_state() == (logging.INFO, False, 1)  # replaced, not added
        assert configure_from_env({"FLUX_LOG": "off"}) is None
        assert logger_state() == (logging.NOTSET, True, 0)
        with pytest.warns(RuntimeWarning, match="neither 'info' nor 'debug'"):
            assert configure_from_env({"FLUX_LOG": "verbose"}) is None
    finally:
        configure_from_env({})
    assert logger_state() == (logging.NOTSET, True, 0)


SCRIPT = """
import httpx
from flux_adapters import EditRequest, FluxClient

def reply(request):
    if request.url.path.endswith("generations"):
        return httpx.Response(
            401, json={"error": {"message": "bad key sk-echo-SECRET-123456789012 ###KEY###"}}
        )
    raise AssertionError(request.url)

http = httpx.Client(transport=httpx.MockTransport(reply))
client = FluxClient(providers=["laozhang", "apiyi"], http_client=http)
try:
    client.edit(EditRequest(prompt="p", model="flux-2-pro"))
except Exception as error:
    print(type(error).__name__)
"""


@pytest.mark.parametrize("level", ["debug", "info", ""])
def test_flux_log_writes_decisions_to_stderr_without_keys(level: str, tmp_path: Path) -> None:
    import os

    key = "sk-from-env-SECRET-abcdefghijkl"
    script = tmp_path / "app.py"
    script.write_text(SCRIPT.replace("###KEY###", key))
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FLUX_", "LAOZHANG_", "APIYI_"))
    }
    env |= {"FLUX_LOG": level, "LAOZHANG_API_KEY": key, "APIYI_API_KEY": key + "2"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "AllProvidersFailed"
    assert key[:12] not in done.stderr
    if not level:
        assert done.stderr == ""
        return
    assert "INFO flux_adapters: flux-2-pro: laozhang failed" in done.stderr
    assert "failing over to apiyi" in done.stderr
    assert "no provider produced the image" in done.stderr
    assert ("POST http" in done.stderr) == (level == "debug")  # each exchange, at DEBUG


def test_from_env_leaves_out_a_provider_without_a_key_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # no flux-adapters.toml here
    monkeypatch.delenv("FLUX_CONFIG", raising=False)
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang,aimlapi,apiyi")
    monkeypatch.setenv("AIMLAPI_API_KEY", KEYS["aimlapi"])
    monkeypatch.delenv("LAOZHANG_API_KEY", raising=False)
    monkeypatch.setenv("APIYI_API_KEY", "")  # empty counts as unset
    with caplog.at_level(logging.WARNING, logger="flux_adapters"):
        client = FluxClient.from_env()
    assert client.providers == ("aimlapi",)
    skipped = [(r.levelno, r.getMessage(), getattr(r, "flux_event", "")) for r in caplog.records]
    assert skipped == [
        (logging.WARNING, "laozhang skipped: no API key (set LAOZHANG_API_KEY)", "no-key"),
        (logging.WARNING, "apiyi skipped: no API key (set APIYI_API_KEY)", "no-key"),
    ]
    assert KEYS["aimlapi"] not in caplog.text


def test_a_provider_list_without_a_key_is_told_to_set_the_variable_not_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: "pass api_key= or set APIYI_API_KEY", but api_key= goes with provider= only: a
    # list given it is refused. One provider= is still offered both.
    monkeypatch.setenv("LAOZHANG_API_KEY", KEYS["laozhang"])
    monkeypatch.delenv("APIYI_API_KEY", raising=False)
    with pytest.raises(errors.ConfigurationError) as caught:
        FluxClient(providers=["laozhang", "apiyi"])
    assert str(caught.value) == "no API key for apiyi: set APIYI_API_KEY"
    with pytest.raises(errors.ConfigurationError) as caught:
        FluxClient("apiyi")
    assert str(caught.value) == "no API key for apiyi: pass api_key= or set APIYI_API_KEY"


def test_from_env_with_no_key_at_all_names_every_variable_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLUX_CONFIG", raising=False)
    for prefix in ("LAOZHANG", "APIYI", "AIMLAPI"):
        monkeypatch.delenv(f"{prefix}_API_KEY", raising=False)
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang,apiyi,apiyi-multipart")
    with pytest.raises(errors.ConfigurationError) as caught:
        FluxClient.from_env()
    assert str(caught.value) == (
        "no API key for any of the providers: set LAOZHANG_API_KEY (laozhang), "
        "APIYI_API_KEY (apiyi, apiyi-multipart)"
    )
    monkeypatch.setenv("FLUX_PROVIDERS", "aimlapi")
    with pytest.raises(
        errors.ConfigurationError, match=r"^no API key for aimlapi: set AIMLAPI_API_KEY$"
    ):
        AsyncFluxClient.from_env()
    # A key named in the file is looked for under that name.
    (tmp_path / "flux-adapters.toml").write_text(
        'providers = ["laozhang"]\n[provider.laozhang]\napi_key_env = "MY_LZ_KEY"\n'
    )
    monkeypatch.delenv("FLUX_PROVIDERS")
    with pytest.raises(errors.ConfigurationError, match=r"set MY_LZ_KEY$"):
        FluxClient.from_env()
    monkeypatch.setenv("MY_LZ_KEY", KEYS["laozhang"])
    assert FluxClient.from_env().providers == ("laozhang",)


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("https://api.example.com/v1", "https://api.example.com"),  # the OpenAI SDK habit
        ("https://api.example.com/v1/", "https://api.example.com"),
        ("https://api.example.com/relay/v1", "https://api.example.com/relay"),
        ("http://v1", "http://v1"),  # a host named v1 (a container, a cluster service)
        ("http://v1:8080", "http://v1:8080"),
        ("http://gateway/v1", "http://gateway"),
    ],
)
def test_a_final_v1_is_dropped_from_the_path_only(given: str, used: str) -> None:
    from flux_adapters.config import base_url_for
    from flux_adapters.providers import get_adapter

    assert base_url_for(get_adapter("laozhang"), given, environ={}) == used


# --- TLS -----------------------------------------------------------------------------------------


def test_the_clients_trust_what_httpx_trusts_loaded_once_per_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import certifi

    from flux_adapters._transport import shared_ssl_context

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    default = shared_ssl_context()
    assert shared_ssl_context() is default  # the certificates are loaded once
    assert default.get_ca_certs() == httpx.create_ssl_context().get_ca_certs()
    # A company's own authority, named as httpx.Client() reads it: the next context trusts it.
    bundle = Path(certifi.where()).read_text()
    first = bundle[: bundle.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    (tmp_path / "ca.pem").write_text(first[first.index("-----BEGIN CERTIFICATE-----") :] + "\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    assert len(shared_ssl_context().get_ca_certs()) == 1
    monkeypatch.delenv("SSL_CERT_FILE")
    assert shared_ssl_context() is default
