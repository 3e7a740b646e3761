"""The asynchronous providers (bfl, fal) and their resumption, attacked by a hostile provider.

Each test here failed before the fix it names. What is held: an accepted job is never submitted
again and stays resumable; the key never reaches a file, a repr or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters.emulator import Fault, run_emulator
from flux_adapters.jobs import Polling
from flux_adapters.result import BatchItem
from tests.conftest import CLIENT_KINDS
from tests.test_jobs import KEY, T2I, Fake, FakeBfl, both, run
from tests.test_jobs_emulator import edit

QUICK = Polling(first=0.001, factor=1.5, longest=0.005, jitter=0.0, deadline=30.0)

# --- a key the provider repeats in a job's URL, at a provider that takes it in a header -------


class EchoesTheKeyInItsUrl(FakeBfl):
    """BFL (the key in ``x-key``) answering a submit with a polling URL that repeats the key."""

    def answer(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            url = f"https://api.eu2.bfl.ai/v1/get_result?id=job-1&token={KEY}&sig=a%2Fb"
            return httpx.Response(200, json={"id": "job-1", "polling_url": url})
        return super().answer(request)


@both
def test_a_key_echoed_in_a_polling_url_is_kept_nowhere_where_the_key_goes_in_a_header(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Only adapters taking the key in the query had it taken out of a job's URLs: at BFL and
    # fal (a header) the job kept the URL as answered, and the key went into the result's repr,
    # its to_dict (--json), and httpx's log line of every poll.
    fake = EchoesTheKeyInItsUrl()
    with caplog.at_level(logging.INFO):
        result = run(kind, fake, T2I)
    assert result.job is not None
    assert result.job.poll_url == "https://api.eu2.bfl.ai/v1/get_result?id=job-1&sig=a%2Fb"
    assert KEY not in repr(result)
    assert KEY not in json.dumps(result.to_dict())
    assert KEY not in caplog.text
    polls = [r for r in fake.requests if r.method == "GET" and "get_result" in str(r.url)]
    assert polls
    assert all(r.headers["x-key"] == KEY for r in polls)  # the key goes as declared, still


def test_a_key_echoed_in_a_polling_url_never_reaches_the_batch_journal(tmp_path: Path) -> None:
    fake = EchoesTheKeyInItsUrl()

    async def batch() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as http:
            client = AsyncFluxClient("bfl", api_key=KEY, http_client=http)
            items = client.edit_many([T2I], output_dir=tmp_path, names=["a"])
            return [item.status async for item in items]

    assert asyncio.run(batch()) == ["ok"]
    journal = (tmp_path / ".flux-journal.jsonl").read_text()
    assert '"job"' in journal
    assert KEY not in journal


# --- fal: an unusable cancel URL beside usable status and result URLs -----------------------

FAL_QUEUE = "https://queue.fal.run/fal-ai/flux-2-pro/requests/req-1"


class FakeFal(Fake):
    """fal's queue: POST /<app> -> the request's URLs; status COMPLETED; the result's images."""

    def __init__(self, cancel_url: object = f"{FAL_QUEUE}/cancel") -> None:
        super().__init__()
        self.cancel_url = cancel_url

    def answer(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(
                200,
                json={
                    "request_id": "req-1",
                    "status_url": f"{FAL_QUEUE}/status",
                    "response_url": FAL_QUEUE,
                    "cancel_url": self.cancel_url,
                },
            )
        if request.url.path.endswith("/status"):
            return httpx.Response(200, json={"status": "COMPLETED"})
        image = {"url": "https://v3.fal.media/files/a/out.png", "content_type": "image/png"}
        return httpx.Response(200, json={"images": [image], "seed": 1})


@both
@pytest.mark.parametrize(
    "cancel_url", ["ftp://queue.fal.run/cancel", "/fal-ai/flux-2-pro/requests/req-1/cancel", 42]
)
def test_a_fal_job_whose_cancel_url_is_unusable_is_followed_to_its_image(
    kind: str, cancel_url: object
) -> None:
    # The whole acceptance was refused as unreadable for its one optional URL: the job fal took
    # (and bills) was never polled, its status and result URLs fine; a batch reported it
    # unconfirmed and its image was lost. Without a usable cancel URL it is a job with no cancel.
    fake = FakeFal(cancel_url)
    result = run(kind, fake, T2I, provider="fal")
    assert fake.count("POST") == 1
    assert result.job is not None
    assert result.job.cancel_url is None
    assert [image.url for image in result.images] == ["https://v3.fal.media/files/a/out.png"]


# --- a Retry-After on a pending answer, as docs/concepts.md says it is honoured -------------


def test_a_retry_after_on_a_pending_poll_answer_is_the_least_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Honoured on a 429 or a 5xx only: a provider answering "Pending" with "Retry-After: 0.05"
    # was polled again at the backoff's first waits, faster than it asked.
    import time as time_module

    slept: list[float] = []
    real = time_module.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real(min(seconds, 0.001))

    fake = FakeBfl(
        pending=0,
        poll_faults=[
            httpx.Response(200, headers={"retry-after": "0.05"}, json={"status": "Pending"})
        ],
    )
    polling = Polling(first=0.01, factor=2.0, longest=0.03, jitter=0.0, deadline=5)
    monkeypatch.setattr(time_module, "sleep", sleep)
    run("sync", fake, T2I, polling=polling)
    assert slept == [pytest.approx(0.01), pytest.approx(0.05)]


# --- the caller's own deadline (asyncio.timeout, wait_for, Ctrl-C) passing mid-poll ----------


def test_a_bfl_job_the_callers_timeout_cut_short_is_resumed_without_a_second_submit() -> None:
    # BFL has no cancel: the job goes on, and is billed. The interruption only said so in a
    # note, the job's id as text and no polling URL: no program could resume it, and its image
    # was lost. The job is on the interruption now (`.job`), as on every FluxError after a submit.
    fake = FakeBfl(pending=10**9)

    async def main() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as http:
            client = AsyncFluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK)
            with pytest.raises(TimeoutError) as caught:
                await asyncio.wait_for(client.edit(T2I), 0.2)
            cut = caught.value.__cause__
            assert isinstance(cut, asyncio.CancelledError)
            assert cut.__notes__[0].endswith("it may still finish, and be billed")
            job = cut.job  # type: ignore[attr-defined]
            fake.pending = 0  # the job finished meanwhile
            result = await client.resume(job)
            return [image.url for image in result.images if image.url]

    assert asyncio.run(main()) == ["https://delivery-eu1.bfl.ai/results/a/sample.png"]
    assert fake.count("POST") == 1


def test_ctrl_c_mid_poll_leaves_the_job_on_the_interruption_to_resume() -> None:
    class Interrupting(FakeBfl):
        def answer(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET" and self.count("GET") == 2 and self.pending:
                raise KeyboardInterrupt
            return super().answer(request)

    fake = Interrupting(pending=10**9)
    with httpx.Client(transport=httpx.MockTransport(fake)) as http:
        client = FluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK)
        with pytest.raises(KeyboardInterrupt) as caught:
            client.edit(T2I)
        job = caught.value.job  # type: ignore[attr-defined]
        assert job.id == "job-1"
        fake.pending = 0
        result = client.resume(job)
    assert result.job == job
    assert fake.count("POST") == 1


def test_an_interruption_before_any_job_was_taken_carries_none() -> None:
    class Interrupting(FakeBfl):
        def answer(self, request: httpx.Request) -> httpx.Response:
            raise KeyboardInterrupt

    with httpx.Client(transport=httpx.MockTransport(Interrupting())) as http:
        client = FluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK)
        with pytest.raises(KeyboardInterrupt) as caught:
            client.edit(T2I)
    assert getattr(caught.value, "job", None) is None


# --- a batch rerun after a job fal accepted, then moderated (fal bills it) -------------------


def test_a_rerun_never_sends_again_a_job_fal_accepted_then_moderated(tmp_path: Path) -> None:
    # The journal took moderation for a refusal ("failed": not billed) wherever it came from;
    # but a job fal accepted and then moderated is billed ("invalid inputs (HTTP 422) may still
    # be charged"; the budget keeps it, as the emulator bills it): each rerun sent the job
    # again, and paid for it again.
    request = EditRequest(prompt="moderated after acceptance", model="flux-2-pro", size="256x256")
    with run_emulator(pending_polls=0) as emulator:
        emulator.inject("fal", Fault(outcome="content-moderated"))

        async def batch() -> list[BatchItem]:
            async with AsyncFluxClient(
                "fal", api_key=KEY, base_url=emulator.base_url("fal"), polling=QUICK
            ) as client:
                items = client.edit_many([request], output_dir=tmp_path, names=["a"])
                return [item async for item in items]

        [first] = asyncio.run(batch())
        [again] = asyncio.run(batch())
        billed = len(emulator.billed("fal"))
        submits = len(emulator.calls("fal", "submit"))
    assert isinstance(first.error, errors.Moderated)
    assert (first.status, again.status) == ("unconfirmed", "unconfirmed")
    assert (submits, billed) == (1, 1)


# --- an id of another type than the document's, beside a usable polling URL -----------------


@both
def test_a_bfl_job_accepted_with_a_numeric_id_is_followed_to_its_image(kind: str) -> None:
    # The polling URL is what follows the job; the id names it. A number ({"id": 12345}, as
    # some BFL-compatible resellers answer) made the acceptance unreadable: the job BFL took
    # (and bills) was never polled, and its image was lost. The flow takes a number as its
    # text for any adapter; the built-in ones now do too.
    submit = httpx.Response(
        200, json={"id": 12345, "polling_url": "https://api.eu2.bfl.ai/v1/get_result?id=12345"}
    )
    fake = FakeBfl(submit=submit)
    result = run(kind, fake, T2I)
    assert result.job is not None
    assert result.job.id == "12345"
    assert fake.count("POST") == 1
    assert len(result.images) == 1


@pytest.mark.parametrize("ident", [True, 1.5, [1], {"a": 1}, "", 10**250, -1])
def test_an_id_that_is_no_whole_number_nor_text_is_still_no_id(ident: object) -> None:
    from flux_adapters.providers.bfl import BflAdapter
    from flux_adapters.wire import HttpResponse

    body = {"id": ident, "polling_url": "https://api.bfl.ai/v1/get_result?id=1"}
    answer = HttpResponse(status_code=200, headers={}, content=json.dumps(body).encode())
    if ident == -1:
        assert BflAdapter().parse_submit(answer).id == "-1"
        return
    with pytest.raises(errors.ResponseFormatError):
        BflAdapter().parse_submit(answer)


# --- fal: an unreadable answer to the result fetch, as to a poll ----------------------------


@pytest.mark.parametrize("kind", CLIENT_KINDS)
@pytest.mark.parametrize("body", ["html", "malformed"])
def test_one_unreadable_fetch_answer_is_tried_again_as_a_polls_is(kind: str, body: str) -> None:
    # A poll's unreadable 2xx (a CDN's "Just a moment..." page, a cut JSON) is tried again, up to
    # three in a row; the fetch of the result, as free, ended the paid job at the first one.
    request = EditRequest(prompt=f"fetch garbled once {body}", model="flux-2-pro", size="256x256")
    with run_emulator(pending_polls=1) as emulator:
        emulator.inject("fal", Fault(on="fetch", body=body, first=1))
        result, images = edit(kind, emulator, "fal", request)
        fetches = len(emulator.calls("fal", "fetch"))
        submits = len(emulator.calls("fal", "submit"))
    assert len(images) == 1
    assert result.job is not None
    assert (submits, fetches) == (1, 2)


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_a_fetch_unreadable_every_time_ends_the_job_after_three_with_the_job(kind: str) -> None:
    request = EditRequest(prompt="fetch garbled forever", model="flux-2-pro", size="256x256")
    with run_emulator(pending_polls=0) as emulator:
        emulator.inject("fal", Fault(on="fetch", body="html"))
        with pytest.raises(errors.ResponseFormatError) as caught:
            edit(kind, emulator, "fal", request)
        fetches = len(emulator.calls("fal", "fetch"))
        submits = len(emulator.calls("fal", "submit"))
    assert caught.value.job is not None
    assert (submits, fetches) == (1, 3)


# --- a status of another type than text -----------------------------------------------------


@pytest.mark.parametrize("status", [["Ready"], {"state": "Ready"}])
def test_a_bfl_status_that_is_no_text_is_an_unknown_status_not_an_adapter_failure(
    status: object,
) -> None:
    # A list or an object as the status is an answer of the wrong shape; the adapter looked it up
    # in a set of statuses and failed with a TypeError, shown as "the bfl adapter could not read
    # the answer (TypeError)", a bug of ours, without the answer's excerpt.
    from flux_adapters.jobs import Job
    from flux_adapters.providers.bfl import BflAdapter
    from flux_adapters.wire import HttpResponse

    job = Job(provider="bfl", model="flux-2-pro", id="j", poll_url="https://api.bfl.ai/v1/r")
    answer = HttpResponse(
        status_code=200, headers={}, content=json.dumps({"status": status}).encode()
    )
    with pytest.raises(errors.ResponseFormatError, match="no known job status") as caught:
        BflAdapter().parse_poll(answer, job)
    assert caught.value.excerpt


# --- a job id echoing the key, in what a rerun says of the job it polled again --------------


def test_a_reruns_reason_for_a_job_polled_again_never_shows_the_key(tmp_path: Path) -> None:
    # A provider's job id may hold the key it was sent: every error scrubs it, but a rerun's
    # reason for a job it polled again quoted the id as it came, into report.jsonl and --json.
    submit = httpx.Response(
        200, json={"id": f"job-{KEY}", "polling_url": "https://api.eu2.bfl.ai/v1/get_result?id=1"}
    )
    fake = FakeBfl(pending=10**9, submit=submit)

    async def batch(polling: Polling) -> BatchItem:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as http:
            client = AsyncFluxClient("bfl", api_key=KEY, http_client=http, polling=polling)
            [item] = [item async for item in client.edit_many([T2I], output_dir=tmp_path)]
            return item

    late = asyncio.run(batch(Polling(first=0.001, deadline=0.05)))
    assert isinstance(late.error, errors.JobTimeout)
    fake.pending = 0
    again = asyncio.run(batch(QUICK))
    assert again.status == "ok"
    assert "polled again" in again.reason
    assert KEY not in again.reason
    assert fake.count("POST") == 1


# --- a job id echoing the key, as the provider's request id of a result ---------------------


def _id_echoes_the_key(body: dict[str, Any], request: httpx.Request) -> None:
    """The emulator's BFL naming each job by an id holding the key sent (polling URL untouched)."""
    body["id"] = f"{body['id']}-{request.headers['x-key']}"


def test_a_job_id_echoing_the_key_never_reaches_a_gateway_client(tmp_path: Path) -> None:
    # A result's request_id was the job's id as it came (no header named one): the gateway
    # answered it to its client as x-flux-provider-request-id, handing the operator's provider
    # key to whoever holds a gateway key.
    from flux_adapters.gateway import run_gateway
    from tests.test_gateway import PROVIDER_SECRET, RewrittenBfl

    with run_emulator(pending_polls=1) as emulator:
        echoing = RewrittenBfl(emulator, _id_echoes_the_key)
        with run_gateway(files_dir=tmp_path, clients=echoing) as gateway:
            key, _ = gateway.add_key()
            answer = httpx.post(
                gateway.url + "/images/generations",
                json={"prompt": "a robot", "size": "64x64"},
                headers={"authorization": f"Bearer {key}"},
                timeout=60,
            )
            echoing.close(gateway)
    assert answer.status_code == 200, answer.text
    assert "x-flux-provider-request-id" in answer.headers
    assert PROVIDER_SECRET not in str(answer.headers)
    assert PROVIDER_SECRET not in answer.text


@both
def test_a_resumed_or_edited_jobs_request_id_never_holds_the_key(kind: str) -> None:
    submit = httpx.Response(
        200, json={"id": f"job-{KEY}", "polling_url": "https://api.eu2.bfl.ai/v1/get_result?id=1"}
    )
    fake = FakeBfl(submit=submit)
    result = run(kind, fake, T2I)
    assert result.request_id is not None
    assert KEY not in result.request_id
    assert result.job is not None
    assert result.job.id == f"job-{KEY}"  # kept whole, to be polled again
    with httpx.Client(transport=httpx.MockTransport(fake)) as http:
        resumed = FluxClient("bfl", api_key=KEY, http_client=http).resume(result.job)
    assert resumed.request_id is not None
    assert KEY not in resumed.request_id
