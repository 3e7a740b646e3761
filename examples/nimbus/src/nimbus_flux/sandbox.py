"""Nimbus's sandbox: a local server speaking its task API, to record cassettes and test against.

    python -m nimbus_flux.sandbox --port 8766

A real provider author records against the live service (or the provider's own sandbox); Nimbus
is fictional, so this server stands in for it, on loopback, with no internet. It checks each
task as the document in README.md describes (unknown fields, too many references, off-grid
sizes, settings a model does not take: a 422), answers any key except a revoked one, and
renders real images with the flux-adapters emulator's public `flux_adapters.emulator.images`,
served at signed URLs that expire.

A task moves on when it is polled, not with time: ``queued`` at its first poll, ``running`` until
it has been polled ``pending_polls`` times (2 by default), then done. Prompts holding a sandbox
word decide how it ends (the README lists them), e.g. ``[sandbox:blocked]``.

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

__all__ = ["REVOKED", "SANDBOX_WORDS", "Call", "Sandbox", "create_app", "main", "run_sandbox"]

REVOKED: Final = "sk-conformance-revoked-key"
"""A key the sandbox refuses with 401 (the conformance suite's ``error-401`` records with it)."""

SANDBOX_WORDS: Final = {
    "[sandbox:overloaded]": "the submit answers 503 overloaded; no task is created",
    "[sandbox:prompt-blocked]": "the submit answers 400 prompt_blocked",
    "[sandbox:blocked]": "the task ends blocked: input_blocked",
    "[sandbox:blocked-output]": "the task ends blocked: output_blocked",
    "[sandbox:failed]": "the task ends failed: worker_lost, not charged",
    "[sandbox:failed-charged]": "the task ends failed: invalid_input, charged",
    "[sandbox:stuck]": "the task never finishes (until canceled)",
    "[sandbox:expired]": "its status URL answers 404 task_not_found",
}
"""Words in a prompt that make the sandbox end a task a given way, and what each does."""

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
    word: str | None
    polls: int = 0
    canceled: bool = False
    finished: bool = False


@define
class Sandbox:
    """The sandbox's state: its tasks, its files, and every exchange it received.

    Attributes:
        pending_polls: Polls a task answers as not done before it ends.
        poll_after_ms: The ``poll_after_ms`` a pending task answers (the live service's document
            says 1000 to 2000; the sandbox is quicker, to keep tests and replays short).
        public_url: The origin of the status, cancel and file URLs it hands out; by default
            the one each request came to.
        url: Its root URL once it is served (`run_sandbox`).
    """

    pending_polls: int = 2
    poll_after_ms: int = 50
    public_url: str | None = None
    url: str = ""
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
    return sandbox.public_url or str(request.base_url).rstrip("/")


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


def _word(prompt: str) -> str | None:
    return next((word for word in SANDBOX_WORDS if word in prompt), None)


def create_app(sandbox: Sandbox) -> Starlette:
    """The sandbox's HTTP application, serving *sandbox*."""

    async def submit(request: Request) -> Response:
        refused = _refusal(sandbox._record(request, "submit"))
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not JSON")
        task_input = body.get("input") if isinstance(body, dict) else None
        prompt = task_input.get("prompt") if isinstance(task_input, dict) else None
        word = _word(prompt) if isinstance(prompt, str) else None
        if word == "[sandbox:overloaded]":
            return _error(503, "overloaded", "no capacity right now; nothing was created")
        if word == "[sandbox:prompt-blocked]":
            return _error(400, "prompt_blocked", "the prompt was refused by the safety filter")
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
            word=word,
        )
        sandbox._tasks[task.id] = task
        origin = _origin(sandbox, request)
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
        refused = _refusal(sandbox._record(request, "poll"))
        if refused is not None:
            return refused
        task = sandbox._tasks.get(request.path_params["task_id"])
        if task is None or task.word == "[sandbox:expired]":
            return _error(404, "task_not_found", "no such task (tasks are kept for 24 hours)")
        task.polls += 1
        answer: dict[str, object] = {"task_id": task.id}
        if task.canceled:
            task.finished = True
            return JSONResponse({**answer, "state": "canceled"})
        if task.polls <= sandbox.pending_polls or task.word == "[sandbox:stuck]":
            queued = task.polls == 1
            progress = 0.0 if queued else min(0.9, (task.polls - 1) / max(1, sandbox.pending_polls))
            answer |= {"state": "queued" if queued else "running", "progress": progress}
            if queued:
                answer["queue_position"] = 1
            answer["poll_after_ms"] = sandbox.poll_after_ms
            return JSONResponse(answer)
        task.finished = True
        return JSONResponse(answer | _ending(sandbox, request, task))

    async def cancel(request: Request) -> Response:
        refused = _refusal(sandbox._record(request, "cancel"))
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

    return Starlette(
        routes=[
            Route("/v1/tasks", submit, methods=["POST"]),
            Route("/v1/tasks/{task_id}", status, methods=["GET"]),
            Route("/v1/tasks/{task_id}/cancel", cancel, methods=["POST"]),
            Route("/v1/files/{name}", download, methods=["GET"]),
        ]
    )


def _ending(sandbox: Sandbox, request: Request, task: _Task) -> dict[str, object]:
    """How a task ends: its images and credits, or why it has none."""
    if task.word == "[sandbox:blocked]":
        return {"state": "blocked", "error": {"code": "input_blocked", "message": "a reference or the prompt was blocked"}}  # fmt: skip
    if task.word == "[sandbox:blocked-output]":
        return {"state": "blocked", "error": {"code": "output_blocked", "message": "the generated image was blocked"}}  # fmt: skip
    if task.word == "[sandbox:failed]":
        return {"state": "failed", "error": {"code": "worker_lost", "message": "the worker rendering the task was lost", "charged": False}}  # fmt: skip
    if task.word == "[sandbox:failed-charged]":
        return {"state": "failed", "error": {"code": "invalid_input", "message": "a reference could not be used", "charged": True}}  # fmt: skip
    expires = int(time.time()) + _TTL
    origin = _origin(sandbox, request)
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
    parser.add_argument("--pending-polls", type=int, default=2, help="default: 2")
    arguments = parser.parse_args(argv)
    sandbox = Sandbox(pending_polls=arguments.pending_polls)
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
