"""The one wait before trying again: exponential backoff with full jitter.

The wait before try ``n + 1`` is drawn uniformly from ``[0, min(longest, first * 2**n)]``
("full jitter", https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/):
clients that failed together (a provider's outage, a shared rate limit) spread their retries out
instead of coming back in step. The router (`flux_adapters.routing`) and the result downloader
use it; a wait the provider asked for (``Retry-After``) is honoured as it is, not jittered.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["backoff"]


def backoff(
    tries: int, first: float, longest: float, draw: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after *tries* failed retries (0 before the first retry).

    Args:
        tries: Retries already made.
        first: The ceiling of the first wait; it doubles for each further one.
        longest: The highest the ceiling grows.
        draw: A number in ``[0, 1)``; tests pass a fixed one.
    """
    ceiling = min(longest, first * 2.0 ** min(max(tries, 0), 64))
    return max(0.0, min(draw(), 1.0)) * ceiling
