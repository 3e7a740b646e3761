"""One worker process of the shared-state tests: edits through the emulator, state in Redis.

``python -m tests.state_worker '<json>'`` prints one JSON line per call: who served it, or the
error's type, and every attempt. The JSON says: ``url`` and ``prefix`` of the state, ``providers``
(in order; keys and base URLs come from the environment), ``calls``, ``concurrency``,
``budget_usd``, ``sync`` (FluxClient instead of AsyncFluxClient) and ``skew`` (seconds this
process's clocks are set off by: the shared state must not care).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient
from flux_adapters.errors import FluxError
from flux_adapters.prices import PerCall
from flux_adapters.state import open_state

REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _line(result: Any = None, error: FluxError | None = None) -> str:
    attempts = (result if result is not None else error).attempts  # type: ignore[union-attr]
    return json.dumps(
        {
            "provider": result.provider if result is not None else None,
            "cost": result.cost_usd if result is not None else None,
            "error": type(error).__name__ if error is not None else None,
            "attempts": [[a.provider, a.outcome, a.reason] for a in attempts],
        }
    )


def _options(args: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "providers": args["providers"],
        "state": open_state(args["url"], prefix=args["prefix"], timeout=2.0),
        "prices": {(p, "flux-2-pro"): PerCall(usd=0.07) for p in args["providers"]},
        "max_retries": args.get("max_retries", 0),
    }
    if args.get("budget_usd") is not None:
        options["budget_usd"] = args["budget_usd"]
        options["budget_period"] = "day"
        options["budget_scope"] = "client:shared"
    return options


async def _run_async(args: dict[str, Any]) -> None:
    options = _options(args)
    state = options["state"]
    gate = asyncio.Semaphore(args.get("concurrency", 1))
    async with AsyncFluxClient(**options) as client:

        async def one() -> str:
            async with gate:
                try:
                    return _line(await client.edit(REQUEST))
                except FluxError as error:
                    return _line(error=error)

        for line in await asyncio.gather(*(one() for _ in range(args.get("calls", 1)))):
            _say(line)
    await state.aclose()


def _run_sync(args: dict[str, Any]) -> None:
    options = _options(args)
    state = options["state"]
    with FluxClient(**options) as client:
        for _ in range(args.get("calls", 1)):
            try:
                _say(_line(client.edit(REQUEST)))
            except FluxError as error:
                _say(_line(error=error))
    state.blocking.close()


def main() -> None:
    args = json.loads(sys.argv[1])
    skew = float(args.get("skew", 0))
    if skew:  # this worker's clocks are hours off; only Redis's TIME may count
        wall, mono, perf = time.time, time.monotonic, time.perf_counter
        time.time = lambda: wall() + skew
        time.monotonic = lambda: mono() + skew
        time.perf_counter = lambda: perf() + skew
    if args.get("sync"):
        _run_sync(args)
    else:
        asyncio.run(_run_async(args))


if __name__ == "__main__":
    main()
