"""The gateway's connections on uvicorn's httptools protocol (a C parser) instead of h11.

h11 parses each request and answer head in Python (a regular expression for every header):
about 460 of the 2,600 Python function calls a gateway call makes on uvloop. With httptools it
makes about 27 % fewer instructions per call (docs/benchmarks.md, row m). It keeps what the
h11 protocol (`flux_adapters._serving.JoinedWrites`) gives: a deadline for each request head,
a cap on a head's size (h11's is 16 KiB), a 400 for an HTTP/1.1 request without ``Host`` or
that the parser refuses, sent after the answers of the requests before it, and an answer's head
and body sent in one write.

Imported only when httptools is installed (the ``gateway`` extra brings it); the gateway serves
with `JoinedWrites` otherwise.
"""

from __future__ import annotations

import asyncio
from typing import Final

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flux_adapters._serving import HeadClock, _JoinedTransport

__all__ = ["HttptoolsJoinedWrites"]

MOST_HEAD_BYTES: Final = 16 * 1024
"""A request head that has sent more than this without ending is answered 400 and closed."""


_NO_HOST: Final = b"Invalid HTTP request received."
"""What h11's protocol answers (400) to an HTTP/1.1 request without ``Host``."""


async def _no_host(scope: Scope, receive: Receive, send: Send) -> None:
    """The app that answers a request without ``Host``: 400, and the connection closed."""
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(_NO_HOST)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _NO_HOST})


class HttptoolsJoinedWrites(HeadClock, HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size cap and joined writes.

    The connection waits for a head when every head it received has its message (body
    included) read and its answer sent: from the connection, and again from each complete
    exchange. While it waits, the deadline runs (`HeadClock`) and the bytes received are
    counted against `MOST_HEAD_BYTES`; a complete head stops both.
    """

    _heads = _messages = _answers = _head_bytes = 0
    _refused: str | None = None
    """The 400 owed for bytes the parser refused behind a whole request still being answered."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _JoinedTransport(transport, self.loop)  # type: ignore[assignment]
        self._follow_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        self._stop_stall()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return  # the parser refused what came before: nothing after it is a request
        # `_waiting_for_head`, spelled out: asked twice for every read.
        if self._heads == self._messages == self._answers:
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._heads == self._messages == self._answers:
            self._head_bytes = 0
        elif self._head_bytes > MOST_HEAD_BYTES and not self.transport.is_closing():
            self.send_400_response("Request head too large.")

    def on_headers_complete(self) -> None:
        if self.parser.get_http_version() == "1.1" and not any(
            name == b"host" for name, _ in self.headers
        ):
            # RFC 9112, 3.2, as h11 has it: a 400 and the connection closed, the app never sees
            # the request. Answered in its turn, as uvicorn runs any request: one pipelined
            # behind a generation under way must not cut off that (paid) generation's answer.
            app, self.app = self.app, _no_host
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._heads += 1
        self._follow_head()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._messages += 1
        self._follow_head()

    def send_400_response(self, msg: str) -> None:
        if self._answers < self._messages == self._heads and not self.transport.is_closing():
            # The bytes refused follow whole requests not all answered yet (a paid generation,
            # maybe): uvicorn would answer 400 and close at once, and those answers would be
            # lost. They go first, the 400 after, as on h11, which reads no further meanwhile.
            self._refused = msg
            self.flow.pause_reading()
            return
        super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._answers += 1
        if self._refused is not None and self._waiting_for_head():
            self.send_400_response(self._refused)  # every request before it answered
            return
        self._follow_head()

    def _waiting_for_head(self) -> bool:
        return self._heads == self._messages == self._answers
