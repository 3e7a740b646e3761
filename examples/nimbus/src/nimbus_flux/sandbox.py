"""Nimbus's sandbox: a local server speaking its task API, to record cassettes and test against.

    python -m nimbus_flux.sandbox --port 8766

A real provider author records against the live service (or the provider's own sandbox); Nimbus
is fictional, so this server stands in for it, on loopback, with no internet. It checks each
task as the document in README.md describes (unknown fields, too many references, off-grid
sizes, settings a model does not take: a 422), answers any key except a revoked one, and
renders real images with the flux-adapters emulator's public `flux_adapters.emulator.images`,
served at signed URLs that expire.

A task moves on when it is polled, not with time: ``queued`` at its first poll, ``running`` until
it has been polled ``pending_polls`` times (2 by default), then done; each pending answer asks for
the next poll after ``poll_after_ms``, doubling up to 2 s. An outcome of `OUTCOMES` decides how a
task ends, or how its submit is answered, when its prompt holds ``[sandbox:<outcome>]`` or when
it is sent under ``/sandbox/<outcome>`` (a base URL such as ``http://127.0.0.1:8766/sandbox/failed``,
whose URLs keep the prefix), or when the conformance suite's fault-control protocol armed it
(``POST /__flux/faults`` with a fault of `FAULTS`, until ``DELETE /__flux/faults``): that is how
``flux-adapters conformance --record --base-url`` records the failures a live service will not
produce on request.

In tests, `run_sandbox` serves it in a background thread and records every exchange it received
(`Sandbox.calls`), with the key each one carried.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import uvicorn
from attrs import define, field, frozen
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.config import LOGGING_CONFIG

from flux_adapters.emulator.images import decode, encode, placeholder, render

__all__ = [
    "FAULTS",
    "OUTCOMES",
    "REVOKED",
    "Call",
    "Sandbox",
    "create_app",
    "main",
    "run_sandbox",
]

REVOKED: Final = "sk-conformance-revoked-key"
"""A key the sandbox refuses with 401 (the conformance suite's ``error-401`` records with it)."""

OUTCOMES: Final = {
    "overloaded": "the submit answers 503 overloaded; no task is created",
    "no-credits": "the submit answers 402 insufficient_credits; no task is created",
    "rate-limited": "the submit answers 429 rate_limited with Retry-After: 7; no task is created",
    "prompt-blocked": "the submit answers 400 prompt_blocked; no task is created",
    "malformed": "the submit answers 200 with a body that is not the documented shape",
    "blocked": "the task ends blocked: input_blocked",
    "blocked-output": "the task ends blocked: output_blocked",
    "failed": "the task ends failed: worker_lost, not charged",
    "failed-charged": "the task ends failed: invalid_input, charged",
    "stuck": "the task never finishes (until canceled)",
    "expired": "its status URL answers 404 task_not_found",
}
"""How the sandbox can be told to answer, by ``[sandbox:<outcome>]`` in a prompt or a
``/sandbox/<outcome>`` base URL, and what each does."""

FAULTS: Final[tuple[tuple[dict[str, object], str], ...]] = (
    ({"status": 402}, "no-credits"),
    ({"status": 429, "retry_after": 7}, "rate-limited"),
    ({"status": 503}, "overloaded"),
    ({"body": "malformed"}, "malformed"),
    ({"moderation": True}, "prompt-blocked"),
    ({"outcome": "request-moderated"}, "blocked"),
    ({"outcome": "content-moderated"}, "blocked-output"),
    ({"outcome": "failed"}, "failed"),
    ({"outcome": "not-found"}, "expired"),
    ({"pending": 1000}, "stuck"),
)
"""The faults of the fault-control protocol the sandbox produces (its body, exactly), and the
outcome of `OUTCOMES` each arms; any other fault is answered 422."""

_MODELS: Final = {
    # wire model -> (max references, credits, takes a size, takes an aspect ratio, flex settings)
    "flux.2-pro": (6, 4, True, False, False),
    "flux.2-flex": (6, 6, True, False, True),
    "flux.1-kontext-pro": (1, 4, False, True, False),
}
_FORMATS: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_KONTEXT_FORMATS: Final = ("png", "jpeg")
_INPUT_FIELDS: Final = {
    "prompt",
    "references",
    "width",
    "height",
    "aspect_ratio",
    "seed",
    "steps",
    "guidance",
}
_MAX_REFERENCE_BYTES: Final = 16 * 1024 * 1024
_RATIO: Final = re.compile(r"([1-9][0-9]{0,2}):([1-9][0-9]{0,2})")
_TTL: Final = 600
_LONGEST_POLL_AFTER_MS: Final = 2000
_PROMPT_OUTCOME: Final = re.compile(r"\[sandbox:([a-z-]+)\]")


@frozen
class Call:
    """One exchange the sandbox received.

    Attributes:
        kind: ``"submit"``, ``"poll"``, ``"cancel"`` or ``"download"``.
        method: The HTTP method.
        url: The URL as requested (host included).
        key: The key it carried in ``Authorization: Token <key>``, or ``None``.
        authorization: The ``Authorization`` header as received, or ``None``.
    """

    kind: str
    method: str
    url: str
    key: str | None
    authorization: str | None


@define
class _Task:
    id: str
    credits: int
    images: list[bytes]
    extension: str
    outcome: str | None
    origin: str
    polls: int = 0
    canceled: bool = False
    finished: bool = False


@define
class Sandbox:
    """The sandbox's state: its tasks, its files, and every exchange it received.

    Attributes:
        pending_polls: Polls a task answers as not done before it ends.
        poll_after_ms: The ``poll_after_ms`` of a task's first pending answer, doubling with
            each poll up to 2000 (the live service asks for 1000 to 2000; the sandbox starts
            quicker, to keep tests and recordings short).
        public_url: The origin of the status, cancel and file URLs it hands out; by default
            the one each request came to.
        url: Its root URL once it is served (`run_sandbox`).
    """

    pending_polls: int = 2
    poll_after_ms: int = 50
    public_url: str | None = None
    url: str = ""
    armed: str | None = None
    """The outcome the fault-control protocol armed for every submit, until cleared."""
    _tasks: dict[str, _Task] = field(factory=dict, init=False)
    _calls: list[Call] = field(factory=list, init=False)
    _lock: threading.Lock = field(factory=threading.Lock, init=False)
    _secret: bytes = field(factory=lambda: secrets.token_bytes(16), init=False)

    def calls(self, kind: str | None = None) -> list[Call]:
        """The exchanges received, oldest first, all or of one *kind*."""
        with self._lock:
            return [call for call in self._calls if kind in (None, call.kind)]

    def _record(self, request: Request, kind: str) -> str | None:
        authorization = request.headers.get("authorization")
        scheme, _, key = (authorization or "").partition(" ")
        token = key.strip() if scheme == "Token" and key.strip() else None
        with self._lock:
            self._calls.append(Call(kind, request.method, str(request.url), token, authorization))
        return token

    def _sign(self, name: str, expires: int) -> str:
        return hmac.new(self._secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def _refusal(token: str | None) -> JSONResponse | None:
    if token is None:
        return _error(401, "missing_token", "send your key as Authorization: Token <key>")
    if token == REVOKED:
        return _error(401, "invalid_token", "this key was revoked")
    return None


def _origin(sandbox: Sandbox, request: Request) -> str:
    """Where the URLs handed out for *request* live: its origin, and its /sandbox/ prefix."""
    origin = sandbox.public_url or f"{request.url.scheme}://{request.url.netloc}"
    outcome = request.path_params.get("outcome")
    return f"{origin}/sandbox/{outcome}" if outcome else origin


class _Invalid(Exception):
    """A task the document says Nimbus refuses (answered 422 validation_failed)."""


def _whole(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _Invalid(f"input.{name} must be a whole number from {low} to {high}")
    return value


def _reference(value: object, index: int) -> Image.Image:
    where = f"input.references[{index}]"
    if not isinstance(value, dict):
        raise _Invalid(f"{where} must be an object")
    if value.get("type") == "url" and set(value) == {"type", "url"}:
        url = value["url"]
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise _Invalid(f"{where}.url must be an http(s) URL")
        return placeholder(url)  # the sandbox never fetches: a tile stands for the image
    if value.get("type") == "base64" and set(value) == {"type", "media_type", "data"}:
        if value["media_type"] not in _FORMATS.values():
            raise _Invalid(f"{where}.media_type must be image/png, image/jpeg or image/webp")
        data = value["data"]
        if not isinstance(data, str) or data.startswith("data:"):
            raise _Invalid(f"{where}.data must be bare base64, without a data: prefix")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _Invalid(f"{where}.data is not base64") from None
        if len(raw) > _MAX_REFERENCE_BYTES:
            raise _Invalid(f"{where} is over 16 MiB")
        try:
            return decode(raw)
        except ValueError:
            raise _Invalid(f"{where} is not a readable png, jpeg or webp image") from None
    raise _Invalid(f'{where} must be {{"type": "url", "url"}} or {{"type": "base64", ...}}')


def _ratio_size(text: object) -> tuple[int, int]:
    match = _RATIO.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise _Invalid('input.aspect_ratio must be "W:H"')
    ratio = int(match[1]) / int(match[2])
    if not 1 / 4 <= ratio <= 4:
        raise _Invalid("input.aspect_ratio must be from 1:4 to 4:1")
    width = math.sqrt(1024 * 1024 * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def _task(body: object) -> tuple[str, str, list[Image.Image], tuple[int, int], str, int | None]:
    """Check a submit's body; return its model, prompt, references, size, format and seed."""
    if not isinstance(body, dict) or not set(body) <= {"model", "input", "output"}:
        raise _Invalid("the body is an object with model, input and (optionally) output")
    model = body.get("model")
    if model not in _MODELS:
        raise _Invalid(f"model must be one of {', '.join(_MODELS)}")
    most, _, sized, ratioed, flex = _MODELS[model]
    task = body.get("input")
    if not isinstance(task, dict) or not set(task) <= _INPUT_FIELDS:
        unknown = sorted(set(task) - _INPUT_FIELDS) if isinstance(task, dict) else []
        raise _Invalid(f"input must be an object of the documented fields (unknown: {unknown})")
    prompt = task.get("prompt")
    if not isinstance(prompt, str) or not prompt or len(prompt) > 3000:
        raise _Invalid("input.prompt must be 1 to 3000 characters")
    given = task.get("references", [])
    if not isinstance(given, list) or len(given) > most:
        raise _Invalid(f"input.references takes at most {most} images for {model}")
    references = [_reference(value, index) for index, value in enumerate(given)]
    size = (1024, 1024)
    if "width" in task or "height" in task:
        if not sized:
            raise _Invalid(f"{model} takes no width or height; give aspect_ratio")
        size = (
            _whole(task.get("width"), "width", 256, 2048),
            _whole(task.get("height"), "height", 256, 2048),
        )
        if size[0] % 32 or size[1] % 32:
            raise _Invalid("input.width and input.height must be multiples of 32")
    if "aspect_ratio" in task:
        if not ratioed:
            raise _Invalid(f"{model} takes no aspect_ratio; give width and height")
        size = _ratio_size(task["aspect_ratio"])
    seed = _whole(task["seed"], "seed", 0, 2**32 - 1) if "seed" in task else None
    if ("steps" in task or "guidance" in task) and not flex:
        raise _Invalid(f"{model} takes no steps or guidance")
    if "steps" in task:
        _whole(task["steps"], "steps", 1, 50)
    guidance = task.get("guidance", 1.5)
    if not isinstance(guidance, int | float) or isinstance(guidance, bool):
        raise _Invalid("input.guidance must be a number")
    if not 1.5 <= guidance <= 10:
        raise _Invalid("input.guidance must be from 1.5 to 10")
    output = body.get("output", {"format": "png"})
    formats = _KONTEXT_FORMATS if ratioed else tuple(_FORMATS)
    if not isinstance(output, dict) or set(output) != {"format"} or output["format"] not in formats:
        raise _Invalid(f"output.format must be one of {', '.join(formats)}")
    return model, prompt, references, size, output["format"], seed


def _prompt_outcome(body: object) -> str | None:
    task = body.get("input") if isinstance(body, dict) else None
    prompt = task.get("prompt") if isinstance(task, dict) else None
    found = _PROMPT_OUTCOME.search(prompt) if isinstance(prompt, str) else None
    return found[1] if found is not None and found[1] in OUTCOMES else None


def _submit_refusal(outcome: str | None) -> Response | None:
    """The answer to a submit that *outcome* refuses (no task is created), if it does."""
    if outcome == "overloaded":
        return _error(503, "overloaded", "no capacity right now; nothing was created")
    if outcome == "no-credits":
        return _error(402, "insufficient_credits", "top up your credits to submit tasks")
    if outcome == "rate-limited":
        answer = _error(429, "rate_limited", "too many tasks in flight")
        answer.headers["Retry-After"] = "7"
        return answer
    if outcome == "prompt-blocked":
        return _error(400, "prompt_blocked", "the prompt was refused by the safety filter")
    if outcome == "malformed":
        return Response('{"task_id": "tsk_', status_code=200, media_type="application/json")
    return None


def create_app(sandbox: Sandbox) -> Starlette:
    """The sandbox's HTTP application, serving *sandbox*."""

    async def submit(request: Request) -> Response:
        refused = _refusal(sandbox._record(request, "submit")) or _unknown_outcome(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not JSON")
        outcome = request.path_params.get("outcome") or sandbox.armed or _prompt_outcome(body)
        refused = _submit_refusal(outcome)
        if refused is not None:
            return refused
        try:
            model, prompt, references, (width, height), extension, seed = _task(body)
        except _Invalid as problem:
            return _error(422, "validation_failed", str(problem))
        picture = encode(render(width, height, references, prompt, seed), extension)
        task = _Task(
            id=f"tsk_{secrets.token_hex(10)}",
            credits=_MODELS[model][1],
            images=[picture],
            extension=extension,
            outcome=outcome,
            origin=_origin(sandbox, request),
        )
        sandbox._tasks[task.id] = task
        origin = task.origin
        return JSONResponse(
            {
                "task_id": task.id,
                "state": "queued",
                "status_url": f"{origin}/v1/tasks/{task.id}",
                "cancel_url": f"{origin}/v1/tasks/{task.id}/cancel",
            },
            status_code=202,
        )

    async def status(request: Request) -> Response:
        refused = _refusal(sandbox._record(request, "poll")) or _unknown_outcome(request)
        if refused is not None:
            return refused
        task = sandbox._tasks.get(request.path_params["task_id"])
        if task is None or task.outcome == "expired":
            return _error(404, "task_not_found", "no such task (tasks are kept for 24 hours)")
        task.polls += 1
        answer: dict[str, object] = {"task_id": task.id}
        if task.canceled:
            task.finished = True
            return JSONResponse({**answer, "state": "canceled"})
        if task.polls <= sandbox.pending_polls or task.outcome == "stuck":
            queued = task.polls == 1
            progress = 0.0 if queued else min(0.9, (task.polls - 1) / max(1, sandbox.pending_polls))
            answer |= {"state": "queued" if queued else "running", "progress": progress}
            if queued:
                answer["queue_position"] = 1
            later = sandbox.poll_after_ms * 2 ** min(task.polls - 1, 16)
            answer["poll_after_ms"] = min(later, _LONGEST_POLL_AFTER_MS)
            return JSONResponse(answer)
        task.finished = True
        return JSONResponse(answer | _ending(task, sandbox))

    async def cancel(request: Request) -> Response:
        refused = _refusal(sandbox._record(request, "cancel")) or _unknown_outcome(request)
        if refused is not None:
            return refused
        task = sandbox._tasks.get(request.path_params["task_id"])
        if task is None:
            return _error(404, "task_not_found", "no such task")
        if task.finished:
            return _error(409, "task_finished", "the task has already finished")
        task.canceled = True
        return JSONResponse({"task_id": task.id, "state": "canceling"}, status_code=202)

    async def download(request: Request) -> Response:
        sandbox._record(request, "download")
        name = request.path_params["name"]
        task_id, _, rest = name.partition("-")
        task = sandbox._tasks.get(task_id)
        expires = request.query_params.get("expires", "")
        signature = request.query_params.get("signature", "")
        if not expires.isdigit() or not hmac.compare_digest(
            signature, sandbox._sign(name, int(expires))
        ):
            return _error(403, "bad_signature", "the URL's signature does not match")
        if int(expires) < time.time():
            return _error(403, "expired", "the URL has expired")
        index = rest.partition(".")[0]
        if task is None or not index.isdigit() or int(index) >= len(task.images):
            return _error(404, "file_not_found", "no such file")
        return Response(task.images[int(index)], media_type=_FORMATS[task.extension])

    async def faults(request: Request) -> Response:
        """The fault-control protocol: arm (POST) one of `FAULTS` for every submit, or clear it."""
        sandbox.armed = None
        if request.method == "DELETE":
            return Response(status_code=204)
        try:
            fault = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not JSON")
        armed = next((outcome for known, outcome in FAULTS if known == fault), None)
        if armed is None:
            return _error(422, "unsupported_fault", f"the sandbox cannot produce {fault}")
        sandbox.armed = armed
        return JSONResponse({"armed": fault, "outcome": armed})

    routes = [
        Route("/v1/tasks", submit, methods=["POST"]),
        Route("/v1/tasks/{task_id}", status, methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", cancel, methods=["POST"]),
        Route("/v1/files/{name}", download, methods=["GET"]),
    ]
    # The same API under /sandbox/<outcome>: every task submitted there ends that way.
    return Starlette(
        routes=[
            Route("/__flux/faults", faults, methods=["POST", "DELETE"]),
            *routes,
            *(
                Route(f"/sandbox/{{outcome}}{r.path}", r.endpoint, methods=r.methods)
                for r in routes
            ),
        ]
    )


def _unknown_outcome(request: Request) -> Response | None:
    outcome = request.path_params.get("outcome")
    if outcome is None or outcome in OUTCOMES:
        return None
    return _error(404, "unknown_outcome", f"the sandbox knows {', '.join(OUTCOMES)}")


def _ending(task: _Task, sandbox: Sandbox) -> dict[str, object]:
    """How a task ends: its images and credits, or why it has none."""
    if task.outcome == "blocked":
        return {"state": "blocked", "error": {"code": "input_blocked", "message": "a reference or the prompt was blocked"}}  # fmt: skip
    if task.outcome == "blocked-output":
        return {"state": "blocked", "error": {"code": "output_blocked", "message": "the generated image was blocked"}}  # fmt: skip
    if task.outcome == "failed":
        return {"state": "failed", "error": {"code": "worker_lost", "message": "the worker rendering the task was lost", "charged": False}}  # fmt: skip
    if task.outcome == "failed-charged":
        return {"state": "failed", "error": {"code": "invalid_input", "message": "a reference could not be used", "charged": True}}  # fmt: skip
    expires = int(time.time()) + _TTL
    origin = task.origin
    images = []
    for index in range(len(task.images)):
        name = f"{task.id}-{index}.{task.extension}"
        signature = sandbox._sign(name, expires)
        images.append(
            {
                "url": f"{origin}/v1/files/{name}?expires={expires}&signature={signature}",
                "content_type": _FORMATS[task.extension],
            }
        )
    return {
        "state": "succeeded",
        "progress": 1.0,
        "output": {"images": images},
        "usage": {"credits": task.credits},
    }


def _listening(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _server(sandbox: Sandbox, *, own_logging: bool) -> uvicorn.Server:
    # In a test's thread the host application's logging is left alone (no log_config).
    config = uvicorn.Config(
        create_app(sandbox),
        log_level="warning",
        log_config=LOGGING_CONFIG if own_logging else None,
        access_log=False,
        lifespan="off",
    )
    return uvicorn.Server(config)


@contextmanager
def run_sandbox(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    pending_polls: int = 2,
    poll_after_ms: int = 50,
    public_url: str | None = None,
) -> Iterator[Sandbox]:
    """Serve a sandbox in a background thread (on a free port by default); stop it on exit."""
    sandbox = Sandbox(
        pending_polls=pending_polls, poll_after_ms=poll_after_ms, public_url=public_url
    )
    sock = _listening(host, port)
    server = _server(sandbox, own_logging=False)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="nimbus-sandbox", daemon=True
    )
    try:
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Nimbus sandbox did not start")
            time.sleep(0.01)
        sandbox.url = f"http://{host}:{sock.getsockname()[1]}"
        yield sandbox
    finally:
        server.should_exit = True
        if thread.is_alive():
            thread.join(timeout=10)
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m nimbus_flux.sandbox``: serve the sandbox in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m nimbus_flux.sandbox",
        description="Nimbus's sandbox (Nimbus is fictional): its task API on loopback, any key "
        f"accepted but {REVOKED}",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument(
        "--pending-polls", type=int, default=2, help="polls a task answers as pending (default 2)"
    )
    parser.add_argument(
        "--poll-after-ms",
        type=int,
        default=50,
        help="the first pending answer's poll_after_ms, doubling up to 2000 (default 50)",
    )
    arguments = parser.parse_args(argv)
    sandbox = Sandbox(pending_polls=arguments.pending_polls, poll_after_ms=arguments.poll_after_ms)
    try:
        sock = _listening(arguments.host, arguments.port)
    except OSError as exc:
        print(
            f"nimbus sandbox: cannot listen on port {arguments.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    print(
        f"Nimbus sandbox on http://{arguments.host}:{sock.getsockname()[1]} (Ctrl-C to stop)",
        flush=True,
    )
    try:
        _server(sandbox, own_logging=True).run(sockets=[sock])
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
