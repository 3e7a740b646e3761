"""The Redis shared state attacked: a Redis that drips, stalls, refuses or answers nonsense.

What a real redis-server can be made to do (die, freeze, be flushed, refuse writes) is done to
a real one (tests/redis_server.py); what it cannot (drip a reply, answer a script with the wrong
shape, return ``-OOM`` on demand) is done by tests/hostile_redis.py. The rule under test: every
failure of the state is a `StateUnavailable` (a `FluxError`) or the documented fallback, never
another exception, never a hang.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flux_adapters._shared_batch import Lines, batch_id
from flux_adapters.emulator import Fault, run_emulator
from flux_adapters.errors import ConfigurationError, StateUnavailable
from flux_adapters.routing import Admitted
from flux_adapters.state import Ask, Finish, Reservation, open_state
from flux_adapters.state._redis import RedisState
from tests.hostile_redis import Reply, hostile_redis, resp
from tests.redis_server import redis_server
from tests.test_shared_batch import environment, two_workers_under_way, write_jobs

KEY = ("laozhang", "flux-2-pro")
ASK = Ask(key=KEY, scope="team", amount_usd=0.05, limit_usd=10.0)
OK_ADMIT = resp(["ok", "0", "total"])


def scripts(reply: Callable[[list[bytes]], Reply]) -> Callable[[list[bytes]], Reply]:
    """*reply* for script calls (EVALSHA, EVAL); ``SCRIPT LOAD`` answered as Redis would."""

    def answer(command: list[bytes]) -> Reply:
        if command[0].upper() == b"SCRIPT":
            return Reply(resp("0" * 40))
        return reply(command)

    return answer


# -- one deadline for all the reads of one call ------------------------------------------------


def test_a_blocking_call_to_a_redis_that_drips_its_answer_ends_unavailable() -> None:
    # Each byte comes well within the socket timeout (0.3 s), so no single read times out;
    # the whole answer would take 5 s. One call must not outlive its deadline.
    dripped = Reply(OK_ADMIT, drip=0.2)
    with hostile_redis(scripts(lambda command: dripped)) as server:
        state = open_state(server.url, timeout=0.3)
        assert isinstance(state, RedisState)
        try:
            with pytest.raises(StateUnavailable, match=r"did not answer within 0\.3 s"):
                state.blocking.admit(ASK)
        finally:
            state.blocking.close()


def test_a_blocking_call_whose_script_must_be_loaded_shares_one_deadline() -> None:
    # EVALSHA -> NOSCRIPT -> SCRIPT LOAD -> EVALSHA: three round trips, each answered in 0.2 s,
    # within the 0.3 s socket timeout each; together they pass the call's deadline.
    def answer(command: list[bytes]) -> Reply:
        if command[0].upper() == b"SCRIPT":
            return Reply(resp("0" * 40), delay=0.2)
        if sum(1 for c in server.commands if c[0].upper() == b"EVALSHA") == 1:
            return Reply(b"-NOSCRIPT No matching script. Please use EVAL.\r\n", delay=0.2)
        return Reply(OK_ADMIT, delay=0.2)

    with hostile_redis(answer) as server:
        state = open_state(server.url, timeout=0.3)
        assert isinstance(state, RedisState)
        try:
            with pytest.raises(StateUnavailable):
                state.blocking.admit(ASK)
        finally:
            state.blocking.close()


def test_the_async_call_to_a_redis_that_drips_each_round_trip_ends_unavailable() -> None:
    def answer(command: list[bytes]) -> Reply:
        if command[0].upper() == b"SCRIPT":
            return Reply(resp("0" * 40), delay=0.2)
        if sum(1 for c in server.commands if c[0].upper() == b"EVALSHA") == 1:
            return Reply(b"-NOSCRIPT No matching script. Please use EVAL.\r\n", delay=0.2)
        return Reply(OK_ADMIT, delay=0.2)

    async def run(url: str) -> None:
        state = open_state(url, timeout=0.3)
        try:
            with pytest.raises(StateUnavailable):
                await state.admit(ASK)
        finally:
            await state.aclose()

    with hostile_redis(answer) as server:
        asyncio.run(run(server.url))


def test_a_dripping_redis_with_fallback_to_local_falls_back() -> None:
    with hostile_redis(scripts(lambda command: Reply(OK_ADMIT, drip=0.2))) as server:
        state = open_state(server.url, timeout=0.3, fallback="local")
        assert isinstance(state, RedisState)
        try:
            admitted = state.blocking.admit(ASK)
            reservation = getattr(admitted, "reservation", None)
            assert isinstance(reservation, Reservation)
            assert reservation.local
            assert state.blocking.finish(Finish(reservation=reservation, charge_usd=0.0)) is None
        finally:
            state.blocking.close()


# -- error replies named; answers of the wrong shape are StateUnavailable ---------------------


def _admit_sync(url: str) -> object:
    state = open_state(url, timeout=2.0)
    assert isinstance(state, RedisState)
    try:
        return state.blocking.admit(ASK)
    finally:
        state.blocking.close()


def _admit_async(url: str) -> object:
    async def run() -> object:
        state = open_state(url, timeout=2.0)
        try:
            return await state.admit(ASK)
        finally:
            await state.aclose()

    return asyncio.run(run())


CALLS = {"blocking": _admit_sync, "async": _admit_async}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    ("reply", "named"),
    [
        (b"-ERR something odd happened\r\n", "ERR something odd happened"),
        (b"-BUSY Redis is busy running a script.\r\n", "BUSY Redis is busy"),
        (b"-MASTERDOWN Link with MASTER is down\r\n", "MASTERDOWN"),
        (b"-NOSCRIPT No matching script. Please use EVAL.\r\n", "NOSCRIPT"),
    ],
)
def test_an_error_reply_is_named_in_the_error(call: str, reply: bytes, named: str) -> None:
    # NOSCRIPT even after SCRIPT LOAD: a proxy in front of Redis that drops scripts.
    with (
        hostile_redis(scripts(lambda command: Reply(reply))) as server,
        pytest.raises(StateUnavailable, match=named) as caught,
    ):
        CALLS[call](server.url)
    assert "nothing was sent" in str(caught.value)


ODD_ANSWERS = {
    "an integer": b":1\r\n",
    "nil": b"_\r\n",
    "a string": resp("ok"),
    "too short": resp(["ok", "0"]),
    "too long": resp(["ok", "0", "total", "more"]),
    "an unknown status": resp(["weird", "1", "0"]),
    "a wait that is no number": resp(["paused", "soon", "0"]),
    "a wait that is NaN": resp(["paused", "nan", "0"]),
    "a negative wait": resp(["cooling", "-5", "0"]),
    "an infinite wait": resp(["paced", "inf", "0"]),
    "a nested array": resp([["ok"], "0", "total"]),
    "bytes that are not UTF-8": resp([b"\xff\xfe", "0", "total"]),
    "a window that is not a day": resp(["ok", "0", "yesterday"]),
    "a RESP3 map": b"%1\r\n+ok\r\n+0\r\n",
    "a double": b",1.5\r\n",
    "not RESP at all": b"HTTP/1.1 400 Bad Request\r\n\r\n",
    "an array of absurd length": b"*99999999999999999999\r\n",
    "a bulk string of absurd length": b"$-7\r\n",
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("odd", ODD_ANSWERS)
def test_an_admission_answer_of_the_wrong_shape_is_state_unavailable(call: str, odd: str) -> None:
    with (
        hostile_redis(scripts(lambda command: Reply(ODD_ANSWERS[odd]))) as server,
        pytest.raises(StateUnavailable, match="nothing was sent"),
    ):
        CALLS[call](server.url)


FINISH = Finish(
    granted=None, reservation=Reservation("team", "total", "total", 0.05), charge_usd=0.0
)


@pytest.mark.parametrize(
    "odd", [resp(["1"]), resp("soon"), resp("nan"), resp("-3"), b":7\r\n", resp(b"\xff")]
)
def test_a_finish_answer_of_the_wrong_shape_is_state_unavailable(odd: bytes) -> None:
    cooling = Finish(
        granted=None, outcome="failure", reservation=FINISH.reservation, charge_usd=0.0
    )
    with hostile_redis(scripts(lambda command: Reply(odd))) as server:
        state = open_state(server.url, timeout=2.0)
        assert isinstance(state, RedisState)
        try:
            with pytest.raises(StateUnavailable):
                state.blocking.finish(cooling)
        finally:
            state.blocking.close()


@pytest.mark.parametrize("odd", [resp(["1"]), resp("many"), resp("nan"), resp("-1"), b"_\r\n"])
def test_a_spent_answer_of_the_wrong_shape_is_state_unavailable(odd: bytes) -> None:
    async def run(url: str) -> None:
        state = open_state(url, timeout=2.0)
        try:
            with pytest.raises(StateUnavailable):
                await state.spent("team", "total")
        finally:
            await state.aclose()

    with hostile_redis(scripts(lambda command: Reply(odd))) as server:
        asyncio.run(run(server.url))


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "hello",
    [b"*1\r\n$5\r\nproto\r\n", b":3\r\n", b"-NOPROTO unsupported protocol version\r\n", b"+OK\r\n"],
)
def test_a_handshake_answer_of_the_wrong_shape_is_state_unavailable_or_ignored(
    call: str, hello: bytes
) -> None:
    # What answers at the URL is not Redis (or not one redis-py can talk to). The blocking
    # client checks the handshake (and raised AttributeError on a list); the async one goes on
    # and is answered: either is fine, anything outside the FluxError tree is not. (HELLO is
    # sent only when the URL asks for RESP3.)
    with hostile_redis(scripts(lambda command: Reply(OK_ADMIT)), hello=hello) as server:
        try:
            answer = CALLS[call](f"{server.url}?protocol=3")
        except StateUnavailable:
            return
        assert isinstance(answer, Admitted)


def test_a_redis_out_of_memory_is_named_for_both_clients() -> None:
    with redis_server() as server:
        client: Any = server.client()
        client.config_set("maxmemory", "1")
        client.config_set("maxmemory-policy", "noeviction")
        for call in CALLS.values():
            with pytest.raises(StateUnavailable, match="OOM"):
                call(server.url)


def test_a_read_only_replica_is_named_for_both_clients() -> None:
    with redis_server() as server:
        client: Any = server.client()
        client.execute_command("REPLICAOF", "127.0.0.1", "1")  # nobody there: stays read-only
        for call in CALLS.values():
            with pytest.raises(StateUnavailable, match="READONLY"):
                call(server.url)


# -- a shared batch whose Redis was flushed mid-run --------------------------------------------


def test_a_batch_whose_redis_was_flushed_mid_run_stops_with_exit_4_and_says_so(
    tmp_path: Path,
) -> None:
    # FLUSHALL (or a restart without persistence, or a failover to a replica that lacked the
    # batch): the journal is gone. A worker must not take that for "the round is over" (exit 0,
    # jobs never run counted nowhere) nor write a fresh journal over it (a job whose `sent`
    # record was lost could be sent again): it stops, exit 4, and says what happened.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 300), tmp_path / "out"
    with redis_server() as server, run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.05))
        env = environment(emulator)
        workers = two_workers_under_way(source, folder, server.url, env, emulator)
        client: Any = server.client()
        client.flushall()
        at_flush = len(emulator.calls())
        done = [process.communicate(timeout=120) for process in workers]
        after = len(emulator.calls())
        ledger = Counter(entry.prompt for entry in emulator.billed())
        left = client.keys("*")
        client.close()

    lines = Lines(source)
    batch = batch_id(lines.digest, str(folder))
    lines.close()
    for process, (stdout, stderr) in zip(workers, done, strict=True):
        assert process.returncode == 4, stderr
        assert "Traceback" not in stderr
        assert f"no longer holds batch {batch}" in stderr
        assert "did not answer" not in stderr  # it answered: the batch was not there
        assert json.loads(stdout)["error"]["type"] == "StateUnavailable"
    # At most the requests on their way when the journal vanished (4 in flight per worker),
    # and no job twice; no worker wrote a new batch into the flushed Redis.
    assert after - at_flush <= 8, (at_flush, after)
    assert max(ledger.values()) == 1
    assert left == []


# -- the shared batch's scripts answered with the wrong shape, or refused ----------------------


def _store_call(url: str, step: str) -> object:
    from flux_adapters._shared_batch_store import Store

    async def run() -> object:
        state = open_state(url, timeout=2.0)
        assert isinstance(state, RedisState)
        store = Store(state, "b" * 24, worker="w", keep_s=60)
        store.round, store.block, store.total = "1", 10, 25
        try:
            if step == "begin":
                return await store.begin(
                    total=25, block=10, lease_ms=1000, file_digest="d", output="o"
                )
            if step == "claim":
                return await store.claim()
            if step == "renew":
                return await store.renew([0, 1])
            if step == "journal":
                return await store.journal([[3, '{"k":"sent"}', "", 0, ""]])
            return await store.totals()
        finally:
            await state.aclose()

    return asyncio.run(run())


BATCH_ANSWERS = {
    "begin": [resp(["new", "1"]), resp(["odd", "1", "10", "1000"]), resp(["new", "1", "0", "x"])],
    "claim": [
        resp(["block", "0", "0", "10"]),  # flags and jobs missing
        resp(["block", "0", "7", "00" * 10, *[""] * 10]),
        resp(["block", "9", "0", "", ""]),  # a block past the end of the batch
        resp(["block", "x"]),
        resp(["wait", "soon"]),
        resp(["whatever"]),
        b":5\r\n",
    ],
    "renew": [resp(["", "1"]), resp(["1,x", "1", []]), b":1\r\n"],
    "journal": [resp(["ok", "ok"]), resp(["maybe"]), b"_\r\n"],
    "totals": [resp(["current", "{"]), resp(["current", "[" * 100_000]), resp(["current"])],
}


@pytest.mark.parametrize(
    ("step", "answer"),
    [(step, answer) for step, answers in BATCH_ANSWERS.items() for answer in answers],
)
def test_a_batch_script_answer_of_the_wrong_shape_is_state_unavailable(
    step: str, answer: bytes
) -> None:
    with (
        hostile_redis(scripts(lambda command: Reply(answer))) as server,
        pytest.raises(StateUnavailable, match="cannot be read"),
    ):
        _store_call(server.url, step)


@pytest.mark.parametrize("step", BATCH_ANSWERS)
def test_a_batch_script_refused_names_the_error(step: str) -> None:
    refused = Reply(b"-BUSY Redis is busy running a script. You can only call SCRIPT KILL\r\n")
    with (
        hostile_redis(scripts(lambda command: refused)) as server,
        pytest.raises(StateUnavailable, match=r"answered with an error \(BUSY Redis is busy"),
    ):
        _store_call(server.url, step)


# -- the gateway's key lookup, Redis failing ------------------------------------------------------


def test_a_gateway_key_lookup_that_redis_fails_is_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx

    from flux_adapters import AsyncFluxClient
    from flux_adapters.gateway import run_gateway

    def clients(only: tuple[str, ...] | None) -> AsyncFluxClient:
        return AsyncFluxClient("laozhang", api_key="test-key", base_url="http://127.0.0.1:9/v1")

    caplog.set_level(logging.WARNING, logger="flux_adapters.gateway")
    with (
        redis_server() as redis,
        run_gateway(files_dir=tmp_path, clients=clients, state_url=redis.url) as gateway,
    ):
        key, _ = gateway.add_key()
        redis.kill()
        with httpx.Client(base_url=gateway.root, timeout=30) as http:
            answer = http.post(
                "/v1/images/generations",
                json={"model": "flux-2-pro", "prompt": "no state"},
                headers={"authorization": f"Bearer {key}"},
            )
            metrics = http.get("/metrics").text
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "state_unavailable"
    assert 'flux_gateway_state_failures_total{step="key_lookup"} 1.0' in metrics
    assert 'flux_gateway_requests_total{route="/v1/images/generations",status="503"} 1.0' in metrics
    logged = [r for r in caplog.records if r.name == "flux_adapters.gateway"]
    assert any("key" in r.getMessage() and "did not answer" in r.getMessage() for r in logged)
    assert key not in caplog.text


# -- `keys create` prints a key only once Redis has it ------------------------------------------


@pytest.mark.parametrize(
    "answer", [b":0\r\n", b"_\r\n", b"+QUEUED\r\n", resp("1"), b"-READONLY replica\r\n"]
)
def test_keys_create_prints_no_key_unless_redis_confirmed_the_write(answer: bytes) -> None:
    from flux_adapters.cli import main

    out, err = io.StringIO(), io.StringIO()
    with hostile_redis(lambda command: Reply(answer)) as server:
        status = main(["keys", "--state", server.url, "create", "--name", "ci"], out=out, err=err)
    assert status == 4, err.getvalue()
    assert "fxg_" not in out.getvalue()
    assert "StateUnavailable" in err.getvalue()


def test_keys_create_prints_no_key_that_redis_does_not_hold_afterwards() -> None:
    # A proxy that acknowledges writes and drops them: the key is read back before it is shown.
    def answer(command: list[bytes]) -> Reply:
        return Reply(b":1\r\n" if b"SET" in command[1] else b"_\r\n")

    from flux_adapters.cli import main

    out, err = io.StringIO(), io.StringIO()
    with hostile_redis(answer) as server:
        status = main(["keys", "--state", server.url, "create", "--name", "ci"], out=out, err=err)
    assert status == 4, err.getvalue()
    assert "fxg_" not in out.getvalue()
    assert "did not keep" in err.getvalue()


def test_keys_create_with_redis_prints_the_key_it_stored() -> None:
    from flux_adapters.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redis_server() as server:
        status = main(["keys", "--state", server.url, "create", "--name", "ci"], out=out, err=err)
        client: Any = server.client()
        ids = client.smembers("flux:gwkeys")
    assert status == 0, err.getvalue()
    key = out.getvalue().split()[0]
    assert key.startswith("fxg_")
    assert [i.decode() for i in ids] == [key.split("_")[1]]


# -- timeouts in the state URL ------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "socket_timeout=abc",
        "socket_timeout=nan",
        "socket_timeout=inf",
        "socket_timeout=-1",
        "socket_timeout=0",
        "socket_timeout=1e400",
        "socket_timeout=100000",
        "socket_connect_timeout=nan",
        "socket_connect_timeout=-2",
        "timeout=inf",
        "health_check_interval=nan",
        "socket_timout=0.5",  # a typo: redis-py passed it on, and every call failed
        "protocol=9",
    ],
)
def test_a_state_url_with_an_unusable_option_is_a_configuration_error(query: str) -> None:
    option = query.partition("=")[0]
    with pytest.raises(ConfigurationError, match=option):
        open_state(f"redis://127.0.0.1:6379/0?{query}")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/flux", "'flux'"),  # meant as a namespace: it was database 0
        ("rediss://127.0.0.1:6379/flux/", "'flux'"),
        ("redis://127.0.0.1:6379/-1", "'-1'"),
        ("unix:///tmp/redis.sock?db=-2", "-2"),
    ],
)
def test_a_state_url_whose_database_is_no_number_is_a_configuration_error(
    url: str, shown: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"database must be a whole number .* not {shown}"):
        open_state(url)


@pytest.mark.parametrize(
    "url", ["redis://h:6379", "redis://h:6379/", "redis://h/3/", "unix:///s?db=2"]
)
def test_a_state_url_with_a_database_or_none_opens(url: str) -> None:
    assert isinstance(open_state(url), RedisState)


def test_a_state_url_socket_timeout_is_the_states_timeout() -> None:
    state = open_state("redis://127.0.0.1:6379/0?socket_timeout=0.25", timeout=5.0)
    assert repr(state) == "RedisState(prefix='flux:', timeout=0.25)"
    slow = Reply(OK_ADMIT, delay=1.0)  # past the URL's 0.3 s, within the 5 s given in code
    with hostile_redis(scripts(lambda command: slow)) as server:
        state = open_state(f"{server.url}?socket_timeout=0.3", timeout=5.0)
        assert isinstance(state, RedisState)
        try:
            with pytest.raises(StateUnavailable, match=r"did not answer within 0\.3 s"):
                state.blocking.admit(ASK)
        finally:
            state.blocking.close()


# -- gateway keys: answers of the wrong shape --------------------------------------------------------


def _keys_call(url: str, step: str) -> object:
    async def run() -> object:
        state = open_state(url, timeout=2.0)
        assert isinstance(state, RedisState)
        try:
            if step == "list":
                return await state.list_keys()
            if step == "get":
                return await state.get_key("a" * 64)
            return await state.delete_key("abc")
        finally:
            await state.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("step", "smembers", "other"),
    [
        ("list", b":5\r\n", b"*0\r\n"),
        ("list", resp(["a", "b"]), b":1\r\n"),
        ("list", resp(["a", "b"]), resp([None])),  # fewer records than ids
        ("list", resp([b"\xff"]), resp([None])),
        ("list", resp([["nested"]]), resp([None])),
        ("get", b"*0\r\n", resp(["not", "a", "record"])),
        ("get", b"*0\r\n", b":5\r\n"),
        ("get", b"*0\r\n", resp(b"\xff\xfe")),
        ("delete", b"*0\r\n", resp(["x"])),
    ],
)
def test_a_gateway_key_answer_of_the_wrong_shape_is_a_flux_error(
    step: str, smembers: bytes, other: bytes
) -> None:
    def answer(command: list[bytes]) -> Reply:
        return Reply(smembers if command[0].upper() == b"SMEMBERS" else other)

    with hostile_redis(answer) as server, pytest.raises((StateUnavailable, ConfigurationError)):
        _keys_call(server.url, step)


# -- a huge answer: read up to a bound, not into memory whole ---------------------------------------

HUGE = 256 << 20  # far more than any answer of the scripts; never held whole by the test


@pytest.mark.parametrize("call", CALLS)
def test_a_huge_answer_is_cut_at_a_bound_not_read_whole(call: str) -> None:
    huge = Reply(b"$%d\r\n" % HUGE, tail=HUGE)
    with hostile_redis(scripts(lambda command: huge)) as server:
        with pytest.raises(StateUnavailable, match="longer than"):
            CALLS[call](server.url)
        taken = server.tail_sent
    assert taken < HUGE // 2


def test_a_huge_answer_to_a_batch_script_is_cut_at_a_bound() -> None:
    huge = Reply(b"$%d\r\n" % HUGE, tail=HUGE)
    with hostile_redis(scripts(lambda command: huge)) as server:
        with pytest.raises(StateUnavailable, match="longer than the bound"):
            _store_call(server.url, "claim")
        taken = server.tail_sent
    assert taken < HUGE // 2


# -- a shared batch begun afresh under its id after a flush -------------------------------------


def test_workers_of_a_flushed_batch_begun_afresh_by_another_worker_stop_and_send_nothing_twice(
    tmp_path: Path,
) -> None:
    # The flush and a new worker's BEGIN in one step (as if it came right after): the running
    # workers never see the batch missing, only a batch that is not the one they joined. Taking
    # it for theirs, they would claim block 0 again with no journal: every job sent again.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 300), tmp_path / "out"
    lines = Lines(source)
    batch = batch_id(lines.digest, str(folder))
    lines.close()
    meta = f"flux:batch:{{{batch}}}:meta"
    with redis_server() as server, run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.05))
        env = environment(emulator)
        workers = two_workers_under_way(source, folder, server.url, env, emulator)
        client: Any = server.client()
        fields = client.hgetall(meta)
        begun = {**fields, b"next": b"0", b"epoch": b"0123456789abcdef"}
        with client.pipeline(transaction=True) as step:
            step.flushall()
            step.hset(meta, mapping=begun)
            step.execute()
        at_flush = len(emulator.calls())
        done = [process.communicate(timeout=120) for process in workers]
        after = len(emulator.calls())
        ledger = Counter(entry.prompt for entry in emulator.billed())
        client.close()

    for process, (stdout, stderr) in zip(workers, done, strict=True):
        assert process.returncode == 4, stderr
        assert f"no longer holds batch {batch}" in stderr
        assert json.loads(stdout)["error"]["type"] == "StateUnavailable"
    assert after - at_flush <= 8, (at_flush, after)
    assert max(ledger.values()) == 1


# -- a Redis that wants a password ---------------------------------------------------------------


@pytest.mark.parametrize("password", [None, "wrong-PW-x"])
def test_a_redis_refusing_the_password_is_named_and_the_password_never_shown(
    password: str | None,
) -> None:
    with redis_server() as server:
        client: Any = server.client()
        client.config_set("requirepass", "the-right-PW")
        client.close()
        url = (
            server.url
            if password is None
            else server.url.replace("unix://", f"unix://:{password}@")
        )
        for call in CALLS.values():
            with pytest.raises(StateUnavailable, match=r"NOAUTH|WRONGPASS") as caught:
                call(url)
            assert "PW" not in str(caught.value)


# -- a careless operator's hand edits: a number key holding something else ---------------------------

DAMAGE = ["nan", "-nan", "inf", "-inf", "abc", "1e400", "-5"]


@pytest.mark.parametrize("value", DAMAGE)
def test_a_budget_key_damaged_by_hand_fails_closed_naming_the_key(value: str) -> None:
    # "nan" used to admit every call (NaN > limit is false) and stay "nan": no budget at all.
    with redis_server() as server:
        client: Any = server.client()
        client.set("flux:budget:team:total", value)
        for call in CALLS.values():
            with pytest.raises(StateUnavailable, match="flux:budget:team:total holds"):
                call(server.url)
        assert client.get("flux:budget:team:total") == value.encode()  # nothing written


@pytest.mark.parametrize("value", DAMAGE[:-1])
@pytest.mark.parametrize(
    ("key", "field", "ask"),
    [
        ("flux:rate:k-1", "tokens", Ask(bucket="k-1", rate_per_s=1.0, burst=1)),
        ("flux:rate:k-1", "ts", Ask(bucket="k-1", rate_per_s=1.0, burst=1)),
        ("flux:pause:k-1", None, Ask(bucket="k-1")),
        ("flux:cb:laozhang:flux-2-pro", "until", Ask(key=KEY)),
        ("flux:cb:laozhang:flux-2-pro", "probing", Ask(key=KEY)),
    ],
)
def test_a_number_damaged_by_hand_in_redis_fails_closed_naming_the_key(
    value: str, key: str, field: str | None, ask: Ask
) -> None:
    with redis_server() as server:
        client: Any = server.client()
        if field is None:
            client.set(key, value)
        else:
            client.hset(key, mapping={"until": "0", field: value})
        state = open_state(server.url, timeout=2.0)
        assert isinstance(state, RedisState)
        try:
            with pytest.raises(StateUnavailable, match=f"{key} holds"):
                state.blocking.admit(ask)
        finally:
            state.blocking.close()


def test_a_pause_key_damaged_by_hand_fails_the_429s_pause_naming_the_key() -> None:
    # 'nan' there made every later pause compare false: no 429 paused the key again.
    with redis_server() as server:
        client: Any = server.client()
        client.set("flux:pause:k-1", "nan")
        state = open_state(server.url, timeout=2.0)
        assert isinstance(state, RedisState)
        try:
            with pytest.raises(StateUnavailable, match="flux:pause:k-1 holds"):
                state.blocking.finish(Finish(bucket="k-1", pause_s=30.0))
        finally:
            state.blocking.close()


def test_a_gateway_call_whose_admission_redis_fails_is_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx

    from flux_adapters import AsyncFluxClient
    from flux_adapters.gateway import FileKeys, run_gateway

    caplog.set_level(logging.WARNING, logger="flux_adapters.gateway")
    keys = FileKeys(tmp_path / "keys.json")  # keys in a file: only the admission needs Redis
    with redis_server() as redis:

        def clients(only: tuple[str, ...] | None) -> AsyncFluxClient:
            return AsyncFluxClient(
                "laozhang", api_key="test-key", base_url="http://127.0.0.1:9/v1", state=redis.url
            )

        with run_gateway(
            files_dir=tmp_path / "files", clients=clients, keys=keys, state_url=redis.url
        ) as gateway:
            key, _ = gateway.add_key()
            redis.kill()
            with httpx.Client(base_url=gateway.root, timeout=30) as http:
                answer = http.post(
                    "/v1/images/generations",
                    json={"model": "flux-2-pro", "prompt": "no state"},
                    headers={"authorization": f"Bearer {key}"},
                )
                metrics = http.get("/metrics").text
    assert answer.status_code == 503, answer.text
    assert 'flux_gateway_state_failures_total{step="call"} 1.0' in metrics, (answer.text, metrics)
    logged = [r.getMessage() for r in caplog.records if r.name == "flux_adapters.gateway"]
    assert any("shared state" in line and "did not answer" in line for line in logged)


@pytest.mark.parametrize("reply", [b"-ERR no\r\n", resp("soon")])
def test_a_failure_after_the_call_never_says_nothing_was_sent(reply: bytes) -> None:
    # What FluxClient logs when the bookkeeping after a call fails ("its outcome stands"): the
    # call was sent; a message saying otherwise would mislead whoever checks the bill.
    done = Finish(granted=None, outcome="failure", reservation=FINISH.reservation, charge_usd=0.0)

    async def run(url: str) -> None:
        state = open_state(url, timeout=2.0)
        try:
            with pytest.raises(StateUnavailable, match="after the call") as caught:
                await state.finish(done)
            assert "nothing was sent" not in str(caught.value)
        finally:
            await state.aclose()

    with hostile_redis(scripts(lambda command: Reply(reply))) as server:
        state = open_state(server.url, timeout=2.0)
        assert isinstance(state, RedisState)
        try:
            with pytest.raises(StateUnavailable, match="after the call") as caught:
                state.blocking.finish(done)
            assert "nothing was sent" not in str(caught.value)
        finally:
            state.blocking.close()
        asyncio.run(run(server.url))


def test_keys_commands_with_redis_close_their_connections() -> None:
    import sys

    with redis_server() as server:
        for action in (["create", "--name", "ci"], ["list"], ["revoke", "nosuchkey"]):
            run = subprocess.run(
                [
                    sys.executable,
                    "-X",
                    "dev",
                    "-m",
                    "flux_adapters",
                    "keys",
                    "--state",
                    server.url,
                    *action,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode in (0, 5), run.stderr
            assert "ResourceWarning" not in run.stderr, (action, run.stderr)


def test_a_state_used_in_a_second_event_loop_says_so() -> None:
    # Its connections belong to the first loop: redis-py failed every later call with a
    # RuntimeError ("cannot be read"). Now one clear error, outside the fallback to local state.
    with redis_server() as server:
        state = open_state(server.url, timeout=2.0, fallback="local")
        first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
        try:
            assert isinstance(first.run_until_complete(state.admit(ASK)), Admitted)
            with pytest.raises(ConfigurationError, match="another event loop"):
                second.run_until_complete(state.admit(ASK))
            first.run_until_complete(state.aclose())
            assert isinstance(second.run_until_complete(state.admit(ASK)), Admitted)
            second.run_until_complete(state.aclose())
        finally:
            first.close()
            second.close()


# -- a Redis without HELLO (Redis 5, a proxy) ------------------------------------------------------


@pytest.mark.parametrize("call", CALLS)
def test_a_redis_that_does_not_know_hello_is_used_with_resp2(call: str) -> None:
    refused = b"-ERR unknown command 'HELLO'\r\n"
    with hostile_redis(scripts(lambda command: Reply(OK_ADMIT)), hello=refused) as server:
        assert isinstance(CALLS[call](server.url), Admitted)
