"""`HeadClock`'s send timeout, step by step: a protocol on a transport whose buffer the test sets,
and a loop whose timers the test fires (no clock, no socket: the kernel's queue is not asked)."""

from __future__ import annotations

from typing import Any

from flux_adapters._serving import HeadClock


class Transport:
    def __init__(self) -> None:
        self.buffered = 0
        self.closing = self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> Any:
        return None  # no socket: the buffer alone is judged


class Timer:
    def __init__(self, callback: Any, args: tuple[Any, ...]) -> None:
        self.callback, self.args, self.cancelled = callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self.timers: list[Timer] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> Timer:
        timer = Timer(callback, args)
        self.timers.append(timer)
        return timer

    def fire(self) -> None:
        """Run the timers due (every one pending: each is the send timeout from its start)."""
        due, self.timers = [t for t in self.timers if not t.cancelled], []
        for timer in due:
            timer.callback(*timer.args)

    @property
    def pending(self) -> int:
        return sum(not t.cancelled for t in self.timers)


class Cycle:
    response_complete = False


class Base:
    """What uvicorn's protocol does around the clock: nothing, here."""

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def on_response_complete(self) -> None:
        self.cycle.response_complete = True  # type: ignore[attr-defined]


class Protocol(HeadClock, Base):
    def __init__(self) -> None:
        self.transport = Transport()  # type: ignore[assignment]
        self.loop = Loop()  # type: ignore[assignment]
        self.cycle = Cycle()

    def _waiting_for_head(self) -> bool:
        return False


def test_an_answer_complete_with_bytes_left_below_the_pause_mark_is_watched() -> None:
    protocol, transport = Protocol(), Transport()
    protocol.transport = transport  # type: ignore[assignment]
    transport.buffered = 30_000  # the kernel took the rest; never paused
    protocol.on_response_complete()
    transport.closing = True  # the next head's deadline closes it: close() waits for them
    protocol.loop.fire()  # type: ignore[attr-defined]
    assert transport.aborted


def test_bytes_a_resume_left_once_the_answer_is_complete_are_watched() -> None:
    protocol = Protocol()
    transport: Transport = protocol.transport  # type: ignore[assignment]
    transport.buffered = 200_000
    protocol.pause_writing()
    protocol.on_response_complete()  # one write: complete while paused
    transport.buffered = 10_000  # the client read a little, then stopped
    protocol.resume_writing()
    transport.closing = True
    protocol.loop.fire()  # type: ignore[attr-defined]
    assert transport.aborted


def test_a_client_reading_while_an_answer_goes_on_is_not_cut() -> None:
    # A resume mid-answer is progress; the writes that follow raise the bytes owed, and the
    # watch counts from the next pause, not from before them.
    protocol = Protocol()
    transport: Transport = protocol.transport  # type: ignore[assignment]
    loop: Loop = protocol.loop  # type: ignore[assignment]
    transport.buffered = 70_000
    protocol.pause_writing()
    transport.buffered = 10_000
    protocol.resume_writing()
    assert loop.pending == 0  # the answer goes on: the next pause will say
    transport.buffered = 140_000  # the next chunks
    protocol.pause_writing()
    transport.buffered = 120_000  # read some: progress
    loop.fire()
    assert not transport.aborted
    assert loop.pending == 1


def test_a_watch_ends_once_the_buffer_is_handed_to_the_kernel() -> None:
    protocol = Protocol()
    transport: Transport = protocol.transport  # type: ignore[assignment]
    loop: Loop = protocol.loop  # type: ignore[assignment]
    transport.buffered = 30_000
    protocol.on_response_complete()
    transport.buffered = 0  # the client read it all
    loop.fire()
    assert not transport.aborted
    assert loop.pending == 0
