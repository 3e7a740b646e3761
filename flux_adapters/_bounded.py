"""How the sync client keeps its deadline, which per-read timeouts alone cannot do.

A server that drips its answer a byte at a time, headers included, each byte within the read
timeout, would hold a blocking call for as long as it likes. So:

- under the library's own sync httpx client (`flux_adapters._transport.bounded_http_client`)
  a network backend whose every read, write, connect and TLS handshake waits no longer than the
  time left (within `flux_adapters._transport.bounded_by`), at no cost per call;
- with a caller's httpx client, whose sockets cannot be reached that way, the send runs on a
  daemon worker thread and the caller stops waiting at the deadline or on Ctrl-C
  (`send_on_worker`).

The same backends, on the library's own clients (sync and async), check where a URL the
provider gave leads (``flux_adapters._addresses``): they resolve the name, refuse a non-public
address, and connect to the very address they checked (TLS still names the host).

Imported on first use: httpx loads httpcore only when a client is made.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import httpcore
import httpx

from flux_adapters._addresses import GUARDED, Target
from flux_adapters._transport import ENDS, deadline_error

__all__ = ["bound", "bound_async", "connection_pools", "needs_lookup", "send_on_worker"]


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


def _check_peer(
    target: Target, stream: httpcore.NetworkStream | httpcore.AsyncNetworkStream
) -> None:
    """Refuse unless the address *stream* is connected to is public.

    For a connection opened without a check (for the base URL, or a trusted provider's URL)
    that the pool reuses for a provider-given URL at the same host and port: no connection is
    opened then, so nothing else would look. A peer that cannot be read (a closed socket, a
    test's stream) is left to the write.
    """
    try:
        peer = stream.get_extra_info("server_addr")
    except OSError:
        return
    if isinstance(peer, tuple) and peer:
        target.check((str(peer[0]),))


class _BoundedStream(httpcore.NetworkStream):
    """A socket stream whose every read, write and TLS handshake ends by the deadline.

    *checked*: its peer is known to be public (opened for a provider-given URL, checked), or
    not to be looked at (a proxy's). Otherwise a write for a provider-given URL checks the
    peer first (`_check_peer`): a connection opened unchecked may be reused for one.
    """

    def __init__(self, inner: httpcore.NetworkStream, checked: bool = False) -> None:
        self._inner = inner
        self._checked = checked

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not self._checked:
            target = GUARDED.get()
            if target is not None:
                _check_peer(target, self._inner)
                self._checked = True
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        seconds = _left(timeout, httpcore.ConnectTimeout)
        stream = self._inner.start_tls(ssl_context, server_hostname, seconds)
        return _BoundedStream(stream, self._checked)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _addresses(found: Iterable[tuple[Any, ...]]) -> list[str]:
    """The addresses of a ``getaddrinfo`` answer, each once, in its order."""
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def _checked(target: Target, found: Iterable[tuple[Any, ...]]) -> list[str]:
    addresses = _addresses(found)
    target.check(addresses)
    return addresses


class _BoundedBackend(httpcore.NetworkBackend):
    """Opens `_BoundedStream` connections; *guarded*: checks provider-given hosts first.

    A proxy's pool is not *guarded*: its connections go to the proxy, which resolves the
    target itself (the caller checks that beforehand, `needs_lookup`).
    """

    def __init__(self, inner: httpcore.NetworkBackend, guarded: bool = True) -> None:
        self._inner = inner
        self.guarded = guarded

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        target = GUARDED.get() if self.guarded else None
        if target is None:
            seconds = _left(timeout, httpcore.ConnectTimeout)
            stream = self._inner.connect_tcp(host, port, seconds, local_address, socket_options)
            return _BoundedStream(stream, checked=not self.guarded)
        # Resolved once, here: the addresses checked are the ones connected to.
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:  # what the inner backend's own lookup would raise
            raise httpcore.ConnectError(str(exc)) from exc
        failed: httpcore.ConnectError | None = None
        for address in _checked(target, found):
            seconds = _left(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(
                    address, port, seconds, local_address, socket_options
                )
            except httpcore.ConnectError as exc:  # the next address, as a plain connect does
                failed = exc
                continue
            return _BoundedStream(stream, checked=True)
        raise failed or httpcore.ConnectError(f"{host} resolved to no address")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        seconds = _left(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_unix_socket(path, seconds, socket_options)
        return _BoundedStream(stream, checked=True)  # no IP address to judge

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _PeerCheckedStream(httpcore.AsyncNetworkStream):
    """An async stream opened without a check: a write for a provider-given URL checks its peer.

    As `_BoundedStream` does for the sync pools (`_check_peer`). Reads, closing and the rest go
    straight to the inner stream's own methods, without a frame of their own.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._checked = False
        self.read = inner.read  # type: ignore[method-assign]
        self.aclose = inner.aclose  # type: ignore[method-assign]
        self.get_extra_info = inner.get_extra_info  # type: ignore[method-assign]

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not self._checked:
            target = GUARDED.get()
            if target is not None:
                _check_peer(target, self._inner)
                self._checked = True
        await self._inner.write(buffer, timeout)

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        if self._checked:
            return stream
        return _PeerCheckedStream(stream)


class _GuardedAsyncBackend(httpcore.AsyncNetworkBackend):
    """The async backend of the library's own httpx pools: checks provider-given hosts first.

    A connection it opens unchecked checks its peer when reused for one (`_PeerCheckedStream`).
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner
        self.guarded = True

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        target = GUARDED.get()
        if target is None:
            stream = await self._inner.connect_tcp(
                host, port, timeout, local_address, socket_options
            )
            return _PeerCheckedStream(stream)
        import anyio  # httpx's own dependency, loaded with httpcore's async backend

        try:
            found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        failed: httpcore.ConnectError | None = None
        for address in _checked(target, found):
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                failed = exc
        raise failed or httpcore.ConnectError(f"{host} resolved to no address")

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


_PROXIES: Final = (httpcore.HTTPProxy, httpcore.SOCKSProxy)
_ASYNC_PROXIES: Final = (httpcore.AsyncHTTPProxy, httpcore.AsyncSOCKSProxy)


def connection_pools(client: httpx.Client | httpx.AsyncClient) -> list[Any]:
    """*client*'s httpcore connection pools (its proxies' included), where httpx keeps them.

    httpx has no public way to reach them; an item is ``None`` for a transport without one.
    """
    transports = [client._transport, *client._mounts.values()]
    return [getattr(transport, "_pool", None) for transport in transports if transport]


def bound(client: httpx.Client) -> bool:
    """Put the bounded backend under each of *client*'s connection pools (proxies included).

    httpx does not let one pass a network backend in, so it is set on its pools; ``False``
    (nothing changed) if a future httpx keeps them elsewhere.
    """
    pools = connection_pools(client)
    if not pools or not all(isinstance(pool, httpcore.ConnectionPool) for pool in pools):
        return False
    for pool in pools:
        guarded = not isinstance(pool, _PROXIES)
        pool._network_backend = _BoundedBackend(pool._network_backend, guarded)
    return True


def bound_async(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """*client*, its direct connection pools checking provider-given hosts (not its proxies')."""
    for pool in connection_pools(client):
        if isinstance(pool, httpcore.AsyncConnectionPool) and not isinstance(pool, _ASYNC_PROXIES):
            pool._network_backend = _GuardedAsyncBackend(pool._network_backend)
    return client


def needs_lookup(http: httpx.Client | httpx.AsyncClient, url: str) -> bool:
    """Whether a provider-given *url* must be resolved and checked before *http* sends to it.

    ``False`` when the library's backend checks its host where it connects, or when the
    transport is not httpx's own network transport (a caller's ``MockTransport``, ASGI or
    other transport decides where its bytes go). ``True`` for httpx's transport on a caller's
    client, or through a proxy: the host is then checked beforehand (`Target.check_resolved`),
    best effort.
    """
    try:
        transport = http._transport_for_url(httpx.URL(url))
    except (httpx.InvalidURL, ValueError, TypeError):
        return False  # a URL httpx cannot send: it fails when the request is built
    if not isinstance(transport, httpx.HTTPTransport | httpx.AsyncHTTPTransport):
        return False
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    return not (isinstance(backend, _BoundedBackend | _GuardedAsyncBackend) and backend.guarded)


class _Workers:
    """Daemon threads that run blocking sends for callers that may stop waiting for them.

    Daemon threads, not a ``ThreadPoolExecutor``, whose threads the interpreter joins at exit: a
    send given up on may still be blocked on its server, and must not hold up the process.
    Idle threads wait for the next send, so a call does not pay for starting one.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)  # no thread survives a fork

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def submit(self, task: Callable[[], None]) -> None:
        """Run *task* (which must not raise) on an idle thread, or on a new one."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._tasks.put(task)
                return
        threading.Thread(
            target=self._work, args=(task,), name="flux-adapters-send", daemon=True
        ).start()

    def _work(self, task: Callable[[], None]) -> None:
        while True:
            task()
            with self._lock:
                self._idle += 1
                tasks = self._tasks
            task = tasks.get()


_WORKERS: Final = _Workers()
_SIGNAL_SLICE: Final = 0.05
"""Seconds between looks at pending signals (Ctrl-C) while waiting for a worker."""


class _Send:
    """``http.send(request)`` on a worker thread, which its caller may give up on."""

    def __init__(self, http: httpx.Client, request: httpx.Request) -> None:
        self._http = http
        self._request = request
        self._context = contextvars.copy_context()  # the caller's (tracing spans, ...)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._sockets: list[socket.socket] = []
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        traced = request.extensions.get("trace")

        def trace(event: str, info: dict[str, object]) -> None:
            # httpcore's hook: the socket of a connection opened for this request, to shut down
            # if the caller gives up (a connection taken from the pool cannot be reached).
            if event == "connection.connect_tcp.complete":
                self._opened(info.get("return_value"))
            if traced is not None:
                traced(event, info)

        request.extensions = {**request.extensions, "trace": trace}

    def run(self) -> None:
        try:
            response = self._context.run(
                self._http.send, self._request, stream=True, auth=None, follow_redirects=False
            )
        except BaseException as exc:  # handed to the caller, KeyboardInterrupt included
            self.error = exc
        else:
            with self._lock:
                late = self._abandoned
                self.response = response
            if late:
                response.close()
        finally:
            self._done.set()

    def wait(self, ends: float) -> bool:
        """Wait for the send until *ends*; ``False`` if it has not finished by then."""
        while True:
            left = ends - time.monotonic()
            if left <= 0:
                return self._done.is_set()
            # In slices: a blocked Event.wait does not wake for a signal on Linux, and Ctrl-C
            # must interrupt the caller within a moment, not when the answer comes.
            if self._done.wait(min(left, _SIGNAL_SLICE)):
                return True

    def abandon(self) -> None:
        """Stop waiting: close an answer that came, shut the connection this send opened."""
        with self._lock:
            self._abandoned = True
            response, sockets = self.response, list(self._sockets)
        if response is not None:
            response.close()
        for opened in sockets:
            _shut(opened)

    def _opened(self, stream: object) -> None:
        try:
            opened = stream.get_extra_info("socket")  # type: ignore[attr-defined]
        except Exception:  # a network backend of another kind
            return
        if not isinstance(opened, socket.socket):
            return
        with self._lock:
            self._sockets.append(opened)
            late = self._abandoned
        if late:
            _shut(opened)


def _shut(opened: socket.socket) -> None:
    # shutdown(), not close(): it wakes a thread blocked reading the socket.
    with contextlib.suppress(OSError):
        opened.shutdown(socket.SHUT_RDWR)


def send_on_worker(
    http: httpx.Client, request: httpx.Request, ends: float, provider: str, deadline: float
) -> httpx.Response:
    """``http.send(request, stream=True)`` on a worker thread, waited for until *ends*.

    Given up (the deadline, Ctrl-C), the connection the send opened is shut down so the worker
    ends too, and an answer that comes later is closed unread.

    Raises:
        Timeout: *ends* passed first (``sent=True``: the provider may have the request).
        Exception: Whatever ``http.send`` raised.
    """
    send = _Send(http, request)
    try:
        _WORKERS.submit(send.run)
        finished = send.wait(ends)
    except BaseException:  # Ctrl-C while starting the worker or waiting for it
        send.abandon()
        raise
    if not finished:
        send.abandon()
        raise deadline_error(provider, deadline)
    if send.error is not None:
        error, send.error = send.error, None
        raise error
    assert send.response is not None
    return send.response
