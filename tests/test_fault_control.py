"""Any sandbox can record the fault scenarios, and recording is safe.

The fault-control protocol (``POST``/``DELETE {base_url}/__flux/faults``): the bodies the suite
sends, the emulator's side of it, recordings against a standalone emulator, PixelForge's sandbox
(in under 40 lines) and Nimbus's, and the scenarios a run could not record, named with why.
Recording is safe: each scenario records on its own, and a run pointed at a wrong server leaves
the committed cassettes untouched. PixelForge's declared deviation is an XFAIL with its reason
in pytest, and the CLI's report gives the same verdicts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import attrs
import httpx
import pytest
import uvicorn
from pixelforge_flux import PixelforgeAdapter
from pixelforge_flux import sandbox as pixelforge_sandbox
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from flux_adapters import EditRequest, FluxClient, errors
from flux_adapters.conformance import (
    SCENARIOS,
    RecordingFailed,
    _fault_control,
    record,
    run_scenario,
)
from flux_adapters.conformance.runner import (
    _LIVE_FAULTS,
    _recordable,
    fault_control_problem,
    paid_calls,
)
from flux_adapters.conformance.scenarios import by_id
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.emulator._faults import build_fault_body, parse_fault_body
from flux_adapters.emulator._server import EmulatorServer
from flux_adapters.providers.aimlapi import AimlapiAdapter
from flux_adapters.providers.bfl import BflAdapter
from flux_adapters.providers.laozhang import LaozhangAdapter
from tests.conftest import serving

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "validating-a-provider.md"
PIXELFORGE = ROOT / "examples" / "pixelforge"
PIXELFORGE_CASSETTES = PIXELFORGE / "tests" / "cassettes" / "pixelforge"
REVOKED = "sk-conformance-revoked-key"
FAULT_SCENARIOS = [scenario for scenario in SCENARIOS if scenario.fault is not None]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """Serve *app* on a free loopback port in a thread; yield its root URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, log_level="warning", log_config=None, lifespan="off")
    server = EmulatorServer(config)  # uvicorn's, stopped at once
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(timeout=10), "the server did not start"
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.stop()
        thread.join(timeout=10)
        sock.close()


@contextmanager
def nothing_listens() -> Iterator[str]:
    """A loopback port bound but never listening: every connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def not_found_everywhere() -> Iterator[str]:
    """A server that answers 404 to every request, whatever its method: not the provider."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _not_found(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            page = b"<html><body>Not Found</body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        do_GET = do_POST = do_PUT = do_DELETE = _not_found

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def no_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The test's own waits between polls, noted instead of spent (servers keep their pace)."""
    here, real, slept = threading.current_thread(), time.sleep, []

    def sleep(seconds: float) -> None:
        if threading.current_thread() is here:
            slept.append(seconds)
        else:
            real(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    return slept


# --- the bodies ---------------------------------------------------------------------------------


def test_a_whole_number_is_sent_whole() -> None:
    assert build_fault_body(Fault(status=429, retry_after=7.0)) == {"status": 429, "retry_after": 7}
    assert build_fault_body(Fault(delay=0.5)) == {"delay": 0.5}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([{"status": 503}], "a fault is a JSON object, not list"),
        ({"status": "503"}, "must be int, not str @ $.status"),
        ({"status": True}, "must be int, not bool @ $.status"),
        ({"moderation": 1}, "must be bool, not int @ $.moderation"),
        ({"status": 429, "retry_after": "7"}, "must be a number, not str @ $.retry_after"),
        ({"stauts": 503}, "stauts"),
        ({"status": 999}, "status 999 is not an HTTP status"),
        ({"retry_after": 7}, "retry_after needs a status"),
    ],
)
def test_a_fault_body_is_read_strictly(body: object, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_fault_body(body)


# --- the emulator's side ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator(bad_keys={REVOKED}) as running:
        yield running


def faults_url(emulator: Emulator, provider: str) -> str:
    return f"{emulator.base_url(provider)}/__flux/faults"


def test_the_emulator_arms_a_fault_for_the_next_submits_until_it_is_cleared(
    emulator: Emulator,
) -> None:
    url = faults_url(emulator, "laozhang")
    armed = httpx.post(url, json={"status": 503})
    assert armed.status_code == 200
    assert armed.json() == {"armed": {"status": 503}, "providers": ["laozhang"]}
    request = EditRequest(prompt="a robot", model="flux-2-pro")
    client = FluxClient("laozhang", api_key="test-key", base_url=emulator.base_url("laozhang"))
    with client:
        for _ in range(2):  # every submit, not only the first
            with pytest.raises(errors.ProviderUnavailable) as caught:
                client.edit(request)
            assert caught.value.status_code == 503
        assert httpx.delete(url).status_code == 204
        assert client.edit(request).images


def test_a_prefix_arms_every_provider_under_it(emulator: Emulator) -> None:
    url = faults_url(emulator, "apiyi")
    armed = httpx.post(url, json={"status": 402})
    assert armed.json()["providers"] == ["apiyi", "apiyi-multipart"]
    try:
        for path in ("/v1/images/generations", "/v1/images/edits"):
            answer = httpx.post(
                emulator.base_url("apiyi") + path, headers={"Authorization": "Bearer k"}
            )
            assert answer.status_code == 402, path
    finally:
        httpx.delete(url)


@pytest.mark.parametrize(
    ("provider", "body", "status", "words"),
    [
        ("bfl", {"body": "b64"}, 422, "bfl has no inline (b64) answer"),
        ("laozhang", {"outcome": "failed"}, 422, "laozhang answers with the image, no job"),
        ("laozhang", {"status": "503"}, 400, "must be int, not str"),
        ("laozhang", {"drop": True, "status": 503}, 400, "pick one"),
    ],
)
def test_the_emulator_refuses_what_it_cannot_arm_and_says_why(
    emulator: Emulator, provider: str, body: object, status: int, words: str
) -> None:
    answer = httpx.post(faults_url(emulator, provider), json=body)
    assert answer.status_code == status
    assert words in answer.json()["error"]["message"]


def test_the_emulator_answers_404_under_a_prefix_no_provider_has(emulator: Emulator) -> None:
    assert httpx.delete(f"{emulator.url}/nobody/__flux/faults").status_code == 404
    assert httpx.post(f"{emulator.url}/nobody/__flux/faults", json={}).status_code == 404


def test_the_emulator_refuses_a_body_that_is_not_json(emulator: Emulator) -> None:
    answer = httpx.post(faults_url(emulator, "laozhang"), content=b"\xff{")
    assert answer.status_code == 400


# --- recording through the protocol -------------------------------------------------------------


def test_record_against_a_standalone_emulator_records_the_fault_scenarios(
    emulator: Emulator, tmp_path: Path
) -> None:
    adapter = AimlapiAdapter()
    scenarios = [by_id(i) for i in ("result-by-base64", "error-402", "error-429", "malformed-200")]
    lines: list[str] = []
    verdicts = record(
        adapter,
        tmp_path / "aimlapi",
        api_key="a-recording-key",
        base_url=emulator.base_url("aimlapi"),
        scenarios=[by_id("text-to-image"), *scenarios],
        log=lines.append,
    )
    assert [v.outcome for v in verdicts] == ["pass"] * 5
    for scenario in scenarios:
        assert run_scenario(adapter, scenario, tmp_path / "aimlapi").outcome == "pass", scenario.id
    # The protocol's own requests are not in any cassette, and no fault is left armed.
    assert not any("__flux" in path.read_text() for path in (tmp_path / "aimlapi").iterdir())
    with FluxClient(adapter, api_key="test-key", base_url=emulator.base_url("aimlapi")) as client:
        assert client.edit(EditRequest(prompt="after", model="flux-2-pro")).images


def test_record_against_a_standalone_emulator_records_job_faults(
    emulator: Emulator, tmp_path: Path, no_waits: list[float]
) -> None:
    scenarios = [by_id("job-request-moderated"), by_id("job-failed")]
    verdicts = record(
        BflAdapter(),
        tmp_path / "bfl",
        api_key="a-recording-key",
        base_url=emulator.base_url("bfl"),
        scenarios=scenarios,
        log=print,
    )
    assert [v.outcome for v in verdicts] == ["pass", "pass"]
    for scenario in scenarios:
        assert run_scenario(BflAdapter(), scenario, tmp_path / "bfl").outcome == "pass"
    assert no_waits  # polled at the suite's pace, like any sandbox


def test_recording_against_the_emulator_tells_it_each_fault_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[Fault] = []
    arm = _fault_control.FaultControl.arm

    def spy(self: _fault_control.FaultControl, fault: Fault) -> tuple[str, str]:
        told.append(fault)
        assert self.url.endswith("/laozhang/__flux/faults")
        return arm(self, fault)

    monkeypatch.setattr(_fault_control.FaultControl, "arm", spy)
    scenarios = [by_id("error-5xx"), by_id("moderation")]
    verdicts = record(
        LaozhangAdapter(), tmp_path / "laozhang", api_key="", emulator=True, scenarios=scenarios
    )
    assert [v.outcome for v in verdicts] == ["pass", "pass"]
    assert told == [scenario.fault for scenario in scenarios]


# --- where faults are never asked for -----------------------------------------------------------


def test_a_live_run_never_asks_for_faults_and_names_what_it_did_not_record(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def probe(self: _fault_control.FaultControl) -> str:
        asked.append(self.url)
        return ""

    monkeypatch.setattr(_fault_control.FaultControl, "probe", probe)

    class Live(LaozhangAdapter):
        """laozhang whose real base URL is the emulator: a "live" run without the internet."""

        default_base_url: ClassVar[str] = emulator.base_url("laozhang")

    lines: list[str] = []
    verdicts = record(
        Live(),
        tmp_path / "laozhang",
        api_key="a-recording-key",
        scenarios=[by_id("text-to-image"), by_id("error-402"), by_id("moderation")],
        log=lines.append,
    )
    assert asked == []
    assert [(v.scenario, v.outcome, v.detail) for v in verdicts] == [
        ("text-to-image", "pass", ""),
        ("error-402", "unrecorded", _LIVE_FAULTS),
        ("moderation", "unrecorded", _LIVE_FAULTS),
    ]
    assert f"  not recorded error-402: {_LIVE_FAULTS}" in lines
    assert "laozhang: not recorded (see above why): error-402, moderation" in lines
    assert fault_control_problem(Live(), None) == _LIVE_FAULTS
    assert sorted(p.name for p in (tmp_path / "laozhang").iterdir()) == ["text-to-image.yaml"]


def test_the_announced_count_includes_the_fault_scenarios_only_where_they_can_be_recorded() -> None:
    adapter = PixelforgeAdapter()
    everything, billed_with = paid_calls(adapter, False, faults=True)
    without, billed_without = paid_calls(adapter, False)
    assert everything - without == 5  # 402, 429, 5xx, malformed-200, moderation
    assert billed_with - billed_without == 1  # the unreadable 200 may have been done


# --- recording is safe --------------------------------------------------------------------------


def _refusing_faults(app: ASGIApp) -> Starlette:
    """*app* behind a fault endpoint that takes the probe but answers 500 to every fault."""

    async def faults(request: Request) -> Response:
        return Response(status_code=204 if request.method == "DELETE" else 500)

    return Starlette(
        routes=[
            Route("/__flux/faults", faults, methods=["POST", "DELETE"]),
            Mount("/", app=app),
        ]
    )


def test_a_sandbox_that_refuses_a_fault_fails_that_scenario_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "pixelforge"
    shutil.copytree(PIXELFORGE_CASSETTES, folder)
    before = _snapshot(folder)
    lines: list[str] = []
    with (
        serve(_refusing_faults(pixelforge_sandbox.app)) as url,
        pytest.raises(RecordingFailed) as caught,
    ):
        record(
            PixelforgeAdapter(),
            folder,
            api_key="a-recording-key",
            base_url=url,
            scenarios=[by_id("error-402"), by_id("text-to-image")],
            log=lines.append,
        )
    [failure] = caught.value.failures
    assert failure.scenario == "error-402"
    assert "the sandbox refused the scenario's fault" in failure.detail
    assert "answered 500" in failure.detail
    assert "  recorded text-to-image: pass" in lines
    assert _snapshot(folder) == before


@pytest.mark.parametrize(
    "wrong", [nothing_listens, not_found_everywhere], ids=["nothing-listens", "404-everywhere"]
)
def test_a_recording_run_pointed_at_a_wrong_server_leaves_the_committed_cassettes_untouched(
    tmp_path: Path, wrong: Callable[[], Any]
) -> None:
    folder = tmp_path / "pixelforge"
    shutil.copytree(PIXELFORGE_CASSETTES, folder)
    before = _snapshot(folder)
    lines: list[str] = []
    with wrong() as url, pytest.raises(RecordingFailed) as caught:
        record(
            PixelforgeAdapter(), folder, api_key="a-recording-key", base_url=url, log=lines.append
        )
    assert _snapshot(folder) == before
    assert [path.name for path in tmp_path.iterdir()] == ["pixelforge"]  # no staging folder left
    # Every scenario was tried and reported: the well-behaved ones failed, the faults were
    # not asked for, since the server does not speak the protocol.
    recordable, _ = paid_calls(PixelforgeAdapter(), False)
    assert len(caught.value.failures) == recordable == 13
    assert f"{folder} is unchanged" in str(caught.value)
    faults = [s.id for s in FAULT_SCENARIOS if _recordable(PixelforgeAdapter(), s, faults=True)]
    assert faults == ["error-402", "error-429", "error-5xx", "malformed-200", "moderation"]
    for scenario_id in faults:
        assert any(
            line.startswith(f"  not recorded {scenario_id}: DELETE {url}/__flux/faults")
            for line in lines
        )
    assert lines[-1] == f"pixelforge: not recorded (see above why): {', '.join(faults)}"
    assert "pixelforge: 13 scenario(s) recorded in " in "\n".join(lines)


# --- the command line ---------------------------------------------------------------------------


def test_the_command_says_before_it_starts_that_the_faults_will_not_be_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from flux_adapters.cli import main

    monkeypatch.setenv("PIXELFORGE_API_KEY", "a-recording-key")
    out, err = io.StringIO(), io.StringIO()
    with not_found_everywhere() as url:
        code = main(
            ["conformance", "--record", "--yes", "--adapter", "pixelforge_flux:PixelforgeAdapter",
             "--base-url", url, "--cassettes", str(tmp_path), "--report-dir", str(tmp_path / "out")],
            out=out, err=err,
        )  # fmt: skip
    assert code != 0
    first, second = out.getvalue().splitlines()[:2]
    assert first.startswith(f"pixelforge: 13 scenario(s) to record against {url}, ")
    assert second == (
        f"pixelforge: its fault scenarios will not be recorded: DELETE {url}/__flux/faults "
        "answered 404: it does not speak the fault-control protocol"
    )
    assert "RecordingFailed" in err.getvalue()


# --- the documented protocol, and PixelForge's sandbox ------------------------------------------


def _documented_bodies() -> dict[str, object]:
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| `(\{.*\})` \|$", DOC.read_text(), re.MULTILINE)
    return {scenario_id: json.loads(body) for scenario_id, body in rows}


def test_every_fault_scenario_sends_the_body_the_documentation_lists() -> None:
    sent = {scenario.id: build_fault_body(scenario.fault) for scenario in FAULT_SCENARIOS}  # type: ignore[arg-type]
    assert sent == _documented_bodies()
    assert sent["error-429"] == {"status": 429, "retry_after": 7}
    for scenario in FAULT_SCENARIOS:
        assert parse_fault_body(json.loads(json.dumps(sent[scenario.id]))) == scenario.fault


def _protocol_lines() -> list[str]:
    """Every line of PixelForge's sandbox that is there for the protocol, blank ones included.

    The delimited block, and outside it every line that uses what the block defines (each must
    be marked ``# fault-control protocol``), with the ``return`` under a marked ``if``.
    """
    lines = (PIXELFORGE / "pixelforge_flux" / "sandbox.py").read_text().splitlines()
    start = lines.index("# --- fault-control protocol (docs/validating-a-provider.md) ---")
    end = lines.index("# --- end of the fault-control protocol ---")
    names = ("_armed", "_answer_to", "faults_route", "__flux")
    uses = [
        number
        for number, line in enumerate(lines)
        if not start <= number <= end and any(name in line for name in names)
    ]
    assert [lines[n] for n in uses if not lines[n].endswith("# fault-control protocol")] == []
    following = [lines[n + 1] for n in uses if lines[n].strip().startswith("if ")]
    return lines[start : end + 1] + [lines[n] for n in uses] + following


def test_pixelforge_speaks_the_protocol_in_under_40_lines_as_documented() -> None:
    lines = _protocol_lines()
    assert len(lines) < 40
    stated = re.search(r"PixelForge's sandbox does it in (\d+) lines", DOC.read_text())
    assert stated is not None
    assert int(stated[1]) == len(lines)
    # The documentation shows the block as it is.
    block = "\n".join(lines[: lines.index("# --- end of the fault-control protocol ---") + 1])
    assert f"<!-- pixelforge-fault-control -->\n```python\n{block}\n```" in DOC.read_text()


@pytest.fixture(scope="module")
def pixelforge_url() -> Iterator[str]:
    with serve(pixelforge_sandbox.app) as url:
        yield url


@pytest.mark.parametrize(
    ("body", "error", "status"),
    [
        ({"status": 402}, errors.InsufficientBalance, 402),
        ({"status": 503}, errors.ProviderUnavailable, 503),
        ({"moderation": True}, errors.ContentModerated, 400),
        ({"body": "malformed"}, errors.ResponseFormatError, 200),
        ({"status": 429, "retry_after": 7}, errors.RateLimited, 429),
    ],
)
def test_pixelforge_answers_each_armed_fault_in_its_own_shape(
    pixelforge_url: str, body: dict[str, object], error: type[errors.ProviderError], status: int
) -> None:
    request = EditRequest(prompt="a robot", model="flux-2-pro")
    client = FluxClient(PixelforgeAdapter(), api_key="test-key", base_url=pixelforge_url)
    assert httpx.post(f"{pixelforge_url}/__flux/faults", json=body).status_code == 204
    try:
        with client, pytest.raises(error) as caught:
            client.edit(request)
    finally:
        assert httpx.delete(f"{pixelforge_url}/__flux/faults").status_code == 204
    assert caught.value.status_code == status
    if isinstance(caught.value, errors.RateLimited):
        # Its documented quirk: the wait is in the body, which the adapter does not read yet.
        assert caught.value.retry_after is None
    with FluxClient(PixelforgeAdapter(), api_key="test-key", base_url=pixelforge_url) as client:
        assert client.edit(request).images


@pytest.mark.parametrize(
    "body", [{"body": "b64"}, {"status": 502}, {"status": 429, "retry_after": 1.5}, [402]]
)
def test_pixelforge_answers_422_to_a_fault_it_cannot_produce(
    pixelforge_url: str, body: object
) -> None:
    answer = httpx.post(f"{pixelforge_url}/__flux/faults", json=body)
    assert answer.status_code == 422
    assert answer.json()["error_code"] == "unsupported_fault"


def test_a_fault_the_sandbox_cannot_produce_is_not_recorded_and_keeps_its_cassette(
    pixelforge_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "pixelforge"
    shutil.copytree(PIXELFORGE_CASSETTES, folder)
    before = _snapshot(folder)
    gateway = attrs.evolve(by_id("error-5xx"), fault=Fault(status=502))
    lines: list[str] = []
    verdicts = record(
        PixelforgeAdapter(),
        folder,
        api_key="a-recording-key",
        base_url=pixelforge_url,
        scenarios=[by_id("error-402"), gateway],
        log=lines.append,
    )
    assert [(v.scenario, v.outcome) for v in verdicts] == [
        ("error-402", "pass"),
        ("error-5xx", "unrecorded"),
    ]
    assert "the sandbox cannot produce this fault" in verdicts[1].detail
    assert "answered 422: the sandbox cannot produce {'status': 502}" in verdicts[1].detail
    assert any(line.startswith("  not recorded error-5xx: the sandbox cannot") for line in lines)
    assert "pixelforge: not recorded (see above why): error-5xx" in lines
    after = _snapshot(folder)
    assert after["error-5xx.yaml"] == before["error-5xx.yaml"]
    assert after["error-402.yaml"] != before["error-402.yaml"]  # recorded again, and replaced


# --- declared deviations, when recording --------------------------------------------------------


def test_a_declared_deviation_records_and_an_undeclared_one_replaces_nothing(
    pixelforge_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "pixelforge"
    shutil.copytree(PIXELFORGE_CASSETTES, folder)
    old = (folder / "error-429.yaml").read_bytes()
    [verdict] = record(
        PixelforgeAdapter(),
        folder,
        api_key="a-recording-key",
        base_url=pixelforge_url,
        scenarios=[by_id("error-429")],
        log=print,
    )
    assert verdict.outcome == "deviation"
    assert verdict.detail.endswith("(the 429 carried no Retry-After value)")
    # Recorded (replaced), and replays as the deviation it is.
    assert (folder / "error-429.yaml").read_bytes() != old
    replayed = run_scenario(PixelforgeAdapter(), by_id("error-429"), folder, {"error-429": "x"})
    assert replayed.outcome == "deviation"

    (folder / "deviations.toml").unlink()
    before = _snapshot(folder)
    with pytest.raises(RecordingFailed, match="the 429 carried no Retry-After value"):
        record(
            PixelforgeAdapter(),
            folder,
            api_key="a-recording-key",
            base_url=pixelforge_url,
            scenarios=[by_id("error-429")],
            log=print,
        )
    assert _snapshot(folder) == before


def test_a_declared_deviation_that_now_conforms_fails_the_recording(
    pixelforge_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "pixelforge"
    shutil.copytree(PIXELFORGE_CASSETTES, folder)
    (folder / "deviations.toml").write_text('[deviations]\nerror-402 = "ticket 7"\n')
    before = _snapshot(folder)
    with pytest.raises(RecordingFailed) as caught:
        record(
            PixelforgeAdapter(),
            folder,
            api_key="a-recording-key",
            base_url=pixelforge_url,
            scenarios=[by_id("error-402")],
            log=print,
        )
    assert "declared as a deviation (ticket 7) but it now conforms" in str(caught.value)
    assert _snapshot(folder) == before


# --- pytest and the CLI agree on PixelForge -----------------------------------------------------

_PYTEST_WORDS = {
    "PASSED": "pass",
    "XFAIL": "deviation",
    "SKIPPED": "skipped",
    "FAILED": "fail",
    "XPASS": "fail",
}
_SKIPPED = {"unsupported", "unrecorded", "not-applicable"}


def test_pytest_shows_pixelforge_s_deviation_as_xfail_and_the_cli_agrees(tmp_path: Path) -> None:
    environment = os.environ | {"PYTHONPATH": str(PIXELFORGE)}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-rx", "-p", "no:cacheprovider",
         "examples/pixelforge/tests/test_conformance.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    reason = (
        "deviation: PixelForge gives a 429's wait in the body (retry_in_ms), not in a Retry-After "
        "header, and the adapter does not read it yet (error-429: the 429 carried no Retry-After "
        "value)"
    )
    assert f"XFAIL examples/pixelforge/tests/test_conformance.py::TestPixelforge::test_scenario[error-429] - {reason}" in tests.stdout  # fmt: skip
    said = {
        match[1]: _PYTEST_WORDS[match[2]]
        for match in re.finditer(r"::test_scenario\[([a-z0-9-]+)\] ([A-Z]+)", tests.stdout)
    }
    assert set(said) == {scenario.id for scenario in SCENARIOS}

    cli = subprocess.run(
        [sys.executable, "-m", "flux_adapters", "conformance",
         "--adapter", "pixelforge_flux:PixelforgeAdapter",
         "--cassettes", str(PIXELFORGE_CASSETTES.parent), "--report-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    verdicts = json.loads((tmp_path / "conformance.json").read_text())["verdicts"]
    reported = {
        v["scenario"]: "skipped" if v["outcome"] in _SKIPPED else v["outcome"] for v in verdicts
    }
    assert reported == said
    assert reported["error-429"] == "deviation"
    assert "| `error-429` | deviation |" in cli.stdout


# --- Nimbus's sandbox ---------------------------------------------------------------------------


def test_nimbus_records_its_job_faults_through_the_protocol(
    tmp_path: Path, no_waits: list[float]
) -> None:
    from nimbus_flux import NimbusAdapter
    from nimbus_flux.sandbox import run_sandbox

    scenarios = [by_id(i) for i in ("error-429", "job-content-moderated", "job-not-found")]
    with run_sandbox() as sandbox:
        verdicts = record(
            NimbusAdapter(),
            tmp_path / "nimbus",
            api_key="a-recording-key",
            base_url=sandbox.url,
            scenarios=scenarios,
            log=print,
        )
        refused = httpx.post(f"{sandbox.url}/__flux/faults", json={"status": 418})
        assert sandbox.armed is None  # cleared after the run, and a refused fault arms nothing
    assert [v.outcome for v in verdicts] == ["pass"] * 3
    assert refused.status_code == 422
    for scenario in scenarios:
        assert run_scenario(NimbusAdapter(), scenario, tmp_path / "nimbus").outcome == "pass"
