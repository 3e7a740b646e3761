"""What the emulator sends back: successes, errors in each provider's style, and misbehaviour.

This is the one place that decides what an injected `Fault` looks like on the wire: `failure` for
an answer that replaces the success, `download` for a result URL that misbehaves, `dripped` for
an answer sent slowly. The app (`_app`) only decides *when* each is sent.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from typing import Final

import anyio
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from flux_adapters.emulator._faults import Fault

__all__ = [
    "DroppedConnection",
    "download",
    "dripped",
    "error",
    "failure",
    "portal",
    "result_inline",
    "result_url",
]


class DroppedConnection(Exception):
    """Raised inside the app to make the server cut the connection (an injected fault)."""


# fal's request errors name their kind in "error_type" and in an X-Fal-Error-Type header, with
# "typical status codes" (https://docs.fal.ai/documentation/model-apis/request-errors); an
# injected status gets the type typical of it.
_FAL_ERROR_TYPES: Final = {
    400: "bad_request",
    499: "client_cancelled",
    500: "internal_error",
    502: "runner_incomplete_response",
    503: "runner_scheduling_failure",
    504: "request_timeout",
}
_FAL_TYPES: Final = frozenset(_FAL_ERROR_TYPES.values()) | {
    "startup_timeout",
    "runner_connection_timeout",
    "runner_disconnected",
    "runner_connection_refused",
    "runner_connection_error",
    "runner_server_error",
    "client_disconnected",
}


def error(
    provider: str, status: int, message: str, code: str, headers: Mapping[str, str] | None = None
) -> Response:
    """An error answer in *provider*'s style."""
    extra = dict(headers or {})
    if provider == "aimlapi":
        # aimlapi answers in its framework's shape: {"statusCode", "message", "error"}.
        body: dict[str, object] = {"statusCode": status, "message": message, "error": code}
    elif provider == "bfl":
        # BFL's API is FastAPI: an HTTPException is {"detail": "..."}.
        body = {"detail": message}
    elif provider == "fal":
        # fal's request errors: {"detail": "...", "error_type": "..."}, the type in a header too.
        error_type = code if code in _FAL_TYPES else _FAL_ERROR_TYPES.get(status, code)
        body = {"detail": message, "error_type": error_type}
        extra["X-Fal-Error-Type"] = error_type
    else:
        # laozhang and apiyi answer in the OpenAI shape their gateways use.
        body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status_code=status, headers=extra)


def result_url(provider: str, url: str, created: int) -> Response:
    """The success answer that points at the result."""
    if provider == "aimlapi":
        body: dict[str, object] = {
            "data": [{"url": url, "b64_json": None}],
            "meta": {"usage": {"credits_used": 2}},
        }
    else:
        body = {"created": created, "data": [{"url": url}]}
    return JSONResponse(body)


def result_inline(picture: bytes, created: int) -> Response:
    """The success answer with the image inline, as ``b64_json``."""
    encoded = base64.b64encode(picture).decode()
    return JSONResponse({"created": created, "data": [{"url": None, "b64_json": encoded}]})


_FAULT_ANSWERS: Final = {
    402: ("Insufficient balance: top up your account to continue", "insufficient_balance"),
    429: ("Rate limit reached for requests; retry later", "rate_limit_exceeded"),
    500: ("Internal server error while generating the image", "internal_error"),
    503: ("The model is overloaded; service temporarily unavailable", "service_unavailable"),
}
# A gateway in front of the provider answers 502 and 504 itself, as nginx's stock pages.
_GATEWAY_PAGES: Final = {
    status: (
        f"<html><head><title>{status} {reason}</title></head>"
        f"<body><center><h1>{status} {reason}</h1></center><hr><center>nginx</center></body></html>"
    )
    for status, reason in ((502, "Bad Gateway"), (504, "Gateway Time-out"))
}
_CHALLENGE_PAGE: Final = (
    "<!DOCTYPE html><html><head><title>Just a moment...</title></head>"
    "<body><h1>Checking your browser before accessing the API</h1>"
    "<p>This process is automatic.</p></body></html>"
)
_NOT_AVAILABLE_PAGE: Final = (
    "<!DOCTYPE html><html><head><title>File not available</title></head>"
    "<body><h1>This file is not available</h1><p>Sign in to continue.</p></body></html>"
)
_NOT_AN_IMAGE: Final = b"this is not an image\n" * 64
_NESTING: Final = 100_000


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


def _garbage(body: str, created: int) -> Response:
    if body == "empty":
        return Response(b"", media_type="application/json")
    if body == "malformed":
        return Response(b'{"data": [{"url": ', media_type="application/json")
    if body == "bad-b64":
        return JSONResponse({"created": created, "data": [{"url": None, "b64_json": "%%%-no"}]})
    if body == "nested":
        # Valid JSON that a recursive parser cannot read: Python's json raises RecursionError.
        return Response(
            '{"data": ' + "[" * _NESTING + "]" * _NESTING + "}", media_type="application/json"
        )
    return Response(_CHALLENGE_PAGE, media_type="text/html")


def failure(provider: str, fault: Fault, created: int) -> Response:
    """The answer *fault* sends instead of the success (only for a fault that `Fault.fails`)."""
    if fault.drop:
        return _Dropping()
    if fault.body is not None and fault.body != "b64":
        return _garbage(fault.body, created)
    if fault.moderation:
        return error(
            provider,
            400,
            "Request Moderated: the prompt or an input was flagged",
            "content_policy_violation",
        )
    status = fault.status
    if status is None:
        raise ValueError(f"{fault} does not replace the answer; it has no failure to send")
    if status in _GATEWAY_PAGES:
        return Response(_GATEWAY_PAGES[status], status_code=status, media_type="text/html")
    message, code = _FAULT_ANSWERS.get(status, ("injected failure", "injected"))
    headers = {}
    if status == 429 or fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after if fault.retry_after is not None else 1:g}"
    return error(provider, status, message, code, headers)


def download(kind: str | None, picture: bytes, media_type: str, url: str, drip: float) -> Response:
    """The answer at a result URL: the image, or the misbehaviour *kind* (`Fault.download`).

    Args:
        kind: The download fault, or ``None`` for the image.
        picture: The image's bytes.
        media_type: The image's content type.
        url: This URL, for a redirect to itself.
        drip: Seconds per byte for ``"drip"``.
    """
    if kind == "html":
        return Response(_NOT_AVAILABLE_PAGE, media_type="text/html")
    if kind == "empty":
        return Response(b"", media_type=media_type)
    if kind == "redirect":
        return RedirectResponse("/portal", status_code=302)
    if kind == "redirect-loop":
        return RedirectResponse(url, status_code=302)
    if kind == "not-image":
        return Response(_NOT_AN_IMAGE, media_type=media_type)
    image = Response(picture, media_type=media_type)
    return dripped(image, drip) if kind == "drip" else image


def portal() -> Response:
    """The HTML page a ``"redirect"`` download lands on."""
    return Response(_NOT_AVAILABLE_PAGE, media_type="text/html")


def dripped(response: Response, interval: float) -> Response:
    """*response* with its headers sent at once and its body one byte every *interval* seconds.

    Starlette stops the stream when the client disconnects, so a client that gives up does not
    keep a task dripping into nothing.
    """
    body = bytes(response.body)

    async def one_byte_at_a_time() -> AsyncIterator[bytes]:
        for index in range(len(body)):
            await anyio.sleep(interval)
            yield body[index : index + 1]

    # The original Content-Length stays: the client knows from the headers how much is coming.
    return StreamingResponse(
        one_byte_at_a_time(),
        status_code=response.status_code,
        headers=dict(response.headers.items()),
    )
