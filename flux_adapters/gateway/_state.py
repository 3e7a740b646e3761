"""Budgets and rate limits for the gateway: the shared state backend, or an in-process stand-in.

The gateway codes against the state interface of ``flux_adapters.state`` (``reserve``,
``settle``, ``spent``, ``take``, ``pause``, ``aclose``). Until that module is present, `Budgets`
below implements those methods in one process with the same names and meaning, so the one can
replace the other without a change in the gateway.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from attrs import frozen

__all__ = ["Budgets", "Reservation", "StateLike", "open_backend"]

Period = Literal["day", "total"]


@frozen
class Reservation:
    """Money set aside for one call under a budget, until it is settled."""

    scope: str
    period: Period
    bucket: str
    amount_usd: float


class StateLike(Protocol):
    """The part of the state backend the gateway uses."""

    async def reserve(
        self, scope: str, amount_usd: float, limit_usd: float, period: Period
    ) -> Any: ...
    async def settle(self, reservation: Any, spent_usd: float) -> None: ...
    async def spent(self, scope: str, period: Period) -> float: ...
    async def take(self, bucket: str, rate_per_s: float, burst: int) -> float: ...
    async def aclose(self) -> None: ...


def _bucket(period: Period, clock: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(clock)) if period == "day" else "total"


class Budgets:
    """In-process budgets (spend per scope and period, reservations included) and token buckets.

    Thread-safe; every read-modify-write under one lock. ``"day"`` is the UTC day by this
    process's clock.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._spent: dict[tuple[str, str], float] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, at)
        self._paused: dict[str, float] = {}

    async def reserve(
        self, scope: str, amount_usd: float, limit_usd: float, period: Period
    ) -> Reservation | None:
        """Set *amount_usd* aside under *scope*'s budget; ``None`` when it would pass *limit_usd*."""
        bucket = _bucket(period, self._clock())
        with self._lock:
            now = self._spent.get((scope, bucket), 0.0)
            if now + amount_usd > limit_usd + 1e-12 or (amount_usd == 0 and now >= limit_usd):
                return None
            self._spent[(scope, bucket)] = now + amount_usd
        return Reservation(scope, period, bucket, amount_usd)

    async def settle(self, reservation: Reservation, spent_usd: float) -> None:
        """Replace the reserved amount with what was spent (0.0: a refund)."""
        key = (reservation.scope, reservation.bucket)
        with self._lock:
            self._spent[key] = max(
                0.0, self._spent.get(key, 0.0) - reservation.amount_usd + spent_usd
            )

    async def spent(self, scope: str, period: Period) -> float:
        """Spent (and reserved) under *scope* in the current *period*."""
        with self._lock:
            return self._spent.get((scope, _bucket(period, self._clock())), 0.0)

    async def take(self, bucket: str, rate_per_s: float, burst: int) -> float:
        """Take one token from *bucket*: 0.0 to go, else the seconds until one is there."""
        now = self._monotonic()
        with self._lock:
            paused = self._paused.get(bucket, 0.0) - now
            if paused > 0:
                return paused
            tokens, at = self._buckets.get(bucket, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate_per_s)
            if tokens >= 1.0:
                self._buckets[bucket] = (tokens - 1.0, now)
                return 0.0
            self._buckets[bucket] = (tokens, now)
            return (1.0 - tokens) / rate_per_s if rate_per_s > 0 else math.inf

    async def pause(self, bucket: str, seconds: float) -> None:
        """Refuse *bucket* for *seconds* (a 429's ``Retry-After``)."""
        with self._lock:
            self._paused[bucket] = max(self._paused.get(bucket, 0.0), self._monotonic() + seconds)

    async def aclose(self) -> None:
        """Nothing to close in one process."""


def open_backend(url: str | None) -> StateLike:
    """The shared state backend for *url* (``flux_adapters.state``), else the in-process one."""
    import importlib

    try:
        module = importlib.import_module("flux_adapters.state")
    except ImportError:
        return Budgets()
    backend: StateLike = module.open_state(url)
    return backend
