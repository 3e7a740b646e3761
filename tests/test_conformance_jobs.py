"""The job scenarios of the conformance suite: they pass for bfl and fal from the committed
cassettes, fail for adapters broken in the ways that matter (a moderated job read as pending,
the wrong stage, a failure billed against the document, a job posted again, no cancel at the
deadline), fail for a cassette that lacks a poll or holds one too many, replay without
sleeping, and are reported as not applicable, never passed, where they do not apply."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flux_adapters import errors
from flux_adapters.conformance import (
    SCENARIOS,
    record,
    run_scenario,
    scan_for_secrets,
    write_report,
)
from flux_adapters.conformance.cassettes import Scrubber
from flux_adapters.conformance.runner import credential_names
from flux_adapters.conformance.scenarios import JobEnds, TimesOut, by_id
from flux_adapters.jobs import Done, Job, Pending
from flux_adapters.limits import Plan
from flux_adapters.providers import AnyAdapter, KeyAuth
from flux_adapters.providers.bfl import BflAdapter
from flux_adapters.providers.fal import FalAdapter
from flux_adapters.providers.laozhang import LaozhangAdapter
from flux_adapters.request import EditRequest
from flux_adapters.wire import HttpRequest, HttpResponse
from tests.conftest import image_bytes

CASSETTES = Path(__file__).resolve().parent.parent / "cassettes"
JOB_SCENARIOS = [scenario for scenario in SCENARIOS if scenario.applies_to == "job"]
JOB_IDS = [scenario.id for scenario in JOB_SCENARIOS]


def test_the_job_scenarios_are_the_ones_the_issue_names() -> None:
    assert JOB_IDS == [
        "job-pending-then-ready",
        "job-request-moderated",
        "job-content-moderated",
        "job-failed",
        "job-not-found",
        "job-deadline",
    ]
    # Each expects a typed outcome from the error tree, never a status code.
    for scenario in JOB_SCENARIOS[1:]:
        assert isinstance(scenario.expect, JobEnds | TimesOut), scenario.id


@pytest.mark.parametrize("provider", ["bfl", "fal"])
@pytest.mark.parametrize("scenario_id", JOB_IDS)
def test_each_job_scenario_passes_from_the_committed_cassettes(
    provider: str, scenario_id: str
) -> None:
    adapter = BflAdapter() if provider == "bfl" else FalAdapter()
    verdict = run_scenario(adapter, by_id(scenario_id), CASSETTES / provider)
    if (provider, scenario_id) == ("fal", "job-not-found"):
        # fal documents no answer for a request it does not know: a 404 is polled again.
        assert verdict.outcome == "not-applicable", verdict.detail
        assert "reports_unknown_jobs" in verdict.detail
        assert not (CASSETTES / provider / f"{scenario_id}.yaml").exists()
        return
    assert (verdict.outcome, verdict.detail) == ("pass", "")
    assert verdict.recorded is not None
    assert verdict.recorded["where"] == "emulator"


def _interactions(path: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text())
    interactions: list[dict[str, Any]] = data["interactions"]
    return interactions


def _is_poll(interaction: dict[str, Any]) -> bool:
    request = interaction["request"]
    return request["method"] == "GET" and (
        "/get_result?" in request["uri"] or request["uri"].endswith("/status")
    )


@pytest.mark.parametrize("provider", ["bfl", "fal"])
def test_the_committed_job_cassettes_hold_the_polls_each_scenario_needs(provider: str) -> None:
    ready = _interactions(CASSETTES / provider / "job-pending-then-ready.yaml")
    polls = [i for i in ready if _is_poll(i)]
    assert len(polls) == 3  # two pending, then done
    late = _interactions(CASSETTES / provider / "job-deadline.yaml")
    methods = [i["request"]["method"] for i in late]
    # Waits of 1, 1.5, 2.25 and 3.375 s fit in the 10 s deadline: four polls, then the end.
    assert len([i for i in late if _is_poll(i)]) == 4
    assert methods.count("POST") == 1
    # One cancel where the provider offers one (fal), none at BFL, which has no cancel.
    assert methods.count("PUT") == (1 if provider == "fal" else 0)
    assert all("127.0.0.1" not in i["request"]["uri"] for i in ready + late)


# --- adapters broken in the ways the scenarios are for ---------------------------------------


class ReadsModerationAsPending(BflAdapter):
    """Keeps polling a job BFL moderated."""

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        body = response.json()
        if isinstance(body, dict) and body.get("status") in (
            "Request Moderated",
            "Content Moderated",
        ):
            return Pending()
        return super().parse_poll(response, job)


class EveryModerationIsTheRequests(BflAdapter):
    """Reports a moderated output as a moderated request."""

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        try:
            return super().parse_poll(response, job)
        except errors.Moderated as moderated:
            moderated.stage = "request"
            raise


class FailuresBilled(BflAdapter):
    """Says BFL bills a failed job, which BFL's document does not say."""

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        try:
            return super().parse_poll(response, job)
        except errors.JobFailed as failed:
            failed.billed = True
            raise


class PostsTheJobAgain(BflAdapter):
    """Polls by posting the job again: every poll would be a new, billed job."""

    submitted: HttpRequest | None = None

    def build_submit(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        self.submitted = super().build_submit(request, plan, base_url)
        return self.submitted

    def build_poll(self, job: Job) -> HttpRequest:
        assert self.submitted is not None
        return self.submitted


class IgnoresContentPolicy(FalAdapter):
    """Reads fal's content-policy 422 as a refused request rather than the job's outcome."""

    def job_failure(self, response: HttpResponse, job: Job) -> errors.JobError | None:
        return None


class NeverCancels(FalAdapter):
    """Leaves a late job running at fal (and billed), though fal can cancel it."""

    def build_cancel(self, job: Job) -> HttpRequest | None:
        return None


BREAKS = [
    (
        ReadsModerationAsPending(),
        "job-request-moderated",
        "the request was not recorded: GET https://api.eu2.bfl.ai/v1/get_result?id=",
    ),
    (
        EveryModerationIsTheRequests(),
        "job-content-moderated",
        "raised Moderated with stage 'request', expected 'content'",
    ),
    (
        FailuresBilled(),
        "job-failed",
        "raised JobFailed with billed=True; the provider's document says None",
    ),
    (
        PostsTheJobAgain(),
        "job-failed",
        "the request was not recorded: POST https://api.bfl.ai/v1/flux-2-pro",
    ),
    (IgnoresContentPolicy(), "job-request-moderated", "raised ProviderRejected"),
    (NeverCancels(), "job-deadline", "1 recorded request(s) were never made"),
]


@pytest.mark.parametrize(
    ("adapter", "scenario_id", "mismatch"),
    BREAKS,
    ids=[f"{b[1]}:{type(b[0]).__name__}" for b in BREAKS],
)
def test_each_broken_job_adapter_fails_its_scenario_naming_why(
    adapter: AnyAdapter, scenario_id: str, mismatch: str
) -> None:
    verdict = run_scenario(adapter, by_id(scenario_id), CASSETTES / adapter.name)
    assert verdict.outcome == "fail"
    assert verdict.detail.startswith(f"{scenario_id}: ")
    assert mismatch in verdict.detail


def test_the_unbroken_adapters_pass_the_same_scenarios() -> None:
    for adapter, scenario_id, _ in BREAKS:
        original = BflAdapter() if adapter.name == "bfl" else FalAdapter()
        assert run_scenario(original, by_id(scenario_id), CASSETTES / adapter.name).outcome == (
            "pass"
        )


# --- cassettes that do not hold what the replay makes -----------------------------------------


def _without(source: Path, folder: Path, drop: int) -> Path:
    """A copy of the cassette *source* in *folder*, without its interaction number *drop*."""
    data = yaml.safe_load(source.read_text())
    del data["interactions"][drop]
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / source.name
    copy.write_text(yaml.safe_dump(data))
    return copy


@pytest.mark.parametrize("provider", ["bfl", "fal"])
@pytest.mark.parametrize("scenario_id", ["job-pending-then-ready", "job-deadline"])
def test_a_cassette_missing_a_poll_fails_the_replay(
    provider: str, scenario_id: str, tmp_path: Path
) -> None:
    adapter = BflAdapter() if provider == "bfl" else FalAdapter()
    source = CASSETTES / provider / f"{scenario_id}.yaml"
    interactions = _interactions(source)
    polls = [index for index, interaction in enumerate(interactions) if _is_poll(interaction)]
    # The last poll: at the deadline the library would otherwise have waited, cancelled and
    # timed out as recorded, every recorded interaction played, only one poll short.
    _without(source, tmp_path, polls[-1])
    verdict = run_scenario(adapter, by_id(scenario_id), tmp_path)
    assert verdict.outcome == "fail"
    assert "the request was not recorded: GET https://" in verdict.detail


def test_a_cassette_holding_a_poll_more_than_the_replay_makes_fails(tmp_path: Path) -> None:
    source = CASSETTES / "bfl" / "job-request-moderated.yaml"
    data = yaml.safe_load(source.read_text())
    moderated = data["interactions"][-1]
    data["interactions"].append(moderated)  # polled again after the job ended
    (tmp_path / source.name).write_text(yaml.safe_dump(data))
    verdict = run_scenario(BflAdapter(), by_id("job-request-moderated"), tmp_path)
    assert verdict.outcome == "fail"
    assert "1 recorded request(s) were never made" in verdict.detail


def test_the_replay_of_jobs_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    real, here = time.sleep, threading.current_thread()

    def no_sleeping(seconds: float) -> None:
        if threading.current_thread() is not here:  # a thread another test left running
            return real(seconds)
        raise AssertionError(f"the replay slept {seconds} s")

    monkeypatch.setattr(time, "sleep", no_sleeping)
    started = time.perf_counter()
    for provider, adapter in (("bfl", BflAdapter()), ("fal", FalAdapter())):
        for scenario in JOB_SCENARIOS:
            verdict = run_scenario(adapter, scenario, CASSETTES / provider)
            assert verdict.outcome in ("pass", "not-applicable"), verdict.detail
    # 11 replays (fal has no job-not-found) whose jobs waited 4.75 to 10 s each on the job's clock.
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("provider", ["bfl", "fal"])
def test_recording_the_deadline_makes_the_same_polls_every_time(
    provider: str, tmp_path: Path
) -> None:
    adapter: AnyAdapter = BflAdapter() if provider == "bfl" else FalAdapter()
    scenarios = [by_id("job-deadline"), by_id("job-failed")]
    shapes = []
    for run in ("first", "second"):
        verdicts = record(
            adapter,
            tmp_path / run,
            api_key="test-key",
            emulator=True,
            scenarios=scenarios,
            log=print,
        )
        assert [v.outcome for v in verdicts] == ["pass", "pass"]
        late = _interactions(tmp_path / run / "job-deadline.yaml")
        shapes.append([(i["request"]["method"], _is_poll(i)) for i in late])
        for scenario in scenarios:
            assert run_scenario(adapter, scenario, tmp_path / run).outcome == "pass"
    assert shapes[0] == shapes[1]
    assert [poll for _, poll in shapes[0]].count(True) == 4


# --- where the scenarios do not apply -----------------------------------------------------------


@pytest.mark.parametrize("scenario_id", JOB_IDS)
def test_a_job_scenario_at_a_provider_without_jobs_is_not_applicable(scenario_id: str) -> None:
    verdict = run_scenario(LaozhangAdapter(), by_id(scenario_id), CASSETTES / "laozhang")
    assert verdict.outcome == "not-applicable"
    assert verdict.detail == "laozhang answers each edit in one call: it has no jobs to poll"


def test_a_refused_call_at_a_job_provider_is_not_applicable_and_says_where_to_look(
    tmp_path: Path,
) -> None:
    verdict = run_scenario(FalAdapter(), by_id("moderation"), CASSETTES / "fal")
    assert verdict.outcome == "not-applicable"
    assert "job-request-moderated" in verdict.detail
    markdown, _ = write_report([verdict], tmp_path)
    assert "| `moderation` | not applicable |" in markdown.read_text()


def test_a_declared_deviation_on_a_scenario_that_does_not_apply_is_refused() -> None:
    # Declaring a deviation is saying the scenario fails; one that does not apply never does.
    verdict = run_scenario(
        LaozhangAdapter(),
        by_id("job-deadline"),
        CASSETTES / "laozhang",
        {"job-deadline": "never cancels"},
    )
    assert verdict.outcome == "fail"
    assert "it does not fail (not applicable: laozhang answers" in verdict.detail
    assert verdict.detail.endswith("remove the declaration")


def test_a_refused_key_at_bfl_is_its_documented_403() -> None:
    verdict = run_scenario(BflAdapter(), by_id("error-401"), CASSETTES / "bfl")
    assert verdict.outcome == "pass"
    codes = [
        i["response"]["status"]["code"] for i in _interactions(CASSETTES / "bfl" / "error-401.yaml")
    ]
    assert codes == [403]


# --- scrubbing what job providers send ---------------------------------------------------------


class FakeRequest:
    def __init__(self, uri: str, body: bytes, headers: dict[str, str]) -> None:
        self.uri, self.body, self.headers = uri, body, headers


def test_the_key_header_comes_from_the_adapters_auth() -> None:
    assert credential_names(BflAdapter()) == ("x-key",)
    assert credential_names(FalAdapter()) == ("Authorization",)

    class Reseller(LaozhangAdapter):
        auth = KeyAuth(header="X-Reseller-Token", scheme="Token")

    names = credential_names(Reseller())
    assert names == ("X-Reseller-Token",)
    headers = {"X-Reseller-Token": "Token abc", "Content-Type": "application/json"}
    # "abc" is too short to be searched for as a key: only the name tells it is one.
    plain = Scrubber(["a-long-recording-key"]).request(
        FakeRequest("https://x.example/", b"", dict(headers))
    )
    assert plain.headers["X-Reseller-Token"] == "Token abc"
    told = Scrubber(["a-long-recording-key"], credentials=names).request(
        FakeRequest("https://x.example/", b"", dict(headers))
    )
    assert told.headers["X-Reseller-Token"] == "Token <redacted>"


def test_the_scan_knows_the_adapters_own_key_header(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x-reseller-token:\n- Token abc\n")
    assert scan_for_secrets(tmp_path) == []
    found = scan_for_secrets(tmp_path, credentials=["X-Reseller-Token"])
    assert [line.split(":", 1)[1] for line in found] == [
        "2: an unredacted 'x-reseller-token' value"
    ]


def test_images_in_bare_base64_are_stored_as_their_digest_and_still_matched() -> None:
    png = image_bytes(8, 8)
    bare = base64.b64encode(png).decode()
    body = f'{{"prompt": "p", "input_image": "{bare}", "seed": 7}}'.encode()
    scrubber = Scrubber()
    once = scrubber.request(
        FakeRequest("https://api.bfl.ai/v1/flux-2-pro", body, {"Content-Type": "application/json"})
    )
    assert bare.encode() not in once.body
    assert b'"input_image": "base64:image/png;sha256=' in once.body
    assert f";bytes={len(png)}".encode() in once.body
    again = scrubber.request(FakeRequest(once.uri, once.body, dict(once.headers)))
    assert again.body == once.body  # idempotent, as vcrpy needs
    # Text that is base64 but no image is left alone; a different image has another digest.
    text = base64.b64encode(b"not an image, only text " * 4).decode()
    kept = scrubber.json_value({"note": text}, images=True)
    assert kept == {"note": text}
    other = base64.b64encode(image_bytes(8, 8, color="blue")).decode()
    assert scrubber.json_value(other, images=True) != scrubber.json_value(bare, images=True)


def test_recording_a_job_elsewhere_than_the_emulator_waits_for_real(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Against a live provider (here a base URL the recorder knows nothing of) the suite's
    waits are really spent, so a provider is not polled in a tight loop; the replay does not
    wait, and matches."""
    from flux_adapters.emulator import run_emulator

    slept: list[float] = []
    real, here = time.sleep, threading.current_thread()

    def sleep(seconds: float) -> None:  # the emulator's threads keep their own pace
        if threading.current_thread() is here:
            slept.append(seconds)
        else:
            real(seconds)

    scenario = by_id("job-pending-then-ready")
    with run_emulator(pending_polls=2) as emulator:
        monkeypatch.setattr(time, "sleep", sleep)
        verdicts = record(
            BflAdapter(),
            tmp_path,
            api_key="a-recording-key",
            base_url=emulator.base_url("bfl"),
            scenarios=[scenario],
            log=print,
        )
    assert [v.outcome for v in verdicts] == ["pass"]
    assert slept == [1.0, 1.5, 2.25]  # before each of the three polls
    slept.clear()
    assert run_scenario(BflAdapter(), scenario, tmp_path).outcome == "pass"
    assert slept == []
