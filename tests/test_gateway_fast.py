"""The gateway's fast paths give what its general paths give.

A call through the gateway takes two routes (``POST /v1/images/generations`` and ``GET
/v1/files/<name>``) that `_GatewayApp` dispatches without Starlette's layers; every way an
endpoint can end (an answer, each kind of exception, before and after its answer started) is
run both ways here and must send the same messages and raise the same exception.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
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


# -- the access log -------------------------------------------------------------------------------


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name} {record.levelname} {record.getMessage()}")


def _other_handler(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    parent.addHandler(_Kept())


def _access_handler(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    access.addHandler(_Kept())


def _refusing_filter(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    access.addFilter(lambda record: False)


def _passing_filter(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    access.addFilter(lambda record: True)


def _handler_filter(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    lines.addFilter(lambda record: False)


def _handler_level(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    lines.setLevel(logging.WARNING)


def _timestamped(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    lines.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))


def _propagating(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    parent.propagate = True
    logging.getLogger("flux_adapters").addHandler(_Kept())


def _not_propagating(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    access.propagate = False


def _terminator(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    lines.terminator = "\r\n"


def _as_serve(parent: logging.Logger, access: logging.Logger, lines: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("setup", "fast"),
    [
        (_as_serve, True),
        (_terminator, True),
        (_other_handler, False),
        (_access_handler, False),
        (_refusing_filter, False),
        (_passing_filter, False),
        (_handler_filter, False),
        (_handler_level, False),
        (_timestamped, False),
        (_propagating, False),
        (_not_propagating, False),
    ],
)
def test_access_lines_are_logged_as_logging_would(
    setup: Callable[[logging.Logger, logging.Logger, Any], None], fast: bool
) -> None:
    # serve's setup (a LineHandler alone on the gateway's logger, which does not propagate),
    # and ways it can be changed since: each line must come out as logging.info would write it.
    parent, access = logging.getLogger("flux_adapters.gateway"), _app.ACCESS
    top = logging.getLogger("flux_adapters")
    saved = [(x, x.handlers[:], x.filters[:], x.propagate, x.level) for x in (top, parent, access)]
    stream = io.StringIO()
    lines = _app.LineHandler(stream)
    try:
        for logger in (parent, access):
            logger.handlers, logger.filters = [], []
        parent.addHandler(lines)
        parent.setLevel(logging.INFO)
        parent.propagate = False
        setup(parent, access, lines)
        assert (_app._sole_access_handler() is lines) is fast
        kept = [h for x in (top, parent, access) for h in x.handlers if isinstance(h, _Kept)]
        text = json.dumps({"route": "/v1/files/{name}", "key": 'é"\n', "ms": 0.5})

        def written(log: Callable[[str], None]) -> tuple[str, list[list[str]]]:
            stream.seek(0)
            stream.truncate()
            for handler in kept:
                handler.messages.clear()
            log(text)
            log(text)
            return stream.getvalue(), [handler.messages[:] for handler in kept]

        ours = written(_app._log_access)
        assert ours == written(access.info)
        if setup is _as_serve:
            assert ours[0] == text + "\n" + text + "\n"
    finally:
        for logger, handlers, filters, propagate, level in saved:
            logger.handlers, logger.filters = handlers, filters
            logger.propagate = propagate
            logger.setLevel(level)


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities included: json.dumps writes them as NaN, Infinity
    st.text(),
)


@given(st.dictionaries(st.text(), _VALUES, max_size=14))
def test_access_lines_are_json_dumps(line: dict[str, object]) -> None:
    assert _app._line_json(line) == json.dumps(line)


@pytest.mark.parametrize(
    "scope",
    [
        {"scheme": "http", "server": ("127.0.0.1", 8080), "headers": [(b"host", b"gw:8080")]},
        {"scheme": "https", "server": ("10.0.0.1", 443), "headers": [(b"host", b"gw.example")]},
        {"scheme": "http", "server": ("127.0.0.1", 80), "headers": []},
        {"scheme": "http", "server": ("127.0.0.1", 81), "headers": [(b"x-host", b"no")]},
        {"scheme": "https", "server": ("::1", 8443), "headers": []},
        {"scheme": "http", "server": None, "headers": []},
        {"server": ["127.0.0.1", 80], "headers": [(b"host", b"a"), (b"host", b"b")]},
        {"scheme": "http", "headers": [(b"host", b"gw")], "root_path": "/api"},
        {"scheme": "http", "headers": [(b"host", b"gw")], "root_path": "/api/"},
        {"scheme": "http", "headers": [(b"host", b"gw")], "app_root_path": "/x", "root_path": ""},
        {"scheme": "http", "headers": [(b"host", "gé".encode("latin-1"))]},
    ],
)
def test_image_links_start_as_starlettes_base_url(scope: dict[str, Any]) -> None:
    gateway = cast(_app.Gateway, type("G", (), {"base_urls": {}})())
    full = {"type": "http", "path": "/v1/images/generations", "query_string": b"q=1", **scope}
    expected = str(Request(full).base_url).rstrip("/")
    for _ in range(2):  # made, then found
        assert _app._base_url(gateway, Request(dict(full))) == expected
    assert len(gateway.base_urls) == 1


def test_image_link_roots_kept_are_bounded() -> None:
    gateway = cast(_app.Gateway, type("G", (), {"base_urls": {}})())
    for n in range(200):
        scope = {"type": "http", "path": "/", "headers": [(b"host", f"h{n}".encode())]}
        assert _app._base_url(gateway, Request(scope)) == f"http://h{n}"
        assert len(gateway.base_urls) <= 64
