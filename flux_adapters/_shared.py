"""What a client asks of the shared state (`flux_adapters.state`) around each try.

The router (`flux_adapters.routing.route`, with ``shared=True``) yields `Admit` before a
candidate and `Settle` after it; a client turns them into one `Ask` and one `Finish` each, here,
and sends them to its state (blocking for `FluxClient`, async for `AsyncFluxClient`). Loaded
only by a client that has a state, a budget or a rate limit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from flux_adapters.errors import FluxError
from flux_adapters.routing import Admit, Admitted, Denied, Settle
from flux_adapters.state import (
    Ask,
    BlockingState,
    Finish,
    Period,
    StateBackend,
    bucket_id,
)

if TYPE_CHECKING:
    from flux_adapters.routing import RoutingPolicy

_LOG = logging.getLogger("flux_adapters")


class Shared:
    """A client's shared state and settings: budget, rate limits, cooldown."""

    def __init__(
        self,
        state: StateBackend,
        *,
        owned: bool,
        budget: tuple[str, float, Period] | None,
        rates: Mapping[str, float],
    ) -> None:
        self.state = state
        self.owned = owned
        self.budget = budget
        self._rates = dict(rates)  # provider -> requests per second
        self._buckets: dict[int, str] = {}
        self._blocking: BlockingState | None = None

    def unowned(self) -> Shared:
        """The same state and settings, for a `with_options` copy (closing it leaves the state)."""
        copy = Shared(self.state, owned=False, budget=self.budget, rates=self._rates)
        copy._buckets = self._buckets
        copy._blocking = self._blocking
        return copy

    @property
    def blocking(self) -> BlockingState:
        made = self._blocking
        if made is None:
            made = self._blocking = self.state.blocking  # type: ignore[attr-defined]
        return made

    def bucket(self, binding: Any) -> str:
        found = self._buckets.get(id(binding))
        if found is None:
            found = self._buckets[id(binding)] = bucket_id(binding.adapter.name, binding.api_key)
        return found

    def ask(self, admit: Admit, policy: RoutingPolicy) -> Ask | Denied:
        """The `Ask` for *admit*; a `Denied` at once when the budget cannot price the call."""
        binding = admit.candidate
        name = binding.adapter.name  # type: ignore[attr-defined]
        rate = self._rates.get(name)
        budget = self.budget
        if budget is not None and admit.estimate is None:
            return Denied("budget", 0.0, 0.0, budget[0], budget[1], budget[2])
        return Ask(
            key=admit.key if policy.cooldown > 0 else None,
            bucket=self.bucket(binding),
            rate_per_s=rate,
            burst=max(1, math.ceil(rate)) if rate else 1,
            scope=budget[0] if budget is not None else None,
            amount_usd=admit.estimate or 0.0,
            limit_usd=budget[1] if budget is not None else 0.0,
            period=budget[2] if budget is not None else "total",
            probe_ttl=float(binding.deadline) + 60.0,  # type: ignore[attr-defined]
        )

    def admitted(self, answer: Admitted | Denied) -> Admitted | Denied:
        if isinstance(answer, Denied) and answer.kind == "budget" and self.budget is not None:
            scope, limit, period = self.budget
            return attrs.evolve(answer, scope=scope, limit_usd=limit, period=period)
        return answer

    def finish(self, settle: Settle, policy: RoutingPolicy) -> Finish | None:
        """The `Finish` for *settle*; ``None`` when there is nothing to tell (a plain success)."""
        admitted = settle.admitted
        reservation: Any = admitted.reservation
        granted = admitted.granted
        charge: float | None = None
        if reservation is not None:
            if settle.charge == "refund":
                charge = 0.0
            elif settle.charge == "actual":
                charge = _actual(settle, reservation.amount_usd)
        if (
            settle.result in ("success", "none")
            and (granted is None or not granted.probe)
            and (charge is None or charge == reservation.amount_usd)
            and not settle.pause_s
        ):
            return None  # a closed circuit stays closed; the reservation is the price
        return Finish(
            granted=granted,
            outcome=settle.result,
            retry_after=settle.retry_after,
            cooldown=policy.cooldown,
            reservation=reservation,
            charge_usd=charge,
            bucket=self.bucket(settle.candidate),
            pause_s=settle.pause_s,
        )

    # -- the three steps, blocking (FluxClient) and async (AsyncFluxClient) -------------------

    def admit_blocking(self, admit: Admit, policy: RoutingPolicy) -> Admitted | Denied:
        ask = self.ask(admit, policy)
        if isinstance(ask, Denied):
            return ask
        return self.admitted(self.blocking.admit(ask))

    async def admit_async(self, admit: Admit, policy: RoutingPolicy) -> Admitted | Denied:
        ask = self.ask(admit, policy)
        if isinstance(ask, Denied):
            return ask
        return self.admitted(await self.state.admit(ask))

    def settle_blocking(self, settle: Settle, policy: RoutingPolicy) -> float | None:
        finish = self.finish(settle, policy)
        if finish is None:
            return None
        try:
            return self.blocking.finish(finish)
        except FluxError as error:  # the call's outcome stands; only the bookkeeping was lost
            self.lost(error)
            return None

    async def settle_async(self, settle: Settle, policy: RoutingPolicy) -> float | None:
        finish = self.finish(settle, policy)
        if finish is None:
            return None
        try:
            return await self.state.finish(finish)
        except FluxError as error:
            self.lost(error)
            return None

    def release_blocking(self, pending: Admitted) -> None:
        finish = self.release(pending)
        if finish is not None:
            try:
                self.blocking.finish(finish)
            except FluxError as error:
                self.lost(error)

    async def release_async(self, pending: Admitted) -> None:
        finish = self.release(pending)
        if finish is not None:
            try:
                await self.state.finish(finish)
            except FluxError as error:
                self.lost(error)

    def close_blocking(self) -> None:
        if self.owned:
            self.blocking.close()

    async def aclose(self) -> None:
        if self.owned:
            await self.state.aclose()

    @staticmethod
    def lost(error: FluxError) -> None:
        """A `Finish` that could not be told: the call's own outcome stands; say so once."""
        _LOG.warning("the shared state missed how a call ended (%s); its outcome stands", error)

    @staticmethod
    def release(pending: Admitted) -> Finish | None:
        """What to tell when a route ends with *pending* still open (cancelled, a bug)."""
        if pending.granted is None or not pending.granted.probe:
            return None  # the reservation stays: the call may have been sent
        return Finish(granted=pending.granted, outcome="release")


def _actual(settle: Settle, estimate: float) -> float:
    """The call's cost: the provider's own figure when it gave one, else the estimate."""
    from flux_adapters.client import _merged, _reported_cost

    outcome = settle.outcome
    if outcome is None:
        return estimate
    usage = _merged(outcome.job.usage if outcome.job is not None else None, outcome.answer.usage)
    rate = getattr(settle.candidate.adapter, "usd_per_credit", None)  # type: ignore[attr-defined]
    reported = _reported_cost(usage, rate)
    return estimate if reported is None else min(reported, 1e9)
