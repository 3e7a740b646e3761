"""A loopback server that speaks every provider's dialect, for demos and tests without a key.

Needs the ``emulator`` extra (Starlette, uvicorn, Pillow, python-multipart)::

    from flux_adapters import EditRequest, FluxClient
    from flux_adapters.emulator import Fault, run_emulator

    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(status=429, retry_after=2, first=1))
        client = FluxClient("laozhang", api_key="any", base_url=emulator.base_url("laozhang"))
        ...

From the command line: ``flux-adapters emulate --port 8000 --fault laozhang:503,first=2``.

It validates each request as its provider's document describes (unknown or mistyped fields, too
many images, off-grid sizes, oversized or unreadable images, wrong content type: a 4xx in the
provider's style), accepts any non-empty bearer key unless told otherwise, renders real images
at the requested size and format that visibly combine the references, and serves them at signed
URLs that expire (10 minutes by default; then 403, as at the real providers).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from flux_adapters.emulator._faults import Call, Fault, _Armed

if TYPE_CHECKING:
    import uvicorn

    from flux_adapters.emulator._app import State

__all__ = ["PROVIDER_PREFIXES", "Call", "Emulator", "Fault", "run_emulator", "serve"]

PROVIDER_PREFIXES = {
    "laozhang": "laozhang",
    "apiyi": "apiyi",
    "apiyi-multipart": "apiyi",
    "aimlapi": "aimlapi",
}
"""The URL prefix each provider id lives under (apiyi's multipart endpoint sits beside its JSON one)."""


class Emulator:
    """A running emulator: its URLs, the faults it injects, and the calls it received."""

    def __init__(self, state: State, url: str) -> None:
        self._state = state
        self.url = url
        """Root URL, e.g. ``http://127.0.0.1:8000``."""

    def base_url(self, provider: str) -> str:
        """Base URL to give a client for *provider*, e.g. ``http://127.0.0.1:8000/laozhang``."""
        return f"{self.url}/{PROVIDER_PREFIXES[provider]}"

    def inject(self, provider: str, fault: Fault) -> None:
        """Add *fault* to *provider*'s answers (after any faults already injected)."""
        if provider not in PROVIDER_PREFIXES:
            raise ValueError(f"unknown provider {provider!r}")
        with self._state.lock:
            self._state.faults.setdefault(provider, []).append(_Armed(fault))

    def clear_faults(self, provider: str | None = None) -> None:
        """Remove the faults of *provider*, or of every provider."""
        with self._state.lock:
            if provider is None:
                self._state.faults.clear()
            else:
                self._state.faults.pop(provider, None)

    def calls(self, provider: str | None = None) -> list[Call]:
        """The POSTs received, oldest first, for *provider* or for all."""
        with self._state.lock:
            return [call for call in self._state.calls if provider in (None, call.provider)]

    @property
    def ttl(self) -> float:
        """Seconds a result URL stays valid."""
        return self._state.ttl

    @ttl.setter
    def ttl(self, seconds: float) -> None:
        self._state.ttl = seconds

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock forward, e.g. past the expiry of result URLs."""
        base = self._state.clock
        self._state.clock = lambda: base() + seconds


def _state(
    ttl: float,
    valid_keys: Iterable[str] | None,
    bad_keys: Iterable[str],
    faults: Mapping[str, Iterable[Fault]] | None,
) -> State:
    from flux_adapters.emulator._app import State

    state = State(
        ttl=ttl,
        valid_keys=frozenset(valid_keys) if valid_keys is not None else None,
        bad_keys=frozenset(bad_keys),
    )
    for provider, provider_faults in (faults or {}).items():
        if provider not in PROVIDER_PREFIXES:
            raise ValueError(f"unknown provider {provider!r}")
        state.faults[provider] = [_Armed(fault) for fault in provider_faults]
    return state


def _server(state: State, host: str, port: int) -> tuple[uvicorn.Server, socket.socket]:
    """A uvicorn server for the emulator app and the socket it will listen on (bound here)."""
    import uvicorn  # lazy: the emulator extra is only needed when it runs

    from flux_adapters.emulator._app import create_app, quiet_intended_drops

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it, uvicorn's separate header and body writes
    # meet the client's delayed ACK and every answer stalls about 40 ms (measured: 44 ms -> 0.7 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    quiet_intended_drops()
    config = uvicorn.Config(
        create_app(state), log_level="warning", access_log=False, lifespan="off"
    )
    return uvicorn.Server(config), sock


@contextmanager
def run_emulator(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ttl: float = 600.0,
    valid_keys: Iterable[str] | None = None,
    bad_keys: Iterable[str] = (),
    faults: Mapping[str, Iterable[Fault]] | None = None,
) -> Iterator[Emulator]:
    """Run the emulator in a background thread (on a free port by default) and stop it on exit.

    Args:
        host: Address to listen on; keep it on loopback.
        port: Port, or 0 for a free one.
        ttl: Seconds result URLs stay valid.
        valid_keys: Accept only these bearer keys; by default any non-empty key.
        bad_keys: Keys to refuse with 401.
        faults: Faults to inject from the start, per provider id.
    """
    state = _state(ttl, valid_keys, bad_keys, faults)
    server, sock = _server(state, host, port)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="flux-emulator", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the emulator did not start")
        time.sleep(0.01)
    try:
        yield Emulator(state, f"http://{host}:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    ttl: float = 600.0,
    valid_keys: Iterable[str] | None = None,
    bad_keys: Iterable[str] = (),
    faults: Mapping[str, Iterable[Fault]] | None = None,
) -> None:
    """Run the emulator in the foreground until interrupted (``flux-adapters emulate``)."""
    server, sock = _server(_state(ttl, valid_keys, bad_keys, faults), host, port)
    server.run(sockets=[sock])
