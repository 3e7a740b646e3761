"""Shared fixtures: small real images, and a Hypothesis profile that keeps CI time bounded."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import httpx
import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

from flux_adapters import get_adapter
from flux_adapters._flows import is_job_adapter
from flux_adapters.providers import Adapter

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config: pytest.Config) -> None:
    """Give SIGINT back its default when the suite was started with it ignored.

    A non-interactive shell starts a background command (``make test &``, ``nohup``) with SIGINT
    ignored, and every process it starts inherits that: the commands the tests stop with Ctrl-C
    (``edit``, ``batch``, ``serve``) would never hear it, and their tests wait out their
    timeouts and fail. A Python handler here is reset to the default in each child.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


CLIENT_KINDS = ("sync", "aiohttp", "httpx")
"""What a test that runs on every client takes: FluxClient, then AsyncFluxClient with each of its
drivers (``driver=kind``), so a fault gives the same typed error and ``sent`` on all three."""

ASYNC_DRIVERS = ("aiohttp", "httpx")
"""AsyncFluxClient's drivers."""


def driver(kind: str) -> Literal["aiohttp", "httpx"]:
    """*kind* (one of `ASYNC_DRIVERS`) as AsyncFluxClient's ``driver=`` takes it."""
    assert kind in ASYNC_DRIVERS, kind
    return cast(Literal["aiohttp", "httpx"], kind)


_Server = TypeVar("_Server", bound=socketserver.BaseServer)


@contextmanager
def serving(server: _Server) -> Iterator[_Server]:
    """Run *server* (a `socketserver` server, e.g. an ``http.server`` one) in a thread; stop it on exit.

    ``serve_forever`` looks for a stop every ``poll_interval``, 0.5 s by default, which each
    ``shutdown()`` waited out; 10 ms costs no measurable CPU.
    """
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A new, empty folder whose path a message shows whole, for tests that compare messages.

    Messages keep only the last 80 characters of a longer path; pytest's own ``tmp_path`` can
    pass that with a file name in it (a long user name, ``popen-gw0/`` under pytest-xdist).
    """
    with tempfile.TemporaryDirectory(prefix="flux-") as folder:
        yield Path(folder)


def image_bytes(width: int = 64, height: int = 48, fmt: str = "PNG", color: str = "red") -> bytes:
    """A real image of the given size and format."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format=fmt)
    return buffer.getvalue()


@contextmanager
def held_at_the_provider() -> Iterator[threading.Event]:
    """The next call an emulator of this process (`run_emulator`) works on is held there, read
    and not yet answered, until the block ends; the event is set once it is held. Released by
    the test, not by a timer."""
    from flux_adapters.emulator import _app  # the emulator extra: only where it is used

    reached, release = threading.Event(), threading.Event()
    render = _app._rendered

    def holding(job: Any) -> bytes:  # in a worker thread of the emulator
        if not reached.is_set():  # the first call only
            reached.set()
            release.wait(30)  # bounded
        return render(job)

    _app._rendered = holding
    try:
        yield reached
    finally:
        release.set()
        _app._rendered = render


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to resolve a host other than loopback."""
    real = socket.getaddrinfo

    def loopback_only(host: object, *args: object, **kwargs: object) -> object:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in {"localhost", "::1"} and not name.startswith("127."):
            raise OSError(f"tests may not reach the network (tried {name})")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


def call_adapter(name: str) -> Adapter:
    """The adapter of a synchronous provider (one call), typed as one."""
    adapter = get_adapter(name)
    assert not is_job_adapter(adapter), name
    return cast(Adapter, adapter)


class SubmitRewritten(httpx.AsyncBaseTransport):
    """A real transport (to the emulator), each POST's JSON answer changed by *rewrite*.

    *rewrite* is given the answer's body (to change in place) and the request: a provider that
    echoes what it was sent, or reports what it likes, in its submit answers.
    """

    def __init__(self, rewrite: Callable[[dict[str, Any], httpx.Request], None]) -> None:
        self._real = httpx.AsyncHTTPTransport()
        self._rewrite = rewrite

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        answer = await self._real.handle_async_request(request)
        if request.method != "POST":
            return answer
        body = json.loads(await answer.aread())
        self._rewrite(body, request)
        return httpx.Response(answer.status_code, json=body)

    async def aclose(self) -> None:
        await self._real.aclose()
