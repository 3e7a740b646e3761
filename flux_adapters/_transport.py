"""What both clients and the downloader share to talk HTTP safely.

- httpx (and aiohttp) failures become `TransportError` with ``sent`` saying whether the provider
  may have the request, with every message scrubbed of the client's keys;
- per-phase timeouts never outlast the overall deadline of an exchange;
- a body is read within a size cap and a deadline: a slow-drip server or a 2 GB answer cannot
  hold a call or fill memory.

A deadline is enforced exactly by the async client (``asyncio.timeout``). The sync client checks
it after every chunk and caps each phase's timeout at it, so a call ends within the deadline
plus at most one read wait (itself no longer than the deadline).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Final

import httpx

from flux_adapters._redact import redact
from flux_adapters.errors import FluxError, ResponseFormatError, Timeout, TransportError
from flux_adapters.wire import ERROR_BODY_BYTES, MAX_ANSWER_BYTES, HttpResponse

__all__ = [
    "AnswerBody",
    "deadline_error",
    "mapped_transport_errors",
    "phase_timeouts",
    "proves_not_sent",
]

_MB: Final = 1024 * 1024


def phase_timeouts(timeout: httpx.Timeout, deadline: float) -> httpx.Timeout:
    """*timeout* with no phase (connect, write, read, pool) longer than *deadline*."""

    def cap(value: float | None) -> float:
        return deadline if value is None else min(value, deadline)

    return httpx.Timeout(
        connect=cap(timeout.connect),
        read=cap(timeout.read),
        write=cap(timeout.write),
        pool=cap(timeout.pool),
    )


def proves_not_sent(exc: BaseException) -> bool:
    """Whether a transport failure proves the provider never received the whole request."""
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) and exc.__cause__ else exc
    if type(cause).__module__.partition(".")[0] == "aiohttp":
        # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout, including a
        # disconnect after the body was sent; only aiohttp's connector errors prove it unsent.
        import aiohttp

        return isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    # A write timeout or a local protocol error means the body was not fully written, so the
    # provider cannot have a complete request; a proxy error happens before it is forwarded.
    return isinstance(
        exc,
        httpx.ConnectError
        | httpx.ConnectTimeout
        | httpx.PoolTimeout
        | httpx.WriteTimeout
        | httpx.LocalProtocolError
        | httpx.UnsupportedProtocol
        | httpx.ProxyError,
    )


def _transport_error(exc: BaseException, provider: str, scrub: Callable[[str], str]) -> FluxError:
    sent = not proves_not_sent(exc)
    if isinstance(exc, httpx.TimeoutException | TimeoutError) or isinstance(
        exc.__cause__, TimeoutError
    ):
        what = (
            "timed out waiting for the answer" if sent else "timed out before the request was sent"
        )
        return Timeout(f"{what} ({type(exc).__name__})", provider=provider, sent=sent)
    what = "the connection failed" if sent else "could not send the request"
    detail = scrub(f"{type(exc).__name__}: {exc}")[:300]
    return TransportError(f"{what} ({detail})", provider=provider, sent=sent)


@contextlib.contextmanager
def mapped_transport_errors(provider: str, scrub: Callable[[str], str] = redact) -> Iterator[None]:
    """Re-raise transport failures as ours, saying whether the provider may have the request.

    *scrub* removes the client's keys from the message (an ``Illegal header value`` error
    quotes the header it refused).
    """
    try:
        yield
    except FluxError:
        raise
    except httpx.TransportError as exc:
        raise _transport_error(exc, provider, scrub) from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        # TooManyRedirects, DecodingError, stream errors, or a Location header httpx cannot
        # parse (InvalidURL is no HTTPError): an answer came, and it is unusable.
        message = scrub(f"the answer could not be read ({type(exc).__name__}: {exc})")[:300]
        raise TransportError(message, provider=provider, sent=True) from exc
    except (TimeoutError, OSError) as exc:
        # Raw failures some transports let through (asyncio timeouts, aiohttp client errors).
        raise _transport_error(exc, provider, scrub) from exc
    except Exception as exc:
        if type(exc).__module__.partition(".")[0] != "aiohttp":
            raise
        raise _transport_error(exc, provider, scrub) from exc


def deadline_error(provider: str, deadline: float) -> Timeout:
    """The error for an exchange that passed its overall deadline (the job may be done)."""
    return Timeout(
        f"no complete answer within the deadline of {deadline:g} s", provider=provider, sent=True
    )


def declared_length(response: httpx.Response) -> int | None:
    """The ``Content-Length`` the server declared, when it is a plain number."""
    value = response.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


class AnswerBody:
    """Reads the answer to a POST within its size cap and deadline.

    A 2xx is read up to `MAX_ANSWER_BYTES` (more is an error); an error status up to
    `ERROR_BODY_BYTES` (the rest is not read: the status already says enough).

    Feed it the body's chunks with `take` until it returns ``False``, then call `finish`.
    """

    def __init__(
        self, response: httpx.Response, provider: str, deadline: float, ends: float | None
    ) -> None:
        self._response = response
        self._provider = provider
        self._deadline = deadline
        self._ends = ends
        self._success = 200 <= response.status_code < 300
        self._chunks: list[bytes] = []
        self._size = 0
        declared = declared_length(response)
        if self._success and declared is not None and declared > MAX_ANSWER_BYTES:
            raise self.too_large()
        self._check_time()

    def _check_time(self) -> None:
        if self._ends is not None and time.monotonic() > self._ends:
            raise deadline_error(self._provider, self._deadline)

    def too_large(self) -> ResponseFormatError:
        """The error for an answer over the cap."""
        return ResponseFormatError(
            f"the answer is larger than {math.ceil(MAX_ANSWER_BYTES / _MB)} MB",
            provider=self._provider,
            status_code=self._response.status_code,
        )

    def unreadable(self, why: str) -> ResponseFormatError:
        """The error for an answer whose body cannot be decoded."""
        return ResponseFormatError(
            why, provider=self._provider, status_code=self._response.status_code
        )

    def take(self, chunk: bytes) -> bool:
        """Keep *chunk*; ``False`` when no more of the body is wanted."""
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._success and self._size > MAX_ANSWER_BYTES:
            raise self.too_large()
        self._check_time()
        return self._success or self._size <= ERROR_BODY_BYTES

    def finish(self) -> HttpResponse:
        """The answer as read."""
        return HttpResponse(
            status_code=self._response.status_code,
            # multi_items() walks the headers once; dict(headers) looks each name up again.
            headers=dict(self._response.headers.multi_items()),
            content=b"".join(self._chunks),
        )
