"""A job at BFL or fal, from submit to its end: the phases it goes through, what it costs.

A job moves on when it is polled, not with time, so that tests decide how many pending answers a
client sees: it is in the queue for its first ``queued`` polls, in progress until it has been
polled ``pending`` times, and done from the next poll on. Between polls (for a fetch or a cancel)
it is in the phase the last poll reported; before any poll, in the queue (in progress when it
has no queued polls). A fal cancel ends it at once.

How it ends is decided at the submit (``Fault.outcome``); what each phase looks like on the wire
is `_job_answers`' business, when each is sent `_job_routes`'.
"""

from __future__ import annotations

import hashlib
import math
from typing import Final

from attrs import define, frozen

from flux_adapters.emulator._faults import Billed
from flux_adapters.emulator._job_dialects import Submission
from flux_adapters.prices import MEGAPIXEL, PerMegapixel
from flux_adapters.providers import bfl as bfl_data

__all__ = ["JobRecord", "Output", "bfl_cost", "charged", "derived_seed"]

_NOT_CHARGED: Final = {
    # "Request Moderated" and "Content Moderated": "not charged"
    # (https://docs.bfl.ml/api_integration/errors.md).
    "bfl": frozenset({"request-moderated", "content-moderated"}),
    # "Server errors (HTTP 500+) are never charged ... invalid inputs (HTTP 422) may still be
    # charged" (https://fal.ai/docs/documentation/model-apis/faq.md): a failure answers 500 and
    # is free; a moderated or invalid job answers 422 and is charged, the safe assumption.
    "fal": frozenset({"failed"}),
}


@frozen
class Output:
    """One image of a finished job, where it can be fetched."""

    url: str
    content_type: str
    file_name: str
    file_size: int
    width: int
    height: int


@define(kw_only=True)
class JobRecord:
    """One submitted job and everything later exchanges need to answer about it.

    Attributes:
        id: BFL's ``id`` or fal's ``request_id``.
        provider: ``"bfl"`` or ``"fal"``.
        submission: What was accepted.
        model_id: Where its request URLs live: BFL's model, fal's ``namespace/name`` (the app id
            without its sub-path).
        root: Scheme and host of its polling URLs, e.g. ``http://localhost:8000``.
        pending: Polls answered as not done.
        queued: Of those, polls answered as still in the queue.
        outcome: How it ends (`Fault.outcome`); ``None`` for an image.
        seed: The seed it renders with and reports.
        pictures: The rendered images until it is done (none for a job that does not end with
            images).
        download: The misbehaviour of its result URLs (`Fault.download`).
        drip: Seconds per byte for a ``"drip"`` download.
        submitted: Emulator clock at the submit.
        billed: Its ledger entry, while the provider charges for it.
        polls: Polls answered so far.
        cancelled: Whether a cancel ended it.
        outputs: Its images' URLs, from its first answer as done.
        finished: Emulator clock when it was first answered as done.
    """

    id: str
    provider: str
    submission: Submission
    model_id: str
    root: str
    pending: int
    queued: int
    outcome: str | None
    seed: int
    pictures: tuple[bytes, ...]
    download: str | None = None
    drip: float = 0.0
    submitted: float
    billed: Billed | None = None
    polls: int = 0
    cancelled: bool = False
    outputs: tuple[Output, ...] | None = None
    finished: float | None = None

    @property
    def phase(self) -> str:
        """``"queued"``, ``"running"``, ``"done"`` or ``"cancelled"``."""
        if self.cancelled:
            return "cancelled"
        if self.polls > self.pending:
            return "done"
        if self.polls == 0:
            return "queued" if self.queued else "running"
        return "queued" if self.polls <= self.queued else "running"

    @property
    def gone(self) -> bool:
        """Whether it answers as unknown: a ``not-found`` job once done."""
        return self.outcome == "not-found" and self.phase == "done"

    @property
    def queue_position(self) -> int:
        """Requests ahead of it while queued: counts down to 0 at its last queued poll."""
        return max(0, self.queued - max(self.polls, 1))

    @property
    def progress(self) -> float:
        """A share of the work done while pending, 0 to below 1."""
        return round(min(self.polls, self.pending) / (self.pending + 1), 3)

    @property
    def urls(self) -> dict[str, str]:
        """The request URLs of a fal job: status, result (``response_url``) and cancel."""
        base = f"{self.root}/fal/{self.model_id}/requests/{self.id}"
        return {
            "response_url": base,
            "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel",
        }


def charged(provider: str, outcome: str | None) -> bool:
    """Whether *provider* charges for an accepted job that ends with *outcome*.

    A fal request cancelled while still in the queue is not charged either ("If the request is
    in the queue, fal removes it", https://fal.ai/docs/inference-api/queue/cancel); that is
    settled when it is cancelled.
    """
    return outcome not in _NOT_CHARGED[provider]


def derived_seed(prompt: str) -> int:
    """The seed a provider picks when none is sent: drawn from the prompt, so runs repeat."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") >> 1


def _megapixels(width: int, height: int) -> int:
    # Each image's megapixels rounded up, as `flux_adapters.prices.PerMegapixel` counts them.
    return math.ceil(width * height / MEGAPIXEL)


def bfl_cost(submission: Submission) -> tuple[float, float, float]:
    """BFL's ``cost`` (credits, 1 credit = $0.01), ``input_mp`` and ``output_mp`` of a submit.

    "(firstMP + (outputMP-1)*mpPrice) + (inputMP*mpPrice)" cents, FLUX.2 per megapixel and
    Kontext per image (https://docs.bfl.ai/quick_start/pricing.md, the figures of
    `flux_adapters.providers.bfl.PRICES`). A reference given by URL is never fetched here; its
    256x256 placeholder counts as one megapixel, as the library's estimate counts a URL.
    """
    job = submission.job
    output_mp = _megapixels(job.width, job.height)
    input_mp = sum(_megapixels(*image.size) for image in job.references)
    price = bfl_data.PRICES[job.model]
    if isinstance(price, PerMegapixel):
        usd = price.usd_first + (output_mp - 1) * price.usd_extra + input_mp * price.usd_input
    else:
        usd = price.usd
    return round(usd * 100, 6), float(input_mp), float(output_mp)
