"""The clients over real loopback sockets: FluxClient on httpx, AsyncFluxClient on each of its
drivers (aiohttp, httpx). Bodies must arrive whole with the length announced up front, and a
failure must say honestly whether the request may have reached the server."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, ProviderId, errors
from tests.conftest import CLIENT_KINDS, driver, image_bytes, serving

ANSWER = json.dumps({"data": [{"url": "http://127.0.0.1:1/result.png"}]}).encode()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    received: list[tuple[str, dict[str, str], bytes]]
    hang_up_after_body: bool = False


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        self.server.received.append(
            (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        if len(body) < length:  # the client gave up on the body: no answer to a partial request
            self.close_connection = True
            return
        if self.server.hang_up_after_body:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.received = []
    with serving(httpd):
        yield httpd


def base(httpd: Server, provider: str) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/{provider}"


def edit(kind: str, url: str, provider: ProviderId, request: EditRequest) -> EditResult:
    if kind == "sync":
        with FluxClient(provider, api_key="test-key", base_url=url, timeout=10) as client:
            return client.edit(request)

    async def run() -> EditResult:
        async with AsyncFluxClient(
            provider, api_key="test-key", base_url=url, timeout=10, driver=driver(kind)
        ) as client:
            return await client.edit(request)

    return asyncio.run(run())


both = pytest.mark.parametrize("kind", CLIENT_KINDS)


@both
def test_streamed_json_arrives_whole(kind: str, server: Server, tmp_path: Path) -> None:
    # 3 MB of file: several encoder slices, so chunk boundaries are exercised.
    picture = tmp_path / "big.png"
    picture.write_bytes(image_bytes(64, 64) + bytes(3 * 1024 * 1024))
    request = EditRequest(
        prompt="p", model="flux-2-pro", images=[picture, image_bytes(8, 8, "JPEG")]
    )
    result = edit(kind, base(server, "laozhang"), "laozhang", request)
    [(path, headers, body)] = server.received
    assert path == "/laozhang/v1/images/generations"
    assert int(headers["content-length"]) == len(body)
    assert "transfer-encoding" not in headers
    sent = json.loads(body)
    assert base64.b64decode(sent["input_image"].split(",", 1)[1]) == picture.read_bytes()
    assert sent["input_image_2"].startswith("data:image/jpeg;base64,")
    assert result.images[0].url == "http://127.0.0.1:1/result.png"


@both
@pytest.mark.parametrize("grows", [True, False], ids=["grew", "shrank"])
def test_a_file_changed_after_the_request_was_built_never_goes_out_whole(
    kind: str, grows: bool, server: Server, tmp_path: Path
) -> None:
    picture = tmp_path / "ref.png"
    picture.write_bytes(image_bytes(64, 64) + bytes(2 * 1024 * 1024))
    request = EditRequest(prompt="p", model="flux-2-pro", images=[picture])
    data = picture.read_bytes()
    picture.write_bytes(data + b"\0" * 10 if grows else data[:-10])
    with pytest.raises(errors.RequestError) as caught:
        edit(kind, base(server, "laozhang"), "laozhang", request)
    assert caught.value.violations[0].message.endswith("ref.png changed while it was being sent")
    # Whatever reached the server is short of the announced length: no request it could take.
    for _, headers, body in server.received:
        assert len(body) < int(headers["content-length"])


@both
def test_multipart_arrives_whole(kind: str, server: Server, tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.webp"
    first.write_bytes(image_bytes(40, 40))
    second.write_bytes(image_bytes(30, 20, "WEBP"))
    edit(
        kind,
        base(server, "apiyi"),
        "apiyi-multipart",
        EditRequest(prompt="p", model="flux-2-pro", images=[first, second]),
    )
    [(path, headers, body)] = server.received
    assert path == "/apiyi/v1/images/edits"
    assert int(headers["content-length"]) == len(body)
    assert body.count(b'name="image[]"') == 2
    assert first.read_bytes() in body
    assert second.read_bytes() in body


@both
def test_refused_connection_is_reported_as_not_sent(kind: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before use: nothing listens there
    with pytest.raises(errors.TransportError) as caught:
        edit(
            kind,
            f"http://127.0.0.1:{port}/laozhang",
            "laozhang",
            EditRequest(prompt="p", model="flux-2-pro"),
        )
    assert caught.value.sent is False


@both
def test_a_hang_up_after_the_body_is_reported_as_maybe_sent(kind: str, server: Server) -> None:
    server.hang_up_after_body = True
    with pytest.raises(errors.TransportError) as caught:
        edit(
            kind, base(server, "laozhang"), "laozhang", EditRequest(prompt="p", model="flux-2-pro")
        )
    assert caught.value.sent is True  # the provider may have taken, and billed, the job
    assert len(server.received) == 1
