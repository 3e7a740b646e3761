"""`flux_adapters._deadline.within`: ``asyncio.timeout``'s rules, on one timer of the loop.

The gateway reads every call's body under it and a batch downloads every image under it: a
deadline that left its task cancelled, or turned a caller's cancel into a timeout, would break
the caller's own task groups and timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from flux_adapters._deadline import DeadlinePassed, within


async def _sleeps(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


def test_work_in_time_gives_its_value_and_leaves_no_timer() -> None:
    async def main() -> tuple[str, int, int]:
        done = await within(5, _sleeps(0))
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        pending = [t for t in loop._scheduled if not t.cancelled()]  # type: ignore[attr-defined]
        return done, task.cancelling(), len(pending)

    assert asyncio.run(main()) == ("done", 0, 0)


def test_a_deadline_passing_is_deadline_passed_and_the_task_is_not_left_cancelled() -> None:
    async def main() -> tuple[bool, int, str]:
        with pytest.raises(DeadlinePassed) as caught:
            await within(0.05, _sleeps(10))
        task = asyncio.current_task()
        assert task is not None
        after = await _sleeps(0.01)  # no cancellation left pending for the next await
        return isinstance(caught.value, TimeoutError), task.cancelling(), after

    assert asyncio.run(main()) == (True, 0, "done")


def test_a_callers_cancel_stays_a_cancel() -> None:
    async def main() -> str:
        task = asyncio.create_task(within(5, _sleeps(10)))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except DeadlinePassed:
            return "deadline"
        except asyncio.CancelledError:
            return "cancelled"
        return "done"

    assert asyncio.run(main()) == "cancelled"


def test_a_timeout_error_of_the_work_itself_is_not_the_deadlines() -> None:
    async def times_out() -> None:
        raise TimeoutError("the work's own")

    async def main() -> BaseException:
        with pytest.raises(TimeoutError) as caught:
            await within(5, times_out())
        return caught.value

    error = asyncio.run(main())
    assert not isinstance(error, DeadlinePassed)
    assert str(error) == "the work's own"


async def _swallows_its_cancel() -> str:
    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError:
        return "ended anyway"
    return "slept"


async def _turns_its_cancel_into_an_error() -> str:
    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError:
        raise ValueError("turned") from None
    return "slept"


@pytest.mark.parametrize("work", [_swallows_its_cancel, _turns_its_cancel_into_an_error])
def test_a_body_deadline_that_passed_leaves_its_task_as_asyncio_timeout_does(
    work: Callable[[], Awaitable[str]],
) -> None:
    """The deadline cancels its task as it passes; whatever the work does with that
    cancellation (ends anyway, or raises something else), the task's cancel request is taken
    back, as ``asyncio.timeout`` does: one left behind would make the call's later task groups
    and timeouts take a cancel nobody asked for (the gateway's body read under it: the 408)."""

    async def under(kind: str) -> tuple[str, int]:
        task = asyncio.current_task()
        assert task is not None
        try:
            if kind == "asyncio":
                async with asyncio.timeout(0.01):
                    outcome = await work()
            else:
                outcome = await within(0.01, work())
        except ValueError as exc:
            outcome = str(exc)
        return outcome, task.cancelling()

    assert asyncio.run(under("within")) == asyncio.run(under("asyncio"))


async def _under(kind: str, seconds: float, work: Awaitable[str]) -> str:
    """*work* under a deadline of *seconds*, by `within` or ``asyncio.timeout``: what came out."""
    try:
        if kind == "asyncio":
            async with asyncio.timeout(seconds):
                return await work
        return await within(seconds, work)
    except TimeoutError:
        return "deadline"


@pytest.mark.parametrize("kind", ["within", "asyncio"])
def test_deadlines_in_flight_together_each_pass_at_their_own_time(kind: str) -> None:
    """`within`'s deadlines share one timer of the loop: a shorter one begun after a longer
    one must still pass at its own time (the timer moved sooner), the longer ones must not pass
    with it, and a deadline begun after the timer ran must be watched again. ``asyncio.timeout``
    gives the same outcomes."""

    async def main() -> tuple[list[str], list[str], int]:
        go = asyncio.Event()

        async def waits() -> str:
            await go.wait()
            return "done"

        first = [asyncio.create_task(_under(kind, 60, waits())) for _ in range(3)]
        await asyncio.sleep(0)
        short = asyncio.create_task(_under(kind, 0.02, _sleeps(60)))
        # Well before the long ones' timer: a timer left at 60 s would fail this wait.
        assert await asyncio.wait_for(short, 10) == "deadline"
        go.set()
        again = [
            asyncio.create_task(_under(kind, 0.02, _sleeps(60))),
            asyncio.create_task(_under(kind, 60, _sleeps(0))),
        ]
        outcomes = [await task for task in first]
        later = [await task for task in again]
        loop = asyncio.get_running_loop()
        pending = [t for t in loop._scheduled if not t.cancelled()]  # type: ignore[attr-defined]
        return outcomes, later, len(pending)

    assert asyncio.run(main()) == (["done"] * 3, ["deadline", "done"], 0)


def test_a_deadline_is_kept_in_each_new_event_loop() -> None:
    """Each loop has its own watch: a deadline in a second ``asyncio.run`` passes too (a watch
    kept from the first, closed loop would never run its timer)."""

    async def main() -> str:
        return await _under("within", 0.02, _sleeps(60))

    assert [asyncio.run(main()) for _ in range(2)] == ["deadline", "deadline"]


def test_a_deadline_in_a_loop_of_another_thread_passes_while_this_loops_runs() -> None:
    """Two threads' loops using deadlines at once: each passes in its own loop."""
    import threading

    found: list[str] = []

    async def main() -> str:
        return await _under("within", 0.05, _sleeps(60))

    threads = [threading.Thread(target=lambda: found.append(asyncio.run(main()))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert found == ["deadline"] * 4
