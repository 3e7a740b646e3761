"""Nimbus: a fictional asynchronous FLUX provider, used from flux-adapters by a package of its own.

This is what a third party writes to use a provider that flux-adapters does not ship: one
adapter class, registered by entry point in pyproject.toml (``[project.entry-points.
"flux_adapters.providers"] nimbus = "nimbus_flux:NimbusAdapter"``), built on public API only.
The adapter is pure: it builds each exchange and reads each answer; flux-adapters sends them,
polls, waits, enforces the job's deadline and cancels. docs/validating-a-provider.md walks
through it. Nimbus does not exist: its document is the "The Nimbus API" section of this
package's README.md (cited below as ``docs.nimbus.example``), and `nimbus_flux.sandbox` serves it.

Wire shape: ``POST {base}/v1/tasks`` with ``Authorization: Token <key>`` and JSON ``{"model",
"input": {"prompt", "references", "width", "height" | "aspect_ratio", "seed", "steps",
"guidance"}, "output": {"format"}}``; it answers 202 ``{"task_id", "state", "status_url",
"cancel_url"}``. ``GET status_url`` answers ``{"task_id", "state", "progress", "queue_position",
"poll_after_ms", "output": {"images": [{"url", ...}]}, "usage": {"credits"}, "error": {"code",
"message", "charged"}}``; ``POST cancel_url`` cancels a task that has not finished.

Quirks (all from its document):

- Model ids on the wire are ``flux.2-pro``, ``flux.2-flex`` and ``flux.1-kontext-pro``.
- A reference is ``{"type": "url", "url"}`` or ``{"type": "base64", "media_type", "data"}``, the
  data bare (no ``data:`` prefix).
- ``state`` is ``queued``, ``running``, ``succeeded``, ``failed``, ``blocked`` or ``canceled``.
  ``blocked`` is moderation (``error.code`` ``input_blocked`` or ``output_blocked``) and is never
  charged; a ``failed`` task says in ``error.charged`` whether it was charged.
- ``poll_after_ms`` says when to poll again.
- A prompt refused at submit is a 400 with ``error.code`` ``prompt_blocked``.
- The cost is reported in credits (1 credit = $0.01) once the task succeeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

from flux_adapters import errors
from flux_adapters.jobs import Done, Job, JobAdapterBase, Pending, Submitted
from flux_adapters.limits import (
    IMAGE_KINDS,
    ImageRule,
    IntRange,
    ModelLimits,
    NumberRange,
    Plan,
    RatioRule,
    SizeRule,
)
from flux_adapters.prices import PerCall, Price
from flux_adapters.providers import Answer, KeyAuth
from flux_adapters.providers.answers import (
    json_object,
    number,
    required_text,
    required_url,
    unreadable,
    url_problem,
    words,
)
from flux_adapters.request import EditRequest, ImageInput, UrlImage
from flux_adapters.result import ResultImage, Usage
from flux_adapters.wire import HttpRequest, HttpResponse, ImageValue, JsonBody, JsonValue

__all__ = ["LIMITS", "PRICES", "NimbusAdapter"]

_DOC: Final = "https://docs.nimbus.example/v1/tasks (fictional: examples/nimbus/README.md)"
_MIB: Final = 1024 * 1024

# "Reference images: png, jpeg or webp, at most 16 MiB and 16 megapixels each."
_IMAGES: Final = ImageRule(
    kinds=frozenset(IMAGE_KINDS),
    max_bytes=16 * _MIB,
    max_pixels=16_000_000,
    formats=frozenset({"png", "jpeg", "webp"}),
)
# "width and height: multiples of 32 from 256 to 2048. Leave both out and the model picks."
_SIZES: Final = SizeRule(multiple=32, min_side=256, max_side=2048)
# "seed: 0 to 4294967295"
_SEEDS: Final = IntRange(0, 2**32 - 1)


def _flux2(model: str, *, flex: bool = False) -> ModelLimits:
    return ModelLimits(
        provider="nimbus",
        model=model,
        wire_model=model.replace("flux-2-", "flux.2-"),
        images=IntRange(0, 6),  # "up to 6 references"
        sizes=_SIZES,
        ratios=None,
        image=_IMAGES,
        prompt_max_chars=3000,
        seed=_SEEDS,
        safety_tolerance=None,  # Nimbus's filter has no setting
        steps=IntRange(1, 50) if flex else None,
        guidance=NumberRange(1.5, 10) if flex else None,
        prompt_upsampling=False,
        output_formats=("png", "jpeg", "webp"),
        source=_DOC,
    )


LIMITS: Final[Mapping[str, ModelLimits]] = {
    "flux-2-pro": _flux2("flux-2-pro"),
    "flux-2-flex": _flux2("flux-2-flex", flex=True),
    "flux-kontext-pro": ModelLimits(
        provider="nimbus",
        model="flux-kontext-pro",
        wire_model="flux.1-kontext-pro",
        images=IntRange(0, 1),  # "one reference at most"
        sizes=None,
        ratios=RatioRule(narrowest=(1, 4), widest=(4, 1)),  # "aspect_ratio from 1:4 to 4:1"
        image=_IMAGES,
        prompt_max_chars=3000,
        seed=_SEEDS,
        safety_tolerance=None,
        prompt_upsampling=False,
        output_formats=("png", "jpeg"),
        source=_DOC,
    ),
}
"""Nimbus's models and what it documents about each."""

PRICES: Final[Mapping[str, Price]] = {
    "flux-2-pro": PerCall(usd=0.04, source=_DOC, as_of="2026-11-22"),
    "flux-2-flex": PerCall(usd=0.06, source=_DOC, as_of="2026-11-22"),
    "flux-kontext-pro": PerCall(usd=0.04, source=_DOC, as_of="2026-11-22"),
}
"""Nimbus's price list ("4, 6 and 4 credits per task"): the estimate before a task is sent
(routing by price, budgets); a finished task's cost is the credits it reported."""

_PENDING: Final = frozenset({"queued", "running"})
_LONGEST_WAIT: Final = 60.0
"""A ``poll_after_ms`` above a minute is read as a minute: the provider's hint, not its order."""
_MOST_IMAGES: Final = 16


def _reference(image: ImageInput) -> JsonValue:
    if isinstance(image, UrlImage):
        return {"type": "url", "url": image.url}
    # A local image: the client writes it as bare base64 while streaming the body.
    return {"type": "base64", "media_type": image.info.media_type, "data": ImageValue(image, True)}


class NimbusAdapter(JobAdapterBase):
    """Nimbus's task API: submit a task, poll its ``status_url``, read its images. No I/O."""

    name: ClassVar[str] = "nimbus"
    default_base_url: ClassVar[str] = "https://api.nimbus.example"
    env_prefix: ClassVar[str] = "NIMBUS"
    limits: ClassVar[Mapping[str, ModelLimits]] = LIMITS
    prices: ClassVar[Mapping[str, Price]] = PRICES
    usd_per_credit: ClassVar[float] = 0.01
    """"1 credit = $0.01" (``_DOC``)."""
    auth: ClassVar[KeyAuth] = KeyAuth(header="Authorization", scheme="Token")
    """``Authorization: Token <key>``; status and cancel URLs are on the API's own origin, so no
    other host receives it (result URLs never do)."""

    def build_submit(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """``POST {base}/v1/tasks``: the model, the task's input, and the output format."""
        task: dict[str, JsonValue] = {"prompt": request.prompt}
        if request.images:
            task["references"] = [_reference(image) for image in request.images]
        if plan.dimensions is not None:
            task["width"], task["height"] = plan.dimensions
        if plan.ratio_text is not None:
            task["aspect_ratio"] = plan.ratio_text
        settings: dict[str, JsonValue] = {
            "seed": request.seed,
            "steps": request.steps,
            "guidance": request.guidance,
        }
        task.update({name: value for name, value in settings.items() if value is not None})
        body: dict[str, JsonValue] = {"model": plan.wire_model, "input": task}
        if request.output_format is not None:
            body["output"] = {"format": request.output_format}
        return HttpRequest(method="POST", url=f"{base_url}/v1/tasks", body=JsonBody(body))

    def parse_submit(self, response: HttpResponse) -> Submitted:
        """Read ``{task_id, status_url, cancel_url}``."""
        body = json_object(self.name, response)
        has_cancel = body.get("cancel_url") is not None
        return Submitted(
            id=required_text(self.name, response, body, "task_id"),
            poll_url=required_url(self.name, response, body, "status_url"),
            cancel_url=required_url(self.name, response, body, "cancel_url")
            if has_cancel
            else None,
        )

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        """Read a task's status: pending, its images, or how it ended without one."""
        body = json_object(self.name, response)
        state = body.get("state")
        if state in _PENDING:
            return _pending(body)
        if state == "succeeded":
            return Done(answer=self._answer(response, body))
        error = body.get("error")
        error = error if isinstance(error, dict) else {}
        detail = words(error.get("message"))
        if state == "blocked":
            stage = "content" if error.get("code") == "output_blocked" else "request"
            blocked = "the generated image" if stage == "content" else "the request"
            raise errors.Moderated(
                f"Nimbus's safety filter blocked {blocked} (not charged)",
                provider=self.name,
                job_id=job.id,
                stage=stage,
                detail=detail,
            )
        if state == "failed":
            charged = error.get("charged")
            raise errors.JobFailed(
                "Nimbus reports that the task failed",
                provider=self.name,
                job_id=job.id,
                detail=detail,
                billed=charged if isinstance(charged, bool) else None,
            )
        if state == "canceled":
            raise errors.JobFailed(
                "the task was canceled", provider=self.name, job_id=job.id, detail=detail
            )
        raise unreadable(self.name, response, "the answer has no known task state")

    def _answer(self, response: HttpResponse, body: Mapping[str, object]) -> Answer:
        output = body.get("output")
        images = output.get("images") if isinstance(output, dict) else None
        if not isinstance(images, list) or not 1 <= len(images) <= _MOST_IMAGES:
            raise unreadable(self.name, response, "the task succeeded without output.images")
        urls = []
        for image in images:
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise unreadable(self.name, response, "an image of the task has no url")
            problem = url_problem(url, "an image's url")
            if problem:
                raise unreadable(self.name, response, problem)
            urls.append(url)
        usage = body.get("usage")
        credits = number(usage.get("credits")) if isinstance(usage, dict) else None
        return Answer(
            images=tuple(ResultImage(url=url) for url in urls),
            usage=Usage(credits_used=credits) if credits is not None and credits >= 0 else None,
        )

    def job_failure(self, response: HttpResponse, job: Job) -> errors.JobError | None:
        """``404 task_not_found`` at a task's URL: "A task is kept for 24 hours; after that its
        ``status_url`` answers ``404 task_not_found``" (``_DOC``). Nimbus's word, in its code:
        a bare 404 (a proxy's, a host that is not Nimbus's) is left to the library, which polls
        again rather than give up a task that may still finish and be billed."""
        if response.status_code != 404:
            return None
        body = json_object(self.name, response)
        error = body.get("error")
        if not isinstance(error, dict) or error.get("code") != "task_not_found":
            return None
        return errors.JobNotFound(
            "Nimbus no longer knows the task (tasks are kept for 24 hours)",
            provider=self.name,
            job_id=job.id,
        )

    def build_cancel(self, job: Job) -> HttpRequest | None:
        """``POST cancel_url``: a queued or running task stops and is not charged."""
        if job.cancel_url is None:
            return None
        return HttpRequest(method="POST", url=job.cancel_url, role="cancel")

    def parse_error(self, response: HttpResponse) -> errors.ProviderError:
        """An error answer: Nimbus's ``prompt_blocked`` is moderation; the rest read as usual.

        ``{"error": {"code", "message"}}`` is a common shape: the library's reading
        (`JobAdapterBase.parse_error`) gives the typed error for the status, and only the code
        it does not know is mapped here.
        """
        error = super().parse_error(response)
        if (
            error.code == "prompt_blocked"
            and 400 <= error.status_code < 500
            and not isinstance(error, errors.ContentModerated)
        ):
            return errors.ContentModerated(
                "Nimbus's safety filter blocked the prompt (not charged)",
                provider=self.name,
                status_code=error.status_code,
                detail=error.detail,
                code=error.code,
            )
        return error


def _pending(body: Mapping[str, object]) -> Pending:
    """A queued or running task: its progress and place in the queue, and when to look again."""
    progress = number(body.get("progress"))
    position = body.get("queue_position")
    wait = number(body.get("poll_after_ms"))
    return Pending(
        progress=progress if progress is not None and 0 <= progress <= 1 else None,
        position=position
        if isinstance(position, int) and not isinstance(position, bool) and position >= 0
        else None,
        retry_after=min(wait / 1000, _LONGEST_WAIT) if wait is not None and wait >= 0 else None,
    )
