"""The emulator holds up under hostile clients: oversized bodies get a 413 without being read,
silent and slow connections are closed, hung-up clients leave no traceback in the log, and the
foreground server only announces itself once its port is bound."""

from __future__ import annotations

import inspect
import json
import logging
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from flux_adapters.emulator import Emulator, _app, run_emulator, serve
from flux_adapters.providers import get_adapter
from tests.conftest import image_bytes

KEY = {"Authorization": "Bearer any-key"}
LIMIT = 100_000
HEAD_TIMEOUT = 0.5
GOOD = {"model": "flux-2-pro", "prompt": "a robot"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator(max_body_bytes=LIMIT, header_timeout=HEAD_TIMEOUT) as running:
        yield running


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of the server's own logger, and of any logger that reaches the root."""
    server = logging.getLogger("uvicorn.error")
    server.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    try:
        yield caplog
    finally:
        server.removeHandler(caplog.handler)


def tracebacks(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.levelno >= logging.ERROR or r.exc_info]


def connect(emulator: Emulator) -> socket.socket:
    port = int(emulator.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def head(path: str, length: int, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: emulator\r\nAuthorization: Bearer k\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def wait_for(condition: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# --- request body limit ---------------------------------------------------------------------


def test_the_default_limit_takes_the_largest_legitimate_request() -> None:
    # 8 reference images of the largest allowed size, each a base64 data URL in one JSON body.
    largest = max(
        limits.images.high * limits.image.max_bytes
        for provider in ("laozhang", "apiyi", "aimlapi")
        for limits in get_adapter(provider).limits.values()
        if limits.images.high
    )
    as_base64 = 4 * math.ceil(largest / 3)
    room_for_fields = 64 * 1024
    default = inspect.signature(run_emulator).parameters["max_body_bytes"].default
    assert as_base64 + room_for_fields < default
    assert inspect.signature(serve).parameters["max_body_bytes"].default == default


def test_a_body_at_the_limit_is_read_and_one_byte_over_gets_413(emulator: Emulator) -> None:
    url = f"{emulator.url}/laozhang/v1/images/generations"
    body = json.dumps(GOOD).encode()
    at_limit = body + b" " * (LIMIT - len(body))
    accepted = httpx.post(url, content=at_limit, headers=KEY | {"Content-Type": "application/json"})
    assert accepted.status_code == 200, accepted.text
    over = httpx.post(
        url, content=at_limit + b" ", headers=KEY | {"Content-Type": "application/json"}
    )
    assert over.status_code == 413
    assert over.json()["error"]["code"] == "request_too_large"
    assert str(LIMIT) in over.json()["error"]["message"]


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    emulator: Emulator,
) -> None:
    # Only the head is sent: an answer proves the server did not wait for the gigabyte.
    with connect(emulator) as sock:
        sock.sendall(head("/aimlapi/v1/images/generations", 10**9))
        with sock.makefile("rb") as stream:
            answer = stream.read().decode()  # to the end: the server closes the connection
    assert answer.startswith("HTTP/1.1 413 ")
    assert "connection: close" in answer.lower()
    # aimlapi's own error shape.
    assert '"statusCode":413' in answer


def test_a_chunked_body_is_cut_off_at_the_limit(emulator: Emulator) -> None:
    sent = 0
    total = 256 * 1024 * 1024

    def endless() -> Iterator[bytes]:
        nonlocal sent
        while sent < total:
            sent += 65536
            yield b" " * 65536

    response = httpx.post(
        f"{emulator.url}/apiyi/v1/images/generations",
        content=endless(),
        headers=KEY | {"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    # The server stopped reading: the client never got to send the whole body.
    assert sent < total


def test_a_multipart_body_over_the_limit_gets_413(emulator: Emulator) -> None:
    png = image_bytes(8, 8) + bytes(LIMIT)
    response = httpx.post(
        f"{emulator.url}/apiyi/v1/images/edits",
        data={"model": "flux-2-pro", "prompt": "p"},
        files=[("image[]", ("a.png", png, "image/png"))],
        headers=KEY,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"data": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
    ],
    ids=["nested 10,000 deep", "not UTF-8"],
)
def test_hostile_json_gets_400_not_500(emulator: Emulator, body: bytes, message: str) -> None:
    response = httpx.post(
        f"{emulator.url}/laozhang/v1/images/generations",
        content=body,
        headers=KEY | {"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_a_broken_multipart_body_gets_400_in_the_providers_style(emulator: Emulator) -> None:
    response = httpx.post(
        f"{emulator.url}/apiyi/v1/images/edits",
        content=b"--xx\r\nnot a part header\r\n\r\n",
        headers=KEY | {"Content-Type": "multipart/form-data; boundary=xx"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_multipart"


# --- slow and silent connections ------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(emulator: Emulator) -> None:
    with connect(emulator) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server, no answer
        assert time.monotonic() - started < 5


def test_a_request_head_sent_one_line_at_a_time_is_cut_off(emulator: Emulator) -> None:
    with connect(emulator) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /portal HTTP/1.1\r\n")
        # The write that meets the socket the server closed fails.
        with pytest.raises(OSError):  # noqa: PT011, PT012
            for line in range(100):
                time.sleep(HEAD_TIMEOUT / 4)
                sock.sendall(b"X-Slow: %d\r\n" % line)
        assert time.monotonic() - started < 5


def test_the_next_request_head_on_a_kept_alive_connection_has_a_deadline_too(
    emulator: Emulator,
) -> None:
    request = b"GET /portal HTTP/1.1\r\nHost: emulator\r\n\r\n"
    with connect(emulator) as sock, sock.makefile("rb") as answers:
        sock.sendall(request)
        assert answers.readline().startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        with pytest.raises(OSError):  # noqa: PT011, PT012
            for _ in range(100):
                sock.sendall(b"G")
                time.sleep(HEAD_TIMEOUT / 4)
        assert time.monotonic() - started < 5


def test_keep_alive_still_serves_several_requests_on_one_connection(emulator: Emulator) -> None:
    request = b"GET /portal HTTP/1.1\r\nHost: emulator\r\n\r\n"
    with connect(emulator) as sock, sock.makefile("rb") as answers:
        for _ in range(3):
            sock.sendall(request)
            assert answers.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := answers.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            assert b"<html>" in answers.read(length).lower()
            time.sleep(HEAD_TIMEOUT / 2)  # idle, but within the deadline


def test_a_slow_body_after_a_complete_head_is_not_cut_by_the_head_deadline(
    emulator: Emulator,
) -> None:
    body = json.dumps(GOOD).encode()
    with connect(emulator) as sock:
        sock.sendall(head("/laozhang/v1/images/generations", len(body)))
        for index in range(len(body)):
            if index % 10 == 0:
                time.sleep(HEAD_TIMEOUT / 5)
            sock.sendall(body[index : index + 1])
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


# --- hung-up clients ------------------------------------------------------------------------


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(
    emulator: Emulator, server_log: pytest.LogCaptureFixture
) -> None:
    before, billed = len(emulator.calls()), len(emulator.billed())
    with connect(emulator) as sock:
        sock.sendall(head("/laozhang/v1/images/generations", 50_000) + b"{" * 1000)
    with connect(emulator) as sock:
        sock.sendall(
            head("/apiyi/v1/images/edits", 50_000, "multipart/form-data; boundary=xx")
            + b'--xx\r\nContent-Disposition: form-data; name="model"\r\n\r\nflux'
        )
    wait_for(lambda: len(emulator.calls()) == before + 2)
    time.sleep(0.3)  # the server notices the hang-ups
    assert tracebacks(server_log) == []
    assert len(emulator.billed()) == billed


def test_a_client_that_hangs_up_before_the_answer_leaves_no_traceback_and_is_billed(
    emulator: Emulator, server_log: pytest.LogCaptureFixture
) -> None:
    body = json.dumps(GOOD | {"prompt": "nobody waits for me"}).encode()
    with connect(emulator) as sock:
        sock.sendall(head("/laozhang/v1/images/generations", len(body)) + body)
    wait_for(lambda: any(job.prompt == "nobody waits for me" for job in emulator.billed()))
    time.sleep(0.3)
    assert tracebacks(server_log) == []


def test_a_client_that_hangs_up_mid_download_leaves_no_traceback(
    emulator: Emulator, server_log: pytest.LogCaptureFixture
) -> None:
    body = GOOD | {"size": "2048x2048", "output_format": "png"}
    url = httpx.post(
        f"{emulator.url}/laozhang/v1/images/generations", json=body, headers=KEY
    ).json()["data"][0]["url"]
    with connect(emulator) as sock:
        sock.sendall(f"GET {url.removeprefix(emulator.url)} HTTP/1.1\r\nHost: e\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    time.sleep(0.3)
    assert tracebacks(server_log) == []


def test_a_genuine_bug_is_still_logged_with_its_traceback(
    emulator: Emulator, server_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(job: object) -> bytes:
        raise RuntimeError("a bug in the renderer")

    monkeypatch.setattr(_app, "_rendered", broken)
    response = httpx.post(f"{emulator.url}/laozhang/v1/images/generations", json=GOOD, headers=KEY)
    assert response.status_code == 500
    wait_for(lambda: tracebacks(server_log))
    logged = [r for r in server_log.records if r.exc_info]
    assert logged
    assert "a bug in the renderer" in str(logged[0].exc_info[1] if logged[0].exc_info else "")


# --- the foreground server ------------------------------------------------------------------


def test_serve_refuses_a_busy_port_before_announcing_it() -> None:
    announced: list[str] = []
    outcome: list[BaseException] = []

    def run(port: int) -> None:
        try:
            serve(port=port, on_ready=announced.append)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        thread = threading.Thread(target=run, args=(taken.getsockname()[1],), daemon=True)
        thread.start()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], OSError)
    assert announced == []


def test_serve_announces_its_url_once_it_accepts_connections() -> None:
    script = (
        "from flux_adapters.emulator import serve\n"
        "serve(port=0, on_ready=lambda url: print(url, flush=True))\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            # No retry: the port was listening before the URL was announced.
            response = httpx.get(f"{url}/portal", timeout=10)
            assert response.status_code == 200
        finally:
            server.terminate()
            server.wait(timeout=10)
