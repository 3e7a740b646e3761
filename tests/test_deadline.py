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
