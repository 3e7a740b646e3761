"""Asynchronous providers through httpx.MockTransport: submit, polls, fetch, cancel, resume.

Each fake provider counts what a user pays for (submits) and what is free (polls, fetches,
cancels), so the tests can say "never a second submit" as a number. Every test runs against
`FluxClient` and `AsyncFluxClient` alike where both matter.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, Final

import attrs
import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, errors
from flux_adapters.jobs import Done, Job, JobAdapterBase, Pending, Polling, Submitted
from flux_adapters.providers import Answer, KeyAuth
from flux_adapters.providers.bfl import BflAdapter
from flux_adapters.result import ResultImage
from flux_adapters.wire import HttpRequest, HttpResponse, JsonBody
from tests.conftest import image_bytes

KEY = "bfl-key-0123456789abcdef"
PNG = image_bytes(64, 48)
FAST = Polling(first=0.001, factor=1.5, longest=0.005, jitter=0.0, deadline=5.0)
LAOZHANG_OK = {"created": 1, "data": [{"url": "https://cdn.example/laozhang.png"}]}

Reply = Callable[[httpx.Request], httpx.Response]


class Fake:
    """A provider on MockTransport: answers by script, counts every exchange by role."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.lock = threading.Lock()

    def count(self, method: str, part: str = "") -> int:
        return sum(1 for r in self.requests if r.method == method and part in str(r.url))

    def keys_sent_to(self, host: str) -> list[str | None]:
        return [
            r.headers.get("x-key") or r.headers.get("authorization")
            for r in self.requests
            if r.url.host == host
        ]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
        if request.url.path.endswith(".png") and request.method == "GET":
            return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
        return self.answer(request)

    def answer(self, request: httpx.Request) -> httpx.Response:
        raise NotImplementedError


class FakeBfl(Fake):
    """BFL's API: POST /v1/<model> -> {id, polling_url, cost...}; GET polling_url -> status."""

    def __init__(
        self,
        *,
        pending: int = 2,
        outcome: dict[str, Any] | None = None,
        poll_host: str = "api.eu2.bfl.ai",
        poll_faults: list[Reply | httpx.Response] | None = None,
        submit: httpx.Response | None = None,
    ) -> None:
        super().__init__()
        self.pending = pending
        self.outcome = outcome or {
            "status": "Ready",
            "result": {"sample": "https://delivery-eu1.bfl.ai/results/a/sample.png"},
        }
        self.poll_host = poll_host
        self.poll_faults = list(poll_faults or [])
        self.submit = submit
        self.polls = 0

    def answer(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            if self.submit is not None:
                return fresh(self.submit)
            return httpx.Response(
                200,
                json={
                    "id": "job-1",
                    "polling_url": f"https://{self.poll_host}/v1/get_result?id=job-1",
                    "cost": 4.5,
                    "input_mp": 1.0,
                    "output_mp": 1.05,
                },
            )
        if request.headers.get("x-key") != KEY:
            return httpx.Response(401, json={"detail": "Not authenticated"})
        if self.poll_faults:
            fault = self.poll_faults.pop(0)
            return fault(request) if callable(fault) else fresh(fault)
        self.polls += 1
        if self.polls <= self.pending:
            return httpx.Response(200, json={"id": "job-1", "status": "Pending", "progress": 0.4})
        return httpx.Response(200, json={"id": "job-1", **self.outcome})


def fresh(response: httpx.Response) -> httpx.Response:
    """A new copy of a canned answer: an httpx.Response is read once, by one client."""
    return httpx.Response(response.status_code, headers=response.headers, content=response.content)


def raises(exc: type[Exception]) -> Reply:
    def reply(request: httpx.Request) -> httpx.Response:
        raise exc("injected", request=request)  # type: ignore[call-arg]

    return reply


def run(
    kind: str,
    fake: Callable[[httpx.Request], httpx.Response],
    request: EditRequest,
    *,
    provider: object = "bfl",
    polling: Polling = FAST,
    **options: Any,
) -> EditResult:
    """One edit through a sync or an async client on *fake*; its images read while it is open."""
    transport = httpx.MockTransport(fake)
    keyed: dict[str, Any] = (
        {"providers": provider}
        if isinstance(provider, list)
        else {"provider": provider, "api_key": KEY}
    )
    if kind == "sync":
        with httpx.Client(transport=transport) as http:
            client = FluxClient(**keyed, http_client=http, polling=polling, **options)
            result = client.edit(request)
            DOWNLOADED[id(result)] = [image.read() for image in result.images]
            return result

    async def main() -> EditResult:
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient(**keyed, http_client=http, polling=polling, **options)
            result = await client.edit(request)
            DOWNLOADED[id(result)] = [await image.read_async() for image in result.images]
            return result

    return asyncio.run(main())


DOWNLOADED: dict[int, list[bytes]] = {}
"""The images of each result `run` returned, as downloaded while its client was open."""


both = pytest.mark.parametrize("kind", ["sync", "async"])
T2I = EditRequest(prompt="a lighthouse", model="flux-2-pro", width=1024, height=768)


def three_refs() -> EditRequest:
    return EditRequest(
        prompt="image 1 and image 2 in the scene of image 3",
        model="flux-2-pro",
        images=[PNG, image_bytes(32, 32, "JPEG"), "https://example.com/scene.png"],
    )


# --- the happy path ------------------------------------------------------------------------


@both
def test_bfl_text_to_image_and_a_three_reference_edit_go_submit_polls_result(kind: str) -> None:
    for request in (T2I, three_refs()):
        fake = FakeBfl(pending=2)
        result = run(kind, fake, request)
        assert fake.count("POST") == 1
        assert fake.count("GET", "get_result") == 3  # two pending, then Ready
        assert result.images[0].url == "https://delivery-eu1.bfl.ai/results/a/sample.png"
        assert DOWNLOADED[id(result)] == [PNG]
        assert result.job is not None
        assert result.job.id == "job-1"
        # BFL reports credits; 1 credit = $0.01, so the cost is its figure, not an estimate.
        assert result.cost_usd == pytest.approx(0.045)
        assert result.cost_source == "provider"
        assert result.usage is not None
        assert result.usage.output_mp == pytest.approx(1.05)


def test_the_bfl_submit_names_the_model_in_the_path_and_sends_plain_base64() -> None:
    fake = FakeBfl()
    run("sync", fake, three_refs())
    submit = next(r for r in fake.requests if r.method == "POST")
    assert submit.url == "https://api.bfl.ai/v1/flux-2-pro"
    body = json.loads(submit.content)
    assert "model" not in body
    assert base64.b64decode(body["input_image"]) == PNG  # no data: prefix
    assert body["input_image_3"] == "https://example.com/scene.png"
    assert submit.headers["x-key"] == KEY
    assert "authorization" not in submit.headers


# --- where the key goes --------------------------------------------------------------------


@both
def test_a_polling_url_on_another_bfl_host_gets_the_key_and_the_download_does_not(
    kind: str,
) -> None:
    fake = FakeBfl(poll_host="gateway.bfl.ai")
    run(kind, fake, T2I)
    assert set(fake.keys_sent_to("gateway.bfl.ai")) == {KEY}
    assert fake.keys_sent_to("delivery-eu1.bfl.ai") == [None]  # the image: no key at all


@pytest.mark.parametrize("host", ["bfl.ai.evil.example", "evilbfl.ai", "example.com"])
def test_a_polling_url_on_an_undeclared_host_never_gets_the_key(host: str) -> None:
    fake = FakeBfl(poll_host=host)
    with pytest.raises(errors.ProviderError) as caught:
        run("sync", fake, T2I)
    assert fake.keys_sent_to(host) == [None]  # asked once, without the key: refused
    assert caught.value.status_code == 401
    assert caught.value.job is not None  # and the job, accepted, is kept to resume
    assert fake.count("POST") == 1


@both
@pytest.mark.parametrize("poll_host", ["api.eu.bfl.ai", "gateway.bfl.ai"])
def test_a_reseller_base_urls_key_never_goes_to_bfls_own_polling_hosts(
    kind: str, poll_host: str
) -> None:
    # BflAdapter declares *.bfl.ai for the polling URLs BFL returns on other hosts; with
    # base_url at a BFL-compatible reseller or proxy, the reseller's key went to the *.bfl.ai
    # polling URL it returned: its key, leaked to a third party.
    fake = FakeBfl(poll_host=poll_host)
    with pytest.raises(errors.ProviderError) as caught:
        run(kind, fake, T2I, base_url="https://bfl-proxy.test")
    assert fake.keys_sent_to("bfl-proxy.test") == [KEY]  # the submit, to the base URL
    assert fake.keys_sent_to(poll_host) == [None]  # the poll, without the key: refused
    error = caught.value
    assert error.status_code == 401
    assert error.job is not None  # accepted: kept, to resume
    assert fake.count("POST") == 1
    message = str(error)
    assert f"the key was not sent to {poll_host}" in message
    assert "the configured base URL's host (bfl-proxy.test)" in message
    assert "*.bfl.ai" in message
    assert KEY not in message


@both
def test_a_reseller_polling_on_its_own_host_gets_the_key(kind: str) -> None:
    fake = FakeBfl(poll_host="bfl-proxy.test")
    result = run(kind, fake, T2I, base_url="https://bfl-proxy.test")
    assert DOWNLOADED[id(result)] == [PNG]
    assert set(fake.keys_sent_to("bfl-proxy.test")) == {KEY}


@pytest.mark.parametrize(
    ("base", "allowed"),
    [
        ("https://api.bfl.ai", True),
        ("https://api.us.bfl.ai", True),
        ("https://bfl-proxy.test", False),
        ("https://bfl.ai.reseller.example", False),
        ("https://reseller.example/bfl", False),
    ],
)
def test_bfls_key_hosts_apply_only_when_the_base_url_is_one_of_them(
    base: str, allowed: bool
) -> None:
    auth = BflAdapter.auth
    assert auth.allows("https://api.eu.bfl.ai/v1/get_result?id=1", base) is allowed
    assert auth.allows(base + "/v1/get_result?id=1", base)  # the base URL's own origin, always


def test_a_subclass_of_bfls_adapter_keeps_the_rule() -> None:
    class Reseller(BflAdapter):
        name: ClassVar[str] = "bfl-reseller"

    assert not Reseller.auth.allows("https://api.eu.bfl.ai/v1/get_result", "https://r.example")
    assert Reseller.auth.allows("https://api.eu.bfl.ai/v1/get_result", "https://api.bfl.ai")


def test_plain_http_to_a_declared_host_never_gets_the_key() -> None:
    class Plain(FakeBfl):
        def answer(self, request: httpx.Request) -> httpx.Response:
            response = super().answer(request)
            if request.method == "POST":
                body = json.loads(response.content)
                body["polling_url"] = body["polling_url"].replace("https://", "http://")
                return httpx.Response(200, json=body)
            return response

    fake = Plain()
    with pytest.raises(errors.ProviderError):
        run("sync", fake, T2I)
    assert fake.keys_sent_to("api.eu2.bfl.ai") == [None]


def test_an_adapter_may_send_its_key_as_a_query_parameter_and_httpx_logs_never_show_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class QueryKey(BflAdapter):
        name: ClassVar[str] = "bfl"
        auth: ClassVar[KeyAuth] = KeyAuth(header=None, scheme=None, query="key")

    fake = FakeBfl(poll_host="api.bfl.ai")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params.get("key", ""))
        request.headers["x-key"] = request.url.params.get("key", "")  # so FakeBfl accepts it
        return fake(request)

    with caplog.at_level(logging.INFO, logger="httpx"):
        run("sync", handler, T2I, provider=QueryKey())
    assert seen[:4] == [KEY] * 4  # submit and three polls
    assert seen[-1] == ""  # the download carries no key
    assert caplog.records, "httpx logs each request at INFO"
    assert all(KEY not in record.getMessage() for record in caplog.records)


# --- billing per job: a failed poll is retried, never the submit ---------------------------

POLL_FAULTS: dict[str, Reply | httpx.Response] = {
    "connect error": raises(httpx.ConnectError),
    "read timeout": raises(httpx.ReadTimeout),
    "dropped": raises(httpx.RemoteProtocolError),
    "500": httpx.Response(500, json={"detail": "Internal Server Error"}),
    "502 page": httpx.Response(502, text="<html><title>502 Bad Gateway</title></html>"),
    "503": httpx.Response(503, json={"detail": "overloaded"}),
    "504": httpx.Response(504, text="<html><title>504 Gateway Time-out</title></html>"),
    "429": httpx.Response(429, headers={"retry-after": "0"}, json={"detail": "slow down"}),
    "408": httpx.Response(408),
}


@both
@pytest.mark.parametrize("fault", list(POLL_FAULTS))
def test_a_failed_poll_is_retried_in_place_and_never_submits_again(kind: str, fault: str) -> None:
    fake = FakeBfl(pending=1, poll_faults=[POLL_FAULTS[fault]] * 3)
    result = run(kind, fake, T2I)
    assert fake.count("POST") == 1
    assert fake.polls == 2  # the faulty polls were free; the job went on
    assert result.images


@both
def test_a_job_that_never_finishes_ends_at_its_deadline_with_the_job_to_resume(kind: str) -> None:
    fake = FakeBfl(pending=10**9)
    with pytest.raises(errors.JobTimeout) as caught:
        run(kind, fake, T2I, polling=Polling(first=0.01, longest=0.02, deadline=0.3))
    error = caught.value
    assert error.job_id == "job-1"
    assert error.job is not None
    assert error.cancelled is None  # BFL has no cancel
    assert 0.3 <= error.waited < 3
    assert fake.count("POST") == 1
    assert "job-1" in str(error)


def test_a_poll_that_hangs_cannot_hold_the_job_past_its_deadline() -> None:
    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    slow = FakeBfl(poll_faults=[hang] * 1000)
    with pytest.raises(errors.JobTimeout):
        run("sync", slow, T2I, polling=Polling(first=0.01, deadline=0.2))


# --- job outcomes are typed, carry the job, and are final ----------------------------------

OUTCOMES: dict[str, tuple[dict[str, Any], type[errors.JobError]]] = {
    "Request Moderated": (
        {"status": "Request Moderated", "details": {"Moderation Reasons": ["Derivative Works"]}},
        errors.Moderated,
    ),
    "Content Moderated": ({"status": "Content Moderated"}, errors.Moderated),
    "Error": ({"status": "Error", "details": "out of memory"}, errors.JobFailed),
    "Task not found": ({"status": "Task not found"}, errors.JobNotFound),
}


@both
@pytest.mark.parametrize("status", list(OUTCOMES))
def test_a_job_status_becomes_a_typed_error_with_the_job_and_no_made_up_status(
    kind: str, status: str
) -> None:
    outcome, kind_of_error = OUTCOMES[status]
    fake = FakeBfl(outcome=outcome)
    with pytest.raises(kind_of_error) as caught:
        run(kind, fake, T2I)
    error = caught.value
    assert error.job_id == "job-1"
    assert error.job is not None
    assert not hasattr(error, "status_code")  # no HTTP status is claimed for a job status
    if isinstance(error, errors.Moderated):
        assert error.stage == ("request" if status.startswith("Request") else "content")
    if status == "Request Moderated":
        assert error.detail is not None
        assert "Derivative Works" in error.detail


@both
def test_a_poll_answered_404_is_polled_again_only_task_not_found_ends_the_job(kind: str) -> None:
    # BFL answers an unknown job with a 200 "Task not found"; a 404 is a host's or a proxy's.
    not_found = httpx.Response(404, json={"detail": "Not Found"})
    fake = FakeBfl(poll_faults=[not_found, not_found])
    result = run(kind, fake, T2I)
    assert DOWNLOADED[id(result)] == [PNG]
    assert fake.count("POST") == 1
    stuck = FakeBfl(poll_faults=[not_found] * 1000)
    with pytest.raises(errors.JobTimeout) as caught:
        run(kind, stuck, T2I, polling=Polling(first=0.01, longest=0.02, deadline=0.2))
    assert caught.value.job is not None
    assert "HTTP 404" in str(caught.value)
    assert stuck.count("POST") == 1


def test_unreadable_polls_are_tolerated_twice_and_given_up_the_third_time() -> None:
    garbage = httpx.Response(200, text="<html>maintenance</html>")
    recovered = FakeBfl(pending=0, poll_faults=[garbage, garbage])
    assert run("sync", recovered, T2I).images
    broken = FakeBfl(pending=0, poll_faults=[garbage] * 3)
    with pytest.raises(errors.ResponseFormatError) as caught:
        run("sync", broken, T2I)
    assert caught.value.job is not None
    assert broken.count("POST") == 1


# --- failover: before acceptance only ------------------------------------------------------


class Both:
    """bfl and laozhang on one transport."""

    def __init__(self, bfl: FakeBfl) -> None:
        self.bfl = bfl
        self.laozhang: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.laozhang.ai":
            self.laozhang.append(request)
            return httpx.Response(200, json=LAOZHANG_OK)
        if request.url.host == "cdn.example":
            return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
        return self.bfl(request)


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFL_API_KEY", KEY)
    monkeypatch.setenv("LAOZHANG_API_KEY", "lz-key-0123456789abcdef")


@both
@pytest.mark.parametrize(
    "refusal",
    [
        httpx.Response(503, json={"detail": "busy"}),
        httpx.Response(429, json={"detail": "too many active tasks"}),
        httpx.Response(402, json={"detail": "insufficient credits"}),
    ],
    ids=["503", "429", "402"],
)
def test_a_refused_bfl_submit_fails_over_to_laozhang(
    kind: str, refusal: httpx.Response, keys: None
) -> None:
    both_ = Both(FakeBfl(submit=refusal))
    result = run(kind, both_, T2I, provider=["bfl", "laozhang"], policy=None)
    assert result.provider == "laozhang"
    assert len(both_.laozhang) == 1
    assert next(a.billing for a in result.attempts if a.outcome == "failed") in (
        "overloaded",
        "rate-limited",
        "no-balance",
    )


@both
@pytest.mark.parametrize(
    "after",
    ["deadline", "poll refused", "moderated", "failed", "not found", "unreadable"],
)
def test_never_a_failover_once_bfl_accepted_the_job(kind: str, after: str, keys: None) -> None:
    faults: dict[str, FakeBfl] = {
        "deadline": FakeBfl(pending=10**9),
        "poll refused": FakeBfl(poll_faults=[httpx.Response(403, json={"detail": "revoked"})]),
        "moderated": FakeBfl(outcome={"status": "Content Moderated"}),
        "failed": FakeBfl(outcome={"status": "Error"}),
        "not found": FakeBfl(outcome={"status": "Task not found"}),
        "unreadable": FakeBfl(poll_faults=[httpx.Response(200, text="?")] * 3),
    }
    both_ = Both(faults[after])
    with pytest.raises(errors.FluxError) as caught:
        run(
            kind,
            both_,
            T2I,
            provider=["bfl", "laozhang"],
            polling=Polling(first=0.01, longest=0.02, deadline=0.3),
            failover_on_ambiguous=True,  # even a caller who accepts paying twice elsewhere
        )
    assert both_.laozhang == []
    assert caught.value.job is not None
    assert [a.provider for a in caught.value.attempts] == ["bfl"]


# --- resume --------------------------------------------------------------------------------


@both
def test_resume_finishes_a_timed_out_job_without_a_submit(kind: str) -> None:
    fake = FakeBfl(pending=10**9)
    transport = httpx.MockTransport(fake)
    short = Polling(first=0.01, longest=0.02, deadline=0.2)

    if kind == "sync":
        with httpx.Client(transport=transport) as http:
            client = FluxClient("bfl", api_key=KEY, http_client=http, polling=short)
            with pytest.raises(errors.JobTimeout) as caught:
                client.edit(T2I)
            assert caught.value.job is not None
            fake.pending = fake.polls + 2  # the job finishes two polls later
            result = client.resume(caught.value.job)
            image = result.images[0].read()
    else:

        async def main() -> tuple[EditResult, bytes]:
            async with httpx.AsyncClient(transport=transport) as http:
                client = AsyncFluxClient("bfl", api_key=KEY, http_client=http, polling=short)
                with pytest.raises(errors.JobTimeout) as caught:
                    await client.edit(T2I)
                assert caught.value.job is not None
                fake.pending = fake.polls + 2
                resumed = await client.resume(caught.value.job)
                return resumed, await resumed.images[0].read_async()

        result, image = asyncio.run(main())
    assert fake.count("POST") == 1
    assert image == PNG
    assert result.job is not None
    assert result.cost_usd == pytest.approx(0.045)  # the credits reported at submit, kept


def test_resume_needs_a_job_of_one_of_the_clients_asynchronous_providers() -> None:
    job = Job(provider="bfl", model="flux-2-pro", id="j", poll_url="https://api.bfl.ai/p")
    with FluxClient("laozhang", api_key=KEY) as client:
        with pytest.raises(errors.ConfigurationError, match="no asynchronous provider 'bfl'"):
            client.resume(job)
        with pytest.raises(errors.ConfigurationError, match=r"takes a flux_adapters\.jobs\.Job"):
            client.resume("j")  # type: ignore[arg-type]


def test_a_job_survives_a_round_trip_through_json_and_a_damaged_record_is_none() -> None:
    job = Job(
        provider="fal",
        model="flux-2-pro",
        id="r-1",
        poll_url="https://queue.fal.run/fal-ai/flux-2-pro/requests/r-1/status",
        result_url="https://queue.fal.run/fal-ai/flux-2-pro/requests/r-1",
        cancel_url="https://queue.fal.run/fal-ai/flux-2-pro/requests/r-1/cancel",
        submitted_at=1.5,
    )
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    for damaged in (
        {},
        {"provider": "fal"},
        {**job.to_dict(), "id": 7},
        {**job.to_dict(), "poll_url": ""},
    ):
        assert Job.from_dict(damaged) is None


# --- cancel: at the deadline, and when the caller stops waiting ----------------------------


class Queue(JobAdapterBase):
    """A small queue provider with a cancel, as an outside package would write it."""

    name: ClassVar[str] = "queue"
    default_base_url: ClassVar[str] = "https://queue.example"
    env_prefix: ClassVar[str] = "QUEUE"
    limits: ClassVar[Any] = {"flux-2-pro": BflAdapter.limits["flux-2-pro"]}
    auth: ClassVar[KeyAuth] = KeyAuth(header="Authorization", scheme="Token")

    def build_submit(self, request: EditRequest, plan: Any, base_url: str) -> HttpRequest:
        return HttpRequest(
            method="POST", url=f"{base_url}/jobs", body=JsonBody({"prompt": request.prompt})
        )

    def parse_submit(self, response: HttpResponse) -> Submitted:
        body = response.json()
        assert isinstance(body, dict)
        return Submitted(
            id=body["id"],
            poll_url=f"https://queue.example/jobs/{body['id']}",
            cancel_url=f"https://queue.example/jobs/{body['id']}/cancel",
        )

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        body = response.json()
        assert isinstance(body, dict)
        if body["state"] == "done":
            return Done(answer=Answer(images=(ResultImage(url=body["url"]),)))
        return Pending()

    def build_cancel(self, job: Job) -> HttpRequest | None:
        return HttpRequest(method="POST", url=job.cancel_url or "", role="cancel")


class FakeQueue(Fake):
    def __init__(self, *, interrupt_on_poll: int | None = None) -> None:
        super().__init__()
        self.interrupt_on_poll = interrupt_on_poll
        self.cancelled = False

    def answer(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Token {KEY}"
        if request.method == "POST" and request.url.path == "/jobs":
            return httpx.Response(200, json={"id": "q-1"})
        if request.url.path.endswith("/cancel"):
            self.cancelled = True
            return httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"})
        if self.interrupt_on_poll is not None:
            polls = self.count("GET", "/jobs/q-1")
            if polls == self.interrupt_on_poll:
                raise KeyboardInterrupt
        return httpx.Response(200, json={"state": "running"})


# A provider that takes a cancel (fal: 202 CANCELLATION_REQUESTED) removes a job that had not
# started; one that had gets a signal its app may ignore: it may still finish, and be billed.
CANCELLED: Final = (
    "flux-adapters: the queue job 'q-1' was cancelled if it had not started (queue accepted the"
    " cancel); if it had, it may still finish, and be billed"
)


@both
def test_a_deadline_sends_exactly_one_cancel_and_says_it_was_accepted(kind: str) -> None:
    fake = FakeQueue()
    with pytest.raises(errors.JobTimeout) as caught:
        run(kind, fake, T2I, provider=Queue(), polling=Polling(first=0.01, deadline=0.2))
    assert fake.count("POST", "/cancel") == 1
    assert caught.value.cancelled is True
    assert caught.value.job_id == "q-1"
    assert fake.count("POST", "/jobs") - fake.count("POST", "/cancel") == 1  # one submit


@both
@pytest.mark.parametrize("ends", ["failed", "deadline"])
def test_a_job_id_that_echoes_the_key_is_shown_without_it_and_kept_whole_to_resume(
    kind: str, ends: str
) -> None:
    # A hostile (or careless) provider's job id may hold the key it was sent; the error's
    # message reaches terminals and logs, as the note on an interruption does.
    submit = httpx.Response(
        200,
        json={"id": f"job-{KEY}", "polling_url": "https://api.eu2.bfl.ai/v1/get_result?id=1"},
    )
    outcome = {"status": "Error", "details": "the runner failed"}
    fake = FakeBfl(pending=10**6 if ends == "deadline" else 0, outcome=outcome, submit=submit)
    polling = Polling(first=0.01, deadline=0.1) if ends == "deadline" else FAST
    with pytest.raises(errors.JobError) as caught:
        run(kind, fake, T2I, polling=polling)
    assert isinstance(caught.value, errors.JobTimeout if ends == "deadline" else errors.JobFailed)
    assert KEY not in str(caught.value)
    assert KEY not in caught.value.job_id
    assert caught.value.job is not None
    assert caught.value.job.id == f"job-{KEY}"  # what resume() polls, whole


def test_ctrl_c_while_waiting_cancels_the_job_then_propagates_saying_so() -> None:
    fake = FakeQueue(interrupt_on_poll=2)
    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", fake, T2I, provider=Queue())
    assert fake.count("POST", "/cancel") == 1
    assert caught.value.__notes__ == [CANCELLED]


def test_ctrl_c_landing_in_the_flows_own_code_still_cancels_the_job() -> None:
    # A signal lands between any two bytecodes: in a wait or an exchange the flow is suspended
    # and cancels its job when told; in its own code (reading a poll's answer) the interruption
    # ended the flow, and the job, taken and billed, went on without a cancel or a word of it.
    class Reading(Queue):
        def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
            if fake.count("GET", "/jobs/q-1") == 2:
                raise KeyboardInterrupt
            return super().parse_poll(response, job)

    fake = FakeQueue()
    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", fake, T2I, provider=Reading())
    assert fake.count("POST", "/cancel") == 1
    assert caught.value.__notes__ == [CANCELLED]
    assert caught.value.job.id == "q-1"  # type: ignore[attr-defined]


def test_ctrl_c_at_a_provider_without_cancel_says_the_job_goes_on_and_may_be_billed() -> None:
    class Interrupting(FakeBfl):
        def answer(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET" and self.count("GET") == 1:
                raise KeyboardInterrupt
            return super().answer(request)

    fake = Interrupting(pending=5)
    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", fake, T2I)
    assert fake.count("POST") == 1  # the submit, and no cancel: BFL has none
    (said,) = caught.value.__notes__
    assert said.startswith("flux-adapters: the bfl job '")
    assert said.endswith("goes on (bfl offers no cancel): it may still finish, and be billed")


def test_a_refused_cancel_is_said_and_a_hostile_job_id_is_shown_escaped() -> None:
    class Refusing(FakeQueue):
        def answer(self, request: httpx.Request) -> httpx.Response:
            if request.method == "POST" and request.url.path == "/jobs":
                return httpx.Response(200, json={"id": "q-1\x1b[2J"})
            if request.url.path.endswith("/cancel"):
                return httpx.Response(409, json={"detail": "too late"})
            return super().answer(request)

    class Quoting(Queue):  # the id as the job's name, quoted in its URLs
        def parse_submit(self, response: HttpResponse) -> Submitted:
            submitted = super().parse_submit(response)
            quoted = urllib.parse.quote(submitted.id)
            return attrs.evolve(
                submitted,
                poll_url=f"https://queue.example/jobs/{quoted}",
                cancel_url=f"https://queue.example/jobs/{quoted}/cancel",
            )

    fake = Refusing(interrupt_on_poll=1)
    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", fake, T2I, provider=Quoting())
    assert fake.count("POST", "/cancel") == 1
    (said,) = caught.value.__notes__
    assert "\x1b" not in said
    assert "goes on (its cancel was refused or not answered): it may still finish" in said


def test_cancelling_the_async_task_cancels_the_job() -> None:
    fake = FakeQueue()

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as http:
            client = AsyncFluxClient(Queue(), api_key=KEY, http_client=http, polling=FAST)
            task = asyncio.create_task(client.edit(T2I))
            while fake.count("GET") < 2:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
            assert caught.value.__notes__ == [CANCELLED]

    asyncio.run(main())
    assert fake.cancelled
    assert fake.count("POST", "/cancel") == 1


def test_ctrl_c_while_the_accepted_job_is_being_noted_cancels_it_and_says_so() -> None:
    # Ctrl-C can land at any instruction; here just after the provider took the job, while the
    # client logs that it did (before the first poll): the job must not be left running unsaid.
    class Interrupting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "accepted the job" in record.getMessage():
                raise KeyboardInterrupt

    fake = FakeQueue()
    logger = logging.getLogger("flux_adapters")
    handler, level = Interrupting(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            run("sync", fake, T2I, provider=Queue())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert fake.count("POST", "/cancel") == 1
    assert caught.value.__notes__ == [CANCELLED]


def test_a_task_cancelled_while_its_accepted_job_is_kept_cancels_the_job() -> None:
    # The batch journal makes the accepted job durable (an fsync awaited); a batch closed then
    # cancels its tasks there: the job, taken and billed, must be cancelled like any other.
    fake = FakeQueue()

    class Keeping:  # a watcher whose keeping of the job takes a while (a slow disk)
        def __init__(self) -> None:
            self.keeping = asyncio.Event()

        async def sending(self, provider: str) -> None:
            pass

        async def accepted(self, provider: str, job: Job) -> None:
            self.keeping.set()
            await asyncio.Event().wait()

        def finished(self, *args: object) -> None:
            pass

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as http:
            client = AsyncFluxClient(Queue(), api_key=KEY, http_client=http, polling=FAST)
            watcher = Keeping()
            task = asyncio.create_task(client._edit(T2I, watcher))
            await watcher.keeping.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
            assert caught.value.__notes__ == [CANCELLED]

    asyncio.run(main())
    assert fake.count("POST", "/cancel") == 1


def test_ctrl_c_again_while_the_job_is_being_cancelled_still_names_the_job() -> None:
    # A cancel may take up to 10 s; a user pressing Ctrl-C a second time must still learn which
    # job may go on (to resume or check it), not just "interrupted".
    class Twice(FakeQueue):
        def answer(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/cancel"):
                raise KeyboardInterrupt
            return super().answer(request)

    fake = Twice(interrupt_on_poll=1)
    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", fake, T2I, provider=Queue())
    assert fake.count("POST", "/cancel") == 1
    assert caught.value.__notes__ == [
        "flux-adapters: the queue job 'q-1' goes on (its cancel was refused or not answered):"
        " it may still finish, and be billed"
    ]


def test_a_task_cancelled_again_while_its_job_is_being_cancelled_still_names_the_job() -> None:
    fake = FakeQueue()
    cancelling = threading.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/cancel"):
            cancelling.set()
            await asyncio.Event().wait()  # the cancel hangs
        return fake(request)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            client = AsyncFluxClient(Queue(), api_key=KEY, http_client=http, polling=FAST)
            task = asyncio.create_task(client.edit(T2I))
            while fake.count("GET") < 1:
                await asyncio.sleep(0.005)
            task.cancel()
            while not cancelling.is_set():
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
            (said,) = caught.value.__notes__
            assert said.startswith("flux-adapters: the queue job 'q-1' goes on")

    asyncio.run(main())


def test_ctrl_c_while_the_deadline_cancels_the_job_still_names_the_job() -> None:
    # The deadline passed and its cancel is under way (up to 10 s) when the user gives up too.
    class CtrlCAtCancel(FakeQueue):
        def answer(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/cancel"):
                raise KeyboardInterrupt
            return super().answer(request)

    fake = CtrlCAtCancel()
    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", fake, T2I, provider=Queue(), polling=Polling(first=0.01, deadline=0.1))
    assert fake.count("POST", "/cancel") == 1
    assert caught.value.__notes__ == [
        "flux-adapters: the queue job 'q-1' goes on (its cancel was refused or not answered):"
        " it may still finish, and be billed"
    ]


class _Unshowable(str):
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    "ident",
    [f"q-1{KEY}", "q" * 1_000_000, _Unshowable("q-1"), 12345],
    ids=["the-key-echoed", "a-megabyte", "a-str-whose-repr-raises", "no-text"],
)
def test_the_note_on_an_interruption_never_shows_the_key_nor_runs_long_nor_raises(
    ident: object,
) -> None:
    # The job's id comes from the provider (through its adapter): it may echo the key, be
    # huge, or (an adapter's bug) be no plain text. The interruption must still come out as
    # itself, with a short note that names the job without the key.
    class Echoing(Queue):
        def parse_submit(self, response: HttpResponse) -> Submitted:
            return attrs.evolve(super().parse_submit(response), id=ident)  # type: ignore[arg-type]

    fake = FakeQueue(interrupt_on_poll=1)
    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", fake, T2I, provider=Echoing())
    (said,) = caught.value.__notes__
    assert said.startswith("flux-adapters: the queue job ")
    assert said.endswith(CANCELLED.removeprefix("flux-adapters: the queue job 'q-1'"))
    assert KEY not in said
    assert len(said) < 400


def test_the_note_keeps_a_job_id_that_only_looks_like_a_key() -> None:
    # Only the client's own keys are removed: an id shaped like some key (sk-..., 40 hex) is
    # the one handle the user has on a job that may go on.
    ident = "sk-abcdefghijklmnopqrstuvwx1234"

    class KeyShaped(Queue):
        def parse_submit(self, response: HttpResponse) -> Submitted:
            return attrs.evolve(super().parse_submit(response), id=ident)

    fake = FakeQueue(interrupt_on_poll=1)
    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", fake, T2I, provider=KeyShaped())
    (said,) = caught.value.__notes__
    assert said.startswith(f"flux-adapters: the queue job '{ident}' ")


def test_ctrl_c_during_the_submit_cancels_nothing_and_says_it_may_have_been_taken() -> None:
    seen: list[str] = []

    def submit_interrupted(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", submit_interrupted, T2I, provider=Queue())
    assert len(seen) == 1  # no job id came back: nothing to cancel
    # The request had gone out: the provider may hold a job nobody will hear of, and bill it.
    assert caught.value.__notes__ == [
        "flux-adapters: the request to queue was under way: queue may have taken it,"
        " and may bill it"
    ]


def test_ctrl_c_during_a_synchronous_providers_call_says_it_may_have_been_taken() -> None:
    def interrupted(request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        run("sync", interrupted, T2I, provider="laozhang")
    assert caught.value.__notes__ == [
        "flux-adapters: the request to laozhang was under way: laozhang may have taken it,"
        " and may bill it"
    ]


def test_a_task_cancelled_during_a_call_says_it_may_have_been_taken_and_a_wait_says_nothing() -> (
    None
):
    async def never_answers(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def cancelled_during(fake: Callable[[httpx.Request], Any], **options: Any) -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as http:
            client = AsyncFluxClient(http_client=http, api_key=KEY, polling=FAST, **options)
            task = asyncio.ensure_future(client.edit(T2I))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
        return getattr(caught.value, "__notes__", [])

    assert asyncio.run(cancelled_during(never_answers, provider="laozhang")) == [
        "flux-adapters: the request to laozhang was under way: laozhang may have taken it,"
        " and may bill it"
    ]
    # Waiting before a retry (a 503 said the call was not taken): nothing under way.
    refused = httpx.Response(503, headers={"retry-after": "30"}, json={"error": "busy"})
    waited = asyncio.run(
        cancelled_during(lambda request: refused, provider="laozhang", max_retries=3)
    )
    assert waited == []


def test_polls_back_off_and_honour_retry_after() -> None:
    slept: list[float] = []
    fake = FakeBfl(
        pending=4,
        poll_faults=[httpx.Response(429, headers={"retry-after": "0.05"})],
    )
    import time as time_module

    real = time_module.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real(min(seconds, 0.001))

    polling = Polling(first=0.01, factor=2.0, longest=0.03, jitter=0.0, deadline=5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time_module, "sleep", sleep)
        run("sync", fake, T2I, polling=polling)
    # first wait, then the provider's Retry-After, then growing waits capped at `longest`.
    assert slept[:2] == [pytest.approx(0.01), pytest.approx(0.05)]
    assert slept[2:] == [pytest.approx(0.03)] * (len(slept) - 2)


def test_many_jobs_polled_together_spread_out_with_jitter() -> None:
    from flux_adapters._flows import follow_job

    adapter = BflAdapter()
    job = Job(provider="bfl", model="flux-2-pro", id="j", poll_url="https://api.bfl.ai/p")
    firsts = set()
    for _ in range(20):
        flow = follow_job(adapter, job, polling=Polling(first=1.0, jitter=0.2))
        first = next(flow)
        flow.close()
        assert 0.8 <= first.seconds <= 1.2  # type: ignore[union-attr]
        firsts.add(first.seconds)  # type: ignore[union-attr]
    assert len(firsts) > 10


def test_the_polling_settings_are_checked() -> None:
    with pytest.raises(errors.ConfigurationError, match="polling="):
        FluxClient("bfl", api_key=KEY, polling={"deadline": 5})  # type: ignore[arg-type]


def test_submits_are_counted_once_across_a_matrix_of_poll_faults() -> None:
    """The acceptance figure: 0 second submits over every poll fault, sync and async."""
    second_submits: Counter[str] = Counter()
    for kind in ("sync", "async"):
        for fault in POLL_FAULTS.values():
            fake = FakeBfl(pending=1, poll_faults=[fault] * 2)
            run(kind, fake, T2I)
            second_submits[kind] += fake.count("POST") - 1
    assert second_submits == Counter({"sync": 0, "async": 0})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("first", -1), ("first", float("nan")), ("first", "0.5"), ("first", True),
        ("factor", 0.5), ("factor", float("inf")), ("longest", 10**400), ("longest", None),
        ("jitter", 1.5), ("jitter", -0.1), ("deadline", 0), ("deadline", 86_401),
        ("deadline", float("nan")), ("deadline", [600]),
    ],
)  # fmt: skip
def test_polling_refuses_a_value_that_cannot_be_waited_with_a_typed_error(
    field: str, value: object
) -> None:
    with pytest.raises(errors.ConfigurationError, match=f"Polling: {field} must be a number"):
        Polling(**{field: value})  # type: ignore[arg-type]


def test_polling_takes_zero_waits_and_a_days_deadline() -> None:
    assert Polling(first=0, longest=0, jitter=0, deadline=86_400).deadline == 86_400


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "headers",
    [(("X-Trace", "a", "b"),), (("X-Trace",),), "ab", None, (("X-Seed", 5),)],
    ids=["triple", "single", "text", "none", "int-value"],
)
def test_headers_an_adapter_built_in_another_shape_are_a_request_error_and_nothing_is_sent(
    kind: str, headers: Any
) -> None:
    # HttpRequest does not check its headers' shape: an outside adapter's mistake came out as
    # a bare ValueError or TypeError (async), or as a TransportError that may have been billed
    # (sync), though nothing was sent.
    class Shapeless(Queue):
        def build_submit(self, request: EditRequest, plan: Any, base_url: str) -> HttpRequest:
            return HttpRequest(
                method="POST",
                url=f"{base_url}/jobs",
                body=JsonBody({"prompt": request.prompt}),
                headers=headers,
            )

    sent: list[httpx.Request] = []

    def fake(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    with pytest.raises(errors.RequestError):
        run(kind, fake, T2I, provider=Shapeless(), max_retries=0)
    assert sent == []


@both
@pytest.mark.parametrize("builds", ["poll", "fetch", "cancel"])
@pytest.mark.parametrize("instead", [None, "https://queue.example/jobs/q-1"], ids=["none", "text"])
def test_a_taken_jobs_exchange_built_as_no_request_is_a_typed_error_that_names_the_job(
    kind: str, builds: str, instead: object
) -> None:
    # build_poll (or build_fetch, build_cancel) returning something other than an HttpRequest
    # ended the call with a bare NotAnAttrsClassError, outside FluxError and without the job
    # the provider took (and bills), which the caller needs to resume or cancel it.
    class Careless(Queue):
        def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
            state = super().parse_poll(response, job)
            return Done() if builds == "fetch" and isinstance(state, Pending) else state

        def build_poll(self, job: Job) -> HttpRequest:
            return instead if builds == "poll" else super().build_poll(job)  # type: ignore[return-value]

        def build_fetch(self, job: Job) -> HttpRequest | None:
            return instead if builds == "fetch" else super().build_fetch(job)  # type: ignore[return-value]

        def build_cancel(self, job: Job) -> HttpRequest | None:
            return instead if builds == "cancel" else super().build_cancel(job)  # type: ignore[return-value]

    fake = FakeQueue()
    polling = Polling(first=0.01, deadline=0.2)
    if builds == "cancel":  # asked at the deadline: the job goes on, and says so
        with pytest.raises(errors.JobTimeout) as timed_out:
            run(kind, fake, T2I, provider=Careless(), polling=polling)
        assert timed_out.value.job_id == "q-1"
        assert timed_out.value.cancelled is (None if instead is None else False)
        assert fake.count("POST", "/cancel") == 0
        return
    if builds == "fetch" and instead is None:  # done, with nothing to fetch: said so
        with pytest.raises(errors.ResponseFormatError, match="no result to fetch") as empty:
            run(kind, fake, T2I, provider=Careless(), polling=polling)
        assert empty.value.job is not None
        return
    with pytest.raises(errors.RequestError, match="not an HttpRequest") as caught:
        run(kind, fake, T2I, provider=Careless(), polling=polling)
    assert caught.value.job is not None
    assert caught.value.job.id == "q-1"
    assert fake.count("POST", "/jobs") == 1
