"""Faults that cost money, go wrong at random, or misbehave slowly: "took the job, then failed"
(`after_work`), the billing ledger that counts what each provider charged, `chance` with a seed,
garbage 200s, result URLs that misbehave, and answers that drip one byte at a time."""

from __future__ import annotations

import binascii
import io
import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from PIL import Image, UnidentifiedImageError

from flux_adapters import EditRequest, FluxClient, errors
from flux_adapters.emulator import Billed, Emulator, Fault, run_emulator
from tests.conftest import image_bytes

HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
"""The module's own requests to the emulator: `httpx.get()` builds a client, certificates
and all, for every call (about 25 ms of CPU). Each request still has a connection of its own,
closed with its answer, as with `httpx.get()`: none is left open when the tests end."""

KEY = {"Authorization": "Bearer any-key"}
Check = Callable[[httpx.Response], bool]


@pytest.fixture(scope="module")
def running() -> Iterator[Emulator]:
    with run_emulator() as emulator:
        yield emulator


@pytest.fixture
def emulator(running: Emulator) -> Iterator[Emulator]:
    yield running
    running.clear_faults()


def post(
    emulator: Emulator, prompt: str, provider: str = "laozhang", **extra: object
) -> httpx.Response:
    body: dict[str, object] = {"model": "flux-2-pro", "prompt": prompt} | extra
    if provider == "aimlapi":
        body["model"] = "blackforestlabs/flux-2-pro"
    return HTTP.post(
        f"{emulator.base_url(provider)}/v1/images/generations", json=body, headers=KEY, timeout=30
    )


def billed(emulator: Emulator, prompt: str) -> list[Billed]:
    return [job for job in emulator.billed() if job.prompt == prompt]


# --- the ledger -----------------------------------------------------------------------------


def test_a_success_is_billed_once_with_what_was_asked(emulator: Emulator) -> None:
    assert post(emulator, "ledger: success", seed=42).status_code == 200
    [job] = billed(emulator, "ledger: success")
    assert (job.provider, job.model, job.seed) == ("laozhang", "flux-2-pro", 42)
    assert abs(job.at - time.time()) < 60


def test_the_ledger_tells_providers_apart(emulator: Emulator) -> None:
    assert post(emulator, "ledger: two providers", provider="apiyi").status_code == 200
    multipart = HTTP.post(
        f"{emulator.base_url('apiyi-multipart')}/v1/images/edits",
        data={"model": "flux-2-pro", "prompt": "ledger: two providers"},
        files=[("image[]", ("a.png", image_bytes(), "image/png"))],
        headers=KEY,
    )
    assert multipart.status_code == 200, multipart.text
    providers = [job.provider for job in billed(emulator, "ledger: two providers")]
    assert providers == ["apiyi", "apiyi-multipart"]
    assert all(job.provider == "apiyi" for job in emulator.billed("apiyi"))


def test_a_fault_before_the_work_and_a_refused_request_are_not_billed(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=502, first=1))
    assert post(emulator, "ledger: not billed").status_code == 502
    emulator.inject("laozhang", Fault(status=502, after_work=True, first=1))
    assert post(emulator, "ledger: not billed", seed="not a number").status_code == 400
    assert billed(emulator, "ledger: not billed") == []


# --- took the job, then failed --------------------------------------------------------------


def is_nginx_page(status: int, reason: str) -> Check:
    def check(response: httpx.Response) -> bool:
        return (
            response.status_code == status
            and response.headers["content-type"].startswith("text/html")
            and f"<h1>{status} {reason}</h1>" in response.text
        )

    return check


def is_json_error(status: int) -> Check:
    def check(response: httpx.Response) -> bool:
        return response.status_code == status and "error" in response.json()

    return check


def has_no_json_body(response: httpx.Response) -> bool:
    if response.status_code != 200:
        return False
    try:
        json.loads(response.content)
    except (ValueError, RecursionError):
        return True
    return False


def has_bad_base64(response: httpx.Response) -> bool:
    encoded = response.json()["data"][0]["b64_json"]
    try:
        binascii.a2b_base64(encoded, strict_mode=True)
    except binascii.Error:
        return response.status_code == 200
    return False


def is_html_200(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.headers["content-type"].startswith("text/html")


AFTER_WORK = [
    (Fault(status=500, after_work=True), is_json_error(500)),
    (Fault(status=502, after_work=True), is_nginx_page(502, "Bad Gateway")),
    (Fault(status=504, after_work=True), is_nginx_page(504, "Gateway Time-out")),
    (Fault(status=429, after_work=True), is_json_error(429)),
    (Fault(body="malformed", after_work=True), has_no_json_body),
    (Fault(body="empty", after_work=True), has_no_json_body),
    (Fault(body="nested", after_work=True), has_no_json_body),
    (Fault(body="bad-b64", after_work=True), has_bad_base64),
    (Fault(body="html", after_work=True), is_html_200),
]


@pytest.mark.parametrize(
    ("fault", "looks_right"),
    AFTER_WORK,
    ids=[str(fault.status or fault.body) for fault, _ in AFTER_WORK],  # the same in every run
)
def test_an_after_work_fault_is_billed_and_answers_with_the_failure(
    fault: Fault, looks_right: Check, emulator: Emulator
) -> None:
    prompt = f"after work: {fault}"
    emulator.inject("laozhang", fault)
    response = post(emulator, prompt)
    assert looks_right(response), (response.status_code, response.text[:200])
    assert len(billed(emulator, prompt)) == 1


def test_an_after_work_drop_is_billed_and_cuts_the_connection(emulator: Emulator) -> None:
    emulator.inject("apiyi", Fault(drop=True, after_work=True))
    with pytest.raises(httpx.RemoteProtocolError):
        post(emulator, "after work: drop", provider="apiyi")
    assert [job.provider for job in billed(emulator, "after work: drop")] == ["apiyi"]


def test_after_work_faults_speak_aimlapis_error_shape(emulator: Emulator) -> None:
    emulator.inject("aimlapi", Fault(status=500, after_work=True))
    response = post(emulator, "after work: aimlapi", provider="aimlapi")
    assert response.json()["statusCode"] == 500
    assert len(billed(emulator, "after work: aimlapi")) == 1


def test_the_client_sees_a_gateway_error_for_a_job_the_provider_billed(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=502, after_work=True))
    with (
        pytest.raises(errors.ProviderUnavailable),
        FluxClient("laozhang", api_key="test-key", base_url=emulator.base_url("laozhang")) as flux,
    ):
        flux.edit(EditRequest(prompt="after work: through the client", model="flux-2-pro"))
    assert len(billed(emulator, "after work: through the client")) == 1


# --- garbage 200s before any work -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "looks_right"),
    [("bad-b64", has_bad_base64), ("nested", has_no_json_body), ("html", is_html_200)],
)
def test_garbage_200s_before_the_work_bill_nothing(
    body: str, looks_right: Check, emulator: Emulator
) -> None:
    emulator.inject("laozhang", Fault(body=body))
    response = post(emulator, f"garbage: {body}")
    assert looks_right(response)
    assert billed(emulator, f"garbage: {body}") == []


def test_nested_is_valid_json_100000_levels_deep(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(body="nested"))
    text = post(emulator, "garbage: nested depth").text
    assert text.startswith('{"data": [[[[')
    assert text.count("[") == text.count("]") == 100_000


def test_a_504_before_the_work_is_a_gateway_page(emulator: Emulator) -> None:
    emulator.inject("apiyi", Fault(status=504))
    assert is_nginx_page(504, "Gateway Time-out")(post(emulator, "504", provider="apiyi"))


# --- chance ---------------------------------------------------------------------------------


def statuses(emulator: Emulator, provider: str, calls: int) -> list[int]:
    # An empty body is refused before any rendering, unless a fault answers first: fast calls.
    url = f"{emulator.base_url(provider)}/v1/images/generations"
    with httpx.Client(headers=KEY) as http:
        return [http.post(url, json={}).status_code for _ in range(calls)]


def test_chance_applies_a_fault_to_some_calls_the_same_way_for_the_same_seed() -> None:
    runs = []
    for _ in range(2):
        with run_emulator(seed=7, faults={"laozhang": [Fault(status=503, chance=0.3)]}) as emulator:
            runs.append(statuses(emulator, "laozhang", 60))
    assert runs[0] == runs[1]
    failed = runs[0].count(503)
    assert 5 <= failed <= 35  # about 18 of 60; the seed makes it exact, this bound only sanity
    assert set(runs[0]) == {400, 503}
    with run_emulator(seed=8, faults={"laozhang": [Fault(status=503, chance=0.3)]}) as emulator:
        assert statuses(emulator, "laozhang", 60) != runs[0]


def test_chance_zero_never_applies_and_first_counts_only_applications(emulator: Emulator) -> None:
    emulator.inject("aimlapi", Fault(status=503, chance=0))
    assert 503 not in statuses(emulator, "aimlapi", 20)
    emulator.clear_faults()
    emulator.inject("aimlapi", Fault(status=503, chance=0.5, first=3))
    outcome = statuses(emulator, "aimlapi", 40)
    assert outcome.count(503) == 3
    assert outcome[:2] != [503, 503] or outcome[2] != 503  # not simply the first three calls


def test_a_fault_that_misses_its_draw_lets_the_next_one_try(emulator: Emulator) -> None:
    emulator.inject("apiyi", Fault(status=503, chance=0))
    emulator.inject("apiyi", Fault(status=429))
    assert set(statuses(emulator, "apiyi", 5)) == {429}


# --- result URLs that misbehave -------------------------------------------------------------


def result_url(emulator: Emulator, fault: Fault, prompt: str) -> str:
    emulator.inject("laozhang", fault)
    response = post(emulator, prompt)
    assert response.status_code == 200, response.text
    assert len(billed(emulator, prompt)) == 1  # the POST itself succeeded, and was paid for
    url: str = response.json()["data"][0]["url"]
    return url


def test_a_download_that_is_an_html_page(emulator: Emulator) -> None:
    got = HTTP.get(result_url(emulator, Fault(download="html"), "download: html"))
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("text/html")


def test_a_download_that_is_empty(emulator: Emulator) -> None:
    got = HTTP.get(result_url(emulator, Fault(download="empty"), "download: empty"))
    assert (got.status_code, got.content) == (200, b"")


def test_a_download_that_redirects_to_an_html_page(emulator: Emulator) -> None:
    url = result_url(emulator, Fault(download="redirect"), "download: redirect")
    first = HTTP.get(url)
    assert first.status_code == 302
    landed = HTTP.get(url, follow_redirects=True)
    assert landed.status_code == 200
    assert landed.headers["content-type"].startswith("text/html")
    assert landed.url.path == "/portal"


def test_a_download_that_redirects_to_itself_for_ever(emulator: Emulator) -> None:
    url = result_url(emulator, Fault(download="redirect-loop"), "download: loop")
    assert HTTP.get(url).headers["location"] == url
    with pytest.raises(httpx.TooManyRedirects):
        HTTP.get(url, follow_redirects=True)


def test_a_download_that_is_not_an_image(emulator: Emulator) -> None:
    got = HTTP.get(result_url(emulator, Fault(download="not-image"), "download: not an image"))
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/jpeg"  # laozhang's default output format
    assert got.content
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(got.content))


def test_other_results_download_normally(emulator: Emulator) -> None:
    result_url(emulator, Fault(download="html", first=1), "download: the faulty one")
    url = post(emulator, "download: the next one").json()["data"][0]["url"]
    assert HTTP.get(url).headers["content-type"] == "image/jpeg"


# --- slow drips -----------------------------------------------------------------------------


def test_a_dripping_answer_sends_its_headers_at_once_and_its_body_a_byte_at_a_time(
    emulator: Emulator,
) -> None:
    emulator.inject("laozhang", Fault(drip=0.01))
    url = f"{emulator.base_url('laozhang')}/v1/images/generations"
    body = {"model": "flux-2-pro", "prompt": "drip: answer"}
    with httpx.stream("POST", url, json=body, headers=KEY, timeout=5) as response:
        assert response.status_code == 200
        length = int(response.headers["content-length"])
        received = b""
        started = time.monotonic()
        chunks = response.iter_raw()
        while time.monotonic() - started < 0.3:
            received += next(chunks)
        # At one byte per 10 ms, at most about 30 of the ~180 bytes are there after 0.3 s.
        assert len(received) < length
        received += b"".join(chunks)
    assert json.loads(received)["data"][0]["url"]
    assert len(billed(emulator, "drip: answer")) == 1


def test_a_dripping_failure_after_the_work(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=504, after_work=True, drip=0.001))
    response = post(emulator, "drip: failure")
    assert is_nginx_page(504, "Gateway Time-out")(response)
    assert len(billed(emulator, "drip: failure")) == 1


def test_a_dripping_download_stops_when_the_client_gives_up() -> None:
    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(download="drip", drip=0.05))
        answer = post(emulator, "drip: download")
        assert answer.status_code == 200
        url = answer.json()["data"][0]["url"]
        with httpx.stream("GET", url, timeout=5) as download:
            assert download.headers["content-type"] == "image/jpeg"
            assert int(download.headers["content-length"]) > 1000
            assert next(download.iter_raw())  # the first byte
        stopping = time.monotonic()
    # The server did not wait for the rest of the drip to stop.
    assert time.monotonic() - stopping < 5


# --- the fault value ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("502,after-work", Fault(status=502, after_work=True)),
        ("drop,after-work,first=2", Fault(drop=True, after_work=True, first=2)),
        ("503,chance=0.3", Fault(status=503, chance=0.3)),
        ("bad-b64", Fault(body="bad-b64")),
        ("nested,after-work", Fault(body="nested", after_work=True)),
        ("html", Fault(body="html")),
        ("download=redirect-loop", Fault(download="redirect-loop")),
        ("download=drip,drip=0.5", Fault(download="drip", drip=0.5)),
        ("504,drip=0.1,delay=1", Fault(status=504, drip=0.1, delay=1)),
    ],
)
def test_new_faults_parse_from_the_command_line_form(spec: str, fault: Fault) -> None:
    assert Fault.parse(spec) == fault


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("after-work", "after_work needs an answer"),
        ("b64,after-work", "after_work needs an answer"),
        ("502,drop", "pick one"),
        ("malformed,moderation", "pick one"),
        ("download=html,503", "download needs the POST"),
        ("download=html,b64", "download needs the POST"),
        ("download=drip", "needs drip"),
        ("download=teapot", "download 'teapot' is not one of"),
        ("chance=1.5", "chance must be from 0 to 1"),
        ("chance=nan", "chance must be from 0 to 1"),
        ("drip=-1", "drip must be from 0 to 86400 seconds"),
        ("delay=inf", "delay must be from 0 to 86400 seconds"),
        ("retry-after=2", "retry_after needs a status"),
        ("drop,drip=0.1", "drop sends no body"),
        ("999", "not an HTTP status"),
        ("chance=often", "chance must be a number"),
    ],
)
def test_faults_that_cannot_take_effect_are_refused(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Fault.parse(spec)


def test_a_mistyped_body_is_refused_rather_than_ignored() -> None:
    with pytest.raises(ValueError, match="body 'malformd' is not one of"):
        Fault(body="malformd")
