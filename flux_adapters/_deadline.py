"""Deadlines on one timer of the event loop: ``asyncio.timeout``'s rules at a fraction of its cost.

``async with asyncio.timeout(s)`` makes a ``Timeout`` object, enters and leaves it through two
coroutines and reschedules its timer: about 30 of asyncio's Python calls, 4.8 us on uvloop.
The paths that pay it on every call (a gateway call's body, a batch job's download) use
`within` instead, with the same rules for what comes out. Its deadlines, like the aiohttp
driver's exchanges (`flux_adapters._aiohttp`), are entries of a `Watch`: one timer of the loop
for all of them, not a timer each. Imported on first use, by code already running on an event
loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar

__all__ = ["DeadlinePassed", "Watch", "within"]

_T = TypeVar("_T")
_EARLY: Final = 1e-6
"""A timer may run this much before its time (the loop's clock resolution): counted as on time."""
_NO_CONTEXT: Final = contextvars.Context()


class Watched(Protocol):
    """What a `Watch` watches: a deadline (or a clock of several) that may pass."""

    def check(self, now: float) -> float | None:
        """The soonest it could pass, seen at *now*; ``None`` once it passed (and acted on it)."""


class Watch:
    """The deadlines of one event loop (`Watched`), on a single timer of that loop.

    A timer per deadline (``loop.call_at``, then cancelled) costs more the more are pending: a
    ``TimerHandle``, its place in the loop's heap (found by comparisons written in Python, about
    log2 of the timers pending, cancelled ones included until the loop clears them) and the
    loop's clean-ups of cancelled ones: about 20 k instructions a deadline at 200 in flight.
    Here a deadline is an entry in a dict; the one timer is set for the earliest moment any
    could pass and, when it runs, looks at every entry (each that passed acts: cancels its
    task) and is set again for the earliest left. A deadline that ends in time adds its entry
    and removes it; the timer is moved only for one that could pass sooner than any before it.
    """

    __slots__ = ("_clocks", "_handle", "_when", "loop", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # asyncio's own loops read time.monotonic in a Python method: called directly here
        # (a clock reads it twice an exchange); any other loop (uvloop) through its own.
        bound = loop.time
        same = getattr(bound, "__func__", None) is asyncio.BaseEventLoop.time
        self.time: Callable[[], float] = time.monotonic if same else bound
        """The loop's clock."""
        self._clocks: dict[Watched, None] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._when = math.inf
        """When the timer runs (``inf``: no timer)."""

    def add(self, clock: Watched, when: float) -> None:
        """Watch *clock*, which could pass at *when* at the soonest."""
        self._clocks[clock] = None
        if when < self._when:
            self._set(when)

    def remove(self, clock: Watched) -> None:
        """Stop watching *clock* (its work is over).

        The timer stays: it runs for nothing at worst, and is already set for the next
        entry, which passes later.
        """
        self._clocks.pop(clock, None)

    def release(self, clock: Watched) -> None:
        """`remove`, and no timer left behind if nothing else is watched."""
        clocks = self._clocks
        clocks.pop(clock, None)
        if not clocks and self._handle is not None:
            self._handle.cancel()
            self._handle, self._when = None, math.inf

    def close(self) -> None:
        """No more timer, unless something is still watched (its owner closed)."""
        if self._handle is not None and not self._clocks:
            self._handle.cancel()
            self._handle, self._when = None, math.inf

    def _set(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._when = when
        # No context of the caller's: the timer's callback reads none.
        self._handle = self.loop.call_at(when, self._fire, context=_NO_CONTEXT)

    def _fire(self) -> None:
        self._handle, self._when = None, math.inf
        now = self.time() + _EARLY
        soonest = math.inf
        for clock in list(self._clocks):
            when = clock.check(now)
            if when is None:  # passed: its work ends with the error, and removes it
                del self._clocks[clock]
            elif when < soonest:
                soonest = when
        if soonest < math.inf:
            self._set(soonest)


class DeadlinePassed(TimeoutError):
    """The deadline of `within` passed and its work was cancelled.

    A `TimeoutError`, as ``asyncio.timeout`` raises; one the work raised itself is not this.
    """


class _Deadline:
    """One `within`'s deadline, as its loop's `Watch` watches it."""

    __slots__ = ("ends", "passed", "task")

    def __init__(self, task: asyncio.Task[object], ends: float) -> None:
        self.task = task
        self.ends = ends
        self.passed = False

    def check(self, now: float) -> float | None:
        if now < self.ends:
            return self.ends
        self.passed = True  # the deadline passed: cancel the task, and say so
        self.task.cancel()
        return None


_watch: Watch | None = None
"""The watch of the loop that last ran `within` (each loop gets its own)."""


async def within(seconds: float, work: Awaitable[_T]) -> _T:
    """``await work``, raising `DeadlinePassed` if *seconds* pass first.

    As under ``asyncio.timeout``: when the deadline passes the task is cancelled, and the
    cancellation is taken back when it ends (`asyncio.Task.uncancel`), however it ends;
    it becomes `DeadlinePassed` only if it was the deadline's alone. A cancellation of the
    caller's (before the deadline, or in the same turn of the loop) stays a
    `asyncio.CancelledError`. No timer is left behind once the last deadline in the loop ends.
    """
    global _watch
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    if task is None:  # pragma: no cover - asyncio runs every coroutine in a task
        raise RuntimeError("a deadline needs an asyncio task to cancel")
    watch = _watch
    if watch is None or watch.loop is not loop:
        # Another loop ran the last one (or none has): this loop's watch from now on. One in
        # another thread that still runs keeps its own, and its deadlines keep theirs.
        watch = _watch = Watch(loop)
    cancelling = task.cancelling()
    deadline = _Deadline(task, watch.time() + seconds)
    watch.add(deadline, deadline.ends)
    try:
        done = await work
    except asyncio.CancelledError as cancelled:
        if deadline.passed and task.uncancel() <= cancelling:
            raise DeadlinePassed from cancelled
        raise
    except BaseException:
        if deadline.passed:
            task.uncancel()
        raise
    finally:
        watch.release(deadline)
    if deadline.passed:  # passed as the work ended: the cancellation is taken back
        task.uncancel()
    return done
