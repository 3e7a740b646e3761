"""`LocalState`: the shared state of one process, thread-safe (no asyncio needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flux_adapters.routing import Admitted, Denied, Pass
from flux_adapters.state import (
    Ask,
    Finish,
    KeyRecord,
    Period,
    Reservation,
    check_bucket,
    check_period,
    check_rate,
    check_scope,
    check_seconds,
    check_usd,
)

_TOLERANCE = 1e-9
"""Dollars a budget may be passed by through floating-point rounding of many small amounts."""

_shared: LocalState | None = None
_shared_lock = threading.Lock()


def shared_local() -> LocalState:
    """This process's `LocalState` (``open_state(None)``), made once."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LocalState()
        return _shared


class LocalState:
    """In-process state: breakers, budgets, rate limits and keys, under one lock.

    Its async methods (`flux_adapters.state.StateBackend`) and its blocking ones (`blocking`)
    share the same data. Times come from *clock* (monotonic); a day is the UTC day of
    ``time.time()``.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._circuits: dict[tuple[str, str], list[float]] = {}  # [opened_until, probing]
        self._spent: dict[tuple[str, str], float] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # tokens, at
        self._paused: dict[str, float] = {}
        self._keys: dict[str, KeyRecord] = {}

    @property
    def blocking(self) -> _Blocking:
        """The blocking form (`flux_adapters.state.BlockingState`), on the same data."""
        return _Blocking(self)

    # -- the atomic steps (sync) -----------------------------------------------------------

    def admit_now(self, ask: Ask) -> Admitted | Denied:
        """`admit`, blocking."""
        with self._lock:
            return self._admit(ask)

    def _window(self, period: Period) -> str:
        return "total" if period == "total" else str(int(self._wall() // 86_400))

    def _admit(self, ask: Ask) -> Admitted | Denied:
        now = self._clock()
        if ask.bucket is not None:
            left = self._paused.get(ask.bucket, 0.0) - now
            if left > 0:
                return Denied("paused", left)
        probe = False
        circuit = self._circuits.get(ask.key) if ask.key is not None else None
        if circuit is not None:
            left = circuit[0] - now
            if left > 0:
                return Denied("cooling", left)
            if circuit[1] > now:
                return Denied("probing", 0.0)
            probe = True
        tokens = 0.0
        if ask.bucket is not None and ask.rate_per_s is not None:
            had, at = self._buckets.get(ask.bucket, (float(ask.burst), now))
            tokens = min(float(ask.burst), had + max(0.0, now - at) * ask.rate_per_s)
            if tokens < 1.0:
                return Denied("paced", (1.0 - tokens) / ask.rate_per_s)
        reservation = None
        if ask.scope is not None:
            window = self._window(ask.period)
            spent = self._spent.get((ask.scope, window), 0.0)
            if spent + ask.amount_usd > ask.limit_usd + _TOLERANCE:
                return Denied("budget", 0.0, spent)
            self._spent[(ask.scope, window)] = spent + ask.amount_usd
            reservation = Reservation(ask.scope, ask.period, window, ask.amount_usd)
        if ask.bucket is not None and ask.rate_per_s is not None:
            self._buckets[ask.bucket] = (tokens - 1.0, now)
        if probe and circuit is not None and ask.key is not None:
            circuit[1] = now + ask.probe_ttl
        return Admitted(Pass(ask.key, probe=probe) if ask.key is not None else None, reservation)

    def finish_now(self, done: Finish) -> float | None:
        """`finish`, blocking."""
        with self._lock:
            return self._finish(done)

    def _finish(self, done: Finish) -> float | None:
        now = self._clock()
        started: float | None = None
        granted = done.granted
        if granted is not None:
            if done.outcome == "success":
                self._circuits.pop(granted.key, None)
            elif done.outcome == "failure" and done.cooldown > 0:
                asked = done.retry_after
                started = max(done.cooldown, min(asked, done.max_pause) if asked else 0.0)
                self._circuits[granted.key] = [now + started, 0.0]
            elif done.outcome in ("release", "failure") and granted.probe:
                circuit = self._circuits.get(granted.key)
                if circuit is not None:
                    circuit[1] = 0.0
        if done.reservation is not None and done.charge_usd is not None:
            reserved = done.reservation
            where = (reserved.scope, reserved.window)
            self._spent[where] = self._spent.get(where, 0.0) + done.charge_usd - reserved.amount_usd
        if done.bucket is not None and done.pause_s is not None and done.pause_s > 0:
            self._paused[done.bucket] = max(self._paused.get(done.bucket, 0.0), now + done.pause_s)
        return started

    async def admit(self, ask: Ask) -> Admitted | Denied:
        """See `flux_adapters.state.StateBackend.admit`."""
        return self.admit_now(ask)

    async def finish(self, done: Finish) -> float | None:
        """See `flux_adapters.state.StateBackend.finish`."""
        return self.finish_now(done)

    # -- StateBackend ----------------------------------------------------------------------

    async def reserve(
        self, scope: str, amount_usd: float, limit_usd: float, period: Period
    ) -> Reservation | None:
        ask = Ask(
            scope=check_scope(scope),
            amount_usd=check_usd(amount_usd, "amount_usd"),
            limit_usd=check_usd(limit_usd, "limit_usd"),
            period=check_period(period),
        )
        answer = self.admit_now(ask)
        return answer.reservation if isinstance(answer, Admitted) else None  # type: ignore[return-value]

    async def settle(self, reservation: Reservation, spent_usd: float) -> None:
        self.finish_now(
            Finish(reservation=reservation, charge_usd=check_usd(spent_usd, "spent_usd"))
        )

    async def spent(self, scope: str, period: Period) -> float:
        check_scope(scope)
        with self._lock:
            return self._spent.get((scope, self._window(check_period(period))), 0.0)

    async def breaker_acquire(self, key: tuple[str, str]) -> Pass | float:
        answer = self.admit_now(Ask(key=key))
        if isinstance(answer, Admitted):
            assert answer.granted is not None
            return answer.granted
        return answer.seconds

    async def breaker_success(self, key: tuple[str, str]) -> None:
        self.finish_now(Finish(granted=Pass(key), outcome="success"))

    async def breaker_failure(
        self, key: tuple[str, str], retry_after: float | None, cooldown: float = 30.0
    ) -> float | None:
        asked = None if retry_after is None else check_seconds(retry_after, "retry_after")
        return self.finish_now(
            Finish(
                granted=Pass(key),
                outcome="failure",
                retry_after=asked,
                cooldown=check_seconds(cooldown, "cooldown"),
            )
        )

    async def breaker_release(self, granted: Pass) -> None:
        self.finish_now(Finish(granted=granted, outcome="release"))

    async def take(self, bucket: str, rate_per_s: float, burst: int) -> float:
        rate, size = check_rate(rate_per_s, burst)
        answer = self.admit_now(Ask(bucket=check_bucket(bucket), rate_per_s=rate, burst=size))
        return 0.0 if isinstance(answer, Admitted) else answer.seconds

    async def pause(self, bucket: str, seconds: float) -> None:
        self.finish_now(
            Finish(bucket=check_bucket(bucket), pause_s=check_seconds(seconds, "seconds"))
        )

    async def put_key(self, record: KeyRecord) -> None:
        if not isinstance(record, KeyRecord):
            raise TypeError("put_key takes a KeyRecord")
        with self._lock:
            self._keys[record.id] = record

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        with self._lock:
            for record in self._keys.values():
                if record.key_hash == key_hash:
                    return record
        return None

    async def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            return sorted(self._keys.values(), key=lambda r: (r.created, r.id))

    async def delete_key(self, key_id: str) -> bool:
        with self._lock:
            return self._keys.pop(key_id, None) is not None

    async def aclose(self) -> None:
        """Nothing to release."""


class _Blocking:
    """`LocalState` for `flux_adapters.FluxClient`: the same data, called without asyncio."""

    __slots__ = ("_state",)

    def __init__(self, state: LocalState) -> None:
        self._state = state

    def admit(self, ask: Ask) -> Admitted | Denied:
        return self._state.admit_now(ask)

    def finish(self, done: Finish) -> float | None:
        return self._state.finish_now(done)

    def close(self) -> None:
        """Nothing to release."""
