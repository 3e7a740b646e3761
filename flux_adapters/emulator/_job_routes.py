"""The job providers' endpoints: BFL's submit and poll, fal's queue. When each answer is sent.

Routes::

    POST /bfl/v1/<model>                           submit (flux-2-pro ... flux-kontext-max)
    GET  /bfl/v1/get_result?id=<id>                poll
    POST /fal/<app>                                submit (fal-ai/flux-2-pro/edit, ...)
    GET  /fal/<namespace>/<name>/requests/<id>/status   poll
    GET  /fal/<namespace>/<name>/requests/<id>          fetch the result
    PUT  /fal/<namespace>/<name>/requests/<id>/cancel   cancel

fal's request URLs name the model without the app's sub-path: "The subpath ... should be used
when making the request, but not when getting request status or results"
(https://docs.fal.ai/model-endpoints/queue); the model id is ``namespace/name``.

Every exchange is recorded with its kind (`Emulator.calls`), may meet an injected `Fault` of its
kind (``Fault.on``), then has its key checked (BFL: ``x-key``; fal: ``Authorization: Key ...``),
does its work and answers (`_job_answers`). A fault answers before the work, or with
``after_work`` after it. A submit renders the job's images at once (they are shown once it is
done) and puts the job on the ledger as the provider charges (`_jobs.charged`).
"""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import anyio
from attrs import frozen
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from flux_adapters.emulator import _answers
from flux_adapters.emulator import _job_answers as answers
from flux_adapters.emulator import images as _images
from flux_adapters.emulator._app import (
    MEDIA_TYPES,
    Result,
    TooLarge,
    capped,
    declared_too_large,
    delivered,
    result_url,
    too_large,
)
from flux_adapters.emulator._faults import Fault
from flux_adapters.emulator._job_dialects import FAL_APPS, Problem, Submission, bfl, fal
from flux_adapters.emulator._jobs import JobRecord, Output, bfl_cost, charged, derived_seed
from flux_adapters.providers import bfl as bfl_data

if TYPE_CHECKING:
    from flux_adapters.emulator._app import State

__all__ = ["job_routes"]

_FAL_REQUEST: Final = re.compile(r"([^/]+/[^/]+)/requests/([^/]+?)(/status|/cancel)?/?")


@frozen
class _Done:
    """The answer of an exchange whose work was done (a fault with ``after_work`` replaces it)."""

    answer: Response


Work = Callable[[Fault | None], Awaitable[Response | _Done]]


def _refusal(state: State, provider: str, request: Request) -> Response | None:
    if provider == "bfl":
        key = request.headers.get("x-key", "").strip()
    else:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip() if scheme.lower() == "key" else ""
    if not key:
        return answers.missing_key(provider)
    if key in state.bad_keys or (state.valid_keys is not None and key not in state.valid_keys):
        return answers.refused_key(provider)
    return None


async def _exchange(
    state: State,
    provider: str,
    kind: str,
    request: Request,
    work: Work,
    *,
    limit: int | None = None,
) -> Response:
    """One exchange, from receipt to answer: the order of records, faults, checks and work."""
    state.record(provider, request, kind)
    if limit is not None and declared_too_large(request, limit):
        return too_large(provider, limit)
    fault = state.take_fault(provider, kind)
    if fault is not None and fault.delay:
        await anyio.sleep(fault.delay)
    if fault is not None and fault.fails and not fault.after_work:
        return delivered(_answers.failure(provider, fault, int(state.clock())), fault)
    refused = _refusal(state, provider, request)
    if refused is not None:
        return refused
    done = await work(fault)
    if isinstance(done, Response):
        return done  # refused: no fault answers for work that was not done
    answer = done.answer
    if fault is not None and fault.after_work:
        answer = _answers.failure(provider, fault, int(state.clock()))
    return delivered(answer, fault)


async def _body(request: Request, limit: int) -> dict[str, object] | Response:
    """The JSON object of a submit, or FastAPI's 422 (`TooLarge` past *limit*)."""
    raw = await capped(request, limit).body()
    try:
        # Off the event loop: a body of a few hundred MB takes a while to parse.
        body = await anyio.to_thread.run_sync(json.loads, raw)
    except (ValueError, RecursionError):
        return answers.invalid([Problem(("body",), "JSON decode error", "json_invalid")])
    if not isinstance(body, dict):
        return answers.invalid([Problem(("body",), "Input should be an object", "dict_type")])
    return body


def _root(request: Request, elsewhere: bool) -> str:
    """Scheme and host for a job's URLs: the submit's, or another name of the same server."""
    host = request.url.hostname or "127.0.0.1"
    if elsewhere:
        host = "127.0.0.1" if host == "localhost" else "localhost"
    port = f":{request.url.port}" if request.url.port else ""
    return f"{request.url.scheme}://{host}{port}"


def _rendered(submission: Submission, seed: int) -> tuple[bytes, ...]:
    job = submission.job
    return tuple(
        _images.encode(
            _images.render(job.width, job.height, job.references, job.prompt, seed + index),
            job.output_format,
        )
        for index in range(submission.num_images)
    )


async def _accept(
    state: State,
    request: Request,
    submission: Submission,
    fault: Fault | None,
    model_id: str,
) -> JobRecord:
    """Take a submit on: its job, its rendered images, its charge."""
    job = submission.job
    pending = state.pending_polls
    if fault is not None and fault.pending is not None:
        pending = fault.pending
    queued = math.ceil(pending / 2)
    if fault is not None and fault.queued is not None:
        queued = min(fault.queued, pending)
    outcome = fault.outcome if fault is not None else None
    seed = job.seed if job.seed is not None else derived_seed(job.prompt)
    # Only a job that ends with images shows them; the others are not rendered.
    pictures = (
        await anyio.to_thread.run_sync(_rendered, submission, seed) if outcome is None else ()
    )
    record = JobRecord(
        id=str(uuid.uuid4()),
        provider=job.provider,
        submission=submission,
        model_id=model_id,
        root=_root(request, fault is not None and fault.other_host),
        pending=pending,
        queued=queued,
        outcome=outcome,
        seed=seed,
        pictures=pictures,
        download=fault.download if fault is not None else None,
        drip=fault.drip if fault is not None else 0.0,
        submitted=state.clock(),
    )
    if charged(job.provider, outcome):
        record.billed = state.bill(job, record.id)
    state.add_job(record)
    return record


def _finish(state: State, job: JobRecord) -> None:
    """Make a done job's images fetchable, once: signed URLs from now on (or data URIs)."""
    if job.outputs is not None or job.phase != "done":
        return
    job.finished = state.clock()
    media_type = MEDIA_TYPES[job.submission.job.output_format]
    outputs = []
    for index, picture in enumerate(job.pictures):
        extension = media_type.removeprefix("image/")
        if job.submission.sync_mode:
            # "the media will be returned as a data URI" (Flux2MaxEditInput.sync_mode).
            url = f"data:{media_type};base64,{base64.b64encode(picture).decode()}"
        else:
            url = result_url(state, job.root, Result(picture, media_type, job.download, job.drip))
        name = f"{job.id}-{index}.{extension}"
        width, height = job.submission.job.width, job.submission.job.height
        outputs.append(Output(url, media_type, name, len(picture), width, height))
    job.outputs = tuple(outputs)
    job.pictures = ()  # kept with the results now (or in the data URIs)


def _poll(state: State, job: JobRecord) -> None:
    with state.lock:
        job.polls += 1
    _finish(state, job)


def _bfl_routes(state: State) -> list[BaseRoute]:
    limit = state.max_body_bytes

    async def submit(request: Request) -> Response:
        model = request.path_params["model"]
        if model not in bfl_data.LIMITS:
            return answers.no_route("bfl", "Not Found")

        async def work(fault: Fault | None) -> Response | _Done:
            body = await _body(request, limit)
            if isinstance(body, Response):
                return body
            checked = await anyio.to_thread.run_sync(bfl, model, body)
            if isinstance(checked, list):
                return answers.invalid(checked)
            job = await _accept(state, request, checked, fault, model)
            cost, input_mp, output_mp = bfl_cost(checked)
            return _Done(answers.bfl_submitted(job, cost, input_mp, output_mp))

        try:
            return await _exchange(state, "bfl", "submit", request, work, limit=limit)
        except TooLarge:
            return too_large("bfl", limit)

    async def get_result(request: Request) -> Response:
        async def work(fault: Fault | None) -> Response | _Done:
            job_id = request.query_params.get("id")
            if job_id is None:
                return answers.invalid([Problem(("query", "id"), "Field required", "missing")])
            job = state.job(job_id, "bfl")
            if job is not None:
                _poll(state, job)
            return _Done(answers.bfl_poll(job_id, job))

        return await _exchange(state, "bfl", "poll", request, work)

    return [
        Route("/bfl/v1/get_result", get_result, methods=["GET"]),
        Route("/bfl/v1/{model}", submit, methods=["POST"]),
    ]


def _fal_routes(state: State) -> list[BaseRoute]:
    limit = state.max_body_bytes

    async def submit(request: Request, app: str) -> Response:
        async def work(fault: Fault | None) -> Response | _Done:
            body = await _body(request, limit)
            if isinstance(body, Response):
                return body
            checked = await anyio.to_thread.run_sync(fal, app, body)
            if isinstance(checked, list):
                return answers.invalid(checked)
            model_id = "/".join(app.split("/")[:2])
            return _Done(answers.fal_submitted(await _accept(state, request, checked, fault, model_id)))  # fmt: skip

        try:
            return await _exchange(state, "fal", "submit", request, work, limit=limit)
        except TooLarge:
            return too_large("fal", limit)

    def known(model_id: str, request_id: str) -> JobRecord | None:
        job = state.job(request_id, "fal")
        return job if job is not None and job.model_id == model_id and not job.gone else None

    async def status(request: Request, model_id: str, request_id: str) -> Response:
        async def work(fault: Fault | None) -> Response | _Done:
            job = known(model_id, request_id)
            if job is not None:
                _poll(state, job)
            if job is None or job.gone:
                return _Done(answers.unknown_request("poll"))
            logs = request.query_params.get("logs", "").lower() in ("1", "true")
            return _Done(answers.fal_status(job, logs))

        return await _exchange(state, "fal", "poll", request, work)

    async def fetch(request: Request, model_id: str, request_id: str) -> Response:
        async def work(fault: Fault | None) -> Response | _Done:
            job = known(model_id, request_id)
            if job is None:
                return _Done(answers.unknown_request("fetch"))
            return _Done(answers.fal_fetch(job))

        return await _exchange(state, "fal", "fetch", request, work)

    async def cancel(request: Request, model_id: str, request_id: str) -> Response:
        async def work(fault: Fault | None) -> Response | _Done:
            job = known(model_id, request_id)
            if job is None:
                return _Done(answers.unknown_request("cancel"))
            with state.lock:
                phase = job.phase
                accepted = phase in ("queued", "running")
                job.cancelled = job.cancelled or accepted
            # "If the request is in the queue, fal removes it": never run, never charged. One
            # already running is stopped by its app, and charged (the emulator's assumption).
            if phase == "queued" and job.billed is not None:
                state.refund(job.billed)
                job.billed = None
            return _Done(answers.fal_cancel(accepted))

        return await _exchange(state, "fal", "cancel", request, work)

    async def entry(request: Request) -> Response:
        path = request.path_params["path"]
        if request.method == "POST":
            if path not in FAL_APPS:
                return answers.no_route("fal", f"Application {path!r} not found")
            return await submit(request, path)
        match = _FAL_REQUEST.fullmatch(path)
        if match is None:
            return answers.no_route("fal", "Not Found")
        model_id, request_id, tail = match[1], match[2], match[3] or ""
        if (request.method, tail) == ("GET", "/status"):
            return await status(request, model_id, request_id)
        if (request.method, tail) == ("GET", ""):
            return await fetch(request, model_id, request_id)
        if (request.method, tail) == ("PUT", "/cancel"):
            return await cancel(request, model_id, request_id)
        return answers.no_route("fal", "Method Not Allowed", 405)

    return [Route("/fal/{path:path}", entry, methods=["GET", "POST", "PUT"])]


def job_routes(state: State) -> list[BaseRoute]:
    """The routes of BFL and fal over *state*."""
    return [*_bfl_routes(state), *_fal_routes(state)]
