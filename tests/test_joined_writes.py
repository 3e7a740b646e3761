"""The gateway's connections send an answer's head and body in one write (`_JoinedTransport`)."""

from __future__ import annotations

import asyncio

from flux_adapters._serving import _JOINED_BYTES, _JoinedTransport


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
