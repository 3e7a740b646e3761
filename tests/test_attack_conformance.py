"""A hostile sandbox, a careless adapter author and a careless caller against the conformance
suite: what each one tried, and that the suite, the recorder and the harness hold.

The fault-control protocol's requests are bounded (a sandbox that drips or never ends its answer
is given up, and never read whole); a sandbox that says it armed a fault and did not, or that
redirects the protocol elsewhere, or echoes the key, replaces no cassette and leaks nothing.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import attrs
import httpx
import pytest
import yaml
from nimbus_flux import NimbusAdapter
from pixelforge_flux import PixelforgeAdapter
from pixelforge_flux import sandbox as pixelforge_sandbox
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from flux_adapters import errors
from flux_adapters.cli import main
from flux_adapters.conformance import (
    ConformanceSuite,
    RecordingFailed,
    _fault_control,
    record,
    runner,
)
from flux_adapters.conformance._fault_control import FaultControl
from flux_adapters.conformance.mutation import render, score
from flux_adapters.conformance.runner import reported_usage, run_scenario, scan_for_secrets
from flux_adapters.conformance.scenarios import SCENARIOS, by_id
from flux_adapters.emulator import Fault
from flux_adapters.jobs import Done, Job, Pending
from flux_adapters.limits import Plan
from flux_adapters.providers import AnyAdapter, get_adapter
from flux_adapters.providers.laozhang import LaozhangAdapter
from flux_adapters.request import EditRequest
from flux_adapters.wire import HttpRequest, HttpResponse
from tests.test_async_drivers import _socket_buffers
from tests.test_fault_control import PIXELFORGE_CASSETTES, ROOT, _snapshot, serve

KEY = "a-recording-key-0123456789abcdef"
NIMBUS = ROOT / "examples" / "nimbus" / "tests" / "cassettes" / "nimbus"


# --- a sandbox that misbehaves on the socket ----------------------------------------------------


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[tuple[str, dict[str, int]]]:
    """A loopback server that reads each request's head and lets *answer* write anything back."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    sent = {"bytes": 0}
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            with suppress(OSError):
                answer(conn)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", sent
    finally:
        stop.set()
        listener.close()


def test_an_endless_answer_to_the_probe_is_not_read_whole() -> None:
    sent = {"bytes": 0}

    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        for _ in range(4096):  # 256 MiB, if anyone read it all
            conn.sendall(chunk)
            sent["bytes"] += 0x10000

    with raw_server(endless) as (url, _), httpx.Client() as http:
        assert FaultControl(url, http).probe() == ""  # a 200: it speaks the protocol
    # What the kernel buffers aside, the client stopped reading at its cap.
    assert sent["bytes"] < 64 * 1024 * 1024


def test_an_endless_answer_to_a_recorded_request_is_not_read_whole(tmp_path: Path) -> None:
    # vcrpy reads each answer whole inside the transport, under the library's own reader and
    # its cap: the sandbox's 256 MiB were all read into memory, and an endless one had no end.
    sent = {"bytes": 0}

    def endless(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        for _ in range(4096):  # 256 MiB, if anyone read it all
            conn.sendall(chunk)
            sent["bytes"] += 0x10000

    folder = tmp_path / "pixelforge"
    with raw_server(endless) as (url, _):
        failed = _record(url, folder, ["text-to-image"], [])
    assert "larger than a cassette may hold" in failed.failures[0].detail
    assert not folder.exists()  # nothing written
    assert sent["bytes"] <= runner.CASSETTE_BYTES + _socket_buffers()


@pytest.mark.parametrize("head_too", [False, True], ids=["body", "head"])
def test_a_sandbox_that_drips_its_answer_is_given_up(
    monkeypatch: pytest.MonkeyPatch, head_too: bool
) -> None:
    monkeypatch.setattr(_fault_control, "DEADLINE", 0.5)
    release = threading.Event()

    def drip(conn: socket.socket) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
        if not head_too:
            conn.sendall(answer)
            answer = b""
        for byte in answer + b"x" * 100000:
            conn.sendall(bytes([byte]))
            if release.wait(0.05):  # each byte well within the per-read timeout
                return

    try:
        with raw_server(drip) as (url, _), httpx.Client() as http:
            control = FaultControl(url, http)
            if not head_too:
                # The status came in time: it is the answer; the rest is not waited for.
                assert control.probe() == ""
                assert control.arm(Fault(status=402))[0] == "armed"
                assert control.clear() == ""
                return
            problem = control.probe()
            assert "got no answer" in problem
            assert "Timeout" in problem
            with pytest.raises(errors.Timeout):
                control.arm(Fault(status=402))
            assert "the fault may be armed" in control.clear()
    finally:
        release.set()


# --- a sandbox that misbehaves in HTTP ----------------------------------------------------------


def _with_faults(app: ASGIApp, faults: Callable[[Request], Response]) -> Starlette:
    async def route(request: Request) -> Response:
        await request.body()
        return faults(request)

    return Starlette(
        routes=[Route("/__flux/faults", route, methods=["POST", "DELETE"]), Mount("/", app=app)]
    )


def _record(url: str, folder: Path, scenarios: list[str], lines: list[str]) -> RecordingFailed:
    with pytest.raises(RecordingFailed) as caught:
        record(
            PixelforgeAdapter(),
            folder,
            api_key=KEY,
            base_url=url,
            scenarios=[by_id(s) for s in scenarios],
            log=lines.append,
        )
    return caught.value


def test_a_sandbox_that_says_armed_but_is_not_replaces_no_cassette(tmp_path: Path) -> None:
    folder = tmp_path / "pixelforge"
    shutil.copytree(PIXELFORGE_CASSETTES, folder)
    before = _snapshot(folder)
    lines: list[str] = []
    app = _with_faults(pixelforge_sandbox.app, lambda request: Response(status_code=204))
    with serve(app) as url:
        failed = _record(url, folder, ["error-402", "moderation", "text-to-image"], lines)
    assert sorted(v.scenario for v in failed.failures) == ["error-402", "moderation"]
    assert all("completed, but" in v.detail for v in failed.failures)
    assert _snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pixelforge"]


def test_a_fault_endpoint_redirected_elsewhere_is_not_followed(tmp_path: Path) -> None:
    seen: list[str] = []

    def elsewhere(request: Request) -> Response:
        seen.append(request.method)
        return RedirectResponse("http://127.0.0.2:9/__flux/faults", status_code=307)

    folder = tmp_path / "pixelforge"
    shutil.copytree(PIXELFORGE_CASSETTES, folder)
    before = _snapshot(folder)
    lines: list[str] = []
    app = _with_faults(pixelforge_sandbox.app, elsewhere)
    with serve(app) as url:
        # The probe's 307 is not a 2xx: no fault is asked for, so nothing fails and the fault
        # scenario keeps its cassette.
        verdicts = record(
            PixelforgeAdapter(),
            folder,
            api_key=KEY,
            base_url=url,
            scenarios=[by_id("error-402")],
            log=lines.append,
        )
    assert [v.outcome for v in verdicts] == ["unrecorded"]
    assert "answered 307" in verdicts[0].detail
    assert seen == ["DELETE"]  # only the probe, never followed to the other host
    assert _snapshot(folder) == before


def test_a_sandbox_that_echoes_the_key_leaks_it_nowhere(tmp_path: Path) -> None:
    """The sandbox saw the key on a submit and repeats it in its answers to the protocol."""

    def echo(request: Request) -> Response:
        if request.method == "DELETE":
            return Response(status_code=204)
        return JSONResponse({"message": f"no: your key is {KEY} ({KEY[:12]})"}, status_code=500)

    folder = tmp_path / "pixelforge"
    shutil.copytree(PIXELFORGE_CASSETTES, folder)
    before = _snapshot(folder)
    lines: list[str] = []
    with serve(_with_faults(pixelforge_sandbox.app, echo)) as url:
        failed = _record(url, folder, ["error-402", "text-to-image"], lines)
    said = "\n".join([str(failed), *lines, *(v.detail for v in failed.failures)])
    assert "answered 500" in said
    assert KEY not in said
    assert KEY[:12] not in said
    assert KEY[8:16] not in said
    assert _snapshot(folder) == before


def test_a_sandbox_compressing_its_answer_in_its_own_spelling_leaks_no_key(
    tmp_path: Path,
) -> None:
    """Its render answer is gzip sent as ``Content-Encoding: GZIP``, the key inside."""

    async def render(request: Request) -> Response:
        answer = await pixelforge_sandbox.render_route(request)
        data = json.loads(bytes(answer.body))
        data["debug"] = f"rendered for {KEY}"
        squeezed = gzip.compress(json.dumps(data).encode())
        return Response(
            squeezed, media_type="application/json", headers={"content-encoding": "GZIP"}
        )

    folder = tmp_path / "pixelforge"
    app = Starlette(
        routes=[
            Route("/api/v2/render", render, methods=["POST"]),
            Mount("/", app=pixelforge_sandbox.app),
        ]
    )
    with serve(app) as url:
        verdicts = record(
            PixelforgeAdapter(),
            folder,
            api_key=KEY,
            base_url=url,
            scenarios=[by_id("text-to-image")],
            log=lambda line: None,
        )
    assert [v.outcome for v in verdicts] == ["pass"]
    stored = yaml.safe_load((folder / "text-to-image.yaml").read_text())["interactions"][0]
    assert "GZIP" not in str(stored["response"]["headers"])  # stored as read: plain text
    assert json.loads(stored["response"]["body"]["string"])["debug"] == "rendered for [redacted]"
    assert scan_for_secrets(folder, [KEY]) == []
    assert run_scenario(PixelforgeAdapter(), by_id("text-to-image"), folder).outcome == "pass"


@pytest.mark.parametrize(
    "limits",
    [{"flux-2-pro": "a row"}, [("flux-2-pro", None)], {}],
    ids=["row-no-model-limits", "a-list", "no-model"],
)
def test_an_adapter_declaring_unusable_limits_is_told_so_not_given_a_traceback(
    limits: object, tmp_path: Path
) -> None:
    # A ConformanceSuite subclass hands the runner its adapter as it is: the runner read its
    # limits before any client checked them, and raised AttributeError from most scenarios.
    wrong = type("Wrong", (LaozhangAdapter,), {"name": "wrong", "limits": limits})()
    suite = type("TestWrong", (ConformanceSuite,), {"adapter": wrong, "cassettes": tmp_path})()
    for scenario in SCENARIOS:
        with pytest.raises(errors.ConfigurationError, match="limits"):
            run_scenario(wrong, scenario, ROOT / "cassettes" / "laozhang")
        with pytest.raises(pytest.fail.Exception, match=r"the adapter cannot be used: .*limits"):
            suite.test_scenario(scenario)


def test_recording_a_provider_package_against_the_emulator_is_refused_saying_why(
    tmp_path: Path,
) -> None:
    # The emulator speaks the built-in providers only: the run started it, then broke off with
    # "KeyError: 'nimbus'".
    with pytest.raises(errors.ConfigurationError, match="emulator speaks the built-in"):
        record(NimbusAdapter(), tmp_path / "nimbus", api_key=KEY, emulator=True)
    out, err = io.StringIO(), io.StringIO()
    argv = ["conformance", "-p", "nimbus", "--record", "--emulator", "-y"]
    code = main([*argv, "--cassettes", str(tmp_path), "--report-dir", str(tmp_path)], out, err)
    assert code != 0
    assert "emulator speaks the built-in providers only" in err.getvalue()
    assert "KeyError" not in err.getvalue()
    assert "to record against" not in out.getvalue()  # refused before counting paid calls
    assert list(tmp_path.iterdir()) == []


# --- an adapter wrong on the wire ---------------------------------------------------------------


class _Submits:
    """A synchronous adapter whose call is edited by *edit* before it is sent."""

    def __init__(self, real: Any, edit: Callable[[HttpRequest], HttpRequest]) -> None:
        self._real, self._edit = real, edit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        return self._edit(self._real.build_request(request, plan, base_url))


@pytest.mark.parametrize("suffix", ["?debug", "?debug=", "?seed="])
@pytest.mark.parametrize("provider", ["laozhang", "aimlapi", "pixelforge"])
def test_a_query_parameter_without_a_value_is_a_difference(provider: str, suffix: str) -> None:
    real = PixelforgeAdapter() if provider == "pixelforge" else get_adapter(provider)
    folder = PIXELFORGE_CASSETTES if provider == "pixelforge" else ROOT / "cassettes" / provider
    wrong = _Submits(real, lambda built: attrs.evolve(built, url=built.url + suffix))
    verdict = run_scenario(cast("AnyAdapter", wrong), by_id("text-to-image"), folder)
    assert verdict.outcome == "fail"
    name = suffix.strip("?=")
    assert verdict.detail == (
        "text-to-image: the request does not match the recording: "
        f"query differs: {name} is sent but was not recorded"
    )
    assert run_scenario(real, by_id("text-to-image"), folder).outcome == "pass"


def test_usage_in_a_usage_object_is_checked_but_a_lone_credits_is_not_usage() -> None:
    # Nimbus reports {"usage": {"credits": 4}}: an adapter that drops it, or reads it in other
    # units, passed every scenario.
    assert reported_usage([{"state": "succeeded", "usage": {"credits": 4}}]) == {
        "credits_used": 4.0
    }
    # A balance is not what the call cost.
    assert reported_usage([{"error": {"code": "no_credits", "credits": 0}}]) == {}
    assert reported_usage([{"usage": {"credits": True}}]) == {}


def test_nimbus_usage_in_other_units_fails_naming_what_was_reported() -> None:
    real = NimbusAdapter()

    class Hundredfold:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
            state = real.parse_poll(response, job)
            if isinstance(state, Done) and state.answer is not None and state.answer.usage:
                usage = state.answer.usage
                wrong = attrs.evolve(usage, credits_used=(usage.credits_used or 0) * 100)
                return attrs.evolve(state, answer=attrs.evolve(state.answer, usage=wrong))
            return state

    verdict = run_scenario(cast("AnyAdapter", Hundredfold()), by_id("text-to-image"), NIMBUS)
    assert verdict.outcome == "fail"
    assert verdict.detail == (
        "text-to-image: the provider reported credits_used 4; the result's usage says 400"
    )
    assert run_scenario(real, by_id("text-to-image"), NIMBUS).outcome == "pass"


# --- a cassette that is not one ----------------------------------------------------------------

_ALIASES = "a: &a [x, x]\n" + "".join(
    f"{chr(98 + n)}: &{chr(98 + n)} [*{chr(97 + n)}, *{chr(97 + n)}]\n" for n in range(20)
)  # 2 ** 21 values once expanded
NOT_CASSETTES = {
    "not-utf8": (b"interactions:\n- request: \xff\xfe\n", "it is not UTF-8 text"),
    "deep": (b"a: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "it nests deeper than 64 levels"),
    "aliases": (
        _ALIASES.encode(),
        "it holds more than 1000000 values with its aliases expanded",
    ),
    "a-list": (b"- 1\n- 2\n", "it holds no list of interactions"),
    "empty": (b"", "it holds no list of interactions"),
    "number": (b"interactions: 42\n", "it holds no list of interactions"),
    "not-an-exchange": (b"interactions:\n- 42\n", "an interaction is not a request and a response"),
    "syntax": (b"interactions: [unclosed\n", "ParserError: while parsing a flow sequence"),
}


@pytest.mark.parametrize("name", list(NOT_CASSETTES))
def test_a_file_that_is_no_cassette_fails_its_scenario_and_says_why(
    tmp_path: Path, name: str
) -> None:
    """Not an exception out of the suite (the whole report lost), nor a crashed process: a
    hundred thousand nested brackets made PyYAML's C loader overflow the stack."""
    folder = tmp_path / "laozhang"
    shutil.copytree(ROOT / "cassettes" / "laozhang", folder)
    content, why = NOT_CASSETTES[name]
    (folder / "text-to-image.yaml").write_bytes(content)
    verdict = run_scenario(get_adapter("laozhang"), by_id("text-to-image"), folder)
    assert verdict.outcome == "fail"
    assert verdict.detail.startswith(
        f"text-to-image: {folder / 'text-to-image.yaml'} cannot be read as a cassette ({why}"
    )
    assert run_scenario(get_adapter("laozhang"), by_id("explicit-size"), folder).outcome == "pass"
    if name in ("deep", "aliases"):  # the scan says it cannot search it, rather than pass it
        [finding] = scan_for_secrets(folder)
        assert finding.endswith(f"YAML that cannot be scanned as parsed ({why})")


def test_a_cassette_too_large_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "CASSETTE_BYTES", 1024)
    folder = tmp_path / "laozhang"
    shutil.copytree(ROOT / "cassettes" / "laozhang", folder)
    (folder / "text-to-image.yaml").write_bytes(b"#" * 4096)
    verdict = run_scenario(get_adapter("laozhang"), by_id("text-to-image"), folder)
    assert verdict.detail.endswith("cannot be read as a cassette (larger than 1024 bytes)")
    assert any(
        "text-to-image.yaml:1: a file that cannot be scanned (larger than 1024 bytes)" in finding
        for finding in scan_for_secrets(folder)
    )


def test_the_command_reports_every_scenario_when_cassettes_are_hostile(tmp_path: Path) -> None:
    folder = tmp_path / "cassettes" / "laozhang"
    shutil.copytree(ROOT / "cassettes" / "laozhang", folder)
    for name, (content, _) in zip(
        ["text-to-image", "explicit-size", "portrait-size", "seed-and-format"],
        [NOT_CASSETTES["not-utf8"], NOT_CASSETTES["deep"], NOT_CASSETTES["aliases"], (b"", "")],
        strict=True,
    ):
        (folder / f"{name}.yaml").unlink()
        if not content:
            os.mkfifo(folder / f"{name}.yaml")  # opened, it would block forever
        else:
            (folder / f"{name}.yaml").write_bytes(content)
    out, err = io.StringIO(), io.StringIO()
    code = main(
        [
            "conformance",
            "-p",
            "laozhang",
            "--cassettes",
            str(tmp_path / "cassettes"),
            "--report-dir",
            str(tmp_path / "out"),
        ],
        out=out,
        err=err,
    )
    assert code == 1, err.getvalue()
    report = out.getvalue()
    for name in ["text-to-image", "explicit-size", "portrait-size", "seed-and-format"]:
        assert f"| `{name}` | FAIL |" in report
    assert "| `reference-by-url` | pass |" in report
    assert "is not a regular file" in report


# --- the mutation harness, given nothing to judge with ------------------------------------------


class _RaisesEverywhere(LaozhangAdapter):
    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        raise RuntimeError("not written yet")


@pytest.mark.parametrize(
    ("adapter", "cassettes", "why"),
    [
        (LaozhangAdapter(), "missing", "there are no cassettes at "),
        (
            _RaisesEverywhere(),
            "laozhang",
            "the real adapter passes no scenario that sends a request",
        ),
    ],
    ids=["no-cassettes", "adapter-that-raises"],
)
def test_no_mutant_is_called_a_survivor_when_nothing_could_judge_it(
    adapter: AnyAdapter, cassettes: str, why: str
) -> None:
    """They were reported as 57 survivors at 0 %, each "not reached by any scenario"."""
    outcome = score(adapter, ROOT / "cassettes" / cassettes)
    assert outcome.results == ()
    assert outcome.problem.startswith(f"no mutant can be judged: {why}")
    assert not outcome.reached
    assert "Survivors: none" in render([outcome])
