"""The HTTP server under the emulator: uvicorn's h11 protocol with a deadline for request heads.

The deadline and the prompt stop live in `flux_adapters._serving`, shared with the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import socket

# Starlette needs python-multipart for apiyi's multipart endpoint, and finds it missing only on
# the first such request (an AssertionError, a 500); imported here, its absence stops the start
# with the install hint (every import of this module is inside `extra_imports`).
import python_multipart  # noqa: F401
import uvicorn
from uvicorn.config import LOGGING_CONFIG

from flux_adapters._serving import HeadDeadline as _HeadDeadline
from flux_adapters._serving import LoopbackServer as EmulatorServer
from flux_adapters._serving import listening_socket
from flux_adapters.emulator._answers import DroppedConnection
from flux_adapters.emulator._app import State, create_app

__all__ = ["EmulatorServer", "build_server"]


class _QuietDrops(logging.Filter):
    """Keeps intended breaks out of the server's error log: injected connection drops, answers cut.

    An answer still in progress when `EmulatorServer.stop` is called is cancelled, which uvicorn
    would log as an exception in the application.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.exc_info
            and isinstance(record.exc_info[1], DroppedConnection | asyncio.CancelledError)
        )


# One instance, so that adding it again for every server is a no-op (`Logger.addFilter`).
_QUIET_DROPS = _QuietDrops()


def build_server(
    state: State, host: str, port: int, *, timeout: float, own_logging: bool
) -> tuple[EmulatorServer, socket.socket]:
    """A uvicorn server for the emulator app, and its socket, already bound and listening.

    Args:
        state: What the app serves.
        host: Address to listen on.
        port: Port, or 0 for a free one.
        timeout: Seconds a connection may take to send a complete request head.
        own_logging: Configure uvicorn's log handlers (a foreground server owns its process);
            otherwise its records go to the host application's logging.

    Raises:
        OSError: The address is in use or cannot be bound.
    """
    sock = listening_socket(host, port)
    logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)

    class EmulatorProtocol(_HeadDeadline):
        head_timeout = timeout

    try:
        config = uvicorn.Config(
            create_app(state),
            http=EmulatorProtocol,
            log_level="warning",
            log_config=LOGGING_CONFIG if own_logging else None,
            access_log=False,
            lifespan="off",
            # asyncio's own loop, even with uvloop installed (the gateway extra brings it, and
            # uvicorn's default would take it): the emulator is the baseline the gateway's
            # benchmark compares with, and serves tests the same on every install.
            loop="asyncio",
        )
        return EmulatorServer(config), sock
    except BaseException:
        sock.close()
        raise
