"""Calling code this library does not own: a provider package's module, adapter and methods.

Such code may fail in any way, not only with an ``Exception``: a ``BaseException`` subclass of
its own, an exception whose ``__str__`` raises. Each failure is mapped into the `FluxError` tree
at the boundary, except an interruption, which is the caller's and goes on up untouched.
"""

from __future__ import annotations

import sys

__all__ = ["is_interruption"]


def is_interruption(error: BaseException) -> bool:
    """Whether *error* stops the program or a task rather than reporting the code's own failure.

    Ctrl-C (``KeyboardInterrupt``), ``SystemExit`` (``sys.exit``, also from a SIGTERM handler
    that may run in the middle of a plugin's import), a generator being closed and an asyncio
    task being cancelled. Anything else a plugin raises is its failure.
    """
    if isinstance(error, KeyboardInterrupt | SystemExit | GeneratorExit):
        return True
    # No CancelledError can exist before asyncio is imported; importing it here would cost
    # every synchronous caller a large import.
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and isinstance(error, asyncio.CancelledError)
