"""The gateway's connections on uvicorn's httptools protocol (a C parser) instead of h11.

h11 parses each request and answer head in Python (a regular expression for every header):
about 460 of the 2,600 Python function calls a gateway call makes. With httptools the gateway
makes about 30 % fewer instructions per call (docs/benchmarks.md, row m). It keeps what the
h11 protocol (`flux_adapters._serving.JoinedWrites`) gives: a deadline for each request head,
a cap on a head's size (h11's is 16 KiB), and an answer's head and body sent in one write.

Imported only when httptools is installed (the ``gateway`` extra brings it); the gateway serves
with `JoinedWrites` otherwise.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flux_adapters._serving import _JoinedTransport

__all__ = ["HttptoolsJoinedWrites"]

MOST_HEAD_BYTES: Final = 16 * 1024
"""A request head that has sent more than this without ending is answered 400 and closed."""


class HttptoolsJoinedWrites(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size cap and joined writes.

    The connection waits for a head when every head it received has its message (body
    included) read and its answer sent: from the connection, and again from each complete
    exchange. While it waits, the deadline runs (bytes of an unfinished head do not extend
    it) and the bytes received are counted against `MOST_HEAD_BYTES`; a complete head stops
    both, so a slow body or a slow answer is not cut.
    """

    head_timeout: ClassVar[float] = 10.0
    _deadline: asyncio.TimerHandle | None = None
    _heads = _messages = _answers = _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _JoinedTransport(transport, self.loop)  # type: ignore[assignment]
        self._follow_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._waiting():
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._waiting():
            self._head_bytes = 0
        elif self._head_bytes > MOST_HEAD_BYTES and not self.transport.is_closing():
            self.send_400_response("Request head too large.")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._heads += 1
        self._follow_head()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._messages += 1
        self._follow_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._answers += 1
        self._follow_head()

    def _waiting(self) -> bool:
        return self._heads == self._messages == self._answers

    def _follow_head(self) -> None:
        if self.transport.is_closing() or not self._waiting():
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
            # Closed without an answer, as the h11 protocol does (`HeadDeadline`).
            self.transport.close()
