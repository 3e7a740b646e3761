"""Failover against the emulator: every fault on the first provider of a failover list, the
configuration-only switch, and batches that never pay twice."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, errors
from flux_adapters.cli import main
from flux_adapters.config import load_config
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.routing import RoutingPolicy
from tests.conftest import ASYNC_DRIVERS, driver

REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")


@pytest.fixture(scope="module")
def running() -> Iterator[Emulator]:
    with run_emulator(bad_keys={"revoked-key"}) as emulator:
        yield emulator


@pytest.fixture
def emulator(running: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    for prefix, provider in (("LAOZHANG", "laozhang"), ("APIYI", "apiyi"), ("AIMLAPI", "aimlapi")):
        monkeypatch.setenv(f"{prefix}_API_KEY", "test-key")
        monkeypatch.setenv(f"{prefix}_BASE_URL", running.base_url(provider))
    monkeypatch.delenv("FLUX_PROVIDERS", raising=False)
    monkeypatch.delenv("FLUX_CONFIG", raising=False)
    yield running
    running.clear_faults()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/laozhang"


def posts(emulator: Emulator, provider: str) -> int:
    return len(emulator.calls(provider))


# (fault on laozhang, expected: the provider that serves it, or the error raised)
MATRIX = [
    (Fault(status=429, retry_after=30), "apiyi"),  # Retry-After too long to wait: next provider
    (Fault(status=402), "apiyi"),
    (Fault(status=502), errors.ProviderUnavailable),  # a gateway: the job may be done
    (Fault(status=503), "apiyi"),
    (Fault(status=500), errors.ProviderUnavailable),  # ambiguous: may have been billed
    (Fault(drop=True), errors.TransportError),  # ambiguous
    (Fault(body="malformed"), errors.ResponseFormatError),  # a 200: may have been billed
    (Fault(body="empty"), errors.ResponseFormatError),
    (Fault(moderation=True), errors.ContentModerated),  # never fails over
    (Fault(delay=3), errors.Timeout),  # read timeout after sending: ambiguous
]


def _timeout(fault: Fault) -> float:
    """1 s where the fault is a slow answer (its read timeout is the point), else room enough
    for the emulator to render the second provider's image on a loaded machine."""
    return 1.0 if fault.delay else 10.0


@pytest.mark.parametrize(("fault", "expected"), MATRIX, ids=lambda v: str(v)[:40])
def test_fault_matrix_on_the_first_provider(
    fault: Fault, expected: object, emulator: Emulator
) -> None:
    emulator.inject("laozhang", fault)
    before = {name: posts(emulator, name) for name in ("laozhang", "apiyi")}
    started = time.monotonic()
    with FluxClient(providers=["laozhang", "apiyi"], timeout=_timeout(fault)) as client:
        if isinstance(expected, str):
            result = client.edit(REQUEST)
            assert result.provider == expected
            assert [(a.provider, a.outcome) for a in result.attempts] == [
                ("laozhang", "failed"),
                ("apiyi", "ok"),
            ]
        else:
            assert isinstance(expected, type)
            assert issubclass(expected, errors.FluxError)
            with pytest.raises(expected) as caught:
                client.edit(REQUEST)
            assert [a.provider for a in caught.value.attempts] == ["laozhang"]
            assert posts(emulator, "apiyi") == before["apiyi"]  # no second POST elsewhere
    assert posts(emulator, "laozhang") == before["laozhang"] + 1  # exactly one POST, no retry
    assert time.monotonic() - started < 60  # bounded by the timeouts: no hang


@pytest.mark.parametrize("kind", ASYNC_DRIVERS)
@pytest.mark.parametrize(("fault", "expected"), MATRIX, ids=lambda v: str(v)[:40])
def test_fault_matrix_on_the_first_provider_on_each_async_driver(
    kind: str, fault: Fault, expected: object, emulator: Emulator
) -> None:
    """The matrix above, on AsyncFluxClient with each driver: the same route and errors."""
    emulator.inject("laozhang", fault)
    before = {name: posts(emulator, name) for name in ("laozhang", "apiyi")}

    async def main() -> object:
        async with AsyncFluxClient(
            providers=["laozhang", "apiyi"], timeout=_timeout(fault), driver=driver(kind)
        ) as client:
            try:
                return await client.edit(REQUEST)
            except errors.FluxError as error:
                return error

    outcome = asyncio.run(main())
    if isinstance(expected, str):
        assert isinstance(outcome, EditResult), outcome
        assert outcome.provider == expected
        assert [(a.provider, a.outcome) for a in outcome.attempts] == [
            ("laozhang", "failed"),
            ("apiyi", "ok"),
        ]
    else:
        assert type(outcome) is expected, outcome
        assert isinstance(outcome, errors.FluxError)
        assert [a.provider for a in outcome.attempts] == ["laozhang"]
        assert posts(emulator, "apiyi") == before["apiyi"]  # no second POST elsewhere
        if isinstance(outcome, errors.TransportError):
            assert outcome.sent is True  # a drop or a read timeout after sending: maybe billed
    assert posts(emulator, "laozhang") == before["laozhang"] + 1  # exactly one POST, no retry


@pytest.mark.parametrize("kind", ASYNC_DRIVERS)
def test_a_refused_connection_fails_over_on_each_async_driver(
    kind: str, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_BASE_URL", closed_port_url())

    async def main() -> EditResult:
        policy = RoutingPolicy(retries=0)
        async with AsyncFluxClient(
            providers=["laozhang", "apiyi"], policy=policy, driver=driver(kind)
        ) as client:
            return await client.edit(REQUEST)

    result = asyncio.run(main())
    assert result.provider == "apiyi"
    assert isinstance(result.attempts[0].error, errors.TransportError)
    assert result.attempts[0].error.sent is False


def test_a_refused_connection_fails_over(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_BASE_URL", closed_port_url())
    policy = RoutingPolicy(retries=0)
    with FluxClient(providers=["laozhang", "apiyi"], policy=policy) as client:
        result = client.edit(REQUEST)
    assert result.provider == "apiyi"
    assert isinstance(result.attempts[0].error, errors.TransportError)
    assert result.attempts[0].error.sent is False


def test_a_revoked_key_fails_over(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "revoked-key")
    with FluxClient(providers=["laozhang", "aimlapi"]) as client:
        result = client.edit(REQUEST)
    assert result.provider == "aimlapi"
    assert isinstance(result.attempts[0].error, errors.AuthenticationFailed)


def test_a_short_429_is_retried_on_the_same_provider(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=429, retry_after=0.2, first=1))
    with FluxClient(providers=["laozhang", "apiyi"]) as client:
        result = client.edit(REQUEST)
    assert result.provider == "laozhang"
    assert [a.outcome for a in result.attempts] == ["failed", "ok"]


def test_failover_after_an_ambiguous_failure_only_when_opted_in(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=500))
    with FluxClient(providers=["laozhang", "apiyi"], failover_on_ambiguous=True) as client:
        assert client.edit(REQUEST).provider == "apiyi"


def test_cheapest_routes_by_price_and_records_why_a_provider_was_skipped(
    emulator: Emulator,
) -> None:
    from flux_adapters.prices import PerCall

    prices = {("aimlapi", "flux-2-pro"): PerCall(usd=0.01)}
    with FluxClient(
        providers=["laozhang", "apiyi", "aimlapi"], routing="cheapest", prices=prices
    ) as client:
        assert client.edit(REQUEST).provider == "aimlapi"
        five = EditRequest(
            prompt="p", model="flux-2-pro", images=[f"https://ex.com/{n}.png" for n in range(5)]
        )
        result = client.edit(five)
    assert result.provider == "laozhang"
    assert result.cost_usd == 0.03
    skipped = result.attempts[0]
    assert (skipped.provider, skipped.outcome) == ("aimlapi", "skipped")
    assert isinstance(skipped.error, errors.RequestError)


def test_with_the_breaker_open_no_call_waits_for_the_provider(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=503, delay=0.5))
    with FluxClient(providers=["laozhang", "apiyi"]) as client:
        client.edit(REQUEST)  # waits 0.5 s for laozhang's 503, then apiyi serves it
        sent = posts(emulator, "laozhang")
        started = time.monotonic()
        for _ in range(5):
            result = client.edit(REQUEST)
            assert result.attempts[0].outcome == "skipped"
        assert time.monotonic() - started < 0.5 * 2  # five calls, none waited the 0.5 s delay
    assert posts(emulator, "laozhang") == sent


def test_every_provider_failing_raises_all_providers_failed_with_each_attempt(
    emulator: Emulator,
) -> None:
    emulator.inject("laozhang", Fault(status=402))
    emulator.inject("apiyi", Fault(status=503))
    client = FluxClient(providers=["laozhang", "apiyi"], policy=RoutingPolicy(retries=0))
    with client, pytest.raises(errors.AllProvidersFailed) as caught:
        client.edit(REQUEST)
    assert [(a.provider, type(a.error).__name__) for a in caught.value.attempts] == [
        ("laozhang", "InsufficientBalance"),
        ("apiyi", "ProviderUnavailable"),
    ]


SCRIPT = """
from flux_adapters import EditRequest, FluxClient
with FluxClient.from_env() as client:
    result = client.edit(EditRequest(prompt="a robot", model="flux-2-pro"))
print(result.provider, [a.provider for a in result.attempts])
"""


def test_one_unchanged_script_switches_provider_by_configuration_only(
    emulator: Emulator, tmp_path: Path
) -> None:
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    config = tmp_path / "flux-adapters.toml"
    config.write_text('providers = ["aimlapi", "laozhang"]\nrouting = "ordered"\n')

    def run(**env: str) -> str:
        import os

        done = subprocess.run(
            [sys.executable, str(script)],
            env=os.environ | env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    assert run() == "aimlapi ['aimlapi']"  # from flux-adapters.toml in the working directory
    assert (
        run(FLUX_PROVIDERS="laozhang") == "laozhang ['laozhang']"
    )  # the environment overrides the file
    emulator.inject("aimlapi", Fault(status=503, first=1))
    assert run() == "laozhang ['aimlapi', 'laozhang']"  # the failover list from the file


def test_configuration_file_rules(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'providers = ["laozhang", "aimlapi"]\nrouting = "cheapest"\nmax_cost_usd = 0.05\n'
        '[provider.aimlapi]\npriority = 1\napi_key_env = "MY_AIML_KEY"\n'
        '[provider.aimlapi.prices]\n"flux-2-pro" = { usd_first = 0.03, usd_extra = 0.015 }\n'
    )
    loaded = load_config(config, environ={})
    assert [p.name for p in loaded.providers] == ["aimlapi", "laozhang"]  # priority first
    assert (loaded.routing, loaded.max_cost_usd) == ("cheapest", 0.05)
    assert loaded.providers[0].api_key_env == "MY_AIML_KEY"
    overridden = load_config(
        config, environ={"FLUX_ROUTING": "ordered", "FLUX_MAX_COST_USD": "0.1"}
    )
    assert (overridden.routing, overridden.max_cost_usd) == ("ordered", 0.1)
    config.write_text('providers = ["laozhang"]\n[provider.laozhang]\napi_key = "sk-secret"\n')
    with pytest.raises(
        errors.ConfigurationError, match="keys are never read from the file"
    ) as caught:
        load_config(config, environ={})
    assert "sk-secret" not in str(caught.value)
    config.write_text('providers = ["laozhang"]\nretries = 3\n')
    with pytest.raises(errors.ConfigurationError, match="unknown keys"):
        load_config(config, environ={})
    with pytest.raises(errors.ConfigurationError, match="no providers configured"):
        load_config(None, environ={})
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # read without blocking, and refused
    with pytest.raises(errors.ConfigurationError, match="not a regular file"):
        load_config(None, environ={"FLUX_CONFIG": str(fifo)})
    for variable in ("FLUX_TIMEOUT", "FLUX_MAX_COST_USD"):
        for value in ("nan", "inf", "-1", "soon"):
            with pytest.raises(errors.ConfigurationError, match="must be"):
                load_config(None, environ={"FLUX_PROVIDERS": "laozhang", variable: value})


def saved_images(folder: Path) -> set[str]:
    return {path.stem for path in folder.iterdir() if path.suffix in (".png", ".jpeg", ".webp")}


def batch_file(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "batch.jsonl"
    lines = [
        json.dumps({"id": f"robot-{n}", "prompt": f"robot {n}", "size": "512x512", "seed": n + 1})
        for n in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_report(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / "report.jsonl").read_text().splitlines()]


def test_a_batch_of_200_with_faults_accounts_for_every_job_and_reruns_only_what_was_not_taken(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang,aimlapi")
    emulator.inject("laozhang", Fault(status=503, first=40))  # not taken: fails over
    emulator.inject("aimlapi", Fault(status=500, first=5))  # ambiguous: may have been billed
    source, folder = batch_file(tmp_path, 200), tmp_path / "images"
    code = main(
        ["batch", str(source), "-o", str(folder), "--concurrency", "16"],
        out=io.StringIO(),
        err=io.StringIO(),
    )
    first = {str(line["id"]): line for line in read_report(folder)}
    assert len(first) == 200  # every job accounted for
    by_status = {
        status: {name for name, line in first.items() if line["status"] == status}
        for status in ("ok", "failed", "unconfirmed")
    }
    assert sum(len(names) for names in by_status.values()) == 200
    assert by_status["ok"] == saved_images(folder)
    assert 1 <= len(by_status["unconfirmed"]) <= 5  # each hit one of aimlapi's 500s
    assert all(
        str(first[name]["error"]).startswith("ProviderUnavailable")
        for name in by_status["unconfirmed"]
    )
    # While both providers cool down after those failures, jobs are refused before sending.
    assert all(
        str(first[name]["error"]).startswith("AllProvidersFailed") for name in by_status["failed"]
    )
    assert code == 8  # some jobs may have been billed without an image

    emulator.clear_faults()
    sent = len(emulator.calls())
    code = main(["batch", str(source), "-o", str(folder)], out=io.StringIO(), err=io.StringIO())
    assert len(emulator.calls()) - sent == len(by_status["failed"])  # never the unconfirmed
    second = {str(line["id"]): line["status"] for line in read_report(folder)}
    assert len(read_report(folder)) == 200  # one line per job: each rerun job's latest
    assert {name for name, status in second.items() if status == "unconfirmed"} == (
        by_status["unconfirmed"]
    )
    assert {name for name, status in second.items() if status == "ok"} == (
        by_status["ok"] | by_status["failed"]
    )
    assert code == 8

    sent = len(emulator.calls())
    code = main(
        ["batch", str(source), "-o", str(folder), "--resend-unconfirmed"],
        out=io.StringIO(),
        err=io.StringIO(),
    )
    assert len(emulator.calls()) - sent == len(by_status["unconfirmed"])  # only on request
    assert code == 0
    assert saved_images(folder) == set(first)


def test_edit_many_yields_as_finished_and_limits_each_provider(
    emulator: Emulator, tmp_path: Path
) -> None:
    emulator.inject("laozhang", Fault(delay=0.2))

    async def run() -> list[int]:
        async with AsyncFluxClient(providers=["laozhang"]) as client:
            requests = [
                EditRequest(prompt=f"r{n}", model="flux-2-pro", size="64x64") for n in range(8)
            ]
            started = time.monotonic()
            order = [
                item.index
                async for item in client.edit_many(
                    requests, concurrency=8, per_provider=2, output_dir=tmp_path
                )
            ]
            assert time.monotonic() - started >= 0.2 * 8 / 2  # at most two at a time at laozhang
            return order

    order = asyncio.run(run())
    assert sorted(order) == list(range(8))
    assert len(saved_images(tmp_path)) == 8
