"""The gateway's connections send an answer's head and body in one write (`_JoinedTransport`), on
either of its protocols (h11's `JoinedWrites`, httptools' `HttptoolsJoinedWrites`)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flux_adapters._serving import _JOINED_BYTES, JoinedWrites, _JoinedTransport
from flux_adapters.gateway._httptools import HttptoolsJoinedWrites


class Recorded(asyncio.Transport):
    """A transport that records what it is asked to do."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


def joined() -> tuple[_JoinedTransport, Recorded]:
    raw = Recorded()
    return _JoinedTransport(raw, asyncio.get_running_loop()), raw


def test_a_head_and_body_written_together_leave_in_one_write() -> None:
    async def main() -> list[bytes]:
        transport, raw = joined()
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"")  # h11's end of a body with a length: nothing
        transport.write(b'{"ok":true}')
        await asyncio.sleep(0)
        return raw.sent

    assert asyncio.run(main()) == [b'HTTP/1.1 200 OK\r\n\r\n{"ok":true}']


def test_a_head_whose_body_comes_later_leaves_at_the_loops_next_turn() -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        transport, raw = joined()
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await asyncio.sleep(0)
        first = list(raw.sent)
        transport.write(b"a piece of a slow body")
        await asyncio.sleep(0)
        return first, raw.sent

    first, everything = asyncio.run(main())
    assert first == [b"HTTP/1.1 200 OK\r\n\r\n"]
    assert everything == [b"HTTP/1.1 200 OK\r\n\r\n", b"a piece of a slow body"]


def test_closing_sends_what_waits_first_and_aborting_drops_it() -> None:
    async def main() -> tuple[Recorded, Recorded]:
        closing, closed = joined()
        closing.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        closing.close()
        aborting, aborted = joined()
        aborting.write(b"HTTP/1.1 200 OK\r\n\r\n")
        aborting.abort()
        await asyncio.sleep(0)
        return closed, aborted

    closed, aborted = asyncio.run(main())
    assert (closed.sent, closed.closed) == ([b"HTTP/1.1 400 Bad Request\r\n\r\n"], True)
    assert (aborted.sent, aborted.aborted) == ([], True)


def test_a_large_body_is_not_copied_into_the_head() -> None:
    async def main() -> list[bytes]:
        transport, raw = joined()
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"x" * _JOINED_BYTES)
        transport.write(b"y" * _JOINED_BYTES)
        await asyncio.sleep(0)
        return raw.sent

    assert asyncio.run(main()) == [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"x" * _JOINED_BYTES,
        b"y" * _JOINED_BYTES,
    ]


def _answers(connection: socket.socket, count: int) -> list[bytes]:
    """The bodies of *count* HTTP/1.1 answers read from *connection* (a length, or chunked)."""
    reader = connection.makefile("rb")
    bodies = []
    for _ in range(count):
        assert reader.readline().startswith(b"HTTP/1.1 200 ")
        length = None
        while (line := reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        if length is not None:
            bodies.append(reader.read(length))
            continue
        body = b""
        while size := int(reader.readline(), 16):
            body += reader.read(size)
            assert reader.readline() == b"\r\n"
        assert reader.readline() == b"\r\n"
        bodies.append(body)
    return bodies


@pytest.mark.parametrize(
    "protocol", [JoinedWrites, HttptoolsJoinedWrites], ids=["h11", "httptools"]
)
def test_pipelined_answers_of_every_shape_arrive_whole_and_in_order(
    protocol: type[asyncio.Protocol], tmp_path: Path
) -> None:
    """A client that sends 25 requests at once and reads them through a small receive buffer
    (the server's writes pause and resume): small JSON, a slow stream, bodies just past the
    joining size, 3,000 small pieces, a file of 2 MB. Then clients that hang up mid-answer, at
    once or with a reset; the server still answers the next one."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from flux_adapters._serving import LoopbackServer, listening_socket

    large = os.urandom(2 * 1024 * 1024 + 7)
    (tmp_path / "large").write_bytes(large)

    async def small(request: Request) -> Response:
        return JSONResponse({"n": request.query_params["n"]})

    async def pieces(request: Request) -> Response:
        async def slow() -> AsyncIterator[bytes]:
            for piece in (b"a", b"b", b"c"):
                yield piece
                await asyncio.sleep(0.005)

        async def many() -> AsyncIterator[bytes]:
            for _ in range(3000):
                yield b"x" * 100

        return StreamingResponse(slow() if request.query_params["n"] == "slow" else many())

    expected = {
        "/small?n=": None,
        "/pieces?n=slow": b"abc",
        "/pieces?n=many": b"x" * 300_000,
        "/past": b"p" * (_JOINED_BYTES + 1),
        "/file": large,
    }
    app = Starlette(
        routes=[
            Route("/small", small),
            Route("/pieces", pieces),
            Route("/past", lambda request: Response(expected["/past"])),
            Route("/file", lambda request: FileResponse(tmp_path / "large")),
        ]
    )
    sock = listening_socket("127.0.0.1", 0)
    config = uvicorn.Config(app, http=protocol, log_level="warning", lifespan="off")
    paths = [list(expected)[n % len(expected)] + (str(n) if n % 5 == 0 else "") for n in range(25)]

    def asked(*paths: str) -> bytes:
        return b"".join(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for path in paths)

    def connected(receive_buffer: int | None = None) -> socket.socket:
        connection = socket.socket()
        if receive_buffer:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        connection.settimeout(30)  # a lost answer fails here instead of hanging the suite
        connection.connect(sock.getsockname())
        return connection

    with LoopbackServer(config).in_thread(sock, "the server", join=5):
        with connected(4096) as connection:
            connection.sendall(asked(*paths))
            bodies = _answers(connection, len(paths))
        for path, body in zip(paths, bodies, strict=True):
            number = path.partition("?n=")[2]
            wanted = expected[path] if not path.startswith("/small") else f'{{"n":"{number}"}}'
            assert body == (wanted.encode() if isinstance(wanted, str) else wanted), path
        for n in range(10):
            with connected() as connection:
                connection.sendall(asked("/file", "/pieces?n=slow", "/small?n=1"))
                connection.recv(1 + n)
                if n % 2:  # a reset rather than a close
                    connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
        with connected() as connection:
            connection.sendall(asked("/small?n=after"))
            assert _answers(connection, 1) == [b'{"n":"after"}']
