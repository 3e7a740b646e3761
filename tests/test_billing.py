"""Never pay twice: the billing rule end to end, against the emulator's billing ledger.

Every provider in turn is the first of a failover pair and meets every fault, the plain ones
(answered before any work) and "took the job, then failed" (the image was made and billed, then
a 500 / 502 / 504 / drop / garbage 200 came back), through FluxClient and AsyncFluxClient on
each of its drivers (aiohttp, httpx). The ledger says which providers did (and billed) each
job: never two, unless the caller opted in. Then 200 concurrent edits meet random faults with
the breaker on, on each driver.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import Iterator

import attrs
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, errors
from flux_adapters.emulator import Emulator, Fault, run_emulator
from tests.conftest import ASYNC_DRIVERS, CLIENT_KINDS, driver, image_bytes

# apiyi-multipart takes local images only and needs at least one: every job carries one, so that
# any provider can stand in for any other.
PICTURE = image_bytes(48, 32)
SECOND = {
    "laozhang": "apiyi",
    "apiyi": "aimlapi",
    "aimlapi": "laozhang",
    "apiyi-multipart": "laozhang",
}

NOT_TAKEN = [
    Fault(status=429, retry_after=60),
    Fault(status=402),
    Fault(status=401),
    Fault(status=403),
    Fault(status=503),
]
AMBIGUOUS_BEFORE_WORK = [
    Fault(status=500),
    Fault(status=502),
    Fault(status=504),
    Fault(drop=True),
    Fault(body="malformed"),
    Fault(body="empty"),
    Fault(body="nested"),
    Fault(body="bad-b64"),
    Fault(body="html"),
]
TOOK_THE_JOB = [
    Fault(status=500, after_work=True),
    Fault(status=502, after_work=True),
    Fault(status=504, after_work=True),
    Fault(drop=True, after_work=True),
    Fault(body="malformed", after_work=True),
    Fault(body="empty", after_work=True),
    Fault(body="nested", after_work=True),
    Fault(body="bad-b64", after_work=True),
    Fault(body="html", after_work=True),
]
FINAL = [Fault(moderation=True)]


@pytest.fixture(scope="module")
def running() -> Iterator[Emulator]:
    with run_emulator(seed=8) as emulator:
        yield emulator


@pytest.fixture
def emulator(running: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    for prefix, provider in (("LAOZHANG", "laozhang"), ("APIYI", "apiyi"), ("AIMLAPI", "aimlapi")):
        monkeypatch.setenv(f"{prefix}_API_KEY", "test-key")
        monkeypatch.setenv(f"{prefix}_BASE_URL", running.base_url(provider))
    yield running
    running.clear_faults()


def job() -> EditRequest:
    return EditRequest(prompt=f"job {uuid.uuid4()}", model="flux-2-pro", images=[PICTURE])


def billed_by(emulator: Emulator, request: EditRequest) -> list[str]:
    return [entry.provider for entry in emulator.billed() if entry.prompt == request.prompt]


def posts(emulator: Emulator) -> Counter[str]:
    return Counter(call.provider for call in emulator.calls())


def edit(kind: str, providers: list[str], request: EditRequest, **options: object) -> object:
    """The result, or the FluxError raised (anything else fails the test)."""
    try:
        if kind == "sync":
            with FluxClient(providers=providers, timeout=2.0, **options) as client:  # type: ignore[arg-type]
                return client.edit(request)

        async def run() -> EditResult:
            async with AsyncFluxClient(
                providers=providers,  # type: ignore[arg-type]
                timeout=2.0,
                driver=driver(kind),
                **options,  # type: ignore[arg-type]
            ) as client:
                assert client.driver == kind
                return await client.edit(request)

        return asyncio.run(run())
    except errors.FluxError as error:
        return error


def named(fault: Fault) -> str:
    """A fault as its command-line spec, e.g. ``502,after-work``."""
    parts = [str(fault.status)] if fault.status else []
    parts += ["drop"] * fault.drop + ["moderation"] * fault.moderation
    parts += [fault.body] if fault.body else []
    parts += ["after-work"] * fault.after_work
    return ",".join(parts)


CASES = [
    (provider, fault, kind)
    for provider in SECOND
    for fault in NOT_TAKEN + AMBIGUOUS_BEFORE_WORK + TOOK_THE_JOB + FINAL
    for kind in CLIENT_KINDS
]


@pytest.mark.parametrize(
    ("first", "fault", "kind"), CASES, ids=[f"{p}:{named(f)}-{k}" for p, f, k in CASES]
)
def test_no_job_is_billed_by_two_providers(
    first: str, fault: Fault, kind: str, emulator: Emulator
) -> None:
    second = SECOND[first]
    emulator.inject(first, fault)
    request = job()
    before = posts(emulator)
    outcome = edit(kind, [first, second], request)
    sent = posts(emulator) - before
    billed = billed_by(emulator, request)

    assert len(billed) <= 1, billed  # the promise
    assert sent[first] == 1  # never retried in place: 429's Retry-After is too long to wait
    if fault in NOT_TAKEN:
        assert isinstance(outcome, EditResult)
        assert outcome.provider == second
        assert billed == [second]
        assert outcome.attempts[0].billing in (
            "rate-limited",
            "no-balance",
            "key-refused",
            "overloaded",
        )
    else:
        assert isinstance(outcome, errors.FluxError), outcome
        assert sent[second] == 0  # may have been billed, or final: never sent elsewhere
        assert [attempt.provider for attempt in outcome.attempts] == [first]
        assert billed == ([first] if fault.after_work else [])


def judged(outcome: object) -> tuple[str, bool | None, int | None, tuple[str, ...]]:
    """What a caller can tell of an outcome: its type, ``sent``, the status, who was tried."""
    attempts = getattr(outcome, "attempts", ())
    return (
        type(outcome).__name__,
        getattr(outcome, "sent", None),
        getattr(outcome, "status_code", None),
        tuple(f"{attempt.provider}:{attempt.outcome}" for attempt in attempts),
    )


@pytest.mark.parametrize(
    "fault", NOT_TAKEN + AMBIGUOUS_BEFORE_WORK + TOOK_THE_JOB + FINAL, ids=named
)
def test_every_client_and_driver_judges_a_fault_the_same(fault: Fault, emulator: Emulator) -> None:
    """FluxClient and AsyncFluxClient on aiohttp and on httpx: the same error, ``sent`` and route."""
    seen = {}
    for kind in CLIENT_KINDS:
        emulator.inject("laozhang", fault)
        seen[kind] = judged(edit(kind, ["laozhang", "apiyi"], job()))
        emulator.clear_faults()
    assert seen["aiohttp"] == seen["sync"], seen
    assert seen["httpx"] == seen["sync"], seen


@pytest.mark.parametrize("kind", CLIENT_KINDS)
@pytest.mark.parametrize("fault", TOOK_THE_JOB[:4], ids=named)
def test_failing_over_after_an_ambiguous_failure_is_the_callers_choice(
    fault: Fault, kind: str, emulator: Emulator
) -> None:
    emulator.inject("laozhang", fault)
    request = job()
    outcome = edit(kind, ["laozhang", "apiyi"], request, failover_on_ambiguous=True)
    assert isinstance(outcome, EditResult)
    assert outcome.provider == "apiyi"
    assert billed_by(emulator, request) == ["laozhang", "apiyi"]  # exactly what was opted into


@pytest.mark.parametrize("kind", ASYNC_DRIVERS)
def test_200_concurrent_edits_with_random_faults_and_the_breaker_on(
    kind: str, emulator: Emulator
) -> None:
    faults = itertools.cycle(NOT_TAKEN + AMBIGUOUS_BEFORE_WORK + TOOK_THE_JOB)
    for provider in ("laozhang", "apiyi", "aimlapi"):
        for _ in range(6):
            emulator.inject(provider, attrs.evolve(next(faults), chance=0.04))
    requests = [job() for _ in range(200)]

    async def run() -> list[object]:
        async with AsyncFluxClient(
            providers=["laozhang", "apiyi", "aimlapi"],
            timeout=5.0,
            driver=driver(kind),
        ) as client:

            async def one(request: EditRequest) -> object:
                try:
                    return await client.edit(request)
                except errors.FluxError as error:
                    return error

            return await asyncio.gather(*(one(request) for request in requests))

    outcomes = asyncio.run(run())
    assert len(outcomes) == 200  # every job accounted for: a result or a typed error
    ledger = Counter(entry.prompt for entry in emulator.billed())
    assert max(ledger[request.prompt] for request in requests) <= 1  # none billed twice
    results = [outcome for outcome in outcomes if isinstance(outcome, EditResult)]
    failures = [outcome for outcome in outcomes if isinstance(outcome, errors.FluxError)]
    assert len(results) + len(failures) == 200
    assert results, "some jobs must get through"
    assert failures, "the faults must hit some jobs"
    for request, outcome in zip(requests, outcomes, strict=True):
        if isinstance(outcome, EditResult):
            assert ledger[request.prompt] == 1  # what came back was billed once, where it says
            assert billed_by(emulator, request) == [outcome.provider]
