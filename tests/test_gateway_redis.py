"""Three ``flux-adapters serve`` processes and one Redis (issue 12's acceptance): a provider that
fails for one gateway is skipped by the others, one $1 budget holds across all three, and a
provider's 429 with ``Retry-After`` pauses all three.

Real parts only: three gateway processes started as a user starts them, the redis-server the
suite starts (tests/redis_server.py), the loopback emulator behind them (its ledger says what
reached and what was billed by each provider), and the OpenAI Python SDK calling the gateways.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from flux_adapters.emulator import Emulator, Fault, run_emulator
from tests.redis_server import RedisServer, redis_server

PROVIDER_SECRET = "sk-provider-SECRET-5e1d7c3a9b"
LAOZHANG_PRICE = 0.03  # the built-in price of flux-2-pro at laozhang; apiyi has none


class Gateways:
    """Three gateway processes sharing one Redis, fronting laozhang then apiyi."""

    def __init__(self, emulator: Emulator, redis: RedisServer, where: Path) -> None:
        self.emulator = emulator
        self.env = {
            **os.environ,
            "FLUX_PROVIDERS": "laozhang,apiyi",
            "FLUX_STATE_URL": redis.url,
        }
        self.env.pop("FLUX_CONFIG", None)
        for name in ("laozhang", "apiyi"):
            self.env[f"{name.upper()}_API_KEY"] = PROVIDER_SECRET
            self.env[f"{name.upper()}_BASE_URL"] = emulator.base_url(name)
        self.where = where
        self.processes: list[subprocess.Popen[str]] = []
        self.roots: list[str] = []
        self._errors: list[list[str]] = []
        self._readers: list[threading.Thread] = []

    def start(self, count: int) -> None:
        for number in range(count):
            process = subprocess.Popen(
                [sys.executable, "-m", "flux_adapters", "serve", "--port", "0",
                 "--files-dir", str(self.where / f"files-{number}")],
                env=self.env, cwd=self.where, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            self.processes.append(process)
        for process in self.processes:
            assert process.stdout is not None
            assert process.stderr is not None
            banner = process.stdout.readline()  # bounded: the process prints it or exits
            assert banner.startswith("flux-adapters gateway on http://127.0.0.1:"), (
                banner + process.stderr.read()
            )
            self.roots.append(banner.split()[3])
            lines: list[str] = []
            self._errors.append(lines)
            # Drain its access log as it comes, so a full pipe never blocks the gateway.
            reader = threading.Thread(target=_drain, args=(process.stderr, lines), daemon=True)
            reader.start()
            self._readers.append(reader)

    def key(self, *options: str) -> str:
        """``flux-adapters keys create`` with the state in Redis: seen by every gateway."""
        made = subprocess.run(
            [sys.executable, "-m", "flux_adapters", "keys", "create", *options],
            env=self.env, cwd=self.where, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return made.stdout.splitlines()[0]

    def sdk(self, number: int, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.roots[number] + "/v1", api_key=key, max_retries=0)

    def stop(self) -> str:
        """Stop every gateway (SIGTERM, as a service is stopped); their logs, joined."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for process in self.processes:
            assert process.stdout is not None
            process.stdout.close()
        for reader in self._readers:
            reader.join(timeout=10)  # the pipe ends with the process
        for process in self.processes:
            assert process.stderr is not None
            process.stderr.close()
        return "".join(line for lines in self._errors for line in lines)


def _drain(stream: Any, into: list[str]) -> None:
    for line in stream:
        into.append(line)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    with redis_server() as redis, run_emulator() as emulator:
        running = Gateways(emulator, redis, tmp_path)
        try:
            running.start(3)
            yield running
        finally:
            logs = running.stop()
            assert PROVIDER_SECRET not in logs


def generate(client: openai.OpenAI, prompt: str) -> tuple[dict[str, str], Any]:
    """One generation: the answer's headers and the parsed answer, or the error's body."""
    try:
        raw = client.images.with_raw_response.generate(model="flux-2-pro", prompt=prompt)
    except openai.APIStatusError as error:
        return dict(error.response.headers), error.body
    return dict(raw.headers), raw.parse()


def test_three_gateways_share_one_budget_cooldowns_and_429_pauses(gateways: Gateways) -> None:
    emulator = gateways.emulator

    # -- a $1 budget, one key, three gateways called at once ----------------------------------
    budget_key = gateways.key("--name", "shared", "--budget-usd", "1")
    clients = [gateways.sdk(number, budget_key) for number in range(3)]

    def spend(number: int) -> list[tuple[dict[str, str], Any]]:
        return [generate(clients[number], f"budget {number}-{i}") for i in range(15)]

    with ThreadPoolExecutor(max_workers=9) as pool:  # three callers on each gateway
        runs = [pool.submit(spend, number) for number in (0, 1, 2) for _ in range(3)]
        answers = [answer for run in runs for answer in run.result(timeout=300)]
    for client in clients:
        client.close()
    served = [headers for headers, body in answers if isinstance(body, openai.types.ImagesResponse)]
    refused = [body for _, body in answers if not isinstance(body, openai.types.ImagesResponse)]
    assert len(served) + len(refused) == 135
    assert {body["code"] for body in refused} == {"budget_exceeded"}
    # apiyi has no known price, so a key with a budget is routed to laozhang only.
    assert {headers["x-flux-provider"] for headers in served} == {"laozhang"}
    spent = sum(float(headers["x-flux-cost-usd"]) for headers in served)
    billed = emulator.billed("laozhang")
    # $1 at $0.03 a call: 33 calls, whatever the three gateways did at once; never a 34th.
    assert len(billed) == len(served) == 33
    assert len(billed) * LAOZHANG_PRICE <= 1.0 + LAOZHANG_PRICE
    assert spent == pytest.approx(0.99)
    assert len(emulator.calls("laozhang")) == 33  # a refused call reached no provider
    assert emulator.calls("apiyi") == []

    # -- laozhang fails for the first gateway: the other two skip it on their first request ---
    open_key = gateways.key("--name", "open")
    emulator.inject("laozhang", Fault(status=503, first=1))  # overloaded: the job was not taken
    with gateways.sdk(0, open_key) as first:
        headers, body = generate(first, "fails over")
    assert isinstance(body, openai.types.ImagesResponse), body
    assert headers["x-flux-provider"] == "apiyi"
    assert headers["x-flux-attempt-log"].startswith("laozhang=failed")
    # Had the others tried laozhang, it would have served them (the fault was for one call).
    for number in (1, 2):
        with gateways.sdk(number, open_key) as other:
            headers, body = generate(other, f"skips on {number}")
        assert isinstance(body, openai.types.ImagesResponse), body
        assert headers["x-flux-provider"] == "apiyi"
        assert headers["x-flux-attempts"] == "2"
        assert headers["x-flux-attempt-log"] == "laozhang=skipped; apiyi=ok"
    assert len(emulator.calls("laozhang")) == 33 + 1
    assert len(emulator.calls("apiyi")) == 3

    # -- apiyi's 429 with Retry-After to the first gateway pauses all three --------------------
    apiyi_key = gateways.key("--name", "apiyi only", "--provider", "apiyi")
    emulator.inject("apiyi", Fault(status=429, retry_after=120, first=1))
    with gateways.sdk(0, apiyi_key) as first:
        headers, body = generate(first, "rate limited")
    assert body["code"] == "provider_rate_limited", body
    assert headers["retry-after"] == "120"
    # The others wait out the 120 s instead of sending: longer than a call may wait, so they
    # answer at once that no provider is available now, apiyi skipped as paused; nothing more
    # reaches apiyi.
    for number in (1, 2):
        with gateways.sdk(number, apiyi_key) as other:
            headers, body = generate(other, f"paused on {number}")
        assert not isinstance(body, openai.types.ImagesResponse), body
        assert body["code"] == "no_provider_available", body
        assert body["may_be_billed"] is False
        [attempt] = body["attempts"]
        assert (attempt["provider"], attempt["outcome"]) == ("apiyi", "skipped")
        assert "paused" in attempt["reason"], attempt
        assert 0 < attempt["available_in_s"] <= 120, attempt
        assert 1 <= int(headers["retry-after"]) <= 120  # the SDK waits that long to retry
    assert len(emulator.calls("apiyi")) == 3 + 1
