"""PixelForge's sandbox: a local server speaking its render API, to record cassettes against.

    python -m pixelforge_flux.sandbox --port 8765

A real provider author records against the live service (or its sandbox); this one exists so
the worked example can be recorded and reproduced without the internet. It answers with a real
image drawn by the flux-adapters emulator (`flux_adapters.emulator.images`, public API) and serves
it at a signed URL.

It also speaks the conformance suite's fault-control protocol (the delimited part below), so
that ``flux-adapters conformance --record --base-url`` records the failures a live service will
not produce on request: 402, 429, 503, an unreadable 200 and moderation, each in the shape
PixelForge's documentation gives it. PixelForge answers with URLs only, so it cannot answer
inline: ``{"body": "b64"}``, like any fault it cannot produce, gets a 422.
"""

from __future__ import annotations

import argparse
import base64
import secrets

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flux_adapters.emulator.images import decode, encode, placeholder, render

REVOKED = "sk-conformance-revoked-key"
_results: dict[str, bytes] = {}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


# --- fault-control protocol (docs/validating-a-provider.md) ---
_armed: list[dict[str, object]] = []  # the fault the next renders answer with; none: render


def _answer_to(fault: dict[str, object]) -> Response | None:
    """PixelForge's documented answer to *fault*, or None when the sandbox cannot produce it."""
    if fault == {"status": 402}:
        return _error(402, "insufficient_credits", "your credit balance is too low")
    if fault == {"status": 503}:
        return _error(503, "overloaded", "no render capacity right now; try again later")
    if fault == {"moderation": True}:
        return _error(400, "prompt_refused", "the prompt breaks the content policy")
    if fault == {"body": "malformed"}:
        return Response('{"job": "cut-off', media_type="application/json")
    wait, keys = fault.get("retry_after", 1), set(fault)
    if fault.get("status") == 429 and keys <= {"status", "retry_after"} and isinstance(wait, int):
        # PixelForge gives the wait in the body, in milliseconds, and sends no Retry-After.
        body = {"error_code": "rate_limited", "message": "slow down", "retry_in_ms": wait * 1000}
        return JSONResponse(body, status_code=429)
    return None


async def faults_route(request: Request) -> Response:
    """Arm (POST) the fault the next renders answer with, or clear it (DELETE)."""
    _armed.clear()
    if request.method == "POST":
        fault = await request.json()
        if not isinstance(fault, dict) or _answer_to(fault) is None:
            return _error(422, "unsupported_fault", f"the sandbox cannot produce {fault}")
        _armed.append(fault)
    return Response(status_code=204)


# --- end of the fault-control protocol ---


async def render_route(request: Request) -> Response:
    if _armed and (answer := _answer_to(_armed[0])) is not None:  # fault-control protocol
        return answer
    key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not key or key == REVOKED:
        return _error(401, "invalid_api_key", "unknown or revoked API key")
    body = await request.json()
    if body.get("engine") != "flux-2-pro" or not body.get("text"):
        return _error(400, "invalid_request", "engine flux-2-pro and text are required")
    references: list[Image.Image] = []
    for reference in body.get("references", []):
        if "data" in reference:
            try:
                references.append(decode(base64.b64decode(reference["data"].split(",", 1)[1])))
            except ValueError:
                return _error(400, "invalid_reference", "a reference is not a readable image")
        else:
            references.append(placeholder(reference["url"]))
    if len(references) > 4:
        return _error(400, "too_many_references", "at most 4 references")
    canvas = body.get("canvas", {"w": 1024, "h": 1024})
    if (
        canvas["w"] % 64
        or canvas["h"] % 64
        or not (256 <= canvas["w"] <= 1536 and 256 <= canvas["h"] <= 1536)
    ):
        return _error(
            400, "invalid_canvas", "canvas sides must be multiples of 64 from 256 to 1536"
        )
    picture = encode(
        render(canvas["w"], canvas["h"], references, body["text"], body.get("seed")),
        body.get("format", "png"),
    )
    name = f"{secrets.token_hex(8)}.{body.get('format', 'png')}"
    _results[name] = picture
    href = f"{str(request.base_url).rstrip('/')}/outputs/{name}?sig={secrets.token_hex(8)}"
    return JSONResponse({"job": name.split(".")[0], "outputs": [{"href": href}]})


async def output_route(request: Request) -> Response:
    picture = _results.get(request.path_params["name"])
    if picture is None:
        return Response(status_code=404)
    return Response(
        picture,
        media_type="image/png" if request.path_params["name"].endswith("png") else "image/jpeg",
    )


app = Starlette(
    routes=[
        Route("/api/v2/render", render_route, methods=["POST"]),
        Route("/outputs/{name}", output_route),
        Route("/__flux/faults", faults_route, methods=["POST", "DELETE"]),  # fault-control protocol
    ]
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="PixelForge's sandbox (fictional), for recording cassettes"
    )
    parser.add_argument("--port", type=int, default=8765)
    arguments = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=arguments.port, log_level="warning")
