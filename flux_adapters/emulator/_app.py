"""The emulator's ASGI app: each provider's endpoints under ``/<provider>``, on one server.

Routes::

    POST /laozhang/v1/images/generations    laozhang JSON
    POST /apiyi/v1/images/generations       apiyi JSON
    POST /apiyi/v1/images/edits             apiyi multipart (image[]), provider id apiyi-multipart
    POST /aimlapi/v1/images/generations     aimlapi JSON
    /bfl/..., /fal/...                      the job providers (`_job_routes`)
    GET  /files/<name>?expires=&signature=  results; 403 once expired, as signed URLs do
    GET  /portal                            the HTML page a "redirect" download fault lands on
    POST /<prefix>/__flux/faults            arm a fault for the providers under that prefix
    DELETE /<prefix>/__flux/faults          clear them (the fault-control protocol)

Every POST is recorded (`Emulator.calls`), refused with 413 if its body is over the limit, may
meet an injected `Fault`, is checked for a bearer key, the content type and the body
(`_dialects`), and is answered with a real image rendered at the requested size and format. A
rendered job is billed (`Emulator.billed`) whether or not its answer gets through. What each
answer looks like is decided in `_answers`; this module decides when each is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
from attrs import define, field, frozen
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flux_adapters._files import MEDIA_TYPES as _FORMAT_MEDIA
from flux_adapters._serving import TooLarge, capped
from flux_adapters.emulator import _answers, _dialects
from flux_adapters.emulator import images as _images
from flux_adapters.emulator._faults import (
    FAULTS_PATH,
    Billed,
    Call,
    Fault,
    _Armed,
    build_fault_body,
    parse_fault_body,
)
from flux_adapters.emulator._jobs import JobRecord

__all__ = [
    "MEDIA_TYPES",
    "Result",
    "State",
    "TooLarge",
    "capped",
    "create_app",
    "declared_too_large",
    "delivered",
    "result_url",
    "too_large",
]

MEDIA_TYPES: Final = {name: _FORMAT_MEDIA[name] for name in ("jpeg", "png", "webp")}
"""The media type of each output format it serves (the library's one table)."""
_KEPT_RESULTS: Final = 512
_KEPT_JOBS: Final = 512
_MB: Final = 1024 * 1024
_FAULT_BODY_BYTES: Final = 64 * 1024
# Where each provider reads the key; the others read Authorization.
_KEY_HEADERS: Final = {"bfl": "x-key"}


@frozen
class Result:
    """A rendered image at its result URL, and how that URL misbehaves (`Fault.download`)."""

    picture: bytes
    media_type: str
    download: str | None = None
    drip: float = 0.0


@define(kw_only=True)
class State:
    """Everything the emulator knows; shared with the `Emulator` handle that controls it.

    Attributes:
        max_body_bytes: The largest request body accepted; a larger one gets a 413.
        random: Decides whether a fault with a ``chance`` applies; seed it for repeatable runs.
        pending_polls: Polls a job answers as not done, unless its fault says otherwise.
        jobs: The jobs of the job providers by id, the oldest forgotten past a bound (then
            unknown, as an expired id is).
    """

    max_body_bytes: int
    pending_polls: int = 2
    ttl: float = 600.0
    valid_keys: frozenset[str] | None = None
    bad_keys: frozenset[str] = frozenset()
    clock: Callable[[], float] = time.time
    random: random.Random = field(factory=random.Random)
    secret: bytes = field(factory=lambda: secrets.token_bytes(32))
    calls: list[Call] = field(factory=list)
    billed: list[Billed] = field(factory=list)
    faults: dict[str, list[_Armed]] = field(factory=dict)
    results: OrderedDict[str, Result] = field(factory=OrderedDict)
    jobs: OrderedDict[str, JobRecord] = field(factory=OrderedDict)
    lock: threading.Lock = field(factory=threading.Lock)

    def take_fault(self, provider: str, kind: str = "submit") -> Fault | None:
        """The fault to apply to this *kind* of exchange with *provider*, if any, counting it.

        Faults are tried in the order injected; the first for this kind of exchange (``on``)
        that still has uses left (``first``) and wins its draw (``chance``) applies.
        """
        with self.lock:
            for armed in self.faults.get(provider, []):
                fault = armed.fault
                if fault.on != kind:
                    continue
                if fault.first is not None and armed.used >= fault.first:
                    continue
                # A certain fault draws nothing, so it does not shift the others' draws.
                if fault.chance < 1 and self.random.random() >= fault.chance:
                    continue
                armed.used += 1
                return fault
        return None

    def record(self, provider: str, request: Request, kind: str = "submit") -> None:
        """Note an exchange received: its kind, where it was sent, whether it carried a key."""
        keyed = bool(request.headers.get(_KEY_HEADERS.get(provider, "authorization"), "").strip())
        call = Call(
            provider,
            request.method,
            request.url.path,
            time.time(),
            kind=kind,
            host=request.headers.get("host", ""),
            keyed=keyed,
        )
        with self.lock:
            self.calls.append(call)

    def bill(self, job: _dialects.Job, job_id: str | None = None) -> Billed:
        """Note a job charged for: from here on the provider has earned its money."""
        billed = Billed(
            provider=job.provider,
            model=job.model,
            prompt=job.prompt,
            seed=job.seed,
            at=time.time(),
            job_id=job_id,
        )
        with self.lock:
            self.billed.append(billed)
        return billed

    def refund(self, billed: Billed) -> None:
        """Take a charge off the ledger (a fal request cancelled while in the queue)."""
        with self.lock:
            self.billed = [entry for entry in self.billed if entry is not billed]

    def add_job(self, job: JobRecord) -> None:
        """Keep *job* for its polls, forgetting the oldest past a bound."""
        with self.lock:
            self.jobs[job.id] = job
            while len(self.jobs) > _KEPT_JOBS:
                self.jobs.popitem(last=False)

    def job(self, job_id: str, provider: str) -> JobRecord | None:
        """*provider*'s job *job_id*, if it is known."""
        with self.lock:
            found = self.jobs.get(job_id)
        return found if found is not None and found.provider == provider else None

    def keep(self, result: Result) -> str:
        """Store *result* under a new name (forgetting the oldest past a bound) and return it."""
        name = f"{secrets.token_hex(12)}.{result.media_type.removeprefix('image/')}"
        with self.lock:
            self.results[name] = result
            while len(self.results) > _KEPT_RESULTS:
                self.results.popitem(last=False)
        return name

    def sign(self, name: str, expires: int) -> str:
        """The signature of a result URL."""
        return hmac.new(self.secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()


def too_large(provider: str, limit: int) -> Response:
    # Connection: close, so the server stops reading instead of draining a body it refused.
    return _answers.error(
        provider,
        413,
        f"Request body too large: at most {limit} bytes",
        "request_too_large",
        {"Connection": "close"},
    )


def declared_too_large(request: Request, limit: int) -> bool:
    # h11 has already refused a Content-Length that is not a number.
    declared = request.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > limit


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _refusal(state: State, request: Request, provider: str) -> Response | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return _answers.error(
            provider,
            401,
            "No API key provided: send Authorization: Bearer <key>",
            "invalid_api_key",
        )
    if key in state.bad_keys or (state.valid_keys is not None and key not in state.valid_keys):
        return _answers.error(provider, 401, "Invalid API key", "invalid_api_key")
    return None


def _checked(provider: str, job: _dialects.Job | list[str]) -> _dialects.Job | Response:
    if isinstance(job, list):
        return _answers.error(provider, 400, "; ".join(job), "invalid_request")
    return job


def _json_job(
    provider: str, dialect: _dialects.JsonDialect
) -> Callable[[Request], Awaitable[_dialects.Job | Response]]:
    async def validate(request: Request) -> _dialects.Job | Response:
        if _media_type(request) != "application/json":
            return _answers.error(
                provider, 415, "Content-Type must be application/json", "unsupported_media_type"
            )
        raw = await request.body()
        try:
            # Off the event loop: a body of a few hundred MB takes a while to parse.
            body = await anyio.to_thread.run_sync(json.loads, raw)
        except (ValueError, RecursionError):
            return _answers.error(provider, 400, "the body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return _answers.error(provider, 400, "the body must be a JSON object", "invalid_json")
        return _checked(provider, await anyio.to_thread.run_sync(dialect, body))

    return validate


async def _form_job(request: Request) -> _dialects.Job | Response:
    provider = "apiyi-multipart"
    if _media_type(request) != "multipart/form-data":
        return _answers.error(
            provider, 415, "Content-Type must be multipart/form-data", "unsupported_media_type"
        )
    fields: dict[str, str] = {}
    files: list[tuple[str, _dialects.Upload]] = []
    try:
        async with request.form(max_files=64, max_fields=64, max_part_size=_MB) as form:
            for name, value in form.multi_items():
                if isinstance(value, str):
                    fields[name] = value
                else:
                    data = await value.read()
                    upload = _dialects.Upload(value.filename or "", value.content_type or "", data)
                    files.append((name, upload))
    except HTTPException as exc:
        # Starlette's answer to a broken multipart body; the provider's style instead.
        return _answers.error(provider, 400, exc.detail, "invalid_multipart")
    return _checked(
        provider, await anyio.to_thread.run_sync(_dialects.apiyi_multipart, fields, files)
    )


def _rendered(job: _dialects.Job) -> bytes:
    picture = _images.render(job.width, job.height, job.references, job.prompt, job.seed)
    return _images.encode(picture, job.output_format)


def delivered(answer: Response, fault: Fault | None) -> Response:
    """*answer*, dripped if *fault* says so (and its download does not drip instead)."""
    if fault is not None and fault.drip and fault.download != "drip":
        return _answers.dripped(answer, fault.drip)
    return answer


def result_url(state: State, root: str, result: Result) -> str:
    """Keep *result* and return its signed URL under *root*, valid for the emulator's ttl."""
    name = state.keep(result)
    expires = int(state.clock() + state.ttl)
    return f"{root}/files/{name}?expires={expires}&signature={state.sign(name, expires)}"


async def _run_job(
    state: State,
    provider: str,
    request: Request,
    validate: Callable[[Request], Awaitable[_dialects.Job | Response]],
) -> Response:
    """One POST, from receipt to answer: the order of checks, faults, work and billing."""
    state.record(provider, request)
    limit = state.max_body_bytes
    # Decided from the header before a byte of the body is read.
    if declared_too_large(request, limit):
        return too_large(provider, limit)
    fault = state.take_fault(provider)
    if fault is not None and fault.delay:
        await anyio.sleep(fault.delay)
    created = int(state.clock())
    if fault is not None and fault.fails and not fault.after_work:
        return delivered(_answers.failure(provider, fault, created), fault)
    refused = _refusal(state, request, provider)
    if refused is not None:
        return refused
    try:
        job = await validate(capped(request, limit))
    except TooLarge:
        return too_large(provider, limit)
    if isinstance(job, Response):
        return job
    picture = await anyio.to_thread.run_sync(_rendered, job)
    state.bill(job)
    if fault is not None and fault.after_work:
        answer = _answers.failure(provider, fault, created)
    elif fault is not None and fault.body == "b64":
        answer = _answers.result_inline(picture, created)
    else:
        result = Result(
            picture,
            MEDIA_TYPES[job.output_format],
            fault.download if fault is not None else None,
            fault.drip if fault is not None else 0.0,
        )
        url = result_url(state, str(request.base_url).rstrip("/"), result)
        answer = _answers.result_url(provider, url, created)
    return delivered(answer, fault)


def _control_answer(status: int, message: str) -> Response:
    return JSONResponse({"error": {"message": message}}, status_code=status)


async def _fault_control(state: State, request: Request) -> Response:
    """The fault-control protocol: arm (POST) or clear (DELETE) faults for one base URL.

    The base URL's prefix names the providers (``/apiyi`` is both ``apiyi`` and
    ``apiyi-multipart``, which share it). A POST adds the fault after any armed before, as
    `Emulator.inject` does: 200 with the fault, or 400 for a body that is no fault and 422 for
    one that cannot take effect there (`Fault.check_for`). A DELETE clears them: 204.
    """
    from flux_adapters.emulator import PROVIDER_PREFIXES

    prefix = request.path_params["prefix"]
    providers = [name for name, under in PROVIDER_PREFIXES.items() if under == prefix]
    if not providers:
        return _control_answer(404, f"no provider under /{prefix}")
    if request.method == "DELETE":
        with state.lock:
            for provider in providers:
                state.faults.pop(provider, None)
        return Response(status_code=204)
    if declared_too_large(request, _FAULT_BODY_BYTES):
        return _control_answer(413, f"a fault is at most {_FAULT_BODY_BYTES} bytes")
    try:
        raw = await capped(request, _FAULT_BODY_BYTES).body()
        fault = parse_fault_body(json.loads(raw))
    except TooLarge:
        return _control_answer(413, f"a fault is at most {_FAULT_BODY_BYTES} bytes")
    except (ValueError, RecursionError) as exc:  # not JSON (a ValueError too), or no fault
        return _control_answer(400, f"not a fault: {str(exc)[:300]}")
    try:
        for provider in providers:
            fault.check_for(provider)
    except ValueError as exc:
        return _control_answer(422, str(exc))
    with state.lock:
        for provider in providers:
            state.faults.setdefault(provider, []).append(_Armed(fault))
    return JSONResponse({"armed": build_fault_body(fault), "providers": providers})


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client hung up before its body was read: nobody will read this answer, and a hang-up
    # is no server error worth a traceback in the log.
    return Response(status_code=400)


def create_app(state: State) -> Starlette:
    """The emulator's ASGI app over *state*."""
    json_jobs = {
        provider: _json_job(provider, dialect) for provider, dialect in _dialects.DIALECTS.items()
    }

    async def generations(request: Request) -> Response:
        provider = request.path_params["provider"]
        validate = json_jobs.get(provider)
        if validate is None:
            return JSONResponse(
                {"error": {"message": f"no provider {provider!r} here"}}, status_code=404
            )
        return await _run_job(state, provider, request, validate)

    async def edits(request: Request) -> Response:
        return await _run_job(state, "apiyi-multipart", request, _form_job)

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
        return _answers.download(
            stored.download, stored.picture, stored.media_type, str(request.url), stored.drip
        )

    async def portal(request: Request) -> Response:
        return _answers.portal()

    async def fault_control(request: Request) -> Response:
        return await _fault_control(state, request)

    # Imported here: the job routes use this module's helpers.
    from flux_adapters.emulator._job_routes import job_routes

    routes = [
        # First: fal's catch-all route would take /fal/__flux/faults for its own.
        Route(f"/{{prefix}}{FAULTS_PATH}", fault_control, methods=["POST", "DELETE"]),
        Route("/apiyi/v1/images/edits", edits, methods=["POST"]),
        Route("/{provider}/v1/images/generations", generations, methods=["POST"]),
        *job_routes(state),
        Route("/files/{name}", files, methods=["GET"]),
        Route("/portal", portal, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={ClientDisconnect: _client_gone})
