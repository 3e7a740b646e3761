"""The gateway's uvicorn server: a deadline for request heads, a prompt stop, a graceful drain."""

from __future__ import annotations

import json
import math
import socket
from typing import TYPE_CHECKING, Literal

import python_multipart  # noqa: F401  (Starlette needs it for /v1/images/edits; fail at start)
import uvicorn
from uvicorn.config import LOGGING_CONFIG

from flux_adapters._options import check_seconds
from flux_adapters._serving import JoinedWrites, LoopbackServer, listening_socket
from flux_adapters.gateway._app import LOGGER, Gateway, create_app

if TYPE_CHECKING:
    from flux_adapters.gateway._httptools import HttptoolsJoinedWrites

__all__ = ["GatewayServer", "build_server", "event_loop", "http_protocol"]


class GatewayServer(LoopbackServer):
    """uvicorn's server; on a signal it marks the gateway draining before it stops listening.

    uvicorn then waits for the answers under way (at most ``timeout_graceful_shutdown``
    seconds) and cancels the rest: each paid call cut that way is logged by the app as possibly
    billed (``cut-at-shutdown``); the count still under way is logged here.
    """

    gateway: Gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.draining = True
        under_way = len(self.gateway.in_flight)
        if under_way:
            LOGGER.warning(
                json.dumps(
                    {
                        "event": "draining",
                        "in_flight": under_way,
                        "message": f"stopping: waiting for {under_way} paid call(s) under way",
                    }
                )
            )
        await super().shutdown(sockets)
        left = len(self.gateway.in_flight)
        LOGGER.info(json.dumps({"event": "stopped", "cut": left}))


def event_loop() -> Literal["uvloop", "asyncio"]:
    """The event loop the gateway runs on: uvloop when it is installed, else asyncio's own.

    uvloop comes with the ``gateway`` extra: about 10 % fewer instructions per call (its loop,
    transports and timers are C, not Python; docs/benchmarks.md, row m). A gateway installed
    without it (uvicorn alone) runs on asyncio, the same in every other respect.
    """
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def http_protocol() -> type[JoinedWrites] | type[HttptoolsJoinedWrites]:
    """How the gateway reads requests: httptools (C) when it is installed, else h11 (Python).

    httptools comes with the ``gateway`` extra: about 27 % fewer instructions per call
    (docs/benchmarks.md, row m). Both give each request head a deadline, cap its size and send
    an answer's head and body in one write.
    """
    try:
        import httptools  # noqa: F401
    except ImportError:
        return JoinedWrites
    from flux_adapters.gateway._httptools import HttptoolsJoinedWrites

    return HttptoolsJoinedWrites


def build_server(
    gateway: Gateway,
    host: str,
    port: int,
    *,
    header_timeout: float,
    own_logging: bool,
    send_timeout: float = 60.0,
    shutdown_timeout: float = 300.0,
) -> tuple[GatewayServer, socket.socket]:
    """A uvicorn server for *gateway* and its socket, already bound and listening.

    Raises:
        ConfigurationError: A timeout is not seconds above 0, up to a day.
        OSError: The address is in use or cannot be bound.
    """
    header_timeout = check_seconds(header_timeout, "header_timeout")
    send_timeout = check_seconds(send_timeout, "send_timeout")
    sock = listening_socket(host, port)

    stall = send_timeout  # a class body does not see a name it assigns from the function

    class Protocol(http_protocol()):  # type: ignore[misc]
        head_timeout = header_timeout
        send_timeout = stall

    try:
        config = uvicorn.Config(
            create_app(gateway),
            http=Protocol,
            log_level="warning",
            log_config=LOGGING_CONFIG if own_logging else None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=math.ceil(shutdown_timeout),
            server_header=False,
            loop=event_loop(),
        )
        server = GatewayServer(config)
        server.gateway = gateway
        return server, sock
    except BaseException:
        sock.close()
        raise
