"""The emulator's ASGI app: each provider's endpoints under ``/<provider>/v1``, on one server.

Routes::

    POST /laozhang/v1/images/generations    laozhang JSON
    POST /apiyi/v1/images/generations       apiyi JSON
    POST /apiyi/v1/images/edits             apiyi multipart (image[]), provider id apiyi-multipart
    POST /aimlapi/v1/images/generations     aimlapi JSON
    GET  /files/<name>?expires=&signature=  results; 403 once expired, as signed URLs do

Every POST is recorded (`Emulator.calls`), may meet an injected `Fault`, is checked for a bearer
key, the content type and the body (`_dialects`), and is answered with a real image rendered at
the requested size and format.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import anyio
from attrs import define, field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from flux_adapters.emulator import _dialects, _images
from flux_adapters.emulator._faults import Call, Fault, _Armed

__all__ = ["DroppedConnection", "State", "create_app"]

_MEDIA_TYPES: Final = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_KEPT_RESULTS: Final = 512


class DroppedConnection(Exception):
    """Raised inside the app to make the server cut the connection (an injected fault)."""


@define(kw_only=True)
class State:
    """Everything the emulator knows; shared with the `Emulator` handle that controls it."""

    ttl: float = 600.0
    valid_keys: frozenset[str] | None = None
    bad_keys: frozenset[str] = frozenset()
    clock: Callable[[], float] = time.time
    secret: bytes = field(factory=lambda: secrets.token_bytes(32))
    calls: list[Call] = field(factory=list)
    faults: dict[str, list[_Armed]] = field(factory=dict)
    results: OrderedDict[str, tuple[bytes, str]] = field(factory=OrderedDict)
    lock: threading.Lock = field(factory=threading.Lock)

    def take_fault(self, provider: str) -> Fault | None:
        """The fault to apply to this call of *provider*, if any, counting it as used."""
        with self.lock:
            for armed in self.faults.get(provider, []):
                if armed.fault.first is None or armed.used < armed.fault.first:
                    armed.used += 1
                    return armed.fault
        return None

    def sign(self, name: str, expires: int) -> str:
        """The signature of a result URL."""
        return hmac.new(self.secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()


def _error(
    provider: str, status: int, message: str, code: str, headers: Mapping[str, str] | None = None
) -> Response:
    if provider == "aimlapi":
        # aimlapi answers in its framework's shape: {"statusCode", "message", "error"}.
        body: dict[str, object] = {"statusCode": status, "message": message, "error": code}
    else:
        # laozhang and apiyi answer in the OpenAI shape their gateways use.
        body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


_FAULT_ANSWERS: Final = {
    402: ("Insufficient balance: top up your account to continue", "insufficient_balance"),
    429: ("Rate limit reached for requests; retry later", "rate_limit_exceeded"),
    500: ("Internal server error while generating the image", "internal_error"),
    503: ("The model is overloaded; service temporarily unavailable", "service_unavailable"),
}
_BAD_GATEWAY: Final = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


class _Dropping(Response):
    """Sends the status line and headers, then has the server cut the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1000")],
            }
        )
        raise DroppedConnection("connection dropped on purpose (injected fault)")


def _fault_answer(provider: str, fault: Fault) -> Response | None:
    if fault.drop:
        return _Dropping()
    if fault.body == "empty":
        return Response(b"", status_code=200, media_type="application/json")
    if fault.body == "malformed":
        return Response(b'{"data": [{"url": ', status_code=200, media_type="application/json")
    if fault.moderation:
        return _error(
            provider,
            400,
            "Request Moderated: the prompt or an input was flagged",
            "content_policy_violation",
        )
    if fault.status is None:
        return None
    if fault.status == 502:
        return Response(_BAD_GATEWAY, status_code=502, media_type="text/html")
    message, code = _FAULT_ANSWERS.get(fault.status, ("injected failure", "injected"))
    headers = {}
    if fault.status == 429 or fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after if fault.retry_after is not None else 1:g}"
    return _error(provider, fault.status, message, code, headers)


def _authorised(state: State, request: Request, provider: str) -> Response | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return _error(
            provider,
            401,
            "No API key provided: send Authorization: Bearer <key>",
            "invalid_api_key",
        )
    if key in state.bad_keys or (state.valid_keys is not None and key not in state.valid_keys):
        return _error(provider, 401, "Invalid API key", "invalid_api_key")
    return None


async def _read_json(request: Request, provider: str) -> Mapping[str, object] | Response:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return _error(
            provider, 415, "Content-Type must be application/json", "unsupported_media_type"
        )
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _error(provider, 400, "the body is not valid JSON", "invalid_json")
    if not isinstance(body, dict):
        return _error(provider, 400, "the body must be a JSON object", "invalid_json")
    return body


async def _read_form(
    request: Request,
) -> tuple[dict[str, str], list[tuple[str, _dialects.Upload]]] | None:
    if request.headers.get("content-type", "").split(";")[0].strip() != "multipart/form-data":
        return None
    fields: dict[str, str] = {}
    files: list[tuple[str, _dialects.Upload]] = []
    async with request.form(max_files=64, max_fields=64, max_part_size=1024 * 1024) as form:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            else:
                data = await value.read()
                upload = _dialects.Upload(value.filename or "", value.content_type or "", data)
                files.append((name, upload))
    return fields, files


def create_app(state: State) -> Starlette:
    """The emulator's ASGI app over *state*."""

    def record(provider: str, request: Request) -> None:
        with state.lock:
            state.calls.append(Call(provider, request.method, request.url.path, time.time()))

    async def answer(
        provider: str, request: Request, job: _dialects.Job | list[str], inline: bool = False
    ) -> Response:
        if isinstance(job, list):
            return _error(provider, 400, "; ".join(job), "invalid_request")
        picture = await anyio.to_thread.run_sync(
            lambda: _images.encode(
                _images.render(job.width, job.height, job.references, job.prompt, job.seed),
                job.output_format,
            )
        )
        if inline:
            encoded = base64.b64encode(picture).decode()
            inline_body: dict[str, object] = {
                "created": int(state.clock()),
                "data": [{"url": None, "b64_json": encoded}],
            }
            return JSONResponse(inline_body)
        name = f"{secrets.token_hex(12)}.{job.output_format}"
        expires = int(state.clock() + state.ttl)
        with state.lock:
            state.results[name] = (picture, _MEDIA_TYPES[job.output_format])
            while len(state.results) > _KEPT_RESULTS:
                state.results.popitem(last=False)
        url = f"{str(request.base_url).rstrip('/')}/files/{name}?expires={expires}&signature={state.sign(name, expires)}"
        body: dict[str, object] = {"created": int(state.clock()), "data": [{"url": url}]}
        if provider == "aimlapi":
            body = {
                "data": [{"url": url, "b64_json": None}],
                "meta": {"usage": {"credits_used": 2}},
            }
        return JSONResponse(body)

    async def misbehave(provider: str) -> tuple[Response | None, bool]:
        """Apply this call's fault, if any: an answer to send instead, and whether to answer inline."""
        fault = state.take_fault(provider)
        if fault is None:
            return None, False
        if fault.delay:
            await asyncio.sleep(fault.delay)
        return _fault_answer(provider, fault), fault.body == "b64"

    async def generations(request: Request) -> Response:
        provider = request.path_params["provider"]
        dialect = _dialects.DIALECTS.get(provider)
        if dialect is None:
            return JSONResponse(
                {"error": {"message": f"no provider {provider!r} here"}}, status_code=404
            )
        record(provider, request)
        failed, inline = await misbehave(provider)
        if failed or (failed := _authorised(state, request, provider)):
            return failed
        body = await _read_json(request, provider)
        if isinstance(body, Response):
            return body
        job = await anyio.to_thread.run_sync(dialect, body)
        return await answer(provider, request, job, inline)

    async def edits(request: Request) -> Response:
        provider = "apiyi-multipart"
        record(provider, request)
        failed, inline = await misbehave(provider)
        if failed or (failed := _authorised(state, request, provider)):
            return failed
        form = await _read_form(request)
        if form is None:
            return _error(
                provider, 415, "Content-Type must be multipart/form-data", "unsupported_media_type"
            )
        job = await anyio.to_thread.run_sync(_dialects.apiyi_multipart, *form)
        return await answer(provider, request, job, inline)

    async def files(request: Request) -> Response:
        name = request.path_params["name"]
        expires_text = request.query_params.get("expires", "")
        signature = request.query_params.get("signature", "")
        expires = int(expires_text) if expires_text.isdigit() else -1
        if not hmac.compare_digest(signature, state.sign(name, expires)):
            return Response(
                "<Error><Code>SignatureDoesNotMatch</Code></Error>",
                403,
                media_type="application/xml",
            )
        if state.clock() > expires:
            return Response("<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>", 403,
                            media_type="application/xml")  # fmt: skip
        with state.lock:
            stored = state.results.get(name)
        if stored is None:
            return Response(
                "<Error><Code>NoSuchKey</Code></Error>", 404, media_type="application/xml"
            )
        return Response(stored[0], media_type=stored[1])

    routes = [
        Route("/apiyi/v1/images/edits", edits, methods=["POST"]),
        Route("/{provider}/v1/images/generations", generations, methods=["POST"]),
        Route("/files/{name}", files, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _QuietDrops(logging.Filter):
    """Keep intended connection drops out of the server's error log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


def quiet_intended_drops(loggers: Iterable[str] = ("uvicorn.error",)) -> None:
    """Install the filter that hides injected drops from the server log."""
    for name in loggers:
        logging.getLogger(name).addFilter(_QuietDrops())
