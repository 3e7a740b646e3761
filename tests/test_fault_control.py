"""Any sandbox can record the fault scenarios, and recording is safe.

The fault-control protocol (``POST``/``DELETE {base_url}/__flux/faults``): the bodies the suite
sends, the emulator's side of it, recordings against a standalone emulator, PixelForge's sandbox
(in under 40 lines) and Nimbus's, and the scenarios a run could not record, named with why.
Recording is safe: each scenario records on its own, and a run pointed at a wrong server leaves
the committed cassettes untouched. PixelForge's declared deviation is an XFAIL with its reason
in pytest, and the CLI's report gives the same verdicts.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from flux_adapters import EditRequest, FluxClient, errors
from flux_adapters.conformance import (
    SCENARIOS,
)
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.emulator._faults import build_fault_body, parse_fault_body

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
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
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

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


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
    client = FluxClient("laozhang", api_key="k", base_url=emulator.base_url("laozhang"))
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
