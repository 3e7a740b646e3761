"""A loopback server that speaks every provider's dialect, for demos and tests without a key.

Needs the ``emulator`` extra (Starlette, uvicorn, Pillow, python-multipart, anyio, h11); without
it this module still imports, and `run_emulator` and `serve` raise `errors.MissingExtraError`,
which names the missing package and ``pip install 'flux-adapters[emulator]'``::

    from flux_adapters import EditRequest, FluxClient
    from flux_adapters.emulator import Fault, run_emulator

    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(status=429, retry_after=2, first=1))
        client = FluxClient("laozhang", api_key="emulator-key", base_url=emulator.base_url("laozhang"))
        ...

From the command line: ``flux-adapters emulate --port 8000 --fault laozhang:503,first=2``.

It validates each request as its provider's document describes (unknown or mistyped fields, too
many images, off-grid sizes, oversized, truncated or decompression-bomb images, wrong content
type, a body over the size limit: a 4xx in the provider's style), accepts any non-empty key
unless told otherwise, renders real images at the requested size and format that visibly
combine the references, and serves them at signed URLs that expire (10 minutes by default; then
403, as at the real providers). Every job a provider charges for is billed (`Emulator.billed`),
so tests can count what a client paid for, including jobs whose answer an ``after_work`` fault
replaced. Connections that never finish a request head are closed, and clients that hang up
leave no traceback in its log.

Besides the synchronous resellers it speaks two job APIs, submit then poll: Black Forest Labs'
own (``bfl``: ``POST /bfl/v1/<model>``, ``GET /bfl/v1/get_result?id=``) and fal's queue
(``fal``: ``POST /fal/<app>``, then status, result and cancel URLs). A job answers
``pending_polls`` polls as not done, then ends as its submit's fault says (`Fault.outcome`).

Faults can also be armed over HTTP, by another process: ``POST /<prefix>/__flux/faults`` with the
fault as JSON, ``DELETE`` to clear (the fault-control protocol a conformance recording speaks to
any sandbox; docs/emulator.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from flux_adapters._extras import extra_imports
from flux_adapters.emulator._faults import Billed, Call, Fault, _Armed

if TYPE_CHECKING:
    from flux_adapters.emulator._app import State

__all__ = ["PROVIDER_PREFIXES", "Billed", "Call", "Emulator", "Fault", "run_emulator", "serve"]

# The largest legitimate request is 8 reference images of 20 MB as base64 data URLs in JSON,
# about 214 MB; the default must take it, with room for the rest of the body.
_MAX_BODY_BYTES: Final = 240 * 1024 * 1024
_HEADER_TIMEOUT: Final = 10.0

_PENDING_POLLS: Final = 2

PROVIDER_PREFIXES = {
    "laozhang": "laozhang",
    "apiyi": "apiyi",
    "apiyi-multipart": "apiyi",
    "aimlapi": "aimlapi",
    "bfl": "bfl",
    "fal": "fal",
}
"""The URL prefix each provider id lives under (apiyi's multipart endpoint sits beside its JSON one).

The synchronous providers' endpoints are under ``<prefix>/v1``; BFL's base URL is ``/bfl`` (its
paths start with ``/v1``), fal's is ``/fal`` (the app id follows, as after
``https://queue.fal.run``)."""


class Emulator:
    """A running emulator: its URLs, the faults it injects, the calls it received, the jobs it billed."""

    def __init__(self, state: State, url: str) -> None:
        self._state = state
        self.url = url
        """Root URL, e.g. ``http://127.0.0.1:8000``."""

    def base_url(self, provider: str) -> str:
        """Base URL to give a client for *provider*, e.g. ``http://127.0.0.1:8000/laozhang``."""
        return f"{self.url}/{PROVIDER_PREFIXES[provider]}"

    def inject(self, provider: str, fault: Fault) -> None:
        """Add *fault* to *provider*'s answers (after any faults already injected).

        Raises:
            ValueError: An unknown provider, or a fault that cannot take effect there
                (`Fault.check_for`).
        """
        _check(provider, fault)
        with self._state.lock:
            self._state.faults.setdefault(provider, []).append(_Armed(fault))

    def clear_faults(self, provider: str | None = None) -> None:
        """Remove the faults of *provider*, or of every provider."""
        with self._state.lock:
            if provider is None:
                self._state.faults.clear()
            else:
                self._state.faults.pop(provider, None)

    def calls(self, provider: str | None = None, kind: str | None = None) -> list[Call]:
        """The exchanges received, oldest first, for *provider* (or all) and of *kind* (or all).

        *kind* is ``"submit"`` (every call to a synchronous provider, a job's POST), ``"poll"``
        (BFL's ``get_result``, fal's ``/status``), ``"fetch"`` (fal's result) or ``"cancel"``.
        Downloads of result URLs are not calls. ``calls("bfl", "poll")`` counts BFL's polls;
        ``calls(kind="submit")`` what a client asked to be done, across providers.
        """
        with self._state.lock:
            return [
                call
                for call in self._state.calls
                if provider in (None, call.provider) and kind in (None, call.kind)
            ]

    def billed(self, provider: str | None = None) -> list[Billed]:
        """The jobs charged for, oldest first, for *provider* or for all.

        At a synchronous provider a job is billed once validated and rendered, whether or not
        its answer reached the client: a success, an ``after_work`` fault, a client that hung up
        while the image was rendered. A fault that answers before the work, and a request refused
        as invalid, are not billed.

        At a job provider a job is billed when its submit is accepted (whether or not the answer
        got through), unless the provider does not charge how it ends: BFL does not charge a
        ``Request Moderated`` or ``Content Moderated`` job; fal does not charge a server error
        (``outcome="failed"``, a 500) and takes a request cancelled while still in the queue off
        the bill; a 422 (``invalid``, a moderated job) is charged.
        """
        with self._state.lock:
            return [job for job in self._state.billed if provider in (None, job.provider)]

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


def _check(provider: str, fault: Fault) -> None:
    if provider not in PROVIDER_PREFIXES:
        raise ValueError(f"unknown provider {provider!r}")
    fault.check_for(provider)


def _state(
    *,
    ttl: float,
    valid_keys: Iterable[str] | None,
    bad_keys: Iterable[str],
    faults: Mapping[str, Iterable[Fault]] | None,
    seed: int | None,
    max_body_bytes: int,
    pending_polls: int,
) -> State:
    from flux_adapters.emulator._app import State

    if pending_polls < 0:
        raise ValueError(f"pending_polls must be at least 0; got {pending_polls}")
    state = State(
        max_body_bytes=max_body_bytes,
        pending_polls=pending_polls,
        ttl=ttl,
        valid_keys=frozenset(valid_keys) if valid_keys is not None else None,
        bad_keys=frozenset(bad_keys),
        random=random.Random(seed),
    )
    for provider, provider_faults in (faults or {}).items():
        armed = []
        for fault in provider_faults:
            _check(provider, fault)
            armed.append(_Armed(fault))
        state.faults[provider] = armed
    return state


@contextmanager
def run_emulator(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ttl: float = 600.0,
    valid_keys: Iterable[str] | None = None,
    bad_keys: Iterable[str] = (),
    faults: Mapping[str, Iterable[Fault]] | None = None,
    seed: int | None = 0,
    max_body_bytes: int = _MAX_BODY_BYTES,
    header_timeout: float = _HEADER_TIMEOUT,
    pending_polls: int = _PENDING_POLLS,
) -> Iterator[Emulator]:
    """Run the emulator in a background thread (on a free port by default) and stop it on exit.

    The stop is immediate: connections are closed and answers still in progress (a ``delay``, a
    ``drip``) are cut short, not waited for.

    Its server logs through the host application's logging (uvicorn's ``uvicorn.error``
    logger), without configuring any handlers.

    Args:
        host: Address to listen on; keep it on loopback.
        port: Port, or 0 for a free one.
        ttl: Seconds result URLs stay valid.
        valid_keys: Accept only these keys; by default any non-empty key.
        bad_keys: Keys to refuse (with 401; BFL answers a refused key with 403).
        faults: Faults to inject from the start, per provider id.
        seed: Seeds the draws of faults with a ``chance``: the same seed and the same order of
            calls give the same faults. ``None`` draws differently on every run.
        max_body_bytes: Refuse larger request bodies with 413 (240 MiB by default, enough for
            8 images of 20 MB as base64 in JSON).
        header_timeout: Close a connection that has not sent a complete request head within
            this many seconds of connecting, or of its previous answer.
        pending_polls: Polls a BFL or fal job answers as not done before it ends (2 by default,
            so that a client meets pending answers); a fault's ``pending`` overrides it.

    Raises:
        MissingExtraError: The ``emulator`` extra is not installed (the message says what to
            install).
    """
    with extra_imports():  # lazy: needs the emulator extra
        from flux_adapters.emulator._server import build_server

    state = _state(
        ttl=ttl,
        valid_keys=valid_keys,
        bad_keys=bad_keys,
        faults=faults,
        seed=seed,
        max_body_bytes=max_body_bytes,
        pending_polls=pending_polls,
    )
    server, sock = build_server(state, host, port, timeout=header_timeout, own_logging=False)
    with server.in_thread(sock, "the emulator", join=10):
        yield Emulator(state, f"http://{host}:{sock.getsockname()[1]}")


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    ttl: float = 600.0,
    valid_keys: Iterable[str] | None = None,
    bad_keys: Iterable[str] = (),
    faults: Mapping[str, Iterable[Fault]] | None = None,
    seed: int | None = 0,
    max_body_bytes: int = _MAX_BODY_BYTES,
    header_timeout: float = _HEADER_TIMEOUT,
    on_ready: Callable[[str], None] | None = None,
    pending_polls: int = _PENDING_POLLS,
) -> None:
    """Run the emulator in the foreground until interrupted (``flux-adapters emulate``).

    The port is bound and listening before *on_ready* is called with the root URL (e.g.
    ``http://127.0.0.1:8000``), so a banner printed there is only printed once the port is ours.
    The other arguments are those of `run_emulator`.

    Raises:
        MissingExtraError: The ``emulator`` extra is not installed.
        OSError: The port is in use (or the address cannot be bound), before *on_ready* is called.
    """
    with extra_imports():  # lazy: needs the emulator extra
        from flux_adapters.emulator._server import build_server

    state = _state(
        ttl=ttl,
        valid_keys=valid_keys,
        bad_keys=bad_keys,
        faults=faults,
        seed=seed,
        max_body_bytes=max_body_bytes,
        pending_polls=pending_polls,
    )
    server, sock = build_server(state, host, port, timeout=header_timeout, own_logging=True)
    try:
        if on_ready is not None:
            on_ready(f"http://{host}:{sock.getsockname()[1]}")
        server.run(sockets=[sock])
    finally:
        sock.close()
