"""``python -m tests.dumped_worker ARGS...``: ``flux-adapters ARGS...`` that tells where it is stuck.

On SIGUSR1 it writes to stderr the stack of every thread (`faulthandler`, at once, even with
the interpreter stuck in C) and then of every asyncio task (once the loop gets control back),
and goes on. A test that gives up waiting for a worker sends it SIGUSR1 first
(`tests.test_shared_batch.finish`): a hang seen once leaves the evidence to diagnose it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import signal
import sys
import types

from flux_adapters.cli import main


def _awaits(coroutine: object, out: io.StringIO) -> None:
    """Each frame of the chain of awaits from *coroutine* down to what it waits on."""
    for _ in range(100):
        frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "gi_frame", None)
        if frame is None:
            out.write(f"    waiting on {coroutine!r}\n"[:2000])
            return
        code = frame.f_code
        out.write(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n')
        following = getattr(coroutine, "cr_await", None) or getattr(coroutine, "gi_yieldfrom", None)
        if following is None:
            return
        coroutine = following


def _tasks(signum: int, frame: types.FrameType | None) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        sys.stderr.write("--- no asyncio loop running\n")
        return
    out = io.StringIO()
    tasks = asyncio.all_tasks(loop)
    out.write(f"--- {len(tasks)} asyncio tasks\n")
    for task in tasks:
        out.write(f"{task!r}\n"[:2000])
        _awaits(task.get_coro(), out)
    sys.stderr.write(out.getvalue())
    sys.stderr.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _tasks)
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
    sys.argv[0] = "flux-adapters"
    sys.exit(main())
