"""The shared state in Redis against a careless operator (attack 31): a key damaged by hand is
not an outage, and must not be treated as one. A real redis-server (tests/redis_server.py) and
the loopback emulator."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient
from flux_adapters.emulator import Emulator, run_emulator
from flux_adapters.errors import StateUnavailable
from flux_adapters.prices import PerCall
from flux_adapters.state import open_state
from tests.redis_server import redis_server

REQUEST = EditRequest(prompt="a robot", model="flux-2-pro", size="64x64")
PRICES = {("laozhang", "flux-2-pro"): PerCall(usd=0.5)}
LONG_SCOPE = "team-" + "x" * 190  # the damaged key's name fills the error's shown detail


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.mark.parametrize("damage", ["nan", "wrongtype"])
@pytest.mark.parametrize("scope", ["team", LONG_SCOPE])
@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
def test_with_fallback_local_a_budget_damaged_by_hand_still_fails_closed(
    damage: str, scope: str, blocking: bool, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    # A budget key holding "nan" (or a key of another type) made each call fail with "holds
    # nan ... fix or delete it", and state_fallback = "local" took that as Redis being down:
    # every worker went on with a budget of its own, from $0, while Redis answered. A $1
    # budget became $1 a worker (two calls of $0.50 each here, then two more, and so on).
    caplog.set_level(logging.WARNING, logger="flux_adapters")
    before = len(emulator.calls("laozhang"))
    with redis_server() as server:
        redis: Any = server.client()
        budget = f"flux:budget:{scope}:total"
        if damage == "nan":
            redis.set(budget, "nan")
        else:
            redis.rpush(budget, "0.5")
        settings: dict[str, Any] = {
            "api_key": "sk-emulator",
            "base_url": emulator.base_url("laozhang"),
            "prices": PRICES,
            "budget_usd": 1.0,
            "budget_scope": scope,
        }
        if blocking:
            state = open_state(server.url, fallback="local", timeout=2.0)
            with FluxClient("laozhang", state=state, **settings) as client:
                for _ in range(3):
                    with pytest.raises(StateUnavailable, match=r"holds|WRONGTYPE"):
                        client.edit(REQUEST)
        else:

            async def run() -> None:
                state = open_state(server.url, fallback="local", timeout=2.0)
                async with AsyncFluxClient("laozhang", state=state, **settings) as client:
                    for _ in range(3):
                        with pytest.raises(StateUnavailable, match=r"holds|WRONGTYPE"):
                            await client.edit(REQUEST)
                await state.aclose()

            asyncio.run(run())
    assert len(emulator.calls("laozhang")) == before  # nothing sent on a budget it cannot read
    assert "using this process's own state instead" not in caplog.text
