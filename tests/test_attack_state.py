"""The Redis shared state attacked: a Redis that drips, stalls, refuses or answers nonsense.

What a real redis-server can be made to do (die, freeze, be flushed, refuse writes) is done to
a real one (tests/redis_server.py); what it cannot (drip a reply, answer a script with the wrong
shape, return ``-OOM`` on demand) is done by tests/hostile_redis.py. The rule under test: every
failure of the state is a `StateUnavailable` (a `FluxError`) or the documented fallback, never
another exception, never a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from flux_adapters.errors import StateUnavailable
from flux_adapters.state import Ask, Finish, Reservation, open_state
from flux_adapters.state._redis import RedisState
from tests.hostile_redis import Reply, hostile_redis, resp

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


# -- 1. one deadline for all the reads of one call ------------------------------------------------


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
