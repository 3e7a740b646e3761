"""The gateway's fast paths give what its general paths give.

A call through the gateway takes two routes (``POST /v1/images/generations`` and ``GET
/v1/files/<name>``) that `_GatewayApp` dispatches without Starlette's layers; every way an
endpoint can end (an answer, each kind of exception, before and after its answer started) is
run both ways here and must send the same messages and raise the same exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from flux_adapters import errors
from flux_adapters.gateway import _app


class _Broken(Response):
    """An answer whose sending fails, after its head went (*started*) or before."""

    def __init__(self, started: bool, exc: Exception) -> None:
        super().__init__(b"x")
        self._started = started
        self._exc = exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise self._exc


def _ending(kind: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        if kind == "answer":
            return JSONResponse(
                {"name": request.path_params.get("name"), "app": "app" in request.scope}
            )
        if kind == "state-down":
            raise errors.StateUnavailable("redis is down")
        if kind.startswith("http-"):
            raise HTTPException(int(kind[5:]), detail="nope", headers={"x-why": "test"})
        if kind == "bug":
            raise ValueError("a bug")
        if kind == "bug-after-start":
            return _Broken(True, ValueError("a bug"))
        if kind == "bug-before-start":
            return _Broken(False, ValueError("a bug"))
        if kind == "state-down-after-start":
            return _Broken(True, errors.StateUnavailable("redis is down"))
        if kind == "http-after-start":
            return _Broken(True, HTTPException(404))
        if kind == "http-before-start":
            return _Broken(False, HTTPException(405))
        raise AssertionError(kind)

    return endpoint


KINDS = [
    "answer",
    "state-down",
    "http-404",
    "http-405",
    "http-418",
    "http-204",
    "bug",
    "bug-after-start",
    "bug-before-start",
    "state-down-after-start",
    "http-after-start",
    "http-before-start",
]
TARGETS = [
    ("POST", "/v1/images/generations", ""),
    ("GET", "/v1/images/generations", ""),
    ("GET", "/v1/files/abc.png", ""),
    ("HEAD", "/v1/files/abc.png", ""),
    ("POST", "/v1/files/abc.png", ""),
    ("GET", "/v1/files/", ""),
    ("GET", "/v1/files/a/b.png", ""),
    ("GET", "/v1/files/abc.png", "/prefix"),
    ("GET", "/v1/images/generations/", ""),
]


def _run(
    fast: bool, kind: str, method: str, path: str, root_path: str, keep_app: bool = False
) -> tuple[Any, ...]:
    patched = pytest.MonkeyPatch()
    patched.setattr(_app, "generations", _ending(kind))
    patched.setattr(_app, "files", _ending(kind))
    try:
        app = _app.create_app(cast(_app.Gateway, object()))
    finally:
        patched.undo()
    assert isinstance(app, _app._GatewayApp)
    app.fast = fast
    sent: list[Message] = []
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"gw")],
        "client": ("127.0.0.1", 5),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":  # request ids are random: not compared
            headers = [(k, b"gw-?" if k == b"x-request-id" else v) for k, v in message["headers"]]
            message = {**message, "headers": headers}
        sent.append(message)

    async def call() -> tuple[Any, ...]:
        try:
            await app(scope, receive, send)
        except Exception as exc:
            return sent, type(exc), str(exc), type(exc.__cause__)
        return (sent, app) if keep_app else (sent, None)

    return asyncio.run(call())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "path", "root_path"), TARGETS)
def test_the_fast_routes_end_every_way_as_starlette_does(
    kind: str, method: str, path: str, root_path: str
) -> None:
    general = _run(False, kind, method, path, root_path)
    fast = _run(True, kind, method, path, root_path)
    assert fast == general
    assert general[0], "something was sent"  # every ending answers, or had started to


def test_the_fast_routes_are_taken() -> None:
    # Starlette builds its layers at the first request they serve: none for these two.
    for method, path in (("GET", "/v1/files/abc.png"), ("POST", "/v1/images/generations")):
        sent, app = _run(True, "answer", method, path, "", keep_app=True)
        assert sent[0]["status"] == 200
        assert app.middleware_stack is None
    sent, app = _run(True, "answer", "GET", "/v1/files/abc.png", "/prefix", keep_app=True)
    assert app.middleware_stack is not None
