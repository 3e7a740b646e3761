"""Black Forest Labs' own API: submit a job, poll it until it is ready, download the sample.

Documents: https://docs.bfl.ai/flux_2/flux2_image_editing (FLUX.2), the model API references
under https://docs.bfl.ai/api-reference/models/ (FLUX.2, FLUX.1 Kontext),
https://docs.bfl.ml/api-reference/utility/get-result.md (polling) and
https://docs.bfl.ml/api_integration/errors.md (statuses and HTTP errors).

Wire shape: ``POST {base}/v1/<model>`` (``flux-2-pro`` ... ``flux-kontext-max``) with JSON and
the key in ``x-key``; reference images are ``input_image``, ``input_image_2`` .. ``input_image_8``
(a URL, or base64 without a ``data:`` prefix). The answer is ``{id, polling_url, cost, input_mp,
output_mp}``: ``cost`` in credits, 1 credit = $0.01. ``GET polling_url`` (with ``x-key``) answers
``{id, status, result}`` until ``status`` is ``Ready``, with ``result.sample`` a signed URL that
lives 10 minutes.

Quirks:
- "Always use the polling_url returned": it may be on another host than the submit
  (``api.eu2.bfl.ai``, ``gateway.bfl.ai``), so the key may go to ``*.bfl.ai`` over https,
  while the base URL is BFL's own (a reseller's key stays with the reseller's host).
- Statuses: ``Pending``, ``Ready``, ``Request Moderated`` and ``Content Moderated`` ("not
  charged"), ``Error`` (processing failed), ``Task not found`` (unknown or expired id).
- HTTP 402 insufficient credits, 403 the key lacks access, 422 invalid body, 429 over the
  concurrency limit ("retry once a previous task finishes"), 500 and 503 "retry with backoff".
- Regional base URLs: ``https://api.bfl.ai`` (global, fails over between clusters),
  ``https://api.eu.bfl.ai``, ``https://api.us.bfl.ai``.
- There is no cancel endpoint: a job past the deadline is left to finish (and be billed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

import attrs

from flux_adapters.errors import JobFailed, JobNotFound, Moderated
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
from flux_adapters.prices import PerCall, PerMegapixel, Price
from flux_adapters.providers import Answer, KeyAuth
from flux_adapters.providers._bfl_json import build_bfl_style_body
from flux_adapters.providers._images_api import url_problem
from flux_adapters.providers._job_answers import (
    json_object,
    number,
    required_text,
    required_url,
    unreadable,
    words,
)
from flux_adapters.request import EditRequest
from flux_adapters.result import ResultImage, Usage
from flux_adapters.wire import HttpRequest, HttpResponse, JsonBody

__all__ = ["LIMITS", "PRICES", "BflAdapter"]

_EDITING: Final = "https://docs.bfl.ai/flux_2/flux2_image_editing"
_SPECS: Final = "https://help.bfl.ai/articles/4029171097-flux-2-technical-specifications"
_KLEIN: Final = "https://docs.bfl.ai/api-reference/models/generate-or-edit-an-image-with-flux2-[klein]-9b-preview"
_KONTEXT: Final = (
    "https://docs.bfl.ml/api-reference/tasks/edit-or-create-an-image-with-flux-kontext-max"
)
_SDK: Final = "https://github.com/black-forest-labs/blackforest (src/bfl/_models.py)"
_MULTIREF: Final = (
    "https://help.bfl.ai/articles/3531680306-how-do-i-reference-specific-images-when-editing"
)
_PRICING: Final = (
    "https://docs.bfl.ai/quick_start/pricing.md; "
    "https://github.com/black-forest-labs/skills (skills/bfl-api/SKILL.md)"
)

# BFL documents no per-image byte limit for FLUX.2; its SDK's image validator refuses over
# 20 MB or 20 MP, the same limits the resellers document for this upstream.
_IMAGES: Final = ImageRule(
    kinds=frozenset(IMAGE_KINDS),
    max_bytes=20 * MB,
    max_pixels=20_000_000,
    formats=frozenset({"png", "jpeg", "webp"}),
)
# FLUX.2 [pro]: "Up to 8 images (9MP total limit)" through the API (_MULTIREF). BFL's megapixel
# here is 1024 x 1024, as in "4 megapixels (e.g., 2048x2048)" (_SPECS): the larger reading.
_PRO_IMAGES: Final = attrs.evolve(_IMAGES, max_total_pixels=9 * MEGAPIXEL)
# "min 64; multiples of 16; max 4 MP total. Omit them and the model picks the size."
_SIZES: Final = SizeRule(multiple=16, min_side=64, max_pixels=4 * MEGAPIXEL)
# Kontext: the API reference says "between 21:9 and 9:21" (its text-to-image guide says 3:7 to
# 7:3, the SDK 1:4 to 4:1); the API reference is what the endpoint documents.
_KONTEXT_RATIOS: Final = RatioRule(narrowest=(9, 21), widest=(21, 9))
# FLUX.2 flex only: steps 1..50; guidance 1.5..10 (the SDK's bounds).
_FLEX_STEPS: Final = IntRange(1, 50)
_FLEX_GUIDANCE: Final = NumberRange(1.5, 10)

_MAX_IMAGES: Final = {
    "flux-2-pro": 8,
    "flux-2-max": 8,
    "flux-2-flex": 8,
    "flux-2-klein-4b": 4,
    # The docs and the preview API page say 4 ("like Pro but max 4 images"); the SDK's catalog
    # says 5. We follow the documents: a fifth image may be refused, a fourth never is.
    "flux-2-klein-9b": 4,
}


_TOLERANCE: Final = (
    "chosen: safety_tolerance 0..5 as the public documents say (the SDK takes 6 and 7 for "
    "allowlisted organisations only)"
)
_CHOICES: Final = {
    "flux-2-klein-9b": "chosen: 4 references as the documents say (the SDK's catalog says 5: "
    "a fifth may be refused, a fourth never is); " + _TOLERANCE,
}


def _flux2(model: str) -> ModelLimits:
    klein = "klein" in model
    return ModelLimits(
        provider="bfl",
        model=model,
        wire_model=model,
        images=IntRange(0, _MAX_IMAGES[model]),
        sizes=_SIZES,
        ratios=None,
        image=_PRO_IMAGES if model == "flux-2-pro" else _IMAGES,
        # Public docs: 0 (strict) to 5; 6 and 7 need an allowlisted organisation (the SDK).
        safety_tolerance=IntRange(0, 5),
        # The SDK: "FLUX.2 [klein] has no upsampling control".
        prompt_upsampling=not klein,
        output_formats=("jpeg", "png", "webp"),
        steps=_FLEX_STEPS if model == "flux-2-flex" else None,
        guidance=_FLEX_GUIDANCE if model == "flux-2-flex" else None,
        source=f"{_EDITING}; {_SPECS}; {_KLEIN}; {_SDK}; "
        + (f"{_MULTIREF}; " if model == "flux-2-pro" else "")
        + _CHOICES.get(model, _TOLERANCE),
    )


def _kontext(model: str) -> ModelLimits:
    return ModelLimits(
        provider="bfl",
        model=model,
        wire_model=model,
        # input_image_2..4 are "Experimental Multiref": only the one documented image is offered.
        images=IntRange(0, 1),
        sizes=None,
        ratios=_KONTEXT_RATIOS,
        image=_IMAGES,
        safety_tolerance=IntRange(0, 6),  # the Kontext API reference: 0..6, default 2
        prompt_upsampling=True,
        output_formats=("jpeg", "png"),
        source=f"{_KONTEXT}; chosen: safety_tolerance 0..6 and ratios 21:9 to 9:21 as this "
        "endpoint's reference says (a guide says 3:7 to 7:3, the SDK 1:4 to 4:1)",
    )


LIMITS: Final[Mapping[str, ModelLimits]] = {
    **{model: _flux2(model) for model in _MAX_IMAGES},
    "flux-kontext-pro": _kontext("flux-kontext-pro"),
    "flux-kontext-max": _kontext("flux-kontext-max"),
}


def _per_mp(first: float, extra: float) -> PerMegapixel:
    # (firstMP + (outputMP - 1) * mpPrice) + inputMP * mpPrice: each input MP at the extra rate.
    return PerMegapixel(
        usd_first=first, usd_extra=extra, usd_input=extra, source=_PRICING, as_of="2026-11-22"
    )


PRICES: Final[Mapping[str, Price]] = {
    "flux-2-pro": _per_mp(0.03, 0.015),
    "flux-2-max": _per_mp(0.07, 0.03),
    "flux-2-flex": _per_mp(0.05, 0.05),
    "flux-2-klein-4b": _per_mp(0.014, 0.001),
    "flux-2-klein-9b": _per_mp(0.015, 0.002),
    "flux-kontext-pro": PerCall(usd=0.04, source=_PRICING, as_of="2026-11-22"),
    "flux-kontext-max": PerCall(usd=0.08, source=_PRICING, as_of="2026-11-22"),
}
"""BFL's documented prices: the estimate before a call (routing by price, budgets); a finished
job's cost is what BFL reported in credits."""


_RESULT: Final = "https://docs.bfl.ml/api-reference/utility/get-result.md"
_PENDING: Final = frozenset({"Pending", "Queued", "Processing"})
"""Statuses of a job not done yet: BFL documents ``Pending``; clients of its API also meet
``Queued`` and ``Processing`` (Vercel's provider, LiteLLM)."""


class BflAdapter(JobAdapterBase):
    """Black Forest Labs' API: submit, poll the returned URL, read ``result.sample``. No I/O."""

    name: ClassVar[str] = "bfl"
    default_base_url: ClassVar[str] = "https://api.bfl.ai"
    env_prefix: ClassVar[str] = "BFL"
    limits: ClassVar[Mapping[str, ModelLimits]] = LIMITS
    prices: ClassVar[Mapping[str, Price]] = PRICES
    usd_per_credit: ClassVar[float] = 0.01
    """"1 credit = $0.01" (https://docs.bfl.ai/quick_start/pricing.md)."""
    auth: ClassVar[KeyAuth] = KeyAuth(header="x-key", scheme=None, hosts=("*.bfl.ai",))
    """``x-key``; polling URLs come back on regional hosts (``api.eu2.bfl.ai``,
    ``gateway.bfl.ai``) and are polled as returned, so ``*.bfl.ai`` may receive the key: only
    while the base URL is a BFL host itself (`KeyAuth.allows`), never a reseller's key."""

    def build_submit(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """``POST {base}/v1/<model>`` with the prompt, ``input_image`` .. and the settings."""
        body = build_bfl_style_body(request, plan, model=False, bare=True)
        return HttpRequest(
            method="POST", url=f"{base_url}/v1/{plan.wire_model}", body=JsonBody(body)
        )

    def parse_submit(self, response: HttpResponse) -> Submitted:
        """Read ``{id, polling_url, cost, input_mp, output_mp}``; ``cost`` is in credits."""
        body = json_object(self.name, response)
        usage = Usage(
            credits_used=number(body.get("cost")),
            input_mp=number(body.get("input_mp")),
            output_mp=number(body.get("output_mp")),
        )
        return Submitted(
            id=required_text(self.name, response, body, "id"),
            poll_url=required_url(self.name, response, body, "polling_url"),
            usage=usage if usage != Usage() else None,
        )

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        """Read ``{status, result, progress}`` (``state`` is read as a synonym of ``status``)."""
        body = json_object(self.name, response)
        status = body.get("status", body.get("state"))
        if not isinstance(status, str):  # a list or an object is no status (nor hashable)
            raise unreadable(self.name, response, "the answer has no known job status")
        if status in _PENDING:
            progress = number(body.get("progress"))
            if progress is not None and not 0 <= progress <= 1:
                progress = None
            return Pending(progress=progress)
        if status == "Ready":
            result = body.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str):
                raise unreadable(self.name, response, "the job is Ready without result.sample")
            problem = url_problem(sample, "result.sample")
            if problem:
                raise unreadable(self.name, response, problem)
            return Done(answer=Answer(images=(ResultImage(url=sample),)))
        detail = words(body.get("details") or body.get("detail") or body.get("result"))
        if status in ("Request Moderated", "Content Moderated"):
            stage = "request" if status == "Request Moderated" else "content"
            blocked = "the request" if stage == "request" else "the generated image"
            raise Moderated(
                f"BFL's moderation blocked {blocked} (not charged)",
                provider=self.name,
                job_id=job.id,
                stage=stage,
                detail=detail,
            )
        if status in ("Error", "Failed"):
            raise JobFailed(
                "BFL reports that processing the job failed",
                provider=self.name,
                job_id=job.id,
                detail=detail,
            )
        if status == "Task not found":
            raise JobNotFound(
                "BFL does not know the job (unknown, or expired)",
                provider=self.name,
                job_id=job.id,
            )
        raise unreadable(self.name, response, "the answer has no known job status")
