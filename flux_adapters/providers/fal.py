"""fal.ai's queue: submit to an app, poll its status, fetch the result, cancel if it is late.

Documents: https://docs.fal.ai/documentation/model-apis/inference/queue (the queue API) and
fal's generated endpoint types (https://github.com/fal-ai/fal-js, ``libs/client/src/types/
endpoints.ts``) for the FLUX.2 apps' fields; prices from each app's page
(``https://fal.ai/models/<app>/llms.txt``).

Wire shape: ``POST {base}/<app>`` (``https://queue.fal.run/fal-ai/flux-2-pro/edit``) with JSON
and ``Authorization: Key <key>``; the answer is ``{request_id, status_url, response_url,
cancel_url}``. ``GET status_url`` answers ``{status: IN_QUEUE | IN_PROGRESS | COMPLETED,
queue_position}``; once ``COMPLETED``, ``GET response_url`` gives the app's output
(``{images: [{url, content_type, width, height}], seed}``) or the error the app failed with.
``PUT cancel_url`` cancels a request that has not finished.

Quirks:
- An edit has its own app (``.../edit``) and takes ``image_urls`` (URLs or data URIs); the status
  and result URLs leave that sub-path out, so they are followed as returned.
- Field names differ from BFL's: ``image_size`` (``{width, height}`` or a preset name),
  ``guidance_scale``, ``num_inference_steps``; ``safety_tolerance`` is a *string* "1".."5".
- "Server errors (HTTP 500+) are never charged ... invalid inputs (HTTP 422) may still be
  charged" (https://fal.ai/docs/documentation/model-apis/faq.md).
- FLUX.2 [klein] and FLUX.1 Kontext are offered here as edits only (the apps this library knows
  take images); Kontext takes one ``image_url``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

from flux_adapters.errors import JobError, JobFailed, Moderated, ResponseFormatError
from flux_adapters.jobs import Done, Job, JobAdapterBase, Pending, Submitted
from flux_adapters.limits import (
    IMAGE_KINDS,
    MB,
    MEGAPIXEL,
    ImageRule,
    IntRange,
    ModelLimits,
    NumberRange,
    Plan,
    RatioRule,
    SizeRule,
)
from flux_adapters.prices import BINARY_MEGAPIXEL, PerMegapixel, Price
from flux_adapters.providers import Answer, KeyAuth
from flux_adapters.providers._images_api import url_problem
from flux_adapters.providers._job_answers import (
    json_object,
    required_text,
    required_url,
    unreadable,
    words,
)
from flux_adapters.request import EditRequest
from flux_adapters.result import ResultImage
from flux_adapters.wire import HttpRequest, HttpResponse, JsonBody, JsonValue, json_image

__all__ = ["LIMITS", "PRICES", "FalAdapter"]

_QUEUE: Final = "https://docs.fal.ai/documentation/model-apis/inference/queue"
_TYPES: Final = (
    "https://github.com/fal-ai/fal-js/blob/381105e138b85502b528fb8f6c16d909e30e462a/"
    "libs/client/src/types/endpoints.ts"
)

# fal documents no per-image byte limit; these are the limits of the BFL upstream of its
# BFL-hosted tiers, the same the resellers document.
_IMAGES: Final = ImageRule(
    kinds=frozenset(IMAGE_KINDS),
    max_bytes=20 * MB,
    max_pixels=20_000_000,
    formats=frozenset({"png", "jpeg", "webp"}),
)
# ImageSize {width, height} carries no grid in fal's types; the BFL-hosted tiers render on
# BFL's (multiples of 16, at least 64 px, at most 4 MP), so that grid is enforced.
_SIZES: Final = SizeRule(multiple=16, min_side=64, max_pixels=4 * MEGAPIXEL)
_PRESETS: Final = {
    "1:1": "square_hd",
    "4:3": "landscape_4_3",
    "3:4": "portrait_4_3",
    "16:9": "landscape_16_9",
    "9:16": "portrait_16_9",
}
_PRESET_RATIOS: Final = RatioRule(narrowest=(9, 16), widest=(16, 9), presets=_PRESETS)
# Kontext's aspect_ratio enum, sent as it is.
_KONTEXT_RATIOS: Final = RatioRule(
    narrowest=(9, 21),
    widest=(21, 9),
    presets={r: r for r in ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")},
)


def _bfl_hosted(model: str, *, flex: bool = False) -> ModelLimits:
    return ModelLimits(
        provider="fal",
        model=model,
        wire_model=f"fal-ai/{model}",
        edit_wire_model=f"fal-ai/{model}/edit",
        # fal's types set no maximum for these apps; third-party copies of its pages say 9 (pro)
        # and 10 (max). They are BFL-hosted, and BFL's API takes 8: a ninth image risks a 422,
        # which fal may charge, so 8 is offered until fal documents more.
        images=IntRange(0, 8),
        sizes=_SIZES,
        ratios=_PRESET_RATIOS,
        image=_IMAGES,
        seed=IntRange(0),
        safety_tolerance=IntRange(1, 5),  # sent as the string "1".."5"
        steps=IntRange(1, 50) if flex else None,  # num_inference_steps (BFL's bounds)
        guidance=NumberRange(1.5, 10) if flex else None,  # guidance_scale (BFL's bounds)
        prompt_upsampling=False,
        output_formats=("jpeg", "png"),
        source=f"{_TYPES} (Flux2ProEditInput, Flux2FlexEditInput); {_QUEUE}",
    )


def _klein(model: str, size: str) -> ModelLimits:
    return ModelLimits(
        provider="fal",
        model=model,
        wire_model=f"fal-ai/flux-2/klein/{size}/edit",
        images=IntRange(1, 4),  # "A maximum of 4 images are allowed"
        sizes=_SIZES,
        ratios=_PRESET_RATIOS,
        image=_IMAGES,
        seed=IntRange(0),
        safety_tolerance=None,  # Flux2Klein4bEditInput has no safety_tolerance
        prompt_upsampling=False,
        output_formats=("jpeg", "png", "webp"),
        source=f"{_TYPES} (Flux2Klein4bEditInput); {_QUEUE}",
    )


def _kontext(model: str, app: str) -> ModelLimits:
    return ModelLimits(
        provider="fal",
        model=model,
        wire_model=app,
        images=IntRange(1, 1),  # one image_url
        sizes=None,
        ratios=_KONTEXT_RATIOS,
        image=_IMAGES,
        seed=IntRange(0),
        safety_tolerance=IntRange(1, 6),  # sent as the string "1".."6"
        prompt_upsampling=False,
        output_formats=("jpeg", "png"),
        source=f"{_TYPES} (FluxKontextInput); {_QUEUE}",
    )


LIMITS: Final[Mapping[str, ModelLimits]] = {
    "flux-2-pro": _bfl_hosted("flux-2-pro"),
    "flux-2-max": _bfl_hosted("flux-2-max"),
    "flux-2-flex": _bfl_hosted("flux-2-flex", flex=True),
    "flux-2-klein-4b": _klein("flux-2-klein-4b", "4b"),
    "flux-2-klein-9b": _klein("flux-2-klein-9b", "9b"),
    "flux-kontext-pro": _kontext("flux-kontext-pro", "fal-ai/flux-pro/kontext"),
    "flux-kontext-max": _kontext("flux-kontext-max", "fal-ai/flux-pro/kontext/max"),
}


def _price(first: float, extra: float, app: str) -> PerMegapixel:
    # "first output MP + per extra MP of input and output, rounded up". fal's megapixel is
    # 1024 x 1024: "a 1024x1024 image will cost $0.05" and "a 1920x1080 image will cost $0.10
    # ($0.05 x 2 megapixels)" (flex/edit), "1920x1080 = $0.045" (pro/edit); a million pixels
    # would make them $0.10, $0.15 and $0.06.
    source = f"https://fal.ai/models/fal-ai/{app}/llms.txt"
    return PerMegapixel(
        usd_first=first,
        usd_extra=extra,
        usd_input=extra,
        source=source,
        as_of="2026-11-22",
        pixels_per_mp=BINARY_MEGAPIXEL,
    )


PRICES: Final[Mapping[str, Price]] = {
    "flux-2-pro": _price(0.03, 0.015, "flux-2-pro/edit"),
    "flux-2-max": _price(0.07, 0.03, "flux-2-max/edit"),
    "flux-2-flex": _price(0.05, 0.05, "flux-2-flex/edit"),
}
"""fal's documented per-megapixel prices (the edit apps' pages; text-to-image has no inputs)."""


_FAQ: Final = "https://fal.ai/docs/documentation/model-apis/faq.md"
_ERRORS: Final = "https://fal.ai/docs/documentation/model-apis/request-errors"
_APP_FAILURES: Final = frozenset(
    {
        "request_timeout",
        "startup_timeout",
        "runner_scheduling_failure",
        "runner_connection_timeout",
        "runner_disconnected",
        "runner_connection_refused",
        "runner_connection_error",
        "runner_incomplete_response",
        "runner_server_error",
    }
)
"""``error_type`` values of a request that failed on fal's runners (``_ERRORS``): server errors,
"never charged" (``_FAQ``). ``internal_error`` is not one of them: it may be the result
endpoint's own, so it is tried again."""
_INPUT_FIELDS: Final = frozenset({"prompt", "image_urls", "image_url"})


class FalAdapter(JobAdapterBase):
    """fal.ai's queue: submit to the app, poll ``status_url``, fetch ``response_url``. No I/O."""

    name: ClassVar[str] = "fal"
    default_base_url: ClassVar[str] = "https://queue.fal.run"
    env_prefix: ClassVar[str] = "FAL"
    limits: ClassVar[Mapping[str, ModelLimits]] = LIMITS
    prices: ClassVar[Mapping[str, Price]] = PRICES
    auth: ClassVar[KeyAuth] = KeyAuth(header="Authorization", scheme="Key")
    """``Authorization: Key <key>``; the status, result and cancel URLs are on the queue's own
    origin, so no other host receives it."""
    reports_unknown_jobs: ClassVar[bool] = False
    """fal's queue documents no answer for a request it does not know (its statuses are
    ``IN_QUEUE``, ``IN_PROGRESS`` and ``COMPLETED``): a 404 from its status or result URL is
    not its word that the job is gone, so the job is polled again until its deadline, then
    `errors.JobTimeout` with the job to resume. (The conformance suite's ``job-not-found``
    does not apply.)"""

    def build_submit(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """``POST {base}/<app>`` with fal's field names."""
        body: dict[str, JsonValue] = {"prompt": request.prompt}
        if request.images:
            if plan.limits.images.high == 1:  # Kontext: one image_url
                body["image_url"] = json_image(request.images[0])
            else:
                body["image_urls"] = [json_image(image) for image in request.images]
        if plan.dimensions is not None:
            width, height = plan.dimensions
            body["image_size"] = {"width": width, "height": height}
        if plan.preset is not None:  # a Kontext app takes a ratio; the others a named size
            body["image_size" if plan.limits.sizes is not None else "aspect_ratio"] = plan.preset
        settings: dict[str, JsonValue] = {
            "seed": request.seed,
            "output_format": request.output_format,
            "safety_tolerance": (
                None if request.safety_tolerance is None else str(request.safety_tolerance)
            ),
            "guidance_scale": request.guidance,
            "num_inference_steps": request.steps,
        }
        body.update({key: value for key, value in settings.items() if value is not None})
        return HttpRequest(method="POST", url=f"{base_url}/{plan.wire_model}", body=JsonBody(body))

    def parse_submit(self, response: HttpResponse) -> Submitted:
        """Read ``{request_id, status_url, response_url, cancel_url}``.

        The id, status and result URLs are the job; without them it cannot be followed. A cancel
        URL that is missing or unusable (no http(s) URL) only means the job has no cancel: fal
        took it and bills it, so it is followed to its image all the same.
        """
        body = json_object(self.name, response)
        cancel = body.get("cancel_url")
        if not isinstance(cancel, str) or url_problem(cancel, "cancel_url"):
            cancel = None
        return Submitted(
            id=required_text(self.name, response, body, "request_id"),
            poll_url=required_url(self.name, response, body, "status_url"),
            result_url=required_url(self.name, response, body, "response_url"),
            cancel_url=cancel,
        )

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        """Read ``{status, queue_position}``: ``COMPLETED`` means the result is ready to fetch."""
        body = json_object(self.name, response)
        status = body.get("status")
        if status in ("IN_QUEUE", "IN_PROGRESS"):
            position = body.get("queue_position")
            known = isinstance(position, int) and not isinstance(position, bool) and position >= 0
            return Pending(position=position if known else None)  # type: ignore[arg-type]
        if status == "COMPLETED":
            return Done()
        raise unreadable(self.name, response, "the answer has no known queue status")

    def parse_fetch(self, response: HttpResponse, job: Job) -> Answer:
        """Read the app's output: ``{images: [{url, ...}], seed, has_nsfw_concepts}``."""
        body = json_object(self.name, response)
        images = body.get("images")
        if not isinstance(images, list) or not images or len(images) > 16:
            raise unreadable(self.name, response, "the answer holds no images list")
        found = []
        for image in images:
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise unreadable(self.name, response, "an image has no URL")
            problem = url_problem(url, "a result URL")
            if problem:
                raise unreadable(self.name, response, problem)
            # fal's File type declares the image's content_type; a claim the download checks.
            found.append(ResultImage(url=url, declared_format=image.get("content_type")))
        flagged = body.get("has_nsfw_concepts")
        if isinstance(flagged, list) and any(item is True for item in flagged):
            # With the safety checker on, fal blanks a flagged image rather than failing.
            raise Moderated(
                "fal's safety checker flagged the generated image",
                provider=self.name,
                job_id=job.id,
                stage="content",
            )
        return Answer(images=tuple(found))

    def build_cancel(self, job: Job) -> HttpRequest | None:
        """``PUT cancel_url``: removes a queued request; one in progress may still finish."""
        if job.cancel_url is None:
            return None
        return HttpRequest(method="PUT", url=job.cancel_url, role="cancel")

    def job_failure(self, response: HttpResponse, job: Job) -> JobError | None:
        """The app's failure, kept at the result URL: moderation, invalid input, a runner error.

        An answer in no shape of fal's (a gateway page) is left to the library: tried again.
        """
        try:
            body = json_object(self.name, response)
        except ResponseFormatError:
            return None
        detail = body.get("detail")
        status = response.status_code
        if isinstance(detail, list):  # a model error: [{loc, msg, type, url, ctx}]
            kinds = [item.get("type") for item in detail if isinstance(item, dict)]
            if "content_policy_violation" in kinds:
                places = {
                    str(place)
                    for item in detail
                    if isinstance(item, dict) and isinstance(item.get("loc"), list)
                    for place in item["loc"]
                }
                return Moderated(
                    "fal's content policy blocked the job",
                    provider=self.name,
                    job_id=job.id,
                    stage="request" if places & _INPUT_FIELDS else "content",
                    detail=words(detail),
                )
            if status == 422:
                return JobFailed(
                    "fal refused the job's input ('invalid inputs (HTTP 422) may still be "
                    "charged')",
                    provider=self.name,
                    job_id=job.id,
                    detail=words(detail),
                )
            return None
        kind = body.get("error_type") or response.header("x-fal-error-type")
        if status >= 500 and kind in _APP_FAILURES:
            return JobFailed(
                "the job failed on fal's servers ('server errors are never charged')",
                provider=self.name,
                job_id=job.id,
                detail=words(detail),
                billed=False,
            )
        if kind == "client_cancelled":
            return JobFailed(
                "the job was cancelled", provider=self.name, job_id=job.id, detail=words(detail)
            )
        return None
