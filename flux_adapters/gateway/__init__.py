"""An HTTP gateway speaking OpenAI's Images API, in front of the router (``flux-adapters serve``).

Applications in any language call it with an OpenAI SDK; it maps each call to an `EditRequest`
and sends it with an `AsyncFluxClient` built from the configuration (``flux-adapters.toml``,
``FLUX_PROVIDERS``, ``<PROVIDER>_API_KEY`` ...), with the same failover and billing rules::

    from flux_adapters.gateway import run_gateway

    with run_gateway(files_dir="out/files") as gateway:     # a background thread, a free port
        print(gateway.url)                                   # http://127.0.0.1:PORT/v1 for SDKs

Routes: ``POST /v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart),
``GET /v1/models``, ``GET /v1/files/<name>`` (kept result images), ``/healthz``, ``/readyz``,
``/metrics`` (Prometheus). Callers authenticate with gateway keys (``flux-adapters keys
create``); provider keys never leave the gateway. docs/gateway.md has the whole story.

Needs the ``gateway`` extra (Starlette, uvicorn, python-multipart, prometheus-client); without
it, `run_gateway` and `serve` raise `errors.MissingExtraError`. This module imports none of
them itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flux_adapters._extras import extra_imports
from flux_adapters.gateway._keys import FileKeys, KeyRecord, KeyStore, new_key

if TYPE_CHECKING:
    from flux_adapters.client import AsyncFluxClient
    from flux_adapters.gateway._app import ClientFactory, Gateway
    from flux_adapters.state import StateBackend

__all__ = [
    "FileKeys",
    "KeyRecord",
    "RunningGateway",
    "clients_from_config",
    "configured_state_url",
    "new_key",
    "open_key_store",
    "run_gateway",
    "serve",
]


def clients_from_config(
    config: str | os.PathLike[str] | None = None,
    *,
    state_url: str | None = None,
    state: StateBackend | None = None,
) -> ClientFactory:
    """Clients as ``AsyncFluxClient.from_env(config=...)`` builds them, for any provider subset.

    The configuration is read (and checked) now: a mistake fails here, before the server starts.
    *state_url* replaces the configured shared state (``state_url``, ``$FLUX_STATE_URL``);
    *state*, an open backend, replaces both: every client then shares its connections and its
    view of an outage (the gateway gives its own, so that a Redis that stops answering is
    waited for once, not once by the key lookup and again by each client), and closing a
    client leaves it open.

    Raises:
        ConfigurationError: As `AsyncFluxClient.from_env`.
    """
    from flux_adapters.client import AsyncFluxClient, _configured_policy
    from flux_adapters.config import load_config, timeouts, with_keys
    from flux_adapters.jobs import Polling

    loaded = load_config(config)
    timeout, usable = timeouts(loaded, with_keys(loaded.providers))
    AsyncFluxClient.from_env(config=config)  # every check from_env makes, once, now

    def make(only: tuple[str, ...] | None) -> AsyncFluxClient:
        chosen = [s for s in usable if only is None or s.name in only]
        policy = _configured_policy(loaded, len(chosen))
        names: list[Any] = [s.name for s in chosen]
        return AsyncFluxClient(
            providers=names,
            timeout=timeout,
            policy=policy,
            prices=loaded.prices,
            settings={s.name: s for s in chosen},
            polling=None if loaded.job_deadline is None else Polling(deadline=loaded.job_deadline),
            state=state if state is not None else state_url or loaded.state_url,
            budget_usd=loaded.budget_usd,
            budget_period="day" if loaded.budget_period == "day" else "total",
            budget_scope=loaded.budget_scope,
            state_fallback="local" if loaded.state_fallback == "local" else "none",
        )

    return make


def configured_state_url(config: str | os.PathLike[str] | None = None) -> str | None:
    """The shared state's URL: ``$FLUX_STATE_URL``, else ``state_url`` in the configuration file.

    Keys go where the budgets are: a gateway whose state is Redis (from either place) keeps its
    keys there, and ``flux-adapters keys`` finds them there.

    Raises:
        ConfigurationError: The configuration file is unusable.
    """
    from flux_adapters.config import DEFAULT_PATH, load_config

    if os.environ.get("FLUX_STATE_URL"):
        from flux_adapters.state import check_url

        return check_url(os.environ["FLUX_STATE_URL"], "$FLUX_STATE_URL")
    if config is None and not os.environ.get("FLUX_CONFIG") and not DEFAULT_PATH.exists():
        return None
    return load_config(config).state_url


def open_key_store(
    state_url: str | None = None, keys_file: str | os.PathLike[str] | None = None
) -> KeyStore:
    """Where gateway keys live: the shared state for a ``redis://`` URL, else a file (`FileKeys`)."""
    if state_url and state_url != "local":
        from flux_adapters.state import open_state

        store: KeyStore = open_state(state_url)
        return store
    return FileKeys(keys_file)


class RunningGateway:
    """A gateway serving in a background thread (`run_gateway`)."""

    def __init__(self, root: str, gateway: Gateway, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.root = root
        """Root URL, e.g. ``http://127.0.0.1:8080``."""
        self.url = f"{root}/v1"
        """The base URL to give an OpenAI SDK."""
        self.gateway = gateway

    def add_key(self, **settings: Any) -> tuple[str, KeyRecord]:
        """Make a gateway key (see `new_key` for *settings*) and store it; the key and its record.

        Stored from the gateway's own event loop, where its state's connections live.
        """
        key, record = new_key(**settings)
        done = asyncio.run_coroutine_threadsafe(self.gateway.keys.put_key(record), self._loop)
        done.result(timeout=30)
        return key, record


def _gateway(
    *,
    files_dir: str | os.PathLike[str] | None,
    config: str | os.PathLike[str] | None,
    clients: ClientFactory | None,
    keys: KeyStore | None,
    state_url: str | None,
    **settings: Any,
) -> Gateway:
    from flux_adapters.config import load_config
    from flux_adapters.gateway._app import Gateway, GatewaySettings
    from flux_adapters.state import open_state

    fallback: Literal["none", "local"] = "none"
    if clients is None:
        loaded = load_config(config)
        state_url = state_url or loaded.state_url
        fallback = "local" if loaded.state_fallback == "local" else "none"
    state = open_state(state_url, fallback=fallback)
    if clients is None:
        # One Redis state for the key lookups and every client (an in-process one stays each
        # client's own: without a budget or a rate, a client keeps only its cooldowns).
        shared = state if state_url not in (None, "local") else None
        clients = clients_from_config(config, state_url=state_url, state=shared)
    folder = (
        Path(files_dir)
        if files_dir is not None
        else Path(tempfile.gettempdir()) / "flux-gateway-files"
    )
    return Gateway(
        GatewaySettings(files_dir=folder, **settings),
        clients,
        keys if keys is not None else state,  # no key file is read or written unless given
        state,
    )


@contextmanager
def run_gateway(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    files_dir: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    clients: ClientFactory | None = None,
    keys: KeyStore | None = None,
    state_url: str | None = None,
    header_timeout: float = 10.0,
    send_timeout: float = 60.0,
    **settings: Any,
) -> Iterator[RunningGateway]:
    """Run a gateway in a background thread (on a free port by default); stop it on exit.

    Args:
        host: Address to listen on.
        port: Port, or 0 for a free one.
        files_dir: Where result images are kept (default: a folder in the temp directory).
        config: The configuration file (default: ``$FLUX_CONFIG`` or ``flux-adapters.toml``).
        clients: Makes the clients (default: `clients_from_config`).
        keys: Where gateway keys live (default: the state, this process's or Redis with
            *state_url*; a key file only when given one, e.g. `FileKeys`).
        state_url: The shared state (``redis://...``); default: the configured one
            (``$FLUX_STATE_URL``, else ``state_url`` in *config*) unless *clients* is given,
            else in-process.
        header_timeout: Seconds a connection may take to send its request head.
        send_timeout: Seconds an answer may wait for its client to read more of it (from when
            the connection's send buffer is full); then the connection is closed.
        **settings: `GatewaySettings` fields: ``retention``, ``max_body_bytes``,
            ``public_url``, ``require_keys``, ``default_model``, ``body_timeout``,
            ``max_bodies_bytes``.

    Raises:
        MissingExtraError: The ``gateway`` extra is not installed.
        ConfigurationError: The configuration is unusable.
    """
    with extra_imports("gateway"):
        from flux_adapters.gateway._server import build_server

    gateway = _gateway(
        files_dir=files_dir,
        config=config,
        clients=clients,
        keys=keys,
        state_url=state_url,
        **settings,
    )
    server, sock = build_server(
        gateway,
        host,
        port,
        header_timeout=header_timeout,
        send_timeout=send_timeout,
        own_logging=False,
    )

    with server.in_thread(sock, "the gateway", join=30):
        shown = f"[{host}]" if ":" in host else host
        assert server.loop is not None
        yield RunningGateway(f"http://{shown}:{sock.getsockname()[1]}", gateway, server.loop)


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    files_dir: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    state_url: str | None = None,
    keys_file: str | os.PathLike[str] | None = None,
    shutdown_timeout: float = 300.0,
    on_ready: Callable[[str], None] | None = None,
    header_timeout: float = 10.0,
    send_timeout: float = 60.0,
    **settings: Any,
) -> None:
    """Run the gateway in the foreground until SIGINT or SIGTERM (``flux-adapters serve``).

    On a signal it stops taking new calls (``/readyz`` answers 503), lets calls under way finish
    for up to *shutdown_timeout* seconds, then cuts those left, logging each one as possibly
    billed. Access logs are JSON lines on standard error.

    Raises:
        MissingExtraError: The ``gateway`` extra is not installed.
        ConfigurationError: The configuration is unusable.
        OSError: The port is in use, before *on_ready* is called.
    """
    with extra_imports("gateway"):
        from flux_adapters.gateway._app import LineHandler
        from flux_adapters.gateway._server import build_server

    state_url = state_url or configured_state_url(config)
    gateway = _gateway(
        files_dir=files_dir,
        config=config,
        clients=None,
        keys=open_key_store(state_url, keys_file),
        state_url=state_url,
        **settings,
    )
    handler = LineHandler(sys.stderr)
    gateway_logger = logging.getLogger("flux_adapters.gateway")
    gateway_logger.addHandler(handler)
    level, propagate = gateway_logger.level, gateway_logger.propagate
    gateway_logger.setLevel(logging.INFO)
    gateway_logger.propagate = False  # its lines are JSON on stderr, once
    server, sock = build_server(
        gateway,
        host,
        port,
        header_timeout=header_timeout,
        send_timeout=send_timeout,
        own_logging=True,
        shutdown_timeout=shutdown_timeout,
    )
    try:
        if on_ready is not None:
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"http://{shown}:{sock.getsockname()[1]}")
        server.run(sockets=[sock])
    finally:
        sock.close()
        gateway_logger.removeHandler(handler)
        gateway_logger.setLevel(level)
        gateway_logger.propagate = propagate
