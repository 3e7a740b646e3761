"""Many workers, one Redis: the clients share breakers, budgets and 429 pauses (issue 12).

Worker processes (tests/state_worker.py) edit through the loopback emulator with their state in a
real redis-server the test starts; the emulator counts what reached each provider.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.errors import (
    BudgetExceeded,
    ConfigurationError,
    ProviderUnavailable,
    StateUnavailable,
)
from flux_adapters.prices import PerCall
from flux_adapters.state import RedisState, open_state
from tests.redis_server import RedisServer, redis_server

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"laozhang": "sk-laozhang-SECRET-7f3a9c2e1b", "apiyi": "sk-apiyi-SECRET-0d4e8b6a5f"}
REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")
PRICES = {(p, "flux-2-pro"): PerCall(usd=0.07) for p in KEYS}
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def running() -> Iterator[Emulator]:
    with run_emulator() as emulator:
        yield emulator


@pytest.fixture
def emulator(running: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    for name, key in KEYS.items():
        monkeypatch.setenv(f"{name.upper()}_API_KEY", key)
        monkeypatch.setenv(f"{name.upper()}_BASE_URL", running.base_url(name))
    _BEFORE.update({name: len(running.calls(name)) for name in KEYS})
    yield running
    running.clear_faults()


_BEFORE: dict[str, int] = {}


def sent(emulator: Emulator, provider: str) -> int:
    """Calls *provider* received during this test."""
    return len(emulator.calls(provider)) - _BEFORE[provider]


def prefix() -> str:
    return f"w{os.getpid()}x{next(_prefixes)}:"


def workers(*jobs: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Run one worker process per job at once; each one's answers, in order."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.state_worker", json.dumps(job)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    answers = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        answers.append([json.loads(line) for line in out.splitlines()])
    return answers


def test_a_provider_failing_for_one_worker_is_skipped_by_the_others(
    redis: RedisServer, emulator: Emulator
) -> None:
    space = prefix()
    job = {"url": redis.url, "prefix": space, "providers": ["laozhang", "apiyi"]}
    # laozhang fails once: a 503 (it did not take the job), so the first worker fails over.
    emulator.inject("laozhang", Fault(status=503, first=1))
    [[first]] = workers(job)
    assert first["provider"] == "apiyi", first
    assert first["attempts"][0][:2] == ["laozhang", "failed"]
    # The other two skip laozhang at once, on their first request: its cooldown is in Redis.
    # (Had they tried it, it would have served them: the fault was for one call only.)
    second, third = workers(job, job)
    for [answer] in (second, third):
        assert answer["provider"] == "apiyi"
        assert answer["attempts"][0][:2] == ["laozhang", "skipped"]
        assert "cooling down" in answer["attempts"][0][2]
    assert sent(emulator, "laozhang") == 1


def test_worker_clocks_hours_apart_see_the_same_cooldown(
    redis: RedisServer, emulator: Emulator
) -> None:
    space = prefix()
    job = {"url": redis.url, "prefix": space, "providers": ["laozhang", "apiyi"]}
    emulator.inject("laozhang", Fault(status=503, first=1))
    [[first]] = workers({**job, "skew": -7200})  # two hours behind
    assert first["provider"] == "apiyi"
    # Two hours ahead, and a sync worker three hours ahead: a cooldown kept on worker clocks
    # would have ended for them long ago; on Redis's clock it still runs.
    ahead, sync_ahead = workers({**job, "skew": 7200}, {**job, "skew": 10800, "sync": True})
    for [answer] in (ahead, sync_ahead):
        assert answer["attempts"][0][:2] == ["laozhang", "skipped"]
    assert sent(emulator, "laozhang") == 1


def test_a_budget_is_kept_across_three_worker_processes(
    redis: RedisServer, emulator: Emulator
) -> None:
    space = prefix()
    job = {
        "url": redis.url,
        "prefix": space,
        "providers": ["laozhang"],
        "budget_usd": 1.0,
        "calls": 10,
        "concurrency": 5,
    }
    answers = [a for worker in workers(job, job, {**job, "sync": True}) for a in worker]
    served = [a for a in answers if a["provider"] is not None]
    refused = [a for a in answers if a["error"] == "BudgetExceeded"]
    assert len(served) + len(refused) == 30
    # $1 at $0.07 a call: 14 calls, never a 15th, whatever the three processes did at once.
    assert len(served) == 14
    assert sum(a["cost"] for a in served) <= 1.0
    assert sent(emulator, "laozhang") == 14
    state = open_state(redis.url, prefix=space)
    spent = asyncio.run(_spent_then_close(state, "client:shared"))
    assert spent == pytest.approx(0.98)


async def _spent_then_close(state: Any, scope: str) -> float:
    try:
        return float(await state.spent(scope, "day"))
    finally:
        await state.aclose()


def test_many_processes_reserving_at_once_never_overspend(redis: RedisServer) -> None:
    space = prefix()
    code = (
        "import asyncio, sys\n"
        "from flux_adapters.state import open_state\n"
        "async def main():\n"
        # Each Redis call may take 30 s, not 1: on a loaded machine 160 calls at once from four
        # new processes can take longer than a second, and what is checked is the total.
        f"    s = open_state({redis.url!r}, prefix={space!r}, timeout=30)\n"
        "    got = await asyncio.gather(*(s.reserve('client:p', 0.03, 1.0, 'total') for _ in range(40)))\n"
        "    sys.stdout.write(str(sum(g is not None for g in got)))\n"
        "    await s.aclose()\n"
        "asyncio.run(main())\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    granted = sum(int(p.communicate(timeout=60)[0]) for p in processes)
    assert granted == 33  # 33 x 0.03 = 0.99 of $1, out of 160 asked


def test_a_429_with_retry_after_pauses_every_worker_on_that_key(
    redis: RedisServer, emulator: Emulator
) -> None:
    space = prefix()
    emulator.inject("laozhang", Fault(status=429, retry_after=120, first=1))
    job = {"url": redis.url, "prefix": space, "providers": ["laozhang"]}
    [[first]] = workers(job)
    assert first["error"] == "RateLimited"
    # Every other worker with the same key waits out the 120 s Retry-After instead of sending:
    # longer than they may wait (max_retry_wait), so a lone provider is not tried, and with a
    # second provider they go there.
    alone, with_other = workers(job, {**job, "providers": ["laozhang", "apiyi"]})
    assert alone[0]["error"] == "AllProvidersFailed"
    assert "paused" in alone[0]["attempts"][0][2]
    assert with_other[0]["provider"] == "apiyi"
    assert with_other[0]["attempts"][0][:2] == ["laozhang", "skipped"]
    assert sent(emulator, "laozhang") == 1


def test_no_secret_reaches_redis(redis: RedisServer, emulator: Emulator) -> None:
    space = prefix()
    emulator.inject("laozhang", Fault(status=429, retry_after=30, first=1))
    job = {
        "url": redis.url,
        "prefix": space,
        "providers": ["laozhang", "apiyi"],
        "budget_usd": 5.0,
        "calls": 3,
    }
    workers(job, {**job, "sync": True})
    raw: Any = redis.client()
    found = []
    for key in raw.scan_iter(match=f"{space}*"):
        found.append(key)
        kind = raw.type(key)
        if kind == b"string":
            values = [raw.get(key)]
        elif kind == b"hash":
            values = [v for pair in raw.hgetall(key).items() for v in pair]
        else:
            values = list(raw.smembers(key))
        for text in [key, *values]:
            for secret in KEYS.values():
                assert secret.encode() not in text
                assert b"SECRET" not in text
    assert found  # there was something to look at: budgets, buckets, a pause
    raw.close()


def test_redis_killed_mid_run_fails_closed_with_a_clear_error(emulator: Emulator) -> None:
    async def run(server: RedisServer) -> None:
        state = open_state(server.url, prefix=prefix(), timeout=0.5)
        client = AsyncFluxClient(
            providers=["laozhang", "apiyi"], state=state, prices=PRICES, budget_usd=10.0
        )
        async with client:
            assert (await client.edit(REQUEST)).provider == "laozhang"
            server.kill()
            before = sent(emulator, "laozhang")
            with pytest.raises(StateUnavailable, match=r"did not answer within 0.5 s"):
                await asyncio.wait_for(client.edit(REQUEST), 60)  # a bound, never reached
            assert sent(emulator, "laozhang") == before  # nothing was sent
        await state.aclose()

    with redis_server() as server:
        asyncio.run(run(server))


def test_a_hung_redis_is_a_clear_error_within_the_timeout_not_a_hang(
    emulator: Emulator,
) -> None:
    with redis_server() as server:
        state = open_state(server.url, prefix=prefix(), timeout=0.3)
        with FluxClient(
            providers=["laozhang", "apiyi"], state=state, prices=PRICES, budget_usd=10.0
        ) as client:
            assert client.edit(REQUEST).provider == "laozhang"
            server.freeze()  # connected, but answering nothing
            try:
                with pytest.raises(StateUnavailable):
                    client.edit(REQUEST)
            finally:
                server.thaw()
        state.blocking.close()


def test_a_hung_redis_is_a_clear_error_for_the_async_client_too(emulator: Emulator) -> None:
    async def run(server: RedisServer) -> None:
        state = open_state(server.url, prefix=prefix(), timeout=0.3)
        async with AsyncFluxClient(providers=["laozhang", "apiyi"], state=state) as client:
            assert (await client.edit(REQUEST)).provider == "laozhang"
            before = sent(emulator, "laozhang")
            server.freeze()
            try:
                with pytest.raises(StateUnavailable):
                    await asyncio.wait_for(client.edit(REQUEST), 60)  # a bound, never reached
            finally:
                server.thaw()
            assert sent(emulator, "laozhang") == before
        await state.aclose()

    with redis_server() as server:
        asyncio.run(run(server))


def test_with_fallback_to_local_a_dead_redis_warns_once_and_calls_go_on(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    async def run(server: RedisServer) -> list[str]:
        state = open_state(server.url, prefix=prefix(), timeout=0.5, fallback="local")
        async with AsyncFluxClient(
            providers=["laozhang", "apiyi"], state=state, prices=PRICES, budget_usd=10.0
        ) as client:
            server.kill()
            served = [(await client.edit(REQUEST)).provider for _ in range(3)]
        await state.aclose()
        return served

    with caplog.at_level(logging.WARNING, logger="flux_adapters"), redis_server() as server:
        served = asyncio.run(run(server))
    assert served == ["laozhang"] * 3
    warnings = [r for r in caplog.records if "shared state unavailable" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("fallback", ["none", "local"])
def test_where_the_state_is_kept_follows_redis_and_the_fallback(fallback: str) -> None:
    async def run(server: RedisServer) -> tuple[str, str | BaseException]:
        state = open_state(server.url, prefix=prefix(), timeout=0.5, fallback=fallback)  # type: ignore[arg-type]
        assert isinstance(state, RedisState)
        up = await state.where()
        server.kill()
        try:
            down: str | BaseException = await state.where()
        except StateUnavailable as error:
            down = error
        await state.aclose()
        return up, down

    with redis_server() as server:
        up, down = asyncio.run(run(server))
    assert up == "redis"
    if fallback == "local":
        assert down == "local"
    else:
        assert isinstance(down, StateUnavailable)


def test_with_fallback_each_outage_warns_and_redis_answering_again_is_said(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flux_adapters.state._redis as redis_state

    monkeypatch.setattr(redis_state, "_RETRY_LOCAL", 0.0)  # try Redis again at once

    async def run(server: RedisServer) -> list[str]:
        state = open_state(server.url, prefix=prefix(), timeout=0.3, fallback="local")
        assert isinstance(state, RedisState)
        kept: list[str] = []
        for frozen in (False, True, False, True, True, False):
            if frozen:
                server.freeze()
            try:
                kept.append(await state.where())
            finally:
                server.thaw()
        await state.aclose()
        return kept

    with caplog.at_level(logging.WARNING, logger="flux_adapters"), redis_server() as server:
        kept = asyncio.run(run(server))
    assert kept == ["redis", "local", "redis", "local", "local", "redis"]
    said = [
        "down" if "unavailable" in r.getMessage() else "up"
        for r in caplog.records
        if "shared state" in r.getMessage()
    ]
    assert said == ["down", "up", "down", "up"]  # each outage once, however long


def test_with_fallback_a_key_lookup_that_timed_out_skips_redis_for_a_while(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A frozen Redis made every gateway call wait out the key lookup's timeout before the
    # gateway used the key it remembered: admit skipped Redis after a failure, get_key never
    # did. Now one lookup waits; the next ones are not asked until Redis is tried again.
    import time

    import flux_adapters.state._redis as redis_state
    from flux_adapters.gateway import new_key

    class Later:
        """The fallback's clock, *ahead* seconds after the real one (nothing else reads it)."""

        ahead = 0.0

        def monotonic(self) -> float:
            return time.monotonic() + self.ahead

    clock = Later()
    monkeypatch.setattr(redis_state, "time", clock)
    _, record = new_key(name="ci")

    async def lookups(server: RedisServer, fallback: Any) -> list[str]:
        state = open_state(server.url, prefix=prefix(), timeout=0.3, fallback=fallback)
        await state.put_key(record)
        said: list[str] = []
        server.freeze()
        try:
            for _ in range(3):
                try:
                    await state.get_key(record.key_hash)
                except StateUnavailable as exc:
                    said.append("waited" if "did not answer" in str(exc) else "skipped")
        finally:
            server.thaw()
        try:  # Redis answers again; within the while, it is still not asked
            said.append("read" if await state.get_key(record.key_hash) == record else "?")
        except StateUnavailable:
            said.append("skipped")
        clock.ahead += redis_state._RETRY_LOCAL  # the while is over: Redis is asked again
        server.freeze()
        try:
            with pytest.raises(StateUnavailable, match="did not answer"):
                await state.get_key(record.key_hash)  # asked again, and down again
        finally:
            server.thaw()
        clock.ahead += redis_state._RETRY_LOCAL
        said.append("read" if await state.get_key(record.key_hash) == record else "?")
        await state.aclose()
        return said

    with caplog.at_level(logging.WARNING, logger="flux_adapters"), redis_server() as server:
        assert asyncio.run(lookups(server, "local")) == [
            "waited", "skipped", "skipped", "skipped", "read"
        ]  # fmt: skip
        warned = [r.getMessage() for r in caplog.records if "shared state" in r.getMessage()]
        assert ["unavailable" in said for said in warned] == [True, False]  # one outage
        # Fail closed, the default: each lookup asks Redis, none is taken from anywhere else.
        assert asyncio.run(lookups(server, "none"))[:3] == ["waited"] * 3


def test_with_fallback_the_blocking_client_also_says_redis_answers_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flux_adapters.state._redis as redis_state
    from flux_adapters.routing import Admitted
    from flux_adapters.state import Ask

    monkeypatch.setattr(redis_state, "_RETRY_LOCAL", 0.0)
    ask = Ask(key=("laozhang", "flux-2-pro"))
    with caplog.at_level(logging.WARNING, logger="flux_adapters"), redis_server() as server:
        state = open_state(server.url, prefix=prefix(), timeout=0.3, fallback="local")
        assert isinstance(state, RedisState)
        server.freeze()
        try:
            assert isinstance(state.blocking.admit(ask), Admitted)  # locally
        finally:
            server.thaw()
        assert isinstance(state.blocking.admit(ask), Admitted)  # by Redis again
        state.blocking.close()
    said = [r.getMessage() for r in caplog.records if "shared state" in r.getMessage()]
    assert len(said) == 2
    assert "unavailable" in said[0]
    assert "available again" in said[1]


def test_a_client_whose_budget_is_used_up_refuses_before_sending(
    redis: RedisServer, emulator: Emulator
) -> None:
    state = open_state(redis.url, prefix=prefix())
    with FluxClient(
        providers=["laozhang", "apiyi"],
        state=state,
        prices=PRICES,
        budget_usd=0.1,
        budget_scope="client:small",
    ) as client:
        assert client.edit(REQUEST).cost_usd == 0.07
        before = sent(emulator, "laozhang") + sent(emulator, "apiyi")
        with pytest.raises(BudgetExceeded) as caught:
            client.edit(REQUEST)
    assert sent(emulator, "laozhang") + sent(emulator, "apiyi") == before
    error = caught.value
    assert error.scope == "client:small"
    assert error.limit_usd == 0.1
    assert error.spent_usd == pytest.approx(0.07)
    assert [a.outcome for a in error.attempts] == ["skipped", "skipped"]
    assert "nothing was sent" in str(error)
    state.blocking.close()


def test_a_failure_that_proves_nothing_was_billed_is_refunded(
    redis: RedisServer, emulator: Emulator
) -> None:
    async def run() -> float:
        state = open_state(redis.url, prefix=prefix())
        emulator.inject("laozhang", Fault(status=503, first=1))  # not taken: refunded
        async with AsyncFluxClient(
            providers=["laozhang", "apiyi"], state=state, prices=PRICES, budget_usd=1.0
        ) as client:
            result = await client.edit(REQUEST)
            assert result.provider == "apiyi"
        spent = float(await state.spent("client:default", "total"))
        await state.aclose()
        return spent

    assert asyncio.run(run()) == pytest.approx(0.07)


def test_an_ambiguous_failure_keeps_its_reservation(redis: RedisServer, emulator: Emulator) -> None:
    async def run() -> float:
        state = open_state(redis.url, prefix=prefix())
        emulator.inject("laozhang", Fault(status=502, after_work=True, first=1))  # may be billed
        async with AsyncFluxClient(
            providers=["laozhang", "apiyi"], state=state, prices=PRICES, budget_usd=1.0
        ) as client:
            with pytest.raises(ProviderUnavailable):  # a 502: not failed over, may be billed
                await client.edit(REQUEST)
        spent = float(await state.spent("client:default", "total"))
        await state.aclose()
        return spent

    assert asyncio.run(run()) == pytest.approx(0.07)


def test_a_provider_without_a_price_is_not_sent_under_a_cumulative_budget(
    redis: RedisServer, emulator: Emulator
) -> None:
    state = open_state(redis.url, prefix=prefix())
    with (
        FluxClient(providers=["apiyi"], state=state, budget_usd=1.0) as client,
        pytest.raises(BudgetExceeded),
    ):
        client.edit(REQUEST)  # apiyi has no known price: nothing to reserve, so not sent
    assert sent(emulator, "apiyi") == 0
    state.blocking.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"budget_usd": float("nan")}, "budget_usd"),
        ({"budget_usd": float("inf")}, "budget_usd"),
        ({"budget_usd": -1}, "budget_usd"),
        ({"budget_usd": 1e12}, "budget_usd"),
        ({"budget_usd": 1, "budget_period": "week"}, "period"),
        ({"budget_usd": 1, "budget_scope": "client:a\r\nb"}, "scope"),
        ({"budget_usd": 1, "budget_scope": ""}, "scope"),
        ({"state": "redis://h\r\nFLUSHALL"}, "state URL"),
        ({"state": 42}, "state="),
        ({"state": "local", "state_fallback": "sometimes"}, "state_fallback"),
    ],
)
def test_careless_state_arguments_are_refused_when_the_client_is_built(
    options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        FluxClient("laozhang", api_key="test-key", **options)


def test_the_sync_client_with_local_state_never_imports_asyncio() -> None:
    code = (
        "import sys, httpx\n"
        "from flux_adapters import EditRequest, FluxClient\n"
        "from flux_adapters.prices import PerCall\n"
        "def answer(request):\n"
        "    return httpx.Response(200, json={'data': [{'url': 'https://cdn.example/i.png'}]})\n"
        "client = FluxClient('laozhang', api_key='test-key', budget_usd=1.0, state='local',\n"
        "    prices={('laozhang', 'flux-2-pro'): PerCall(usd=0.07)},\n"
        "    http_client=httpx.Client(transport=httpx.MockTransport(answer)))\n"
        "result = client.edit(EditRequest(prompt='x', model='flux-2-pro'))\n"
        "print(result.cost_usd, 'asyncio' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.split() == ["0.07", "False"]


def test_importing_the_package_does_not_load_the_state() -> None:
    code = (
        "import sys, flux_adapters\n"
        "from flux_adapters import EditRequest, FluxClient\n"
        "FluxClient('laozhang', api_key='test-key')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('flux_adapters.state', 'redis'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]"


def test_a_cancelled_probe_lets_the_next_call_probe(redis: RedisServer, emulator: Emulator) -> None:
    async def run() -> tuple[bool, str]:
        state = open_state(redis.url, prefix=prefix())
        assert isinstance(state, RedisState)
        key = state._layout.circuit(("laozhang", "flux-2-pro"))
        raw: Any = redis.client()
        raw.hset(key, "until", "0")  # a cooldown that has just passed: the next call probes
        emulator.inject("laozhang", Fault(delay=30, first=1))
        async with AsyncFluxClient(providers=["laozhang", "apiyi"], state=state) as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.edit(REQUEST), 0.5)  # cancelled mid-probe
            probing = raw.hexists(key, "probing")
            served = (await client.edit(REQUEST)).provider  # probes again, and closes it
        raw.close()
        await state.aclose()
        return bool(probing), served

    probing, served = asyncio.run(run())
    assert not probing
    assert served == "laozhang"


def test_from_env_reads_the_state_and_the_budget_from_the_file(
    redis: RedisServer, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "flux-adapters.toml"
    config.write_text(
        'providers = ["laozhang"]\n'
        "budget_usd = 0.05\n"
        'budget_period = "day"\n'
        'budget_scope = "team:a"\n'
        "[provider.laozhang]\n"
        "rate_per_minute = 600\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("FLUX_STATE_URL", redis.url)
    with FluxClient.from_env(config=config) as client:
        assert client.edit(REQUEST).provider == "laozhang"  # $0.03 of $0.05
        with pytest.raises(BudgetExceeded) as caught:
            client.edit(REQUEST)
    assert caught.value.scope == "team:a"
    assert caught.value.period == "day"
    monkeypatch.setenv("FLUX_STATE_URL", "http://not-redis")
    with pytest.raises(ConfigurationError, match=r"\$FLUX_STATE_URL must be"):
        FluxClient.from_env(config=config)


def test_with_options_copies_share_the_state_and_closing_one_leaves_it_open(
    redis: RedisServer, emulator: Emulator
) -> None:
    with FluxClient(providers=["laozhang", "apiyi"], state=redis.url, prices=PRICES) as client:
        copy = client.with_options(max_retries=0)
        copy.close()
        assert client.edit(REQUEST).provider == "laozhang"


def test_mock_transport_clients_share_a_cooldown_through_local_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two clients of one process with state="local" share cooldowns, as two workers would.
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if "laozhang" in request.url.host:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json={"data": [{"url": "https://cdn.example/i.png"}]})

    def client() -> FluxClient:
        return FluxClient(
            providers=["laozhang", "apiyi"],
            state="local",
            http_client=httpx.Client(transport=httpx.MockTransport(answer)),
        )

    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key-1")
    monkeypatch.setenv("APIYI_API_KEY", "test-key-2")
    monkeypatch.delenv("LAOZHANG_BASE_URL", raising=False)
    monkeypatch.delenv("APIYI_BASE_URL", raising=False)
    request = EditRequest(prompt="x", model="flux-2-flex")  # a model no other test cools here
    first, second = client(), client()
    assert first.edit(request).provider == "apiyi"
    result = second.edit(request)
    assert result.attempts[0].outcome == "skipped"
    assert sum("laozhang" in host for host in calls) == 1


def test_a_redis_url_without_the_redis_extra_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None  # as if redis-py were not installed\n"
        "from flux_adapters import FluxClient, errors\n"
        "try:\n"
        "    FluxClient('laozhang', api_key='test-key', state='redis://localhost:6379/0')\n"
        "except errors.MissingExtraError as error:\n"
        "    print(error.extra)\n"
        "FluxClient('laozhang', api_key='test-key', state='local', budget_usd=1)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "redis"


def test_a_refusal_refunds_but_a_moderated_accepted_job_keeps_its_reservation(
    redis: RedisServer, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux_adapters.errors import ContentModerated, Moderated
    from flux_adapters.jobs import Polling

    monkeypatch.setenv("FAL_API_KEY", "fal-test-key")
    monkeypatch.setenv("FAL_BASE_URL", emulator.base_url("fal"))
    fast = Polling(first=0.01, factor=1.5, longest=0.05, jitter=0.1, deadline=30.0)

    async def run() -> tuple[float, float]:
        state = open_state(redis.url, prefix=prefix())
        # laozhang's filter refuses the call: nothing was made, nothing is counted.
        emulator.inject("laozhang", Fault(moderation=True, first=1))
        async with AsyncFluxClient(
            "laozhang", state=state, prices=PRICES, budget_usd=1.0, budget_scope="client:mod"
        ) as client:
            with pytest.raises(ContentModerated):
                await client.edit(REQUEST)
        refused = float(await state.spent("client:mod", "total"))
        # fal accepted the job, then moderated it (fal bills that): the reservation stays.
        emulator.inject("fal", Fault(outcome="content-moderated", pending=0))
        async with AsyncFluxClient(
            "fal", state=state, budget_usd=1.0, budget_scope="client:fal", polling=fast
        ) as client:
            with pytest.raises((Moderated, ContentModerated)):
                await client.edit(REQUEST)
        kept = float(await state.spent("client:fal", "total"))
        await state.aclose()
        return refused, kept

    refused, kept = asyncio.run(run())
    assert refused == 0.0
    assert kept > 0.0


@pytest.mark.parametrize(
    "stored",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        # a hand edit: one provider as a string (read as the letters b, f and l before)
        b'{"id": "abcd1234", "key_hash": "HASH", "allowed_providers": "bfl"}',
        b'{"id": "abcd1234", "key_hash": "HASH", "budget_usd": "50"}',
        # nested past json's recursion limit: a RecursionError, not a ValueError
        b"[" * 100_000,
        b'{"id": "abcd1234", "key_hash": "HASH", "name": ' + b"[" * 100_000 + b"}",
    ],
)
def test_a_damaged_gateway_key_record_in_redis_is_a_configuration_error(
    redis: RedisServer, stored: bytes
) -> None:
    from flux_adapters.errors import ConfigurationError
    from flux_adapters.gateway._keys import new_key

    space = prefix()
    _, record = new_key(name="ci", allowed_providers=["bfl"])

    async def run() -> None:
        state = open_state(redis.url, prefix=space)
        try:
            await state.put_key(record)
            assert await state.get_key(record.key_hash) == record  # what it writes, it reads
            client: Any = redis.client()
            client.set(
                f"{space}gwkey:{record.id}".encode(),
                stored.replace(b"HASH", record.key_hash.encode()),
            )
            client.close()
            # The gateway answers this with a 500 keys_unreadable (test_attack_gateway.py).
            with pytest.raises(ConfigurationError, match="a gateway key record is damaged"):
                await state.get_key(record.key_hash)
            with pytest.raises(ConfigurationError, match="a gateway key record is damaged"):
                await state.list_keys()
        finally:
            await state.aclose()

    asyncio.run(run())
