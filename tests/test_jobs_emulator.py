"""bfl and fal end to end on the bundled emulator: real HTTP, real images, its billing ledger.

The ledger (`Emulator.billed`) is what a user pays for; `Emulator.calls` counts each exchange
by kind (submit, poll, fetch, cancel) and whether it carried a key.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from flux_adapters import (
    AsyncFluxClient,
    EditRequest,
    EditResult,
    FluxClient,
    ModelId,
    ProviderId,
    errors,
)
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.jobs import Polling
from flux_adapters.providers import KeyAuth
from flux_adapters.providers.bfl import BflAdapter
from tests.conftest import CLIENT_KINDS, driver, image_bytes

KEY = "emulator-key-0123456789"
FAST = Polling(first=0.01, factor=1.5, longest=0.05, jitter=0.1, deadline=30.0)
JOB_PROVIDERS = ("bfl", "fal")


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(emulator: Emulator) -> None:
    emulator.clear_faults()


def edit(
    kind: str, emulator: Emulator, provider: object, request: EditRequest, **options: Any
) -> tuple[EditResult, list[bytes]]:
    """One edit, and its images downloaded, by a sync or an async client."""
    name = provider if isinstance(provider, str) else provider.name  # type: ignore[attr-defined]
    settings: dict[str, Any] = {
        "api_key": KEY,
        "base_url": emulator.base_url(name),
        "polling": FAST,
        **options,
    }
    if kind == "sync":
        with FluxClient(provider, **settings) as client:  # type: ignore[arg-type]
            result = client.edit(request)
            return result, [image.read() for image in result.images]

    async def main() -> tuple[EditResult, list[bytes]]:
        async with AsyncFluxClient(provider, driver=driver(kind), **settings) as client:  # type: ignore[arg-type]
            result = await client.edit(request)
            return result, [await image.read_async() for image in result.images]

    return asyncio.run(main())


both = pytest.mark.parametrize("kind", CLIENT_KINDS)
"""FluxClient, and AsyncFluxClient on each of its drivers."""


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def three_references(model: ModelId, prompt: str) -> EditRequest:
    return EditRequest(
        prompt=prompt,
        model=model,
        images=[
            image_bytes(320, 240, color="red"),
            image_bytes(200, 200, "JPEG", color="blue"),
            image_bytes(640, 480, color="green"),
        ],
        width=512,
        height=384,
    )


# --- acceptance: text-to-image and a 3-reference edit, submit -> >= 2 pending polls -> result


@both
@pytest.mark.parametrize("provider", JOB_PROVIDERS)
def test_text_to_image_and_a_three_reference_edit_complete_through_the_job(
    kind: str, provider: str, emulator: Emulator
) -> None:
    for request, size in (
        (
            EditRequest(prompt=f"t2i {kind} {provider}", model="flux-2-pro", width=640, height=480),
            (640, 480),
        ),
        (three_references("flux-2-pro", f"edit {kind} {provider}"), (512, 384)),
    ):
        before = {kind_: len(emulator.calls(provider, kind_)) for kind_ in ("submit", "poll")}
        result, images = edit(kind, emulator, provider, request)
        submits = len(emulator.calls(provider, "submit")) - before["submit"]
        polls = len(emulator.calls(provider, "poll")) - before["poll"]
        assert submits == 1
        assert polls >= 3  # at least two pending, then done
        assert result.provider == provider
        assert result.job is not None
        assert size_of(images[0]) == size
        assert [job.prompt for job in emulator.billed(provider)].count(request.prompt) == 1
    if provider == "fal":
        assert emulator.calls("fal", "fetch")  # fal's result is a separate GET


def test_bfl_reports_credits_and_the_result_says_where_its_cost_came_from(
    emulator: Emulator,
) -> None:
    result, _ = edit("sync", emulator, "bfl", three_references("flux-2-pro", "cost"))
    assert result.cost_source == "provider"
    assert result.usage is not None
    assert result.usage.credits_used is not None
    assert result.cost_usd == pytest.approx(result.usage.credits_used * 0.01)
    fal, _ = edit("sync", emulator, "fal", three_references("flux-2-pro", "fal cost"))
    assert fal.cost_source == "price table"  # fal reports no cost: its per-MP price estimates


# --- acceptance: a polling URL on another host carries the key only when declared -----------


class LocalhostBfl(BflAdapter):
    """BFL's adapter, declaring both of the emulator's host names as BFL's own hosts.

    Declared hosts apply only while the base URL is at one of them (the provider's own API; a
    reseller's key never goes to them): the emulator, standing in for BFL's own API at
    127.0.0.1, declares it too, as BFL's api.bfl.ai is one of its *.bfl.ai.
    """

    auth: ClassVar[KeyAuth] = KeyAuth(
        header="x-key", scheme=None, hosts=("*.bfl.ai", "127.0.0.1", "localhost")
    )


def test_an_other_host_polling_url_gets_the_key_only_when_declared(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(other_host=True, first=1))
    with pytest.raises(errors.ProviderError) as caught:
        edit("sync", emulator, "bfl", EditRequest(prompt="undeclared host", model="flux-2-pro"))
    polls = [call for call in emulator.calls("bfl", "poll") if call.host.startswith("localhost")]
    assert polls
    assert not any(call.keyed for call in polls)  # never sent: the emulator refused the poll
    assert caught.value.status_code in (401, 403)
    assert caught.value.job is not None  # accepted and kept, to resume

    emulator.inject("bfl", Fault(other_host=True, first=1))
    _, images = edit(
        "sync", emulator, LocalhostBfl(), EditRequest(prompt="declared host", model="flux-2-pro")
    )
    declared = [c for c in emulator.calls("bfl", "poll") if c.host.startswith("localhost")]
    assert all(call.keyed for call in declared[len(polls) :])
    assert images


# --- acceptance: faults on polls never cause a second submit --------------------------------

POLL_FAULTS = {
    "connect error": None,  # the poll URL's port refuses: see the test
    "read timeout": Fault(on="poll", delay=1.0, first=2),
    "dropped": Fault(on="poll", drop=True, first=2),
    "500": Fault(on="poll", status=500, first=2),
    "502": Fault(on="poll", status=502, first=2),
    "503": Fault(on="poll", status=503, first=2),
    "504": Fault(on="poll", status=504, first=2),
    "429": Fault(on="poll", status=429, retry_after=0, first=2),
}


@both
@pytest.mark.parametrize("provider", JOB_PROVIDERS)
@pytest.mark.parametrize("fault", [name for name in POLL_FAULTS if POLL_FAULTS[name]])
def test_a_fault_on_a_poll_never_causes_a_second_submit(
    kind: str, provider: str, fault: str, emulator: Emulator
) -> None:
    injected = POLL_FAULTS[fault]
    assert injected is not None
    emulator.inject(provider, injected)
    prompt = f"poll fault {fault} {kind} {provider}"
    submits = len(emulator.calls(provider, "submit"))
    # Short only where the fault is a slow poll (so that it times out); the others have time to
    # spare on a loaded machine, where 0.5 s once timed out a healthy exchange.
    timeout = 0.5 if injected.delay else 5.0
    result, images = edit(
        kind, emulator, provider, EditRequest(prompt=prompt, model="flux-2-pro"), timeout=timeout
    )
    assert images
    assert [job.prompt for job in emulator.billed(provider)].count(prompt) == 1
    assert len(emulator.calls(provider, "submit")) - submits == 1
    assert result.job is not None


def test_a_poll_that_cannot_connect_is_retried_and_never_submits_again(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first polls go to a port nobody listens on (connect refused), then to the job."""
    from flux_adapters.providers import bfl

    real = bfl.BflAdapter.build_poll
    tries = {"n": 0}

    def flaky(self: bfl.BflAdapter, job: Any) -> Any:
        tries["n"] += 1
        request = real(self, job)
        if tries["n"] <= 2:
            return type(request)(method="GET", url="http://127.0.0.1:9/v1/get_result", role="poll")
        return request

    monkeypatch.setattr(bfl.BflAdapter, "build_poll", flaky)
    prompt = "connect refused on a poll"
    _, images = edit("sync", emulator, "bfl", EditRequest(prompt=prompt, model="flux-2-pro"))
    assert images
    assert tries["n"] >= 3
    assert [job.prompt for job in emulator.billed("bfl")].count(prompt) == 1


# --- acceptance: a deadline causes one cancel and a JobTimeout; resume completes ------------


# A resumed job still has the rest of its long pending run to poll through (up to 40 polls,
# each answered at once): polled with no wait between them.
EAGER = Polling(first=0.0, factor=1.0, longest=0.0, jitter=0.0, deadline=30.0)


def resume(
    kind: str, emulator: Emulator, provider: ProviderId, job: Any
) -> tuple[EditResult, bytes]:
    settings: dict[str, Any] = {
        "api_key": KEY,
        "base_url": emulator.base_url(provider),
        "polling": EAGER,
    }
    if kind == "sync":
        with FluxClient(provider, **settings) as client:
            done = client.resume(job)
            return done, done.images[0].read()

    async def main() -> tuple[EditResult, bytes]:
        async with AsyncFluxClient(provider, driver=driver(kind), **settings) as client:
            done = await client.resume(job)
            return done, await done.images[0].read_async()

    return asyncio.run(main())


SHORT = Polling(first=0.01, longest=0.02, jitter=0.0, deadline=0.3)


@both
def test_a_deadline_cancels_the_job_once_and_raises_job_timeout_with_its_id(
    kind: str, emulator: Emulator
) -> None:
    emulator.inject("fal", Fault(pending=40, queued=0, first=1))  # in progress a long while
    request = EditRequest(prompt=f"deadline {kind}", model="flux-2-pro")
    cancels = len(emulator.calls("fal", "cancel"))
    with pytest.raises(errors.JobTimeout) as caught:
        edit(kind, emulator, "fal", request, polling=SHORT)
    error = caught.value
    assert len(emulator.calls("fal", "cancel")) - cancels == 1
    assert error.cancelled is True
    assert error.job is not None
    assert error.job_id == error.job.id
    assert error.job.id in str(error)
    # fal removes a queued job; a running one only gets a signal its app may ignore
    assert "cancelled if it had not started (if it had, it may still finish" in str(error)
    submits = len(emulator.calls("fal", "submit"))

    # The emulator's app honours the cancel: resuming says so, and never submits again.
    with pytest.raises(errors.JobFailed, match="cancelled"):
        resume(kind, emulator, "fal", error.job)
    assert len(emulator.calls("fal", "submit")) == submits


@both
def test_a_job_whose_cancel_was_refused_is_resumed_to_its_image_without_a_submit(
    kind: str, emulator: Emulator
) -> None:
    emulator.inject("fal", Fault(pending=40, queued=0, first=1))
    emulator.inject("fal", Fault(on="cancel", status=503, first=1))
    request = EditRequest(prompt=f"cancel refused {kind}", model="flux-2-pro")
    with pytest.raises(errors.JobTimeout) as caught:
        edit(kind, emulator, "fal", request, polling=SHORT)
    assert caught.value.cancelled is False
    assert caught.value.job is not None
    assert "it may still finish and be billed" in str(caught.value)
    submits = len(emulator.calls("fal", "submit"))

    resumed, data = resume(kind, emulator, "fal", caught.value.job)
    assert len(emulator.calls("fal", "submit")) == submits
    assert resumed.job == caught.value.job
    assert size_of(data) == (1024, 768)  # fal's default image_size, landscape_4_3
    assert [job.prompt for job in emulator.billed("fal")].count(request.prompt) == 1


def test_a_bfl_job_past_its_deadline_is_not_cancelled_and_resumes(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(pending=25, first=1))
    short = Polling(first=0.01, longest=0.02, deadline=0.2)
    with pytest.raises(errors.JobTimeout) as caught:
        edit("sync", emulator, "bfl", EditRequest(prompt="bfl late", model="flux-2-pro"),
             polling=short)  # fmt: skip
    assert caught.value.cancelled is None  # BFL offers no cancel
    assert caught.value.job is not None
    _, data = resume("sync", emulator, "bfl", caught.value.job)
    assert size_of(data)
    assert [job.prompt for job in emulator.billed("bfl")].count("bfl late") == 1


# --- job outcomes, as each provider words them -----------------------------------------------

OUTCOMES = [
    ("bfl", "request-moderated", errors.Moderated),
    ("bfl", "content-moderated", errors.Moderated),
    ("bfl", "failed", errors.JobFailed),
    ("bfl", "not-found", errors.JobNotFound),
    ("fal", "content-moderated", errors.Moderated),
    ("fal", "failed", errors.JobFailed),
    ("fal", "invalid", errors.JobFailed),
    # fal documents no answer for a request it does not know: its 404 is polled again until the
    # deadline, and the job kept to resume (test_a_404_on_a_poll_...).
    ("fal", "not-found", errors.JobTimeout),
]


@pytest.mark.parametrize(("provider", "outcome", "expected"), OUTCOMES)
def test_each_job_outcome_is_its_typed_error_with_the_job(
    provider: str, outcome: str, expected: type[errors.JobError], emulator: Emulator
) -> None:
    emulator.inject(provider, Fault(outcome=outcome, first=1))
    short = {"polling": NOT_FOUND_DEADLINE} if expected is errors.JobTimeout else {}
    with pytest.raises(errors.FluxError) as caught:
        edit("sync", emulator, provider, EditRequest(prompt=outcome, model="flux-2-pro"), **short)
    assert type(caught.value) is expected, caught.value
    assert caught.value.job is not None
    if outcome == "failed" and provider == "fal":
        assert isinstance(caught.value, errors.JobFailed)
        assert caught.value.billed is False  # fal: server errors are never charged


# --- a 404 on a poll does not prove a paid job gone -----------------------------------------
#
# Neither BFL (an unknown job is a 200 whose status is "Task not found") nor fal (no answer for
# an unknown request documented) says a job is gone with an HTTP 404: a regional host's routing
# or a proxy sends one for a job that goes on. It ended the accepted, billed job as JobNotFound,
# which a batch journal marked "over": never polled again, its image lost.

NOT_FOUND_DEADLINE = Polling(first=0.01, factor=1.5, longest=0.02, jitter=0.0, deadline=0.4)


def not_found_everywhere(emulator: Emulator, provider: str, first: int | None = None) -> None:
    """Every poll (the first *first*) answered 404; at fal its cancel URL too (the same host)."""
    emulator.inject(provider, Fault(on="poll", status=404, first=first))
    if provider == "fal":  # else the deadline's cancel removes the queued job, to resume nothing
        emulator.inject(provider, Fault(on="cancel", status=404, first=first))


@both
@pytest.mark.parametrize("provider", JOB_PROVIDERS)
def test_a_poll_answered_404_is_polled_again_and_the_image_saved(
    kind: str, provider: str, emulator: Emulator
) -> None:
    not_found_everywhere(emulator, provider, first=2)
    submits = len(emulator.calls(provider, "submit"))
    prompt = f"poll 404 then ready {kind} {provider}"
    result, images = edit(kind, emulator, provider, EditRequest(prompt=prompt, model="flux-2-pro"))
    assert result.job is not None
    assert size_of(images[0])
    assert len(emulator.calls(provider, "submit")) == submits + 1
    assert [job.prompt for job in emulator.billed(provider)].count(prompt) == 1


@both
@pytest.mark.parametrize("provider", JOB_PROVIDERS)
def test_a_poll_answered_404_until_the_deadline_keeps_the_job_to_resume(
    kind: str, provider: str, emulator: Emulator
) -> None:
    not_found_everywhere(emulator, provider)
    submits = len(emulator.calls(provider, "submit"))
    request = EditRequest(prompt=f"poll 404 forever {kind} {provider}", model="flux-2-pro")
    with pytest.raises(errors.JobTimeout) as caught:
        edit(kind, emulator, provider, request, polling=NOT_FOUND_DEADLINE)
    job = caught.value.job
    assert job is not None
    assert "its poll URL was last answered HTTP 404" in str(caught.value)
    assert "does not prove the job gone" in str(caught.value)
    assert len(emulator.calls(provider, "poll")) >= 2  # polled again, not given up at once

    emulator.clear_faults(provider)  # the host answers again
    resumed, image = resume(kind, emulator, provider, job)  # type: ignore[arg-type]
    assert resumed.job is not None
    assert size_of(image)
    assert len(emulator.calls(provider, "submit")) == submits + 1  # resumed: never resubmitted


@pytest.mark.parametrize("kind", [kind for kind in CLIENT_KINDS if kind != "sync"])
@pytest.mark.parametrize("provider", JOB_PROVIDERS)
def test_a_batch_whose_polls_answered_404_polls_the_job_again_on_rerun(
    kind: str, provider: str, tmp_path: Path
) -> None:
    request = EditRequest(prompt=f"batch poll 404 {provider}", model="flux-2-pro", size="256x256")
    with run_emulator(pending_polls=1) as emulator:

        async def batch(polling: Polling) -> list[Any]:
            async with AsyncFluxClient(
                provider,  # type: ignore[arg-type]
                api_key=KEY,
                base_url=emulator.base_url(provider),
                driver=driver(kind),
                polling=polling,
            ) as client:
                items = client.edit_many([request], output_dir=tmp_path, names=["a"])
                return [item async for item in items]

        not_found_everywhere(emulator, provider)
        [first] = asyncio.run(batch(NOT_FOUND_DEADLINE))
        journal = (tmp_path / ".flux-journal.jsonl").read_text()
        emulator.clear_faults(provider)
        [again] = asyncio.run(batch(FAST))
        submits = len(emulator.calls(provider, "submit"))
        billed = len(emulator.billed(provider))
    assert isinstance(first.error, errors.JobTimeout)
    assert first.status == "unconfirmed"
    assert '"over"' not in journal  # the job is not ended: a rerun may poll it
    assert again.status == "ok", again.error
    assert "polled again" in (again.reason or "")
    assert again.saved
    assert all(path.exists() for path in again.saved)
    assert (submits, billed) == (1, 1)


# --- acceptance: failover from a refused bfl submit, never after acceptance -----------------


@pytest.fixture
def failover_env(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    for provider in ("bfl", "laozhang"):
        prefix = provider.upper()
        monkeypatch.setenv(f"{prefix}_API_KEY", KEY)
        monkeypatch.setenv(f"{prefix}_BASE_URL", emulator.base_url(provider))


def failover(kind: str, request: EditRequest, polling: Polling = FAST) -> EditResult:
    if kind == "sync":
        with FluxClient(providers=["bfl", "laozhang"], polling=polling) as client:
            return client.edit(request)

    async def main() -> EditResult:
        async with AsyncFluxClient(
            providers=["bfl", "laozhang"], polling=polling, driver=driver(kind)
        ) as client:
            return await client.edit(request)

    return asyncio.run(main())


@both
@pytest.mark.parametrize("status", [503, 429, 402])
def test_bfl_refusing_the_submit_fails_over_to_laozhang(
    kind: str, status: int, emulator: Emulator, failover_env: None
) -> None:
    emulator.inject("bfl", Fault(status=status, retry_after=30 if status == 429 else None))
    prompt = f"refused {status} {kind}"
    result = failover(kind, EditRequest(prompt=prompt, model="flux-2-pro"))
    assert result.provider == "laozhang"
    assert [job.prompt for job in emulator.billed()].count(prompt) == 1
    assert all(job.provider == "laozhang" for job in emulator.billed() if job.prompt == prompt)


@both
@pytest.mark.parametrize("after", ["failed", "content-moderated", "not-found", "poll 503", "late"])
def test_never_a_failover_once_bfl_accepted_the_submit(
    kind: str, after: str, emulator: Emulator, failover_env: None
) -> None:
    faults = {
        "failed": Fault(outcome="failed"),
        "content-moderated": Fault(outcome="content-moderated"),
        "not-found": Fault(outcome="not-found"),
        "poll 503": Fault(on="poll", status=503),  # every poll, until the deadline
        "late": Fault(pending=10**9),
    }
    emulator.inject("bfl", faults[after])
    prompt = f"accepted then {after} {kind}"
    before = len(emulator.calls("laozhang"))
    request = EditRequest(prompt=prompt, model="flux-2-pro")
    with pytest.raises(errors.FluxError) as caught:
        failover(kind, request, Polling(first=0.01, longest=0.02, deadline=0.4))
    assert len(emulator.calls("laozhang")) == before  # laozhang never asked
    assert caught.value.job is not None


# --- acceptance: a batch of BFL jobs killed with SIGKILL, rerun: it polls, never re-submits --


def test_a_killed_batch_of_bfl_jobs_finishes_on_rerun_by_polling(tmp_path: Path) -> None:
    jobs = 12
    source, folder = tmp_path / "jobs.jsonl", tmp_path / "out"
    source.write_text(
        "".join(
            json.dumps({"id": f"job-{n:02d}", "prompt": f"batch job {n}", "size": "256x256"}) + "\n"
            for n in range(jobs)
        )
    )
    with run_emulator(pending_polls=1) as emulator:
        # Until the kill every poll answers 503: no job can end before it, however slow the machine.
        emulator.inject("bfl", Fault(on="poll", status=503))
        environment = os.environ | {"BFL_API_KEY": KEY, "BFL_BASE_URL": emulator.base_url("bfl")}
        command = [sys.executable, "-m", "flux_adapters", "batch", str(source), "-o",
                   str(folder), "-p", "bfl", "--concurrency", str(jobs), "--per-provider",
                   str(jobs)]  # fmt: skip
        process = subprocess.Popen(
            command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ends = time.monotonic() + 60
        while len(emulator.calls("bfl", "submit")) < jobs and time.monotonic() < ends:
            time.sleep(0.02)
        while len(emulator.calls("bfl", "poll")) < jobs and time.monotonic() < ends:
            time.sleep(0.02)  # every job accepted, journaled, and polled at least once
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        saved_before = list(folder.glob("job-*.*"))
        submits_at_kill = len(emulator.calls("bfl", "submit"))
        emulator.clear_faults("bfl")

        final = subprocess.run(command, env=environment, capture_output=True, text=True,
                               timeout=180)  # fmt: skip
        submits_after = len(emulator.calls("bfl", "submit"))
        ledger = Counter(job.prompt for job in emulator.billed("bfl"))

    assert submits_at_kill == jobs
    assert saved_before == []  # killed with every job in flight
    assert final.returncode == 0, final.stderr
    assert submits_after == jobs  # the rerun polled: 0 second submits
    assert set(ledger.values()) == {1}
    report = [json.loads(line) for line in (folder / "report.jsonl").read_text().splitlines()]
    last = report[-jobs:]
    assert {line["status"] for line in last} == {"ok"}
    assert all("polled again" in line.get("reason", "") for line in last)
    assert len(list(folder.glob("job-*.jpeg"))) == jobs
