"""The gateway's Prometheus metrics.

Each gateway has a registry of its own, so that several can run in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class _Breakers(Collector):
    """``flux_gateway_breaker_state{provider, model}``: 0 closed, 1 half-open, 2 open, read at scrape."""

    def __init__(self, states: Callable[[], Iterator[tuple[str, str, str]]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "flux_gateway_breaker_state",
            "Circuit state per (provider, model): 0 closed, 1 half-open, 2 open",
            labels=["provider", "model"],
        )
        codes = {"closed": 0.0, "half-open": 1.0, "open": 2.0}
        for provider, model, state in self._states():
            family.add_metric([provider, model], codes[state])
        yield family


class Metrics:
    """Requests, latency, attempts and failovers, spend per key and provider, breaker state."""

    def __init__(self, breaker_states: Callable[[], Iterator[tuple[str, str, str]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flux_gateway_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "flux_gateway_request_seconds",
            "Seconds from the request's arrival to its answer, by route",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "flux_gateway_provider_attempts",
            "Provider attempts, by provider and outcome (ok, failed, skipped)",
            ["provider", "outcome"],
            registry=r,
        )
        self.failovers = Counter(
            "flux_gateway_failovers",
            "Calls served by another provider after one failed, by the provider that failed",
            ["provider"],
            registry=r,
        )
        self.spend = Counter(
            "flux_gateway_spend_usd",
            "US dollars spent (cost of served calls; a call that may have been billed counts "
            "its estimate), by gateway key id and provider",
            ["key", "provider"],
            registry=r,
        )
        self.in_flight = Gauge("flux_gateway_in_flight", "Paid calls under way", registry=r)
        self.state_failures = Counter(
            "flux_gateway_state_failures",
            "Requests refused because the shared state (Redis) failed, by step (key_lookup: "
            "looking up the gateway key; call: admitting the call, before it was sent)",
            ["step"],
            registry=r,
        )
        r.register(_Breakers(breaker_states))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter | Histogram, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once: every call passes here.

        prometheus-client checks and locks on each ``labels`` call; the child it returns is the
        same one every time, so it is kept here (no more of them than the metric itself keeps).
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found
