"""The conformance scenarios: data, with stable ids that name the cassette files.

Each scenario builds an `EditRequest` for a given adapter (choosing the model and, where the
scenario needs one, the model's own limit) and states what must happen:

- `Completes`: the provider answers with images (optionally: the image downloads and is a real
  image; the answer came as base64; a job answered pending before it was done);
- `RaisesBeforeIO`: a `RequestError` before any byte is sent;
- `ProviderFails`: the typed error with the provider's real status code;
- `JobEnds`: an accepted job ends without an image, as the typed `JobError` with its job;
- `TimesOut`: a job still pending at its deadline is given up (and cancelled once where the
  provider can cancel), as `JobTimeout` with its job.

Whether an adapter supports a scenario comes from its limits data: a request its limits refuse
is "unsupported", and the suite then requires that refusal to happen before any I/O. Some
scenarios apply to one kind of provider only (``Scenario.applies_to``): the job scenarios to
asynchronous providers (`flux_adapters.jobs.JobAdapter`), a refused call to synchronous ones;
elsewhere they are "not applicable", said so in the report, never passed. Scenarios whose
failure only a misbehaving server can produce carry the emulator `Fault` that records them (and
are not recorded against a live provider).

Jobs are polled by `JOB_POLLING` (fixed waits, no jitter), and a job's deadline is kept on a
clock that only those waits move: a recording and its replay make the same polls, however long
each exchange took.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Final, Literal, TypeAlias

from attrs import field, frozen

from flux_adapters import errors
from flux_adapters.emulator._faults import Fault
from flux_adapters.jobs import Polling
from flux_adapters.limits import IntRange, ModelLimits, RatioRule
from flux_adapters.providers import AnyAdapter
from flux_adapters.request import EditRequest

__all__ = [
    "JOB_POLLING",
    "SCENARIOS",
    "Completes",
    "Expectation",
    "JobEnds",
    "ProviderFails",
    "RaisesBeforeIO",
    "Scenario",
    "TimesOut",
    "by_id",
]

JOB_POLLING: Final = Polling(first=1.0, factor=1.5, longest=5.0, jitter=0.0, deadline=600.0)
"""How the suite polls jobs, recording and replaying: waits of 1, 1.5, 2.25 ... 5 s, no jitter.

Recording against a live provider really waits; against the emulator, and in a replay, the waits
only move the job's clock (see the module docstring)."""

# Public images of the providers' own documents: fetchable by a live provider (the emulator
# never fetches; it draws a tile per URL).
REFERENCE_URLS: Final = (
    "https://raw.githubusercontent.com/aimlapi/api-docs/main/reference-files/t-rex.png",
    "https://raw.githubusercontent.com/aimlapi/api-docs/main/reference-files/blue-mug.jpg",
    "https://static.apiyi.com/apiyi-logo.png",
)


def asset(number: int) -> Path:
    """One of the three small reference PNGs shipped with the suite."""
    return Path(
        str(resources.files("flux_adapters.conformance") / "assets" / f"reference-{number}.png")
    )


@frozen
class Completes:
    """The provider answers with at least one image, and every one is an image.

    Each is downloaded (from the cassette) or decoded, and must be a png, jpeg or webp whose
    size is the one the request fixed, if it fixed one.

    Attributes:
        base64: The image came inline, as base64.
        pending: A job answered at least this many polls as not done before it was (and was
            submitted once).
    """

    base64: bool = False
    pending: int = 0


@frozen
class RaisesBeforeIO:
    """A `RequestError` is raised and nothing is sent."""


@frozen
class ProviderFails:
    """The provider's answer maps to *error* with *status* (or one of *also*).

    *also* lists other statuses the error tree gives the same meaning, for providers that
    document one of those instead (a refused key: 401, or 403 "about the key").
    """

    error: type[errors.FluxError]
    status: int
    retry_after: bool = False
    also: tuple[int, ...] = ()


@frozen
class JobEnds:
    """An accepted job ends without an image: *error*, carrying the job (``error.job``).

    The job was submitted once; ``error.job_id`` is the job's id, ``error.provider`` the
    adapter's name; no HTTP status is claimed.

    Attributes:
        error: The `errors.JobError` subclass.
        stage: For `errors.Moderated`: ``"request"`` or ``"content"``.
        billed: For `errors.JobFailed`: what each provider's document says of such a failure
            (``JobFailed.billed``), by provider id. A provider not listed must say ``True``,
            ``False`` or ``None`` (not documented), and is not held to one of them.
    """

    error: type[errors.JobError]
    stage: str | None = None
    billed: Mapping[str, bool | None] = field(factory=dict, hash=False)


@frozen
class TimesOut:
    """A job still pending at *deadline* seconds (on the job's clock) is given up.

    `errors.JobTimeout` with the job and its id, having waited the deadline; where the adapter
    can cancel the job (``build_cancel``), exactly one cancel was sent and ``cancelled`` says
    whether the provider accepted it (a 2xx); where it cannot, none was and ``cancelled`` is
    ``None``.
    """

    deadline: float


Expectation: TypeAlias = Completes | RaisesBeforeIO | ProviderFails | JobEnds | TimesOut
Applies: TypeAlias = Literal["any", "job", "call"]


@frozen(kw_only=True)
class Scenario:
    """One behaviour every adapter is checked for.

    Attributes:
        id: Stable identifier; the cassette is ``<id>.yaml``.
        title: What it checks, in words.
        build: Makes the request for an adapter.
        expect: What must happen.
        fault: The fault that produces it: recorded against the emulator, or a sandbox that
            speaks the fault-control protocol (`flux_adapters.conformance._fault_control`);
            never against a live provider.
        api_key: A key to record with instead of the real one (for the 401 scenario).
        result_form: ``"b64_json"`` when it needs the provider to answer inline.
        applies_to: ``"any"`` adapter, ``"job"`` (asynchronous providers only) or ``"call"``
            (synchronous providers only); elsewhere the scenario is not applicable.
        needs: An adapter attribute that must not be ``False`` for the scenario to apply
            (``reports_unknown_jobs``: the provider documents an answer for a job it does not
            know); an adapter without the attribute is held to the scenario.
    """

    id: str
    title: str
    build: Callable[[AnyAdapter], EditRequest]
    expect: Expectation
    fault: Fault | None = None
    api_key: str | None = None
    result_form: str = "url"
    applies_to: Applies = "any"
    needs: str | None = None


def _request(
    model: str = "flux-2-pro", prompt: str = "a red robot on a skateboard", **fields: object
) -> Callable[[AnyAdapter], EditRequest]:
    def build(adapter: AnyAdapter) -> EditRequest:
        # An edit-only endpoint (at least one image) gets one small reference, so that what the
        # scenario checks is still exercised there.
        limits = adapter.limits.get(model)
        images = [asset(1)] if limits is not None and limits.images.low > 0 else []
        return EditRequest(prompt=prompt, model=model, images=images, **fields)  # type: ignore[arg-type]

    return build


_MODELS_TRIED: Final = (
    "flux-2-pro", "flux-2-flex", "flux-2-max", "flux-kontext-pro", "flux-kontext-max",
    "flux-2-klein-9b", "flux-2-klein-4b",
)  # fmt: skip


def _model_with(adapter: AnyAdapter, has: Callable[[ModelLimits], bool]) -> str:
    """The first model (FLUX.2 [pro] first) whose limits at *adapter* have the setting *has*.

    ``flux-2-pro`` when none has it: the request is then refused by the adapter's limits, and
    the scenario is reported unsupported, that refusal checked to come before any I/O.
    """
    return next(
        (
            model
            for model in _MODELS_TRIED
            if (limits := adapter.limits.get(model)) is not None and has(limits)
        ),
        "flux-2-pro",
    )


def _with_setting(
    has: Callable[[ModelLimits], bool],
    value: Callable[[ModelLimits], Mapping[str, object]],
    otherwise: Mapping[str, object],
    prompt: str = "a red robot on a skateboard",
) -> Callable[[AnyAdapter], EditRequest]:
    """A request with the setting *value* reads from the limits of a model that *has* it.

    The value comes from the provider's declared data (its bounds, its widest ratio), so each
    provider is tried at its own edges. A provider where no model has the setting gets
    *otherwise* at ``flux-2-pro``, which its limits must refuse before anything is sent.
    """

    def build(adapter: AnyAdapter) -> EditRequest:
        model = _model_with(adapter, has)
        limits = adapter.limits.get(model)
        fields = value(limits) if limits is not None and has(limits) else otherwise
        return _request(model, prompt, **fields)(adapter)

    return build


def _ratio(rule: RatioRule | None, end: str) -> Mapping[str, object]:
    """The ``"widest"`` or ``"tallest"`` ratio of *rule*, or one twice as wide (``"beyond"``)."""
    assert rule is not None
    width, height = rule.narrowest if end == "tallest" else rule.widest
    return {"aspect_ratio": f"{width * (2 if end == 'beyond' else 1)}:{height}"}


def _most_references(adapter: AnyAdapter, extra: int) -> EditRequest:
    limits = adapter.limits.get("flux-2-pro")
    most = limits.images.high if limits is not None and limits.images.high is not None else 8
    images = [asset(1 + n % 3) for n in range(most + extra)]
    return EditRequest(
        prompt="combine every reference into one scene", model="flux-2-pro", images=images
    )


def _sized(**size: object) -> Callable[[AnyAdapter], EditRequest]:
    """A request for an explicit size, with one reference so that edit-only endpoints take it.

    The sizes used (768x512, 512x768, 1024x768) sit on every grid here (16, 32 or 64) and
    inside every range, and are not square: width and height sent the wrong way round do not
    match the recording, and the image is checked for the size asked.
    """

    def build(adapter: AnyAdapter) -> EditRequest:
        return EditRequest(
            prompt="image 1, on a plain background",
            model="flux-2-pro",
            images=[asset(1)],
            **size,  # type: ignore[arg-type]
        )

    return build


def _bound(levels: IntRange | None, end: str) -> int:
    assert levels is not None
    high = levels.high if levels.high is not None else levels.low
    return levels.low if end == "low" else high


def _oversized(adapter: AnyAdapter) -> EditRequest:
    # A 21 MB file with a valid PNG header: refused from its size alone, never read whole.
    import tempfile

    path = Path(tempfile.gettempdir()) / "flux-conformance-oversized.png"
    if not path.exists() or path.stat().st_size != 21 * 1024 * 1024:
        with path.open("wb") as out:
            out.write(asset(1).read_bytes())
            out.truncate(21 * 1024 * 1024)
    return EditRequest(prompt="edit image 1", model="flux-2-pro", images=[path])


def _data_url_reference(adapter: AnyAdapter) -> EditRequest:
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(asset(1).read_bytes()).decode()
    return EditRequest(prompt="make image 1 blue", model="flux-2-pro", images=[data_url])


SCENARIOS: Final[tuple[Scenario, ...]] = (
    Scenario(
        id="text-to-image",
        title="text-to-image",
        build=lambda a: EditRequest(prompt="a red robot on a skateboard", model="flux-2-pro"),
        expect=Completes(),
    ),
    Scenario(
        id="reference-by-url",
        title="one reference image by URL",
        build=lambda a: EditRequest(
            prompt="make image 1 blue", model="flux-2-pro", images=[REFERENCE_URLS[0]]
        ),
        expect=Completes(),
    ),
    Scenario(
        id="reference-by-data-url",
        title="one reference image by data URL from a local file",
        build=_data_url_reference,
        expect=Completes(),
    ),
    Scenario(
        id="reference-as-bytes",
        title="one reference image given as bytes in memory",
        build=lambda a: EditRequest(
            prompt="make image 1 green", model="flux-2-pro", images=[asset(2).read_bytes()]
        ),
        expect=Completes(),
    ),
    Scenario(
        id="three-references-in-order",
        title='three references, in order ("image 1..3")',
        build=lambda a: EditRequest(
            prompt="image 1 rides image 3 in front of image 2",
            model="flux-2-pro",
            images=[asset(1), asset(2), asset(3)],
        ),
        expect=Completes(),
    ),
    Scenario(
        id="maximum-references",
        title="the model's maximum number of references",
        build=lambda a: _most_references(a, 0),
        expect=Completes(),
    ),
    Scenario(
        id="one-over-maximum-references",
        title="one reference more than the maximum: refused before any I/O",
        build=lambda a: _most_references(a, 1),
        expect=RaisesBeforeIO(),
    ),
    Scenario(
        id="off-grid-size",
        title="an off-grid size: refused before any I/O",
        build=_request(width=1000, height=1000),
        expect=RaisesBeforeIO(),
    ),
    Scenario(
        id="oversized-image",
        title="a local image over 20 MB: refused before any I/O",
        build=_oversized,
        expect=RaisesBeforeIO(),
    ),
    Scenario(
        id="explicit-size",
        title="output size as width and height",
        build=_sized(width=768, height=512),
        expect=Completes(),
    ),
    Scenario(
        id="portrait-size",
        title="a portrait output size (height over width)",
        build=_sized(width=512, height=768),
        expect=Completes(),
    ),
    Scenario(
        id="size-as-wxh",
        title='output size given as "WxH"',
        build=_sized(size="1024x768"),
        expect=Completes(),
    ),
    Scenario(
        id="seed-and-format",
        title="seed and output format passed through",
        build=_request(seed=42, output_format="png"),
        expect=Completes(),
    ),
    Scenario(
        id="kontext-aspect-ratio",
        title="FLUX.1 Kontext with an aspect ratio",
        build=_request("flux-kontext-pro", aspect_ratio="16:9"),
        expect=Completes(),
    ),
    Scenario(
        id="aspect-ratio-widest",
        title="the widest aspect ratio the provider documents",
        build=_with_setting(
            lambda limits: limits.ratios is not None,
            lambda limits: _ratio(limits.ratios, "widest"),
            {"aspect_ratio": "21:9"},
        ),
        expect=Completes(),
    ),
    Scenario(
        id="aspect-ratio-tallest",
        title="the tallest aspect ratio the provider documents",
        build=_with_setting(
            lambda limits: limits.ratios is not None,
            lambda limits: _ratio(limits.ratios, "tallest"),
            {"aspect_ratio": "9:21"},
        ),
        expect=Completes(),
    ),
    Scenario(
        id="aspect-ratio-beyond-range",
        title="an aspect ratio twice as wide as the provider's widest: refused before any I/O",
        build=_with_setting(
            lambda limits: limits.ratios is not None,
            lambda limits: _ratio(limits.ratios, "beyond"),
            {"aspect_ratio": "21:9"},
        ),
        expect=RaisesBeforeIO(),
    ),
    Scenario(
        id="output-format-jpeg",
        title="output format jpeg: the image comes back as a JPEG",
        build=_request(output_format="jpeg"),
        expect=Completes(),
    ),
    Scenario(
        id="safety-tolerance-lowest",
        title="safety_tolerance at the provider's lowest (strictest) level",
        build=_with_setting(
            lambda limits: limits.safety_tolerance is not None,
            lambda limits: {"safety_tolerance": _bound(limits.safety_tolerance, "low")},
            {"safety_tolerance": 0},
        ),
        expect=Completes(),
    ),
    Scenario(
        id="safety-tolerance-highest",
        title="safety_tolerance at the provider's highest (most permissive) level",
        build=_with_setting(
            lambda limits: limits.safety_tolerance is not None,
            lambda limits: {"safety_tolerance": _bound(limits.safety_tolerance, "high")},
            {"safety_tolerance": 2},
        ),
        expect=Completes(),
    ),
    Scenario(
        id="prompt-upsampling",
        title="prompt_upsampling on",
        build=_with_setting(
            lambda limits: limits.prompt_upsampling,
            lambda limits: {"prompt_upsampling": True},
            {"prompt_upsampling": True},
        ),
        expect=Completes(),
    ),
    Scenario(
        id="flex-steps-guidance",
        title="FLUX.2 [flex] with steps and guidance",
        build=_request("flux-2-flex", steps=28, guidance=3.5),
        expect=Completes(),
    ),
    Scenario(
        id="guidance-highest",
        title="guidance at the provider's highest, on the first model that takes it",
        build=_with_setting(
            lambda limits: limits.guidance is not None,
            lambda limits: {"guidance": limits.guidance.high if limits.guidance else 0.0},
            {"guidance": 5.0},
        ),
        expect=Completes(),
    ),
    Scenario(
        id="result-by-url-downloaded",
        title="result by URL, downloaded",
        build=_request(),
        expect=Completes(),
    ),
    Scenario(
        id="result-by-base64",
        title="result inline as base64",
        build=_request(),
        expect=Completes(base64=True),
        fault=Fault(body="b64"),
        result_form="b64_json",
    ),
    Scenario(
        id="error-401",
        title="a refused key: 401 (403 where the provider documents that, as BFL does)",
        build=_request(),
        # BFL documents no 401: "403 ... key lacks access" (https://docs.bfl.ml/api_integration/errors.md).
        expect=ProviderFails(errors.AuthenticationFailed, 401, also=(403,)),
        api_key="sk-conformance-revoked-key",
    ),
    Scenario(
        id="error-402",
        title="insufficient balance: 402",
        build=_request(),
        expect=ProviderFails(errors.InsufficientBalance, 402),
        fault=Fault(status=402),
    ),
    Scenario(
        id="error-429",
        title="rate limited: 429 with Retry-After",
        build=_request(),
        expect=ProviderFails(errors.RateLimited, 429, retry_after=True),
        fault=Fault(status=429, retry_after=7),
    ),
    Scenario(
        id="error-5xx",
        title="a gateway failure: 503",
        build=_request(),
        expect=ProviderFails(errors.ProviderUnavailable, 503),
        fault=Fault(status=503),
    ),
    Scenario(
        id="malformed-200",
        title="a 200 whose body is not the documented shape",
        build=_request(),
        expect=ProviderFails(errors.ResponseFormatError, 200),
        fault=Fault(body="malformed"),
    ),
    Scenario(
        id="moderation",
        title="moderation: the call is refused",
        build=_request(prompt="a prompt the provider's filter blocks"),
        expect=ProviderFails(errors.ContentModerated, 400),
        fault=Fault(moderation=True),
        # A job provider moderates a job it accepted: see job-request-moderated and
        # job-content-moderated.
        applies_to="call",
    ),
    Scenario(
        id="job-pending-then-ready",
        title="a job answers pending twice, then ready: polled until done, submitted once",
        build=_request(prompt="a red robot, rendered slowly"),
        # Recorded against the emulator with its two pending polls (`record`); a live job at
        # the suite's first wait of 1 s is pending too.
        expect=Completes(pending=2),
        applies_to="job",
    ),
    Scenario(
        id="job-request-moderated",
        title="a job whose request the provider's filter blocks: Moderated, stage request",
        build=_request(prompt="a prompt the provider's filter blocks"),
        expect=JobEnds(errors.Moderated, stage="request"),
        fault=Fault(outcome="request-moderated"),
        applies_to="job",
    ),
    Scenario(
        id="job-content-moderated",
        title="a job whose output the provider's filter blocks: Moderated, stage content",
        build=_request(prompt="a prompt whose image the provider's filter blocks"),
        expect=JobEnds(errors.Moderated, stage="content"),
        fault=Fault(outcome="content-moderated"),
        applies_to="job",
    ),
    Scenario(
        id="job-failed",
        title="a job the provider reports as failed: JobFailed, billed as documented",
        build=_request(prompt="a job the provider fails"),
        expect=JobEnds(
            errors.JobFailed,
            billed={
                # BFL's status list says nothing of charging for "Error" (only moderated jobs
                # are "not charged"): https://docs.bfl.ml/api_integration/errors.md.
                "bfl": None,
                # A runner's 500: "Server errors (HTTP 500+) are never charged"
                # (https://fal.ai/docs/documentation/model-apis/faq.md).
                "fal": False,
            },
        ),
        fault=Fault(outcome="failed"),
        applies_to="job",
    ),
    Scenario(
        id="job-not-found",
        title="a job the provider no longer knows: JobNotFound",
        build=_request(prompt="a job the provider forgets"),
        expect=JobEnds(errors.JobNotFound),
        fault=Fault(outcome="not-found"),
        applies_to="job",
        # Only the provider's documented answer proves a job unknown: a bare 404 is polled
        # again until the deadline (job-deadline), so a provider documenting none is exempt.
        needs="reports_unknown_jobs",
    ),
    Scenario(
        id="job-deadline",
        title="a job still pending at its deadline: JobTimeout, cancelled once where possible",
        build=_request(prompt="a job that never ends"),
        # Waits of 1, 1.5, 2.25, 3.375 and 1.875 s: four pending polls, then the deadline.
        expect=TimesOut(deadline=10.0),
        fault=Fault(pending=1000),
        applies_to="job",
    ),
)


def by_id(scenario_id: str) -> Scenario:
    """The scenario with *scenario_id*."""
    for scenario in SCENARIOS:
        if scenario.id == scenario_id:
            return scenario
    raise KeyError(scenario_id)
