"""A hostile Redis for the tests: a loopback TCP server that speaks just enough RESP.

It answers a connection's handshake (``HELLO`` as Redis 7 does; ``CLIENT``, ``SELECT``,
``PING``, ``AUTH`` with ``+OK``)
and every other command with what the test's *answer* function returns for it: a `Reply` that
can be delayed, dripped a byte at a time, be an error or garbage, or close the connection.
It is for what a real redis-server cannot be made to do (tests/redis_server.py starts a real
one for everything else): drip a reply, answer a script with the wrong shape, or return an
error reply such as ``-OOM`` on demand.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from attrs import frozen

__all__ = ["HostileRedis", "Reply", "bulk", "hostile_redis", "resp"]


@frozen
class Reply:
    """What the server sends for one command.

    ``data``: the bytes (RESP or garbage); ``delay``: seconds before the first byte;
    ``drip``: when set, the bytes go one at a time, this many seconds apart; ``close``: close
    the connection after sending; ``tail``: see below.
    """

    data: bytes
    delay: float = 0.0
    drip: float | None = None
    close: bool = False
    tail: int = 0
    """Bytes (``a``) sent after *data*, as fast as the client takes them: a huge answer made
    without holding it in memory. `HostileRedis.tail_sent` counts those the client took."""


def bulk(value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def resp(value: object) -> bytes:
    """*value* in RESP2: ``None`` nil, int an integer, str/bytes a bulk string, list an array."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bool):
        return b":%d\r\n" % int(value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str | bytes):
        return bulk(value)
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(resp(item) for item in value)
    raise TypeError(f"no RESP for {type(value).__name__}")


_HANDSHAKE = {b"CLIENT", b"SELECT", b"PING", b"AUTH"}


class HostileRedis:
    """The running server; ``url`` is its ``redis://`` URL, ``commands`` what it received."""

    def __init__(
        self, answer: Callable[[list[bytes]], Reply], *, hello: bytes | None = None
    ) -> None:
        self.answer = answer
        self.hello = hello or b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n"
        self.commands: list[list[bytes]] = []
        self.tail_sent = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._stopped = threading.Event()
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while not self._stopped.is_set():
                command = _read_command(reader)
                if command is None:
                    return
                if command[0].upper() == b"HELLO":  # redis-py 8 speaks RESP3 by default
                    conn.sendall(self.hello)
                    continue
                if command[0].upper() in _HANDSHAKE:
                    conn.sendall(b"+OK\r\n")
                    continue
                with self._lock:
                    self.commands.append(command)
                reply = self.answer(command)
                if not self._send(conn, reply):
                    return
                if reply.close:
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                reader.close()
                conn.close()

    def _send(self, conn: socket.socket, reply: Reply) -> bool:
        if reply.delay and self._stopped.wait(reply.delay):
            return False
        if reply.drip is None:
            conn.sendall(reply.data)
            chunk = b"a" * 65536
            left = reply.tail
            while left > 0:
                conn.sendall(chunk[:left])
                with self._lock:
                    self.tail_sent += min(left, len(chunk))
                left -= len(chunk)
            return True
        for i in range(len(reply.data)):
            conn.sendall(reply.data[i : i + 1])
            if self._stopped.wait(reply.drip):
                return False
        return True

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


def _read_command(reader: BinaryIO) -> list[bytes] | None:
    """One RESP array of bulk strings (what redis-py sends); ``None`` at the end."""
    head = reader.readline()
    if not head:
        return None
    if not head.startswith(b"*"):
        return head.split()  # an inline command
    parts = []
    for _ in range(int(head[1:])):
        size = int(reader.readline()[1:])
        parts.append(reader.read(size + 2)[:-2])
    return parts


@contextmanager
def hostile_redis(
    answer: Callable[[list[bytes]], Reply], *, hello: bytes | None = None
) -> Iterator[HostileRedis]:
    """A running `HostileRedis`; *hello*: its answer to ``HELLO`` (default: Redis 7's shape)."""
    server = HostileRedis(answer, hello=hello)
    try:
        yield server
    finally:
        server.stop()
