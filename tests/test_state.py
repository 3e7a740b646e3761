"""The shared state (`flux_adapters.state`): the same behaviour in-process and in a real Redis.

Every test that names ``backend`` runs twice: on `LocalState` and on `RedisState` against a
redis-server the suite starts (tests/redis_server.py), each test under its own key prefix.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from flux_adapters import FluxClient
from flux_adapters.config import ProviderSettings
from flux_adapters.errors import ConfigurationError, FluxError
from flux_adapters.routing import Admitted, Denied, Pass
from flux_adapters.state import (
    Ask,
    Finish,
    KeyRecord,
    LocalState,
    RedisState,
    bucket_id,
    check_rate,
    check_seconds,
    check_usd,
    open_state,
)
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.anyio

_prefixes = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def fresh_prefix() -> str:
    return f"t{next(_prefixes)}:"


@pytest.fixture(params=["local", "redis"])
async def backend(request: pytest.FixtureRequest, redis: RedisServer) -> AsyncIterator[Any]:
    if request.param == "local":
        yield LocalState()
        return
    state = RedisState(redis.url, prefix=fresh_prefix())
    yield state
    await state.aclose()


KEY = ("laozhang", "flux-2-pro")


async def test_a_budget_reserves_until_full_and_a_refund_makes_room(backend: Any) -> None:
    taken = [await backend.reserve("client:a", 0.3, 1.0, "total") for _ in range(4)]
    assert [t is not None for t in taken] == [True, True, True, False]
    assert await backend.spent("client:a", "total") == pytest.approx(0.9)
    await backend.settle(taken[0], 0.0)  # refunded: nothing was billed
    assert await backend.spent("client:a", "total") == pytest.approx(0.6)
    await backend.settle(taken[1], 0.35)  # the provider's own figure, a little higher
    assert await backend.spent("client:a", "total") == pytest.approx(0.65)
    assert await backend.spent("client:other", "total") == 0.0


async def test_day_budgets_and_total_budgets_are_apart(backend: Any) -> None:
    assert await backend.reserve("key:k1", 1.0, 1.0, "day") is not None
    assert await backend.reserve("key:k1", 0.01, 1.0, "day") is None
    assert await backend.reserve("key:k1", 1.0, 1.0, "total") is not None
    reservation = await backend.reserve("key:k2", 0.5, 1.0, "day")
    assert reservation.period == "day"
    assert reservation.window.isdigit()


async def test_many_tasks_reserving_at_once_never_overspend(backend: Any) -> None:
    results = await asyncio.gather(
        *(backend.reserve("client:crowd", 0.07, 1.0, "total") for _ in range(60))
    )
    granted = [r for r in results if r is not None]
    assert len(granted) == 14  # 14 x 0.07 = 0.98; a 15th would pass $1
    assert await backend.spent("client:crowd", "total") == pytest.approx(0.98)


async def test_many_threads_admitting_at_once_never_overspend(backend: Any) -> None:
    blocking = backend.blocking
    ask = Ask(scope="client:threads", amount_usd=0.1, limit_usd=2.0, period="total")
    answers: list[object] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(10):
            answer = blocking.admit(ask)
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(a, Admitted) for a in answers) == 20
    assert all(
        isinstance(a, Denied) and a.kind == "budget" for a in answers if not isinstance(a, Admitted)
    )


async def test_the_breaker_opens_on_failure_for_the_longer_of_cooldown_and_retry_after(
    backend: Any,
) -> None:
    assert await backend.breaker_acquire(KEY) == Pass(KEY)
    assert await backend.breaker_failure(KEY, None, 30.0) == 30.0
    left = await backend.breaker_acquire(KEY)
    assert isinstance(left, float)
    assert 0 < left <= 30.0
    assert await backend.breaker_failure(KEY, 120.0, 30.0) == 120.0
    other = ("laozhang", "flux-2-max")  # per model: another model of the provider is still used
    assert await backend.breaker_acquire(other) == Pass(other)


async def test_a_retry_after_longer_than_the_longest_pause_is_cut_to_it(backend: Any) -> None:
    started = await backend.finish(
        Finish(granted=Pass(KEY), outcome="failure", retry_after=86_400.0, cooldown=30.0)
    )
    assert started == 900.0


async def _cool_down(backend: Any) -> None:
    """Make the open circuit's cooldown pass (as if 30 s went by), without waiting for it."""
    if isinstance(backend, LocalState):
        backend._circuits[KEY][0] = 0.0
    else:
        import redis

        raw = redis.Redis.from_url(backend._url)
        raw.hset(backend._layout.circuit(KEY), "until", "0")
        raw.close()


async def test_after_the_cooldown_exactly_one_call_probes(backend: Any) -> None:
    await backend.breaker_failure(KEY, None, 30.0)
    await _cool_down(backend)
    answers = await asyncio.gather(*(backend.breaker_acquire(KEY) for _ in range(20)))
    probes = [a for a in answers if isinstance(a, Pass)]
    assert probes == [Pass(KEY, probe=True)]
    assert all(a == 0.0 for a in answers if not isinstance(a, Pass))
    await backend.breaker_release(probes[0])  # ended without showing either way
    again = await backend.breaker_acquire(KEY)
    assert again == Pass(KEY, probe=True)
    await backend.breaker_success(KEY)
    assert await backend.breaker_acquire(KEY) == Pass(KEY)  # closed


async def test_a_failed_probe_opens_the_circuit_again(backend: Any) -> None:
    await backend.breaker_failure(KEY, None, 30.0)
    await _cool_down(backend)
    probe = await backend.breaker_acquire(KEY)
    assert probe == Pass(KEY, probe=True)
    await backend.finish(Finish(granted=probe, outcome="failure", cooldown=30.0))
    assert isinstance(await backend.breaker_acquire(KEY), float)


async def test_a_token_bucket_paces_and_a_pause_stops_everyone(backend: Any) -> None:
    bucket = bucket_id("laozhang", "sk-secret")
    assert [await backend.take(bucket, 1.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = await backend.take(bucket, 1.0, 3)
    assert 0 < wait <= 1.0
    other = bucket_id("laozhang", "sk-other-key")
    assert await backend.take(other, 1.0, 3) == 0.0  # per key
    await backend.pause(other, 60.0)
    paused = await backend.take(other, 1.0, 3)
    assert 59.0 < paused <= 60.0
    denied = await backend.admit(Ask(key=KEY, bucket=other))  # no rate set: the pause still holds
    assert isinstance(denied, Denied)
    assert denied.kind == "paused"


async def test_nothing_is_taken_when_one_part_refuses(backend: Any) -> None:
    bucket = bucket_id("apiyi", "k")
    full = Ask(
        key=KEY,
        bucket=bucket,
        rate_per_s=1.0,
        burst=1,
        scope="client:parts",
        amount_usd=0.5,
        limit_usd=0.4,
        period="total",
    )
    denied = await backend.admit(full)
    assert isinstance(denied, Denied)
    assert denied.kind == "budget"
    # The budget refused, so the token was not spent: the same call under a budget that fits goes.
    fits = Ask(key=KEY, bucket=bucket, rate_per_s=1.0, burst=1, scope="client:parts",
               amount_usd=0.3, limit_usd=0.4, period="total")  # fmt: skip
    assert isinstance(await backend.admit(fits), Admitted)


async def test_gateway_keys_are_kept_by_their_hash(backend: Any) -> None:
    record = KeyRecord(id="ab12", key_hash="a" * 64, name="web app", budget_usd=50.0)
    await backend.put_key(record)
    assert await backend.get_key("a" * 64) == record
    assert await backend.get_key("b" * 64) is None
    assert await backend.list_keys() == [record]
    assert await backend.delete_key("ab12") is True
    assert await backend.delete_key("ab12") is False
    assert await backend.get_key("a" * 64) is None


HOSTILE_SCOPES = ["", "a b", "key:x\r\nFLUSHALL", "x" * 201, "\x00", "ключ", "-leading", "a\nb"]


@pytest.mark.parametrize("scope", HOSTILE_SCOPES)
async def test_odd_scope_names_are_refused(backend: Any, scope: str) -> None:
    with pytest.raises(ConfigurationError, match="scope"):
        await backend.reserve(scope, 0.1, 1.0, "total")
    with pytest.raises(ConfigurationError, match="scope"):
        await backend.spent(scope, "total")


@pytest.mark.parametrize(
    ("amount", "limit"),
    [
        (math.nan, 1.0),
        (0.1, math.nan),
        (math.inf, 1.0),
        (0.1, math.inf),
        (-0.1, 1.0),
        (0.1, -1.0),
        (1e300, 1e300),
        ("0.1", 1.0),
        (True, 1.0),
        (None, 1.0),
    ],
)
async def test_careless_amounts_are_refused(backend: Any, amount: object, limit: object) -> None:
    with pytest.raises(ConfigurationError):
        await backend.reserve("client:x", amount, limit, "total")


async def test_careless_periods_rates_and_pauses_are_refused(backend: Any) -> None:
    bucket = bucket_id("laozhang", "k")
    with pytest.raises(ConfigurationError, match="period"):
        await backend.reserve("client:x", 0.1, 1.0, "week")
    for rate, burst in [(math.nan, 1), (0.0, 1), (-1.0, 1), (math.inf, 1), (1.0, 0), (1.0, 1.5)]:
        with pytest.raises(ConfigurationError):
            await backend.take(bucket, rate, burst)
    for bad in ("k\r\nx", "", "x" * 65, "a b"):
        with pytest.raises(ConfigurationError, match="bucket"):
            await backend.take(bad, 1.0, 1)
    for seconds in (math.nan, math.inf, -1.0, 1e12):
        with pytest.raises(ConfigurationError):
            await backend.pause(bucket, seconds)
        with pytest.raises(ConfigurationError):
            await backend.breaker_failure(KEY, seconds, 30.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"id": "a b", "key_hash": "a" * 64},
        {"id": "ab", "key_hash": "fxg_ab_secret"},  # a secret instead of its hash
        {"id": "ab", "key_hash": "A" * 64},
        {"id": "ab", "key_hash": "a" * 64, "name": "x\r\ny"},
        {"id": "ab", "key_hash": "a" * 64, "name": "x" * 201},
        {"id": "ab", "key_hash": "a" * 64, "budget_usd": math.nan},
        {"id": "ab", "key_hash": "a" * 64, "period": "week"},
        {"id": "ab", "key_hash": "a" * 64, "allowed_models": ["flux-2-pro"]},
        {"id": "ab", "key_hash": "a" * 64, "rate_per_minute": -1.0},
        {"id": "ab", "key_hash": "a" * 64, "created": math.inf},
        # An int beyond a float's range: OverflowError, outside the FluxError tree, before.
        {"id": "ab", "key_hash": "a" * 64, "budget_usd": 10**400},
        {"id": "ab", "key_hash": "a" * 64, "rate_per_minute": 10**400},
        {"id": "ab", "key_hash": "a" * 64, "created": 10**400},
    ],
)
def test_careless_key_records_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        KeyRecord(**fields)


@pytest.mark.parametrize(
    "check", [check_usd, check_seconds, lambda value, what: check_rate(value, 1)]
)
def test_an_int_too_large_for_a_float_is_refused_not_an_overflow_error(check: Any) -> None:
    # float(10**400) raised OverflowError out of the checks: FluxClient(budget_usd=10**400)
    # ended outside the FluxError tree.
    with pytest.raises(ConfigurationError, match="finite number"):
        check(10**400, "x")


def test_a_client_budget_too_large_for_a_float_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "sk-abcdefabcdefabcdef")
    with pytest.raises(ConfigurationError, match="budget"):
        FluxClient("laozhang", budget_usd=10**400)


@pytest.mark.parametrize("rate", [-1.0, 2e6, math.inf])
def test_a_key_records_rate_is_refused_in_its_own_unit(rate: float) -> None:
    # The rate is per minute; the refusal said "at most 1e6 per second", 60 times the bound.
    with pytest.raises(ConfigurationError, match=r"rate_per_minute .* a minute.* at most 1000000"):
        KeyRecord(id="ab", key_hash="a" * 64, rate_per_minute=rate)


@pytest.mark.parametrize("rate", [1e-300, 1e-9, 0.0001])
def test_a_key_rate_no_one_means_is_refused_as_a_providers_is(rate: float) -> None:
    # A provider's rate_per_minute refused 1e-300 (the first call held the next for 10^300 s);
    # a gateway key's took it. One check, one message.
    with pytest.raises(ConfigurationError) as caught:
        KeyRecord(id="ab", key_hash="a" * 64, rate_per_minute=rate)
    said = str(caught.value)
    assert said.startswith(
        "rate_per_minute must be a number of requests a minute, at least one a day"
    )
    settings = {"laozhang": ProviderSettings(name="laozhang", rate_per_minute=rate)}
    with pytest.raises(ConfigurationError) as client:
        FluxClient(providers=["laozhang"], settings=settings)
    assert str(client.value).endswith(said.replace("1000000", "60000000"))


def test_a_stored_key_rate_below_one_a_day_names_the_rule_it_breaks() -> None:
    # Stored before the bound: the key store cannot be read, and its message says why.
    from flux_adapters.gateway._keys import record_from_dict

    with pytest.raises(ConfigurationError, match=r"damaged: rate_per_minute must be .* one a day"):
        record_from_dict({"id": "ab", "key_hash": "a" * 64, "rate_per_minute": 1e-300})


def test_a_key_rate_of_one_a_day_is_taken() -> None:
    assert KeyRecord(id="ab", key_hash="a" * 64, rate_per_minute=1 / 1440).rate_per_minute


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0\r\nFLUSHALL",
        "http://localhost:6379",
        "redis://a b",
        "",
        "memcached://x",
    ],
)
def test_state_urls_that_are_not_redis_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="state URL"):
        open_state(url)


def test_open_state_local_is_this_process_s_one_state() -> None:
    assert open_state() is open_state("local")
    assert isinstance(open_state(), LocalState)
    with pytest.raises(ConfigurationError, match="fallback"):
        open_state(None, fallback="maybe")  # type: ignore[arg-type]


def test_every_state_error_is_a_flux_error() -> None:
    from flux_adapters.errors import BudgetExceeded, StateUnavailable

    assert issubclass(StateUnavailable, FluxError)
    assert issubclass(BudgetExceeded, FluxError)
