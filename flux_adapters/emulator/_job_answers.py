"""What BFL and fal send back about jobs: submits, polls, results, cancels and their errors.

The one place that decides what each phase and outcome of a job (`_jobs.JobRecord`) looks like
on the wire; `_job_routes` decides when each is sent. Faults injected into these exchanges are
answered by `_answers.failure`, in the same provider styles (`_answers.error`).

Sources: BFL's ``get_result`` OpenAPI document (``ResultResponse``: ``id``, ``status``,
``result``, ``progress``; https://docs.bfl.ml/api-reference/utility/get-result.md) and its
status list (https://docs.bfl.ml/api_integration/errors.md); fal's queue
(https://docs.fal.ai/documentation/model-apis/inference/queue), its cancel reference
(https://fal.ai/docs/inference-api/queue/cancel), its model errors (https://docs.fal.ai/errors)
and request errors (https://docs.fal.ai/documentation/model-apis/request-errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from starlette.responses import JSONResponse, Response

from flux_adapters.emulator._answers import error
from flux_adapters.emulator._job_dialects import Problem
from flux_adapters.emulator._jobs import JobRecord

__all__ = [
    "bfl_poll",
    "bfl_submitted",
    "fal_cancel",
    "fal_fetch",
    "fal_status",
    "fal_submitted",
    "invalid",
    "missing_key",
    "no_route",
    "refused_key",
    "unknown_request",
]

# BFL's status words (https://docs.bfl.ml/api_integration/errors.md).
_BFL_ENDINGS: Final = {
    None: "Ready",
    "request-moderated": "Request Moderated",
    "content-moderated": "Content Moderated",
    "failed": "Error",
}
_FAL_STATUS: Final = {"queued": "IN_QUEUE", "running": "IN_PROGRESS"}
_CONTENT_POLICY: Final = "https://docs.fal.ai/errors#content_policy_violation"
_CANCELLED: Final = "Request cancelled by the client."


def invalid(problems: Sequence[Problem]) -> Response:
    """A 422 in FastAPI's shape, which BFL and fal share."""
    detail = [{"loc": list(p.loc), "msg": p.msg, "type": p.type} for p in problems]
    return JSONResponse({"detail": detail}, status_code=422)


def missing_key(provider: str) -> Response:
    """The 401 for a request without a key where the provider reads it."""
    if provider == "bfl":
        return error("bfl", 401, "Missing API key: send it in the x-key header", "unauthorized")
    return error("fal", 401, "Missing or malformed Authorization header: use 'Key <key>'", "unauthorized")  # fmt: skip


def refused_key(provider: str) -> Response:
    """The answer to a key the provider does not take.

    BFL: 403 (its errors page: "403 ... key lacks access"); fal: 401.
    """
    if provider == "bfl":
        return error("bfl", 403, "Invalid API key", "forbidden")
    return error("fal", 401, "Invalid API key", "unauthorized")


def no_route(provider: str, what: str, status: int = 404) -> Response:
    """A 404 (or 405) for a path or app the provider does not serve."""
    return JSONResponse({"detail": what}, status_code=status)


# --- BFL ------------------------------------------------------------------------------------


def bfl_submitted(job: JobRecord, cost: float, input_mp: float, output_mp: float) -> Response:
    """The submit's answer: ``{id, polling_url, cost, input_mp, output_mp}``."""
    return JSONResponse(
        {
            "id": job.id,
            "polling_url": f"{job.root}/bfl/v1/get_result?id={job.id}",
            "cost": cost,
            "input_mp": input_mp,
            "output_mp": output_mp,
        }
    )


def bfl_poll(job_id: str, job: JobRecord | None) -> Response:
    """``GET /v1/get_result``: the job's status, always a 200 (even ``Task not found``)."""
    if job is None or job.gone:
        return JSONResponse({"id": job_id, "status": "Task not found", "result": None})
    if job.phase != "done":
        body: dict[str, object] = {"id": job.id, "status": "Pending", "result": None}
        return JSONResponse(body | {"progress": job.progress})
    status = _BFL_ENDINGS[job.outcome]
    body = {"id": job.id, "status": status, "result": None, "progress": None}
    if job.outcome is None and job.outputs:
        sample = job.outputs[0]
        finished = job.finished if job.finished is not None else job.submitted
        body["result"] = {
            "sample": sample.url,
            "seed": job.seed,
            "prompt": job.submission.job.prompt,
            "start_time": job.submitted,
            "end_time": finished,
            "duration": round(finished - job.submitted, 3),
        }
    return JSONResponse(body)


# --- fal ------------------------------------------------------------------------------------


def fal_submitted(job: JobRecord) -> Response:
    """The submit's answer, its URLs on the app id without its sub-path.

    ``{request_id, response_url, status_url, cancel_url, queue_position}``.
    """
    return JSONResponse({"request_id": job.id, **job.urls, "queue_position": job.queue_position})


def _failure(job: JobRecord) -> tuple[str, str] | None:
    """The error a finished job carries in its COMPLETED status, if it did not succeed.

    fal's clients read ``error`` and ``error_type`` from a COMPLETED status
    (https://github.com/fal-ai/fal ``fal_client/client.py``, ``Completed``).
    """
    if job.cancelled:
        return _CANCELLED, "client_cancelled"
    if job.outcome == "failed":
        return "The runner encountered an internal server error", "runner_server_error"
    if job.outcome in ("request-moderated", "content-moderated"):
        return "The content was flagged by a content checker", "content_policy_violation"
    if job.outcome == "invalid":
        return "The input could not be processed", "value_error"
    return None


def fal_status(job: JobRecord, logs: bool) -> Response:
    """``GET .../requests/<id>/status``: IN_QUEUE, IN_PROGRESS or COMPLETED.

    IN_QUEUE carries ``queue_position``; COMPLETED ``metrics``, or the ``error`` it ended with.
    """
    body: dict[str, object] = {"request_id": job.id, **job.urls, "logs": [] if logs else None}
    if job.phase in _FAL_STATUS:
        body["status"] = _FAL_STATUS[job.phase]
        if job.phase == "queued":
            # "queue_position: Number of requests ahead of yours (only when IN_QUEUE)".
            body["queue_position"] = job.queue_position
        return JSONResponse(body)
    body["status"] = "COMPLETED"
    failure = _failure(job)
    if failure is None:
        finished = job.finished if job.finished is not None else job.submitted
        body["metrics"] = {"inference_time": round(finished - job.submitted, 3)}
    else:
        body["error"], body["error_type"] = failure
    return JSONResponse(body)


def fal_fetch(job: JobRecord) -> Response:
    """``GET .../requests/<id>``: the app's output once done, else the error it ended with."""
    if job.phase in _FAL_STATUS:
        # fal's own end-to-end test: fetching the result of a request not yet completed is a
        # 400 (https://github.com/fal-ai/fal projects/fal/tests/e2e/test_apps.py,
        # test_app_client_async); the message is the emulator's.
        return error("fal", 400, "Request is still in progress", "bad_request")
    if job.cancelled:
        # A cancelled request: 499, "client_cancelled" (fal's request errors; fal's App answers
        # RequestCancelledException with {"detail": "Request cancelled by the client."}).
        return error("fal", 499, _CANCELLED, "client_cancelled")
    if job.outcome == "failed":
        # A 500 is never charged ("Server errors (HTTP 500+) are never charged").
        return error("fal", 500, "The runner encountered an internal server error", "runner_server_error")  # fmt: skip
    if job.outcome in ("request-moderated", "content-moderated", "invalid"):
        return _model_error(job)
    outputs = job.outputs or ()
    body: dict[str, object] = {
        "images": [
            {
                "url": image.url,
                "content_type": image.content_type,
                "file_name": image.file_name,
                "file_size": image.file_size,
                "width": image.width,
                "height": image.height,
            }
            for image in outputs
        ],
        "seed": job.seed,
    }
    if job.submission.family == "fal-hosted":
        # v4Output / FluxKontextOutput add these; Flux2ProEditOutput is {images, seed}.
        body |= {
            "prompt": job.submission.job.prompt,
            "has_nsfw_concepts": [False] * len(outputs),
            "timings": {},
        }
    return JSONResponse(body)


def _model_error(job: JobRecord) -> Response:
    # fal's model errors: 422, {"detail": [{loc, msg, type, url, ctx?}]} (https://docs.fal.ai/errors).
    if job.outcome == "invalid":
        entry = {
            "loc": ["body", "prompt"],
            "msg": "The input could not be processed by the model",
            "type": "value_error",
        }
    else:
        # "loc: ["body", "field_name"] for input validation, ["body"] for general errors"
        # (https://docs.fal.ai/errors): a flagged prompt names its field; a flagged output names
        # none, which is how a client tells the two stages apart.
        entry = {
            "loc": ["body", "prompt"] if job.outcome == "request-moderated" else ["body"],
            "msg": "The content could not be processed because it was flagged by a content checker",
            "type": "content_policy_violation",
            "url": _CONTENT_POLICY,
        }
    headers = {"X-Fal-Retryable": "false"}
    return JSONResponse({"detail": [entry]}, status_code=422, headers=headers)


def fal_cancel(accepted: bool) -> Response:
    """``PUT .../requests/<id>/cancel``: 202 if the request had not finished, else 400.

    202 ``CANCELLATION_REQUESTED`` for a request that had not finished, 400
    ``ALREADY_COMPLETED`` for one that had (or was cancelled before).

    The statuses are those of fal's cancel reference (``OK``, ``CANCELLATION_REQUESTED``,
    ``ALREADY_COMPLETED``, ``NOT_FOUND``); the codes 202/400/404 are those fal-compatible queues
    document for them, the reference's page naming none.
    """
    if accepted:
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
    return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)


def unknown_request(kind: str) -> Response:
    """A fal request id it does not know (or no longer knows): 404."""
    if kind == "cancel":
        return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
    return JSONResponse({"detail": "Request not found"}, status_code=404)
