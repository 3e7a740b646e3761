"""The conformance suite catches what it is for: each deliberate break below must fail, naming
the scenario and the mismatch. And its own rules: deviations, missing cassettes, secrets,
idempotent scrubbing, and streamed bodies that are still recorded and matched."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import attrs
import pytest

from flux_adapters.conformance import SCENARIOS, record, run_scenario, scan_for_secrets
from flux_adapters.conformance.cassettes import scrub_request
from flux_adapters.conformance.runner import _image_problem, reported_usage
from flux_adapters.conformance.scenarios import Completes, Scenario, asset, by_id
from flux_adapters.jobs import Done, Job, Pending, Submitted
from flux_adapters.limits import Plan
from flux_adapters.providers import Answer, KeyAuth
from flux_adapters.providers.aimlapi import AimlapiAdapter
from flux_adapters.providers.apiyi import ApiyiMultipartAdapter
from flux_adapters.providers.bfl import BflAdapter
from flux_adapters.providers.fal import FalAdapter
from flux_adapters.providers.laozhang import LaozhangAdapter
from flux_adapters.request import EditRequest
from flux_adapters.result import ResultImage
from flux_adapters.wire import (
    FilePart,
    HttpRequest,
    HttpResponse,
    JsonBody,
    JsonValue,
    MultipartBody,
)

CASSETTES = Path(__file__).resolve().parent.parent / "cassettes"


class RenamedField(LaozhangAdapter):
    """Sends output_format as "format"."""

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        wire = super().build_request(request, plan, base_url)
        assert isinstance(wire.body, JsonBody)
        body = dict(wire.body.value)
        if "output_format" in body:
            body["format"] = body.pop("output_format")
        return attrs.evolve(wire, body=JsonBody(body))


class DroppedThirdImage(LaozhangAdapter):
    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        wire = super().build_request(request, plan, base_url)
        assert isinstance(wire.body, JsonBody)
        return attrs.evolve(
            wire, body=JsonBody({k: v for k, v in wire.body.value.items() if k != "input_image_3"})
        )


class WidthWithoutHeight(LaozhangAdapter):
    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        wire = super().build_request(request, plan, base_url)
        assert isinstance(wire.body, JsonBody)
        return attrs.evolve(
            wire, body=JsonBody({k: v for k, v in wire.body.value.items() if k != "height"})
        )


class SingularImageField(ApiyiMultipartAdapter):
    """Sends each file as "image" instead of "image[]"."""

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        wire = super().build_request(request, plan, base_url)
        assert isinstance(wire.body, MultipartBody)
        files = tuple(FilePart("image", part.filename, part.image) for part in wire.body.files)
        return attrs.evolve(wire, body=MultipartBody(fields=wire.body.fields, files=files))


class Rewritten(LaozhangAdapter):
    """Laozhang with one body field changed by *change* (a subclass sets it)."""

    def change(self, body: dict[str, JsonValue]) -> None:
        raise NotImplementedError

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        wire = super().build_request(request, plan, base_url)
        assert isinstance(wire.body, JsonBody)
        body = dict(wire.body.value)
        self.change(body)
        return attrs.evolve(wire, body=JsonBody(body))


class SeedAsText(Rewritten):
    def change(self, body: dict[str, JsonValue]) -> None:
        body["seed"] = str(body["seed"])


class UpsamplingAsNumber(Rewritten):
    def change(self, body: dict[str, JsonValue]) -> None:
        body["prompt_upsampling"] = int(body["prompt_upsampling"] is True)


class RenamedSafetyTolerance(Rewritten):
    def change(self, body: dict[str, JsonValue]) -> None:
        body["safetyTolerance"] = body.pop("safety_tolerance")


class ExtraHeader(LaozhangAdapter):
    """Sends a header the provider's recording does not have."""

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        wire = super().build_request(request, plan, base_url)
        return attrs.evolve(wire, headers=(*wire.headers, ("X-Client", "my-app")))


class PlainAccept(LaozhangAdapter):
    """Asks for any content type where the recording asked for JSON."""

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        wire = super().build_request(request, plan, base_url)
        return attrs.evolve(wire, headers=(*wire.headers, ("Accept", "*/*")))


BREAKS = [
    (RenamedField(), "laozhang", "seed-and-format", "format is sent but was not recorded"),
    (
        SeedAsText(),
        "laozhang",
        "seed-and-format",
        "seed is text '42'; the recording has an integer 42",
    ),
    (
        UpsamplingAsNumber(),
        "laozhang",
        "prompt-upsampling",
        "prompt_upsampling is an integer 1; the recording has a boolean True",
    ),
    (
        RenamedSafetyTolerance(),
        "laozhang",
        "safety-tolerance-highest",
        "safetyTolerance is sent but was not recorded",
    ),
    (ExtraHeader(), "laozhang", "text-to-image", "x-client is sent but was not recorded"),
    (
        PlainAccept(),
        "laozhang",
        "text-to-image",
        "header differs: accept is '*/*'; the recording has 'application/json'",
    ),
    (
        DroppedThirdImage(),
        "laozhang",
        "three-references-in-order",
        "input_image_3 was recorded but is not sent",
    ),
    (WidthWithoutHeight(), "laozhang", "explicit-size", "height was recorded but is not sent"),
    (
        SingularImageField(),
        "apiyi-multipart",
        "three-references-in-order",
        # Parts 1 and 2 are the text fields (model, prompt); the files follow, in order.
        "multipart body differs: part 3 is file 'image' (filename 'reference-1.png', image/png, "
        "sha256=a8b7700c7c7af60521394db7963ced28d078690af41c5291c0dee6c3d2d8a34d;bytes=340); "
        "the recording has file 'image[]' (filename 'reference-1.png'",
    ),
]


@pytest.mark.parametrize(
    ("adapter", "folder", "scenario_id", "mismatch"),
    BREAKS,
    ids=[b[2] + ":" + type(b[0]).__name__ for b in BREAKS],
)
def test_each_deliberate_break_fails_naming_the_scenario_and_the_mismatch(
    adapter: object, folder: str, scenario_id: str, mismatch: str
) -> None:
    verdict = run_scenario(adapter, by_id(scenario_id), CASSETTES / folder)  # type: ignore[arg-type]
    assert verdict.outcome == "fail"
    assert verdict.detail.startswith(f"{scenario_id}: the request does not match the recording")
    assert mismatch in verdict.detail


def test_the_unbroken_adapters_pass_the_same_scenarios() -> None:
    for adapter, folder, scenario_id, _ in BREAKS:
        original = next(kind for kind in type(adapter).__mro__ if kind.__module__ != __name__)()
        assert run_scenario(original, by_id(scenario_id), CASSETTES / folder).outcome == "pass"


def test_a_declared_deviation_must_keep_failing() -> None:
    deviations = {"three-references-in-order": "drops the third image (ticket 12)"}
    broken = run_scenario(
        DroppedThirdImage(), by_id("three-references-in-order"), CASSETTES / "laozhang", deviations
    )
    assert broken.outcome == "deviation"
    fixed = run_scenario(
        LaozhangAdapter(), by_id("three-references-in-order"), CASSETTES / "laozhang", deviations
    )
    assert fixed.outcome == "fail"
    assert "now conforms; remove the declaration" in fixed.detail


def test_a_missing_cassette_fails_with_the_command_to_record_it(tmp_path: Path) -> None:
    verdict = run_scenario(LaozhangAdapter(), by_id("text-to-image"), tmp_path / "laozhang")
    assert verdict.outcome == "fail"
    assert verdict.detail.endswith(
        f"flux-adapters conformance --provider laozhang --record --cassettes {tmp_path}"
    )
    # An adapter that is not registered under its name is recorded with --adapter.
    outside = run_scenario(DroppedThirdImage(), by_id("text-to-image"), Path("cassettes/nowhere"))
    assert outside.detail.endswith(
        "flux-adapters conformance --adapter tests.test_conformance_suite:DroppedThirdImage --record"
    )
    fault_only = run_scenario(LaozhangAdapter(), by_id("error-429"), tmp_path)
    assert fault_only.outcome == "unrecorded"  # reported, never a pass


def test_an_unsupported_scenario_is_verified_to_fail_before_any_io() -> None:
    verdict = run_scenario(AimlapiAdapter(), by_id("kontext-aspect-ratio"), CASSETTES / "aimlapi")
    assert verdict.outcome == "unsupported"
    assert "aimlapi does not offer flux-kontext-pro" in verdict.detail


def test_the_repository_cassettes_hold_no_secrets_and_the_scan_finds_planted_ones(
    tmp_path: Path,
) -> None:
    assert scan_for_secrets(CASSETTES) == []
    leaky = tmp_path / "leak.yaml"
    leaky.write_text(
        "authorization: Bearer sk-live-abcdefghijklmnop\nuri: https://cdn.example/x.png?signature=abc123\nkey: my-own-key\n"
    )
    found = scan_for_secrets(tmp_path, ["my-own-key"])
    assert [line.split(":", 1)[1] for line in found] == [
        "1: a bearer token",
        "1: an API key",
        "1: an unredacted 'authorization' value",
        "2: an unredacted signature= value",
        "3: a recording key",
        "3: an unredacted 'key' value",
    ]
    assert not any("my-own-key" in line or "abcdefgh" in line for line in found)


def test_every_cassette_says_where_and_when_it_was_recorded() -> None:
    import yaml

    files = sorted(CASSETTES.rglob("*.yaml"))
    assert len(files) > 50
    for path in files:
        recorded = yaml.safe_load(path.read_text())["recorded"]
        assert recorded["where"] == "emulator", path
        assert recorded["at"].startswith("20"), path
        assert recorded["scenario"] == path.stem


class FakeRequest:
    def __init__(self, uri: str, body: bytes, headers: dict[str, str]) -> None:
        self.uri, self.body, self.headers = uri, body, headers


def test_scrubbing_is_idempotent() -> None:
    import base64
    import json

    data_url = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake image").decode()
    body = json.dumps(
        {"prompt": "p", "input_image": data_url, "ref": "https://x.example/a.png?signature=s3cr3t"}
    ).encode()
    request = FakeRequest(
        "https://cdn.example/a.png?expires=1&signature=abc",
        body,
        {"Authorization": "Bearer sk-live-secret-key-123456", "Content-Type": "application/json"},
    )
    once = scrub_request(request)
    snapshot = (once.uri, once.body, dict(once.headers))
    twice = scrub_request(once)
    assert (twice.uri, twice.body, dict(twice.headers)) == snapshot
    assert b"sk-live" not in twice.body
    assert "signature=REDACTED" in twice.uri
    assert b"sha256=" in twice.body
    assert twice.headers["Authorization"] == "Bearer <redacted>"


def test_streamed_large_bodies_are_recorded_and_matched(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    from tests.conftest import image_bytes

    big.write_bytes(image_bytes(64, 64) + bytes(3 * 1024 * 1024))  # 3 MB: several encoder slices
    scenario = Scenario(
        id="streamed-large-image",
        title="a large local image, streamed",
        build=lambda adapter: EditRequest(prompt="edit image 1", model="flux-2-pro", images=[big]),
        expect=Completes(),
    )
    verdicts = record(
        LaozhangAdapter(),
        tmp_path / "cassettes",
        api_key="test-key",
        emulator=True,
        scenarios=[scenario],
        log=lambda _: None,
    )
    assert [v.outcome for v in verdicts] == ["pass"]
    text = (tmp_path / "cassettes" / "streamed-large-image.yaml").read_text()
    assert "sha256=" in text
    assert len(text) < 20_000  # the 4 MB data URL is stored as its digest
    assert run_scenario(LaozhangAdapter(), scenario, tmp_path / "cassettes").outcome == "pass"
    big.write_bytes(image_bytes(64, 64) + bytes(3 * 1024 * 1024 - 1) + b"x")  # one byte differs
    changed = run_scenario(LaozhangAdapter(), scenario, tmp_path / "cassettes")
    assert changed.outcome == "fail"
    assert "input_image is" in changed.detail


def test_scenario_ids_are_unique_and_stable() -> None:
    ids = [scenario.id for scenario in SCENARIOS]
    assert len(ids) == len(set(ids))
    assert ids[:3] == ["text-to-image", "reference-by-url", "reference-by-data-url"]


def test_the_documented_report_of_the_example_is_reproduced(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable, "-m", "flux_adapters", "conformance", "--adapter", "pixelforge_flux:PixelforgeAdapter",
        "--cassettes", "examples/pixelforge/tests/cassettes", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    environment = os.environ | {"PYTHONPATH": "examples/pixelforge"}
    finished = subprocess.run(
        command, cwd=root, env=environment, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    committed = (root / "examples" / "pixelforge" / "conformance-report.md").read_text()
    assert (tmp_path / "conformance.md").read_text() == committed


def laozhang_with_deviation(tmp_path: Path, text: str | None) -> Path:
    """A copy of laozhang's cassettes, with *text* as its deviations.toml."""
    import shutil

    folder = tmp_path / "cassettes" / "laozhang"
    shutil.copytree(CASSETTES / "laozhang", folder)
    if text is not None:
        (folder / "deviations.toml").write_text(text)
    return folder


DROPS_THIRD = """[deviations]
three-references-in-order = "drops the third image (ticket 12)"
maximum-references = "drops the third image (ticket 12)"
"""


def test_the_cli_reads_the_same_deviations_file_and_passes_only_with_it(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    def report(text: str | None) -> tuple[int, dict[str, str]]:
        folder = laozhang_with_deviation(tmp_path / str(text is None), text)
        finished = subprocess.run(
            [sys.executable, "-m", "flux_adapters", "conformance", "--adapter",
             "tests.test_conformance_suite:DroppedThirdImage", "--cassettes", str(folder.parent),
             "--report-dir", str(folder.parent / "report")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        verdicts = json.loads((folder.parent / "report/conformance.json").read_text())["verdicts"]
        return finished.returncode, {v["scenario"]: v["outcome"] for v in verdicts}

    code, outcomes = report(DROPS_THIRD)
    assert outcomes["three-references-in-order"] == "deviation"
    assert code == 0
    code, outcomes = report(None)
    assert outcomes["three-references-in-order"] == "fail"
    assert code != 0


def test_a_reason_with_line_breaks_or_bars_keeps_the_reports_layout(tmp_path: Path) -> None:
    # A deviations.toml reason is written into conformance.md as it is: its line breaks ended the
    # list item, and the lines after them made a table and a heading of their own.
    import json

    from flux_adapters.conformance.runner import write_report

    reason = "drops the third image | ticket 12\nsecond line\n\n| a | b |\n|---|---|\n# Heading"
    verdict = run_scenario(
        DroppedThirdImage(),
        by_id("three-references-in-order"),
        CASSETTES / "laozhang",
        {"three-references-in-order": reason},
    )
    assert verdict.outcome == "deviation"
    markdown, data = write_report([verdict], tmp_path)
    notes = markdown.read_text().partition("## Failures and deviations\n\n")[2]
    assert notes.count("\n") == 1  # one line: the one list item
    assert notes.startswith(
        "- `laozhang` drops the third image \\| ticket 12 second line \\| a \\| b \\| "
        "\\|---\\|---\\| # Heading ("
    )
    assert "\n# Heading" not in markdown.read_text()
    assert reason in json.loads(data.read_text())["verdicts"][0]["detail"]  # kept whole there


def test_pytest_reports_a_deviation_as_xfail_and_unsupported_as_skipped(tmp_path: Path) -> None:
    import subprocess
    import sys

    folder = laozhang_with_deviation(tmp_path, DROPS_THIRD)
    module = tmp_path / "test_dropping.py"
    module.write_text(
        "from pathlib import Path\n"
        "from flux_adapters.conformance import ConformanceSuite\n"
        "from tests.test_conformance_suite import DroppedThirdImage\n\n\n"
        "class TestDropping(ConformanceSuite):\n"
        "    adapter = DroppedThirdImage()\n"
        f"    cassettes = Path({str(folder)!r})\n"
    )
    finished = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rxs", "-p", "no:cacheprovider", str(module),
         "-k", "three-references-in-order or flex-steps-guidance", "--rootdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "XFAIL" in finished.stdout
    assert "deviation: drops the third image (ticket 12)" in finished.stdout
    assert "unsupported: steps: laozhang has no such setting" in finished.stdout
    assert " passed" not in finished.stdout.splitlines()[-1]  # neither is counted as a pass


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[deviations]\nerror-249 = "typo"\n', "'error-249' is not a scenario"),
        ("[deviations]\nerror-429 = 503\n", "the reason must be text, not int"),
        ('error-429 = "no table"\n', "must hold one [deviations] table"),
        ("[deviations\n", "cannot be read as TOML"),
    ],
)
def test_a_bad_deviations_file_is_a_configuration_error_naming_it(
    tmp_path: Path, text: str, problem: str
) -> None:
    from flux_adapters.conformance.runner import read_deviations
    from flux_adapters.errors import ConfigurationError

    folder = laozhang_with_deviation(tmp_path, text)
    with pytest.raises(ConfigurationError, match=r"deviations\.toml") as caught:
        read_deviations(folder)
    assert problem in str(caught.value)


class BearerAtBfl(BflAdapter):
    """Sends BFL's key as `Authorization: Bearer` instead of `x-key`."""

    auth: ClassVar[KeyAuth] = KeyAuth(hosts=("*.bfl.ai",))


class XKeyAtLaozhang(LaozhangAdapter):
    auth: ClassVar[KeyAuth] = KeyAuth(header="x-key", scheme=None)


class TokenAtFal(FalAdapter):
    """The right header, the wrong word before the key."""

    auth: ClassVar[KeyAuth] = KeyAuth(scheme="Token")


@pytest.mark.parametrize(
    ("adapter", "folder", "sent", "recorded"),
    [
        (BearerAtBfl(), "bfl", "authorization: Bearer <key>", "x-key: <key>"),
        (XKeyAtLaozhang(), "laozhang", "x-key: <key>", "authorization: Bearer <key>"),
        (TokenAtFal(), "fal", "authorization: Token <key>", "authorization: Key <key>"),
    ],
    ids=["bearer-for-x-key", "x-key-for-bearer", "wrong-scheme"],
)
def test_a_key_in_the_wrong_header_or_scheme_fails_every_scenario_that_sends_it(
    adapter: object, folder: str, sent: str, recorded: str
) -> None:
    for scenario_id in ("text-to-image", "three-references-in-order"):
        verdict = run_scenario(adapter, by_id(scenario_id), CASSETTES / folder)  # type: ignore[arg-type]
        assert verdict.outcome == "fail", verdict
        assert verdict.detail == (
            f"{scenario_id}: the request does not match the recording: credential differs: "
            f"sent {sent}; the recording has {recorded}"
        )


class SwappedSize(LaozhangAdapter):
    """Sends width and height the wrong way round."""

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        wire = super().build_request(request, plan, base_url)
        assert isinstance(wire.body, JsonBody)
        body = dict(wire.body.value)
        if "width" in body:
            body["width"], body["height"] = body["height"], body["width"]
        return attrs.evolve(wire, body=JsonBody(body))


def test_width_and_height_the_wrong_way_round_fail_the_explicit_size_scenario() -> None:
    verdict = run_scenario(SwappedSize(), by_id("explicit-size"), CASSETTES / "laozhang")
    assert verdict.outcome == "fail"
    assert verdict.detail == (
        "explicit-size: the request does not match the recording: "
        "JSON body differs: height is an integer 768; the recording has an integer 512"
    )
    request = by_id("explicit-size").build(LaozhangAdapter())
    assert request.width != request.height  # a square size could not show it


class PollsOnItsBaseHost(BflAdapter):
    """Rebuilds BFL's polling URL on the base URL instead of polling it as returned."""

    def build_poll(self, job: Job) -> HttpRequest:
        path = urlsplit(job.poll_url)
        return HttpRequest(
            method="GET", url=f"{self.default_base_url}{path.path}?{path.query}", role="poll"
        )


def test_a_polling_url_rebuilt_on_the_base_host_fails_the_job_scenarios() -> None:
    verdict = run_scenario(PollsOnItsBaseHost(), by_id("job-pending-then-ready"), CASSETTES / "bfl")
    assert verdict.outcome == "fail"
    assert "the request was not recorded: GET https://api.bfl.ai/v1/get_result" in verdict.detail
    assert (
        run_scenario(BflAdapter(), by_id("job-pending-then-ready"), CASSETTES / "bfl").outcome
        == "pass"
    )


class PollingUrlAsImage(BflAdapter):
    """Returns the job's polling URL as its image."""

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        state = super().parse_poll(response, job)
        if isinstance(state, Done) and state.answer is not None:
            return Done(answer=Answer(images=(ResultImage(url=job.poll_url),)))
        return state


class ShrunkImage(LaozhangAdapter):
    """Answers as if the provider had made the image, but returns the reference image instead."""

    def parse_response(self, response: HttpResponse) -> Answer:
        super().parse_response(response)
        data = base64.b64encode(asset(1).read_bytes()).decode()  # a 96x64 PNG
        return Answer(images=(ResultImage(b64_json=data),))


def test_completing_means_every_image_downloads_as_an_image_of_the_size_asked_for() -> None:
    for scenario_id in ("text-to-image", "job-pending-then-ready"):
        verdict = run_scenario(PollingUrlAsImage(), by_id(scenario_id), CASSETTES / "bfl")
        assert verdict.outcome == "fail"
        # Its "download" is a GET of the polling URL, without the key: no such exchange was
        # recorded (the recorded polls carried the key).
        assert verdict.detail.startswith(f"{scenario_id}: the request does not match")
        assert "credential differs: sent none; the recording has x-key: <key>" in verdict.detail

    wrong_size = run_scenario(ShrunkImage(), by_id("explicit-size"), CASSETTES / "laozhang")
    assert wrong_size.outcome == "fail"
    assert wrong_size.detail == ("explicit-size: image 1 is 96x64; the request asked for 768x512")


def test_a_replay_spends_no_real_time_between_a_downloads_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A replayed answer is the same however late it is asked for: the pauses between the tries
    # of a download the cassette does not hold (a wrong adapter's) cost a replay nothing, as a
    # job's waits between its polls cost it nothing.
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    for scenario_id in ("text-to-image", "job-pending-then-ready"):
        verdict = run_scenario(PollingUrlAsImage(), by_id(scenario_id), CASSETTES / "bfl")
        assert verdict.outcome == "fail"
    assert slept == []


class ForgetsTheCost(BflAdapter):
    """Reads BFL's submit answer but drops the cost it reports."""

    def parse_submit(self, response: HttpResponse) -> Submitted:
        return attrs.evolve(super().parse_submit(response), usage=None)


def test_a_cost_the_provider_reports_must_reach_the_result() -> None:
    verdict = run_scenario(ForgetsTheCost(), by_id("text-to-image"), CASSETTES / "bfl")
    assert verdict.outcome == "fail"
    assert verdict.detail.startswith("text-to-image: the provider reported credits_used ")
    assert verdict.detail.endswith("; the result's usage has none")
    assert run_scenario(BflAdapter(), by_id("text-to-image"), CASSETTES / "bfl").outcome == "pass"


def test_reported_usage_is_read_from_the_answers_at_any_depth() -> None:
    answers = [
        {"id": "job-1", "cost": 4.5, "input_mp": 1, "flag": True},
        {"meta": {"usage": {"credits_used": 2, "tokens_used": True}}, "cost": 9},
        ["not", {"output_mp": 2.0}],
        "text",
    ]
    # The first answer to report a field wins; a boolean is no count.
    assert reported_usage(answers) == {"credits_used": 4.5, "input_mp": 1.0, "output_mp": 2.0}


def png_of(width: int, height: int, kind: str = "PNG") -> ResultImage:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, kind)
    return ResultImage(b64_json=base64.b64encode(out.getvalue()).decode())


@pytest.mark.parametrize(
    ("image", "fields", "problem"),
    [
        (png_of(1024, 576), {"aspect_ratio": "16:9"}, ""),
        (png_of(1536, 640), {"aspect_ratio": "21:9"}, ""),  # rounded to a grid: 2.9 % off
        (
            png_of(576, 1024),
            {"aspect_ratio": "16:9"},
            "image 1 is 576x1024; the request asked for the aspect ratio 16:9",
        ),
        (png_of(768, 512), {"size": "768x512"}, ""),
        (
            png_of(512, 768),
            {"size": "768x512"},
            "image 1 is 512x768; the request asked for 768x512",
        ),
        (png_of(64, 64, "JPEG"), {"output_format": "jpeg"}, ""),
        (
            png_of(64, 64),
            {"output_format": "jpeg"},
            "image 1 is a png image; the request asked for jpeg",
        ),
    ],
)
def test_an_image_must_have_the_size_ratio_and_format_asked_for(
    image: ResultImage, fields: dict[str, object], problem: str
) -> None:
    request = EditRequest(prompt="p", model="flux-2-pro", **fields)  # type: ignore[arg-type]
    assert _image_problem(image, 1, request) == problem


def test_new_settings_are_tried_at_each_providers_own_bounds() -> None:
    lowest, highest = by_id("safety-tolerance-lowest"), by_id("safety-tolerance-highest")
    assert (
        lowest.build(FalAdapter()).safety_tolerance,
        highest.build(FalAdapter()).safety_tolerance,
    ) == (1, 5)
    assert (
        lowest.build(BflAdapter()).safety_tolerance,
        highest.build(BflAdapter()).safety_tolerance,
    ) == (0, 5)
    widest, tallest = by_id("aspect-ratio-widest"), by_id("aspect-ratio-tallest")
    assert widest.build(AimlapiAdapter()).aspect_ratio == "16:9"
    assert tallest.build(AimlapiAdapter()).aspect_ratio == "9:16"
    assert widest.build(LaozhangAdapter()).model == "flux-kontext-pro"  # its FLUX.2 takes sizes
    assert widest.build(LaozhangAdapter()).aspect_ratio == "7:3"
    beyond = by_id("aspect-ratio-beyond-range").build(AimlapiAdapter())
    assert beyond.aspect_ratio == "32:9"
