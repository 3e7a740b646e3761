"""Asynchronous providers attacked: a hostile provider, a careless caller, a crash.

Each test here failed before the fix it names: the money rule (an accepted job is never
submitted again, anywhere), typed errors only, bounded loops, and no key where it must not go.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import attrs
import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters.jobs import Done, Job, Pending, Polling, Submitted
from flux_adapters.providers import KeyAuth
from flux_adapters.providers.bfl import BflAdapter
from flux_adapters.wire import HttpResponse
from tests.test_jobs import KEY, T2I, Both, Fake, FakeBfl, both, run

QUICK = Polling(first=0.001, factor=1.5, longest=0.005, jitter=0.0, deadline=2.0)


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFL_API_KEY", KEY)
    monkeypatch.setenv("LAOZHANG_API_KEY", "lz-key-0123456789abcdef")


# --- an error the client raises itself after the submit was accepted still carries the job --

UNSENDABLE_POLLING_URL = "https://xn--zz.bfl.ai/v1/get_result?id=job-1"
"""A URL that passes as http(s) but that httpx refuses to build (an invalid IDNA label)."""


def oversized_poll(request: httpx.Request) -> httpx.Response:
    """A poll answer declaring more than any answer may be (the client refuses to read it)."""
    return httpx.Response(200, headers={"content-length": str(10**12)}, content=b"{}")


@both
@pytest.mark.parametrize("trouble", ["oversized poll answer", "unsendable polling URL"])
def test_an_error_of_the_client_after_acceptance_keeps_the_job_and_never_fails_over(
    kind: str, trouble: str, keys: None
) -> None:
    # The client (not the flow) refused the poll's answer, or could not build the poll: before
    # the fix, that error had no job, so the router judged it alone (a 2xx it could not read
    # "may be billed", failed over with failover_on_ambiguous; or "refused locally").
    if trouble == "oversized poll answer":
        bfl = FakeBfl(poll_faults=[oversized_poll] * 10)
    else:
        bfl = FakeBfl(poll_host="xn--zz.bfl.ai")
    both_ = Both(bfl)
    with pytest.raises(errors.FluxError) as caught:
        run(
            kind,
            both_,
            T2I,
            provider=["bfl", "laozhang"],
            polling=QUICK,
            failover_on_ambiguous=True,
        )
    assert both_.laozhang == []  # never paid twice
    assert bfl.count("POST") == 1
    assert caught.value.job is not None
    assert caught.value.job.id == "job-1"
    assert [a.billing for a in caught.value.attempts] == ["job-accepted"]


class RelativePolls(BflAdapter):
    """An adapter passing on the polling URL its provider answered relative, as it came."""

    name = "relative-polls"

    def __init__(self, url: str) -> None:
        self.url = url

    def parse_submit(self, response: HttpResponse) -> Submitted:
        return attrs.evolve(super().parse_submit(response), poll_url=self.url)


class Unsupported(Both):
    """bfl and laozhang, and what httpx's own transport does with a URL of no http(s) host."""

    def __init__(self, bfl: FakeBfl) -> None:
        super().__init__(bfl)
        self.unsendable = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in ("http", "https") or not request.url.host:
            self.unsendable += 1
            raise httpx.UnsupportedProtocol("Request URL is missing an 'http://' protocol.")
        return super().__call__(request)


@both
@pytest.mark.parametrize("url", ["/v1/get_result?id=job-1", "", "api.eu2.bfl.ai/v1/get_result"])
def test_a_poll_url_that_can_never_be_sent_ends_the_job_at_once_with_the_job(
    kind: str, url: str, keys: None
) -> None:
    # Each poll failed as "not sent" and was tried again in place until the job's deadline
    # (ten minutes by default), to end in a JobTimeout whose job `resume` refuses.
    fake = Unsupported(FakeBfl())
    with pytest.raises(errors.RequestError) as caught:
        run(kind, fake, T2I, provider=[RelativePolls(url), "laozhang"], polling=QUICK)
    assert fake.unsendable == 0
    assert fake.bfl.count("POST") == 1
    assert fake.laozhang == []  # accepted: never paid twice
    assert caught.value.job is not None
    assert "poll URL" in str(caught.value)
    assert [a.billing for a in caught.value.attempts] == ["job-accepted"]


def test_a_batch_rerun_never_resubmits_a_job_whose_poll_could_not_be_built(
    tmp_path: Path,
) -> None:
    bfl = FakeBfl(poll_host="xn--zz.bfl.ai")

    async def batch() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(bfl)) as http:
            client = AsyncFluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK)
            items = client.edit_many([T2I], output_dir=tmp_path, names=["a"])
            return [item.status async for item in items]

    for _ in range(3):
        asyncio.run(batch())
    assert bfl.count("POST") == 1  # before the fix: one submit per run
    lines = (tmp_path / ".flux-journal.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {r.get("proves") for r in records if r["k"] == "attempt"} == {"may be billed"}


def test_a_journal_that_cannot_record_the_job_fails_with_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flux_adapters._flows import job_flow
    from flux_adapters.jobs import Accepted
    from flux_adapters.providers.bfl import BflAdapter
    from flux_adapters.wire import HttpResponse

    flow = job_flow(BflAdapter(), T2I, "https://api.bfl.ai", polling=QUICK)
    next(flow)  # the submit
    accepted = flow.send(
        HttpResponse(
            status_code=200,
            headers={"content-type": "application/json"},
            content=b'{"id": "j", "polling_url": "https://api.bfl.ai/v1/get_result?id=j"}',
        )
    )
    assert isinstance(accepted, Accepted)
    with pytest.raises(errors.OutputError) as caught:
        flow.throw(errors.OutputError("the disk is full", path="journal"))
    assert caught.value.job is not None
    assert caught.value.job.id == "j"


# --- a careless caller: resume on a closed client, a job that is not one -------------------

JOB = Job(provider="bfl", model="flux-2-pro", id="j", poll_url="https://api.bfl.ai/v1/r?id=j")


def test_resume_on_a_closed_client_is_refused_at_once() -> None:
    # Before: the closed client's RuntimeError became a transport failure of the poll, tried
    # again in place until the job's deadline (ten minutes by default), then a JobTimeout.
    client = FluxClient("bfl", api_key=KEY, polling=QUICK)  # a short deadline: fails fast
    client.close()
    started = time.monotonic()
    with pytest.raises(errors.ConfigurationError, match="closed"):
        client.resume(JOB)

    async def main() -> None:
        closed = AsyncFluxClient("bfl", api_key=KEY, polling=QUICK)
        await closed.aclose()
        with pytest.raises(errors.ConfigurationError, match="closed"):
            await closed.resume(JOB)

    asyncio.run(main())
    assert time.monotonic() - started < 2


@both
@pytest.mark.parametrize(
    "damage",
    [
        {"poll_url": "file:///etc/passwd"},
        {"poll_url": "ftp://api.bfl.ai/v1/r"},
        {"poll_url": "not a url"},
        {"poll_url": "https://api.bfl.ai/v1/r\r\nx-key: stolen"},
        {"poll_url": None},
        {"result_url": "javascript:alert(1)"},
        {"cancel_url": 7},
        {"id": 5},
        {"id": ""},
        {"model": None},
    ],
    ids=lambda damage: f"{next(iter(damage))}={next(iter(damage.values()))!r}",
)
def test_resume_refuses_a_job_it_cannot_poll_before_sending_anything(
    kind: str, damage: dict[str, object]
) -> None:
    # Before: an unsupported scheme or a bad URL was a "transport failure", tried again in place
    # until the deadline; a wrong type passed through to the result or to httpx.
    job = attrs.evolve(JOB, **damage)  # type: ignore[arg-type]
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    transport = httpx.MockTransport(record)

    def resume() -> None:
        if kind == "sync":
            with httpx.Client(transport=transport) as http:
                FluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK).resume(job)
            return

        async def main() -> None:
            async with httpx.AsyncClient(transport=transport) as http:
                client = AsyncFluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK)
                await client.resume(job)

        asyncio.run(main())

    with pytest.raises(errors.ConfigurationError, match="resume"):
        resume()
    assert sent == []


@pytest.mark.parametrize("data", [None, [1], "job", 7, b"{}"])
def test_job_from_dict_of_something_that_is_no_mapping_is_none(data: object) -> None:
    assert Job.from_dict(data) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "damage",
    [
        {"poll_url": "file:///etc/passwd"},
        {"poll_url": "https://api.bfl.ai/r\nx"},
        {"result_url": "ftp://x/y"},
        {"cancel_url": "javascript:x"},
        {"id": "a\r\nb"},
    ],
)
def test_a_journal_record_of_a_job_that_cannot_be_polled_is_damaged(
    damage: dict[str, object],
) -> None:
    assert Job.from_dict({**JOB.to_dict(), **damage}) is None


# --- a hostile provider's cost: never a negative, infinite or NaN dollar figure ------------


def bfl_costing(cost: object) -> FakeBfl:
    body = {"id": "job-1", "polling_url": "https://api.bfl.ai/v1/get_result?id=job-1"}
    content = json.dumps(body)[:-1] + f', "cost": {cost}}}'
    return FakeBfl(submit=httpx.Response(200, content=content.encode()))


class Lavish(BflAdapter):
    usd_per_credit: ClassVar[float] = 1e300


@both
@pytest.mark.parametrize(
    ("cost", "adapter"),
    [("-5", "bfl"), ("-0.0", "bfl"), ("-1e308", "bfl"), ("1e300", "lavish"), ("-1", "lavish")],
)
def test_a_reported_cost_never_makes_a_negative_or_infinite_cost_usd(
    kind: str, cost: str, adapter: str
) -> None:
    provider: object = Lavish() if adapter == "lavish" else "bfl"
    result = run(kind, bfl_costing(cost), T2I, provider=provider, polling=QUICK)
    assert result.cost_usd is not None
    assert math.isfinite(result.cost_usd)
    assert result.cost_usd >= 0
    assert str(result.cost_usd)[0] != "-"  # not even -0.0
    if float(cost) < 0 or adapter == "lavish":
        assert result.cost_source == "price table"  # the provider's figure was not believed


def test_a_resumed_job_from_a_tampered_journal_has_no_negative_cost() -> None:
    job = Job.from_dict({**JOB.to_dict(), "usage": {"credits_used": -300}})
    assert job is not None
    fake = FakeBfl(pending=0)
    with httpx.Client(transport=httpx.MockTransport(fake)) as http:
        result = FluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK).resume(job)
    assert result.cost_usd is None or result.cost_usd >= 0


# --- a hostile provider's waits: Retry-After 0 (or inf) cannot make the client spin ----------

SLOW = Polling(first=0.01, factor=1.5, longest=0.05, jitter=0.0, deadline=0.5)
"""Waits of 10 to 50 ms for half a second: about a dozen polls, never hundreds."""


@both
@pytest.mark.parametrize("retry_after", ["0", "0.0", "-1"])
def test_a_retry_after_of_zero_on_every_poll_does_not_poll_in_a_busy_loop(
    kind: str, retry_after: str
) -> None:
    busy = httpx.Response(429, headers={"retry-after": retry_after}, json={"detail": "slow"})
    fake = FakeBfl(poll_faults=[busy] * 100_000)
    with pytest.raises(errors.JobTimeout):
        run(kind, fake, T2I, polling=SLOW)
    polls = fake.count("GET", "get_result")
    assert polls <= 30  # before: thousands in half a second, the CPU busy
    assert fake.count("POST") == 1


class Impatient(BflAdapter):
    """An adapter (as a package might write one) passing on whatever wait its provider asked."""

    def __init__(self, asked: float) -> None:
        self.asked = asked

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        return Pending(retry_after=self.asked)


@pytest.mark.parametrize("asked", [0.0, -5.0, math.inf, math.nan])
def test_a_pending_answer_asking_any_wait_keeps_the_polls_paced(asked: float) -> None:
    adapter = Impatient(asked)
    fake = FakeBfl()
    with pytest.raises(errors.JobTimeout):
        run("sync", fake, T2I, provider=adapter, polling=SLOW)
    assert 1 <= fake.count("GET", "get_result") <= 30


class FakeFal(Fake):
    """fal's queue on MockTransport: the job is COMPLETED at once; the fetch answers *fetch*."""

    QUEUE = "https://queue.fal.run/fal-ai/flux-2-pro/requests/r-1"

    def __init__(self, fetch: Callable[[httpx.Request], httpx.Response]) -> None:
        super().__init__()
        self.fetch = fetch

    def answer(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(
                200,
                json={
                    "request_id": "r-1",
                    "status_url": f"{self.QUEUE}/status",
                    "response_url": self.QUEUE,
                    "cancel_url": f"{self.QUEUE}/cancel",
                },
            )
        if request.method == "PUT":
            return httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"})
        if request.url.path.endswith("/status"):
            return httpx.Response(200, json={"status": "COMPLETED"})
        return self.fetch(request)

    def fetches(self) -> int:
        return sum(1 for r in self.requests if r.method == "GET" and r.url.path.endswith("r-1"))


def _drop(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError("dropped", request=request)


@both
@pytest.mark.parametrize(
    "trouble",
    [
        lambda request: httpx.Response(429, headers={"retry-after": "0"}),
        _drop,
    ],
    ids=["429 retry-after 0", "dropped"],
)
def test_a_result_fetch_failing_forever_backs_off_until_the_deadline(
    kind: str, trouble: Callable[[httpx.Request], httpx.Response]
) -> None:
    fake = FakeFal(trouble)
    with pytest.raises(errors.JobTimeout) as caught:
        run(kind, fake, T2I, provider="fal", polling=SLOW)
    assert caught.value.cancelled is True
    assert 2 <= fake.fetches() <= 30  # before: every 10 ms (dropped), or a busy loop (429)
    assert fake.count("POST") == 1


@both
@pytest.mark.parametrize("status", [404, 410])
def test_a_result_url_answering_404_is_fetched_again_and_the_job_kept_to_resume(
    kind: str, status: int
) -> None:
    # fal documents no answer for a request it does not know: a 404 or 410 from its result URL
    # (a proxy's, a CDN's) does not prove the paid job gone. It ended the job as JobNotFound,
    # which a batch journal marked "over", never to be fetched again.
    fake = FakeFal(lambda request: httpx.Response(status, json={"detail": "Request not found"}))
    with pytest.raises(errors.JobTimeout) as caught:
        run(kind, fake, T2I, provider="fal", polling=SLOW)
    assert caught.value.job is not None
    assert caught.value.job_id == "r-1"
    assert f"its result URL was last answered HTTP {status}" in str(caught.value)
    assert 2 <= fake.fetches() <= 30  # backed off, as after a 5xx
    assert fake.count("POST") == 1


# --- odd but valid arguments: every ratio fal's Kontext enum lists is taken ------------------


@pytest.mark.parametrize("ratio", ["21:9", "9:21", "16:9", "3:2", "1:1", "42:18"])
def test_fal_kontext_takes_every_aspect_ratio_of_its_enum(ratio: str) -> None:
    # The presets were looked up in lowest terms: 21:9 is 7:3, not a key, so the two widest
    # ratios fal documents were refused ("one of 21:9, ...; got: 21:9").
    from flux_adapters import check
    from flux_adapters._flows import resolve
    from flux_adapters.providers.fal import FalAdapter

    request = EditRequest(
        prompt="x",
        model="flux-kontext-pro",
        images=["https://example.com/a.png"],
        aspect_ratio=ratio,
    )
    assert check(request, "fal") == ()
    adapter = FalAdapter()
    submit = adapter.build_submit(request, resolve(adapter, request), adapter.default_base_url)
    body = submit.body.value  # type: ignore[union-attr]
    assert body["aspect_ratio"] == {"42:18": "21:9"}.get(ratio, ratio)


def test_the_edit_command_says_when_the_cost_is_the_providers_own_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BFL reports what it charged; the command labelled every cost "estimate from the price
    # table", even this one.
    from flux_adapters.cli import main
    from flux_adapters.emulator import run_emulator

    monkeypatch.setenv("BFL_API_KEY", KEY)
    out, err = io.StringIO(), io.StringIO()
    with run_emulator(pending_polls=0) as emulator:
        base = emulator.base_url("bfl")
        arguments = ["edit", "-p", "bfl", "--base-url", base, "--size", "256x256"]
        code = main([*arguments, "-o", str(tmp_path / "a.jpeg"), "a robot"], out, err)
    assert code == 0, err.getvalue()
    cost = next(line for line in out.getvalue().splitlines() if line.startswith("cost:"))
    assert "reported by bfl" in cost
    assert "price table" not in cost


# --- the key goes to a declared host only when the host is a plain DNS name -----------------


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.com\\.bfl.ai/v1/get_result",  # a resolver reads "\." as a dot in a label
        "https://evil.com%2f.bfl.ai/v1/get_result",
        "https://evil.com%00.bfl.ai/v1/get_result",
        "https://evil.com;.bfl.ai/v1/get_result",
        "https://evil.com .bfl.ai/v1/get_result",
        "https://.bfl.ai/v1/get_result",
        "https://evil..bfl.ai/v1/get_result",
    ],
)
def test_a_declared_host_pattern_never_matches_a_host_that_is_no_plain_dns_name(url: str) -> None:
    assert not BflAdapter.auth.allows(url, "https://api.bfl.ai")


@pytest.mark.parametrize(
    "url",
    [
        "https://api.eu2.bfl.ai/v1/get_result?id=1",
        "https://gateway.bfl.ai/v1/get_result?id=1",
        "https://API.US.BFL.AI/v1/get_result?id=1",
        "https://api-2.bfl.ai:8443/v1/get_result?id=1",
    ],
)
def test_bfls_regional_polling_hosts_still_get_the_key(url: str) -> None:
    assert BflAdapter.auth.allows(url, "https://api.bfl.ai")


class QueryKeyed(BflAdapter):
    """BFL's API as a provider that takes the key in the query (``?key=``)."""

    name = "query-keyed"
    auth = KeyAuth(header=None, scheme=None, query="key", hosts=("*.bfl.ai",))


class EchoesTheKey(FakeBfl):
    """Answers a submit with a polling URL that repeats the key it was sent in the query."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.params.get("key") == KEY:
            request = httpx.Request("GET", request.url, headers={**request.headers, "x-key": KEY})
        return super().__call__(request)

    def answer(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            key = request.url.params.get("key")
            url = f"https://api.eu2.bfl.ai/v1/get_result?id=job-1&key={key}&sig=a%2Fb"
            return httpx.Response(200, json={"id": "job-1", "polling_url": url})
        return super().answer(request)


@both
def test_a_key_a_provider_repeats_in_a_polling_url_is_not_kept_with_the_job(kind: str) -> None:
    # The job kept the URL as answered: the key went into the result's repr, `--json` and the
    # batch journal. The client adds it again to each poll, as to every request.
    fake = EchoesTheKey()
    result = run(kind, fake, T2I, provider=QueryKeyed())
    assert result.job is not None
    assert result.job.poll_url == "https://api.eu2.bfl.ai/v1/get_result?id=job-1&sig=a%2Fb"
    assert KEY not in repr(result)
    assert KEY not in json.dumps(result.to_dict())
    polls = [r for r in fake.requests if r.method == "GET" and "get_result" in str(r.url)]
    assert polls
    assert all(r.url.params.get_list("key") == [KEY] for r in polls)


def test_only_the_key_is_taken_out_of_a_jobs_url_not_a_parameter_of_the_same_name() -> None:
    from flux_adapters._flows import _without_key

    url = "https://cdn.bfl.ai/r?token=cdn-signed%2Fvalue&token=" + KEY + "&a=1#part"
    # A CDN's own token= under the name the key travels in is the URL's: it stays, byte for byte.
    assert _without_key(url, (KEY,)) == "https://cdn.bfl.ai/r?token=cdn-signed%2Fvalue&a=1#part"
    assert _without_key(url, ("another-key-0123456789",)) == url
