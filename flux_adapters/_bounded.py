"""Sockets that keep a deadline: httpcore network streams whose every wait ends by it.

`flux_adapters._transport.bounded_http_client` puts `_BoundedBackend` under the library's own
sync httpx client; within `flux_adapters._transport.bounded_by`, each read, write, connect and
TLS handshake waits no longer than the time left. Per-read timeouts alone cannot end a server
that drips its answer (headers included) a byte at a time. Imported when a client is made:
httpx loads httpcore only then.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from flux_adapters._transport import ENDS

__all__ = ["bound"]


def _left(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    """*timeout*, shortened to the time left before the exchange's deadline.

    Raises:
        httpcore.TimeoutException: *expired*, the kind for this phase, when no time is left.
    """
    ends = ENDS.get()
    if ends is None:
        return timeout
    left = ends - time.monotonic()
    if left <= 0:
        raise expired("the deadline passed")
    return left if timeout is None else min(timeout, left)


class _BoundedStream(httpcore.NetworkStream):
    """A socket stream whose every read, write and TLS handshake ends by the deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        seconds = _left(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._inner.start_tls(ssl_context, server_hostname, seconds))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _BoundedBackend(httpcore.NetworkBackend):
    """Opens `_BoundedStream` connections."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        seconds = _left(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, seconds, local_address, socket_options)
        return _BoundedStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        seconds = _left(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._inner.connect_unix_socket(path, seconds, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def bound(client: httpx.Client) -> bool:
    """Put the bounded backend under each of *client*'s connection pools (proxies included).

    httpx does not let one pass a network backend in, so it is set on its pools; ``False``
    (nothing changed) if a future httpx keeps them elsewhere.
    """
    transports = [client._transport, *client._mounts.values()]
    pools = [getattr(transport, "_pool", None) for transport in transports if transport]
    if not pools or not all(isinstance(pool, httpcore.ConnectionPool) for pool in pools):
        return False
    for pool in pools:
        pool._network_backend = _BoundedBackend(pool._network_backend)  # type: ignore[union-attr]
    return True
