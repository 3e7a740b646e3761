"""What the emulator and the gateway serve with: head deadlines, capped bodies, a prompt stop.

uvicorn closes a connection that sits idle *between* requests (``timeout_keep_alive``), but it
cancels that timer on the first byte of the next request, and starts none for a fresh
connection. A client that connects and sends nothing, or sends a header line every few seconds
and never finishes (slowloris), would hold its connection and task for ever. `HeadDeadline`
gives each request head a deadline from the moment the server starts waiting for it. Nor does
uvicorn bound how long an answer may wait for its client to read it: one that never reads
would hold the answer (a gateway's inline image: tens of MB) and its task for ever. `HeadClock`
closes a connection whose client has not taken a stalled answer's bytes in time.

Imported only with uvicorn installed (the ``emulator`` or ``gateway`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import h11
import uvicorn
from starlette.requests import Request
from starlette.types import Message
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "HeadClock",
    "HeadDeadline",
    "JoinedWrites",
    "LoopbackServer",
    "TooLarge",
    "capped",
    "listening_socket",
]


class HeadClock:
    """A deadline for each request head, for a uvicorn protocol (`HeadDeadline`, the gateway's).

    The protocol calls `_follow_head` after each step of its connection, and says when the
    connection waits for a head (`_waiting_for_head`).

    While it waits, one deadline runs: bytes of an unfinished head do not extend it; a complete
    head stops it, so a slow body or a slow answer is not cut. Past it, the connection is
    closed without an answer, as uvicorn closes an idle keep-alive connection: a 408 sent to a
    client that sent nothing would be read as the answer to its next request.
    """

    head_timeout: ClassVar[float] = 10.0
    send_timeout: ClassVar[float] = 60.0
    """Seconds an answer may make no progress while the connection's send buffer is full (or,
    the answer complete, holds bytes the kernel has not taken; closing waits for them): if
    none of it was taken by the client in that time, the connection is aborted and the bytes
    not yet sent dropped, so a client that stops reading cannot hold an answer for ever. One
    that goes on reading, however slowly, is not cut."""
    _deadline: asyncio.TimerHandle | None = None
    _stalled: asyncio.TimerHandle | None = None
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    _paused = False

    def pause_writing(self) -> None:
        self._paused = True
        super().pause_writing()  # type: ignore[misc]
        if not self.transport.is_closing():
            # From now: bytes were added since any watch before (one kept by `_follow_sends`).
            self._stop_stall()
            self._watch_stall(self._unread())

    def resume_writing(self) -> None:
        self._paused = False
        self._stop_stall()
        super().resume_writing()  # type: ignore[misc]
        self._follow_sends()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._follow_sends()

    def _follow_sends(self) -> None:
        """Watch the bytes left in the buffer once the answer is complete.

        They are below the mark that pauses writing, and nothing will pause it again; closing
        the connection (the next head's deadline, keep-alive's end) waits for them, so a client
        that never reads them would hold the connection for ever.
        """
        if self._stalled is not None or not self.transport.get_write_buffer_size():
            return
        cycle = getattr(self, "cycle", None)
        if self.transport.is_closing() or cycle is None or cycle.response_complete:
            self._watch_stall(self._unread())

    def _watch_stall(self, unread: int) -> None:
        self._stalled = self.loop.call_later(self.send_timeout, self._stall_check, unread)

    def _stall_check(self, unread: int) -> None:
        if not self._paused and not self.transport.get_write_buffer_size():
            self._stalled = None  # all handed to the kernel: nothing holds the connection
            return
        now = self._unread()
        if now < unread:  # the client took some meanwhile
            self._watch_stall(now)
            return
        self._stalled = None
        self.transport.abort()  # not close(): that would wait for the buffer to be read

    def _unread(self) -> int:
        """Bytes written and not yet taken by the client: the transport's, and the kernel's.

        The transport's buffer shrinks only when the kernel's send queue has room for a good
        part of it, after the client has read megabytes: a slow client would look stalled for
        seconds. The queue itself (``SIOCOUTQ``, Linux) shrinks with every read; where it
        cannot be asked, the transport's buffer alone is judged.
        """
        unread = self.transport.get_write_buffer_size()
        with contextlib.suppress(ImportError, AttributeError, OSError, TypeError, ValueError):
            import fcntl
            import termios  # TIOCOUTQ is SIOCOUTQ

            fd = self.transport.get_extra_info("socket").fileno()
            queued = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
            unread += int.from_bytes(queued, sys.byteorder, signed=True)
        return unread

    def _stop_stall(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _waiting_for_head(self) -> bool:
        raise NotImplementedError

    def _closing_unanswered(self) -> None:
        """Tell the parser, if it keeps the connection's state, that it closes now."""

    def _follow_head(self) -> None:
        # Whether it waits first: the cheaper question, and the answer most of the time.
        if not self._waiting_for_head() or self.transport.is_closing():
            self._stop_deadline()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.head_timeout, self._head_too_late)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self._closing_unanswered()
            self.transport.close()


class HeadDeadline(HeadClock, H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head is late (`HeadClock`).

    The connection waits for a head while h11's ``their_state`` is ``IDLE``: from the
    connection, and again from each complete answer.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        self._stop_stall()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_head()

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _closing_unanswered(self) -> None:
        self.conn.send(h11.ConnectionClosed())


_JOINED_BYTES = 64 * 1024
"""Writes are joined up to this many bytes; a larger one goes out as it is (no copy)."""


class _JoinedTransport:
    """A connection's transport whose writes in one step of the event loop go out as one.

    uvicorn writes an answer's head and its body separately: two ``send`` calls, two packets,
    and a client woken twice. Here the first write waits until the next write, or until the
    event loop's next turn at the latest (``call_soon``), so a head and a body sent together
    leave together, and a head whose body comes later (a stream, a slow answer) still leaves at
    once. Closing sends what waits first; aborting drops it, as it drops the rest of the buffer.
    """

    __slots__ = ("_loop", "_transport", "_waiting")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._waiting: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._transport.is_closing():
            # Dropped, as asyncio's own transports drop writes after a close (uvloop's raise):
            # uvicorn's httptools protocol, when a request was pipelined behind the answer
            # under way, marks only that request's exchange as cut off when the connection is
            # lost, so the answer's next write still comes.
            return
        waiting = self._waiting
        if waiting is None:
            if len(data) >= _JOINED_BYTES:
                self._transport.write(data)
            else:
                self._waiting = bytes(data)
                self._loop.call_soon(self._flush)
            return
        self._waiting = None
        if len(waiting) + len(data) <= _JOINED_BYTES:
            self._transport.write(waiting + data)
        else:
            self._transport.write(waiting)
            self._transport.write(data)

    def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not self._transport.is_closing():
            self._transport.write(waiting)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._waiting = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        waiting = self._waiting
        return self._transport.get_write_buffer_size() + (0 if waiting is None else len(waiting))

    def is_closing(self) -> bool:
        # Asked several times an exchange (uvicorn, `HeadClock`): spelled out, as a miss that
        # falls to __getattr__ first raises and catches an AttributeError.
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class JoinedWrites(HeadDeadline):
    """`HeadDeadline`, each answer's head and body sent in one write (`_JoinedTransport`).

    For the gateway, which answers small JSON bodies and small images: one system call and one
    packet less per answer, and the client reads the answer in one go.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _JoinedTransport(transport, self.loop)  # type: ignore[assignment]


class LoopbackServer(uvicorn.Server):
    """uvicorn's server, which a host thread can also stop at once (`stop`).

    uvicorn notices ``should_exit`` at its next tick (every 0.1 s), then waits 0.1 s more and
    for every answer in progress to end: a test that leaves an emulator with a delayed or
    dripping answer outstanding waited for it. `stop` wakes the server at once, closes every
    connection and cuts the answers in progress (their clients see the connection close). A
    foreground server stopped by a signal (``flux-adapters emulate``) still stops as uvicorn does.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        """Set once the server listens (`started`), or failed to start."""
        self._woken = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prompt = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the server runs on, once it started."""
        return self._loop

    @contextlib.contextmanager
    def in_thread(self, sock: socket.socket, what: str, join: float) -> Iterator[None]:
        """Serve *sock* in a daemon thread while the block runs, then `stop`.

        *what* is the server's name in words (``"the emulator"``), for the thread and errors.

        It waits up to 10 s for the server to listen, and up to *join* seconds for the thread to
        end after; *sock* is closed last.

        Raises:
            RuntimeError: The server did not start.
        """

        def run() -> None:
            try:
                self.run(sockets=[sock])
            finally:
                self.ready.set()  # also when it failed before it could start

        name = "flux-" + what.removeprefix("the ")
        thread = threading.Thread(target=run, name=name, daemon=True)
        try:
            thread.start()
            if not self.ready.wait(timeout=10) or not self.started:
                raise RuntimeError(f"{what} did not start")
            yield
        finally:
            # At once: the connections are closed and answers still in progress (a delay, a
            # drip) cut short, instead of waited for.
            self.stop()
            if thread.is_alive():
                thread.join(timeout=join)
            sock.close()

    def stop(self) -> None:
        """Stop the server from another thread without waiting for the answers in progress."""
        self._prompt = True
        self.should_exit = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(self._woken.set)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()

    async def main_loop(self) -> None:
        # uvicorn's loop, ticking every 0.1 s (the Date header, should_exit from a signal), but
        # woken at once by `stop`.
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), 0.1)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self._prompt:
            await super().shutdown(sockets)
            return
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.transport.abort()
        tasks = list(self.server_state.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:  # the app's own shutdown (the gateway closes its clients)
            await self.lifespan.shutdown()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to *host*:*port* and listening, with ``TCP_NODELAY`` for its connections.

    Raises:
        OSError: The address is in use or cannot be bound.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this: without it, uvicorn's separate header and body
        # writes meet the client's delayed ACK and every answer stalls about 40 ms (measured on
        # the emulator: 44 ms -> 0.7 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        # Listening here, not when uvicorn starts, makes the port ours before anyone is told.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class TooLarge(Exception):
    """The request body went past the limit while it was being read."""


def capped(request: Request, limit: int) -> Request:
    """*request*, reading whose body raises `TooLarge` as soon as more than *limit* arrived.

    This covers bodies without a Content-Length (chunked): at most one network chunk past the
    limit is ever held.
    """
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise TooLarge
        return message

    return Request(request.scope, receive)
