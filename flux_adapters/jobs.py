"""Asynchronous providers: one job protocol, so that an adapter is data and parsing only.

Black Forest Labs, fal and many others take a job and answer at once with its id; the image
comes later. An adapter for such a provider (a `JobAdapter`) says how to build and read each
exchange, and the library owns everything else, the same way for `FluxClient` and
`AsyncFluxClient`:

- ``submit``: the one exchange that can be billed. `JobAdapter.build_submit` makes it and
  `JobAdapter.parse_submit` reads the provider's acceptance into a `Submitted` (job id, where to
  poll, fetch and cancel it, the cost it reported). Once accepted, the job is never submitted
  again, anywhere: every later error carries it (``error.job``) and ``client.resume(job)`` polls
  it again instead.
- ``poll``: `JobAdapter.parse_poll` reads a status into `Pending` (with progress or a
  ``Retry-After``), `Done` (with the answer, or without it when the result is fetched
  separately), or raises a typed outcome: `errors.Moderated`, `errors.JobFailed`,
  `errors.JobNotFound`. The library waits between polls (growing intervals with jitter,
  honouring ``Retry-After``), retries a poll in place after a dropped connection, a timeout, a 429,
  a 5xx or a 404 (a host's or a proxy's: only the provider's own answer says a job is unknown),
  and gives up at the job's deadline.
- ``fetch`` (optional): `JobAdapter.build_fetch` and `JobAdapter.parse_fetch`, for providers
  that answer the result at its own URL (fal).
- ``cancel`` (optional): `JobAdapter.build_cancel`; sent when the deadline passes or the caller
  stops waiting (Ctrl-C, ``asyncio`` cancellation).

Derive from `JobAdapterBase` for the usual defaults (poll and fetch by ``GET`` of the URLs the
provider returned, no cancel, no error answer taken as the job's own outcome, error bodies in any
common shape).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, runtime_checkable

import attrs
from attrs import frozen

from flux_adapters.result import Usage

if TYPE_CHECKING:
    from flux_adapters.errors import JobError, ProviderError
    from flux_adapters.limits import ModelLimits, Plan
    from flux_adapters.providers import Answer, KeyAuth
    from flux_adapters.request import EditRequest
    from flux_adapters.wire import HttpRequest, HttpResponse

__all__ = [
    "Accepted",
    "Done",
    "Job",
    "JobAdapter",
    "JobAdapterBase",
    "Pending",
    "Polling",
    "StopJob",
    "Submitted",
    "job_problem",
]


@frozen(kw_only=True)
class Job:
    """A job a provider accepted: enough to poll it again, from this process or another.

    Attributes:
        provider: The provider id.
        model: The canonical model id.
        id: The provider's id of the job.
        poll_url: Where its status is read (used as returned: it may be on another host).
        result_url: Where its result is fetched, for providers that answer it apart.
        cancel_url: Where it is cancelled, for providers that can.
        submitted_at: When it was accepted (``time.time()``).
        usage: What the provider reported at submit time (BFL: credits and megapixels).
    """

    provider: str
    model: str
    id: str
    poll_url: str
    result_url: str | None = None
    cancel_url: str | None = None
    submitted_at: float = 0.0
    usage: Usage | None = None

    def to_dict(self) -> dict[str, object]:
        """The job as plain JSON data (the batch journal keeps it)."""
        data: dict[str, object] = {
            "provider": self.provider,
            "model": self.model,
            "id": self.id,
            "poll_url": self.poll_url,
            "result_url": self.result_url,
            "cancel_url": self.cancel_url,
            # A job made by hand may hold anything here: a time JSON cannot hold is not known.
            "submitted_at": _number(self.submitted_at) or 0.0,
        }
        usage = _readable_usage(self.usage)
        if usage is not None:
            data["usage"] = {
                name: value for name in _USAGE_FIELDS if (value := getattr(usage, name)) is not None
            }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job | None:
        """The job in *data* (from `to_dict`), or ``None`` when it is not one (a damaged record).

        A record that is no mapping, or whose job could not be polled (`job_problem`: a URL that
        is not http(s), an id with a line break), is damaged too.
        """
        given: object = data  # a file may hold anything, whatever the annotation says
        if not isinstance(given, Mapping):
            return None
        texts = {name: data.get(name) for name in ("provider", "model", "id", "poll_url")}
        if not all(isinstance(value, str) and str.__len__(value) for value in texts.values()):
            return None
        optional = {name: data.get(name) for name in ("result_url", "cancel_url")}
        when = data.get("submitted_at")
        usage = data.get("usage")
        job = cls(
            provider=str.__str__(texts["provider"]),  # a subclass's own __str__ never runs
            model=str.__str__(texts["model"]),
            id=str.__str__(texts["id"]),
            poll_url=str.__str__(texts["poll_url"]),
            result_url=_plain_url(optional["result_url"]),
            cancel_url=_plain_url(optional["cancel_url"]),
            submitted_at=_number(when) or 0.0,
            usage=_usage(usage) if isinstance(usage, Mapping) else None,
        )
        return None if job_problem(job) else job


def _plain_url(value: object) -> str | None:
    from flux_adapters.request import _as_text

    return _as_text(value)


def job_problem(job: Job) -> str:
    """Why *job* cannot be polled, in words (no value quoted), or ``""`` when it can.

    A `Job` is plain data, so one made by hand or read back from a file may hold anything: its
    provider, model and id must be printable texts, its poll URL (and result and cancel URLs,
    when it has them) http(s) URLs without control characters, as a provider's answer must be.
    """
    from flux_adapters.providers._images_api import url_problem

    for name in ("provider", "model", "id"):
        value = getattr(job, name)
        if not (isinstance(value, str) and value and value.isprintable()):
            return f"its {name} is not a printable text"
    for name in ("poll_url", "result_url", "cancel_url"):
        value = getattr(job, name)
        if value is None and name != "poll_url":
            continue
        if not isinstance(value, str):
            return f"its {name} is not a URL"
        problem = url_problem(value, f"its {name}")
        if problem:
            return problem
    return ""


_TEXTS: Final = ("provider", "model", "id", "poll_url", "result_url", "cancel_url")


def plain_texts(job: Job) -> Job:
    """*job* with each text that is a ``str`` subclass as the plain ``str`` of its characters.

    A `Job` made by hand may hold any ``str``: its own ``__eq__``, ``__len__`` or methods then
    never run while the job is checked, compared with a provider's name or polled.
    """
    from flux_adapters.request import _as_text

    odd: dict[str, Any] = {}
    for name in _TEXTS:
        value: object = getattr(job, name)
        text = _as_text(value)
        if text is not None and text is not value:
            odd[name] = text
    return attrs.evolve(job, **odd) if odd else job


def _readable_job(job: Job) -> Job:
    """*job* with what cannot be read of its submit time and usage left out; *job* if all can.

    A `Job` is plain data: one made by hand or read back may hold a usage that is no `Usage`
    (or one of text), or a submit time of NaN. Those are figures for the cost and the record,
    never a reason to lose the paid image that resuming the job fetches. Its texts are made
    plain (`plain_texts`).
    """
    job = plain_texts(job)
    usage = _readable_usage(job.usage)
    when = _number(job.submitted_at) or 0.0
    if usage == job.usage and when == job.submitted_at:
        return job
    return attrs.evolve(job, usage=usage, submitted_at=when)


def _readable_usage(usage: object) -> Usage | None:
    """The figures of *usage* that are numbers (whole ones for tokens), as a `Usage`, or None."""
    if not isinstance(usage, Usage):
        return None
    return _usage({name: getattr(usage, name) for name in _USAGE_FIELDS})


_USAGE_FIELDS: Final = tuple(field.name for field in attrs.fields(Usage))
"""The names of `Usage`'s figures."""


def _number(value: object) -> float | None:
    """*value* as a finite float, when it is a real number (not a bool)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value) if math.isfinite(value) else None
        except OverflowError:
            return None
    return None


def _usage(data: Mapping[str, Any]) -> Usage | None:
    numbers = {
        name: number
        for name in ("credits_used", "input_mp", "output_mp")
        if (number := _number(data.get(name))) is not None
    }
    tokens = data.get("tokens_used")
    count = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None
    if not numbers and count is None:
        return None
    return Usage(tokens_used=count, **numbers)


@frozen(kw_only=True)
class Submitted:
    """What a provider's acceptance of a submit says (`JobAdapter.parse_submit`).

    Attributes:
        id: The job's id.
        poll_url: Where to read its status.
        result_url: Where to fetch its result, when that is a separate exchange.
        cancel_url: Where to cancel it, when the provider can.
        usage: Cost or sizes the provider reported now (``Usage.credits_used`` ...).
    """

    id: str
    poll_url: str
    result_url: str | None = None
    cancel_url: str | None = None
    usage: Usage | None = None


@frozen(kw_only=True)
class Pending:
    """A poll's answer: not done yet.

    Attributes:
        progress: How far along, from 0 to 1, when the provider says.
        position: Its place in the provider's queue, when the provider says.
        retry_after: Seconds the provider asked to wait before the next poll.
    """

    progress: float | None = None
    position: int | None = None
    retry_after: float | None = None


@frozen(kw_only=True)
class Done:
    """A poll's answer: finished; with the *answer*, or ``None`` when it is fetched apart."""

    answer: Answer | None = None


_SHOWN_ID_CHARS: Final = 200  # as long as an id a built-in adapter accepts


def _shown_id(ident: object, scrub: Callable[[str], str] | None) -> str:
    """*ident* quoted for a note: secrets removed, at most `_SHOWN_ID_CHARS`; never raises."""
    from flux_adapters._display import type_name

    if not isinstance(ident, str):
        return f"(an id of type {type_name(ident)})"
    text = str.__str__(ident)  # plain text, whatever a subclass does
    if scrub is not None:
        text = scrub(text)
    if len(text) > _SHOWN_ID_CHARS:
        return str.__repr__(text[: _SHOWN_ID_CHARS - 3]) + "..."
    return str.__repr__(text)


@frozen
class Accepted:
    """Yielded by a job flow once the submit was accepted: the client records the *job*."""

    job: Job


class StopJob(Exception):
    """Thrown into a job flow when the caller stops waiting: cancel the job if possible.

    The flow sets ``job`` and ``cancelled`` (as `errors.JobTimeout` has it: ``True`` accepted,
    ``False`` refused or not answered, ``None`` the provider offers no cancel) before it lets
    this propagate, so that the client can say what became of the job.
    """

    job: Job | None = None
    cancelled: bool | None = None
    submitting: str | None = None
    """The provider whose paid request (a submit, or a synchronous provider's one call) was
    under way, with no job taken yet (set by the client)."""
    unsent: bool = False
    """Whether that request was stopped before the last byte of its body was handed over, in
    the thread that sends it (set by `FluxClient`): the provider cannot have a whole request,
    so it took no job and bills none (the money rule's "not taken", as a write timeout)."""

    def note(self, scrub: Callable[[str], str] | None = None) -> str | None:
        """What became of the job, for the interruption's notes; ``None`` when nothing was sent.

        The job's id, the provider's text, is shown through *scrub* (the client's removal of its
        keys) and cut to 200 characters; one that is no plain text (an adapter's bug) is shown
        by its type. Never raises: it must not replace the interruption it is added to.
        """
        if self.job is None:
            if self.submitting is None:
                return None
            if self.unsent:
                return (
                    f"the request to {self.submitting} was stopped before all of it was sent:"
                    f" {self.submitting} cannot have taken it, and bills nothing"
                )
            return (
                f"the request to {self.submitting} was under way: {self.submitting} may have"
                " taken it, and may bill it"
            )
        provider = self.job.provider
        what = f"the {provider} job {_shown_id(self.job.id, scrub)}"
        if self.cancelled:  # taken: fal removes a queued job, signals a running one to stop
            return (
                f"{what} was cancelled if it had not started ({provider} accepted the cancel);"
                " if it had, it may still finish, and be billed"
            )
        why = (
            f"{provider} offers no cancel"
            if self.cancelled is None
            else "its cancel was refused or not answered"
        )
        return f"{what} goes on ({why}): it may still finish, and be billed"


@frozen(kw_only=True)
class Polling:
    """How the library polls a job, and how long it waits for one.

    Attributes:
        first: Seconds before the first poll.
        factor: Each wait is the previous one times this ...
        longest: ... up to this many seconds.
        jitter: Each wait varies by up to this fraction either way, so that many jobs started
            together do not poll together.
        deadline: Seconds from the submit to the job's end; then it is cancelled (where the
            provider can) and `errors.JobTimeout` raised, with the job to resume.
    """

    first: float = 0.5
    factor: float = 1.5
    longest: float = 5.0
    jitter: float = 0.2
    deadline: float = 600.0

    def __attrs_post_init__(self) -> None:
        from flux_adapters.errors import ConfigurationError

        problems = [
            f"{name} must be a number {rule}, not {_shown(getattr(self, name))}"
            for name, rule, allowed in _POLLING_RULES
            if not _in_range(getattr(self, name), allowed)
        ]
        if problems:
            raise ConfigurationError("Polling: " + "; ".join(problems))


_POLLING_RULES: Final = (
    ("first", "from 0 to 3600 seconds", (0.0, 3600.0)),
    ("factor", "from 1 to 10", (1.0, 10.0)),
    ("longest", "from 0 to 3600 seconds", (0.0, 3600.0)),
    ("jitter", "from 0 to 1", (0.0, 1.0)),
    ("deadline", "above 0, at most 86400 seconds (a day)", (math.ulp(0.0), 86_400.0)),
)
"""Each `Polling` field, its bounds in words, and as numbers: finite, and within a day."""


def _in_range(value: object, bounds: tuple[float, float]) -> bool:
    from flux_adapters._options import is_number

    return is_number(value) and bounds[0] <= value <= bounds[1]


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@runtime_checkable
class JobAdapter(Protocol):
    """What the library needs from the adapter of an asynchronous provider.

    Besides the data every adapter has (``name``, ``default_base_url``, ``env_prefix``,
    ``limits``, and optionally ``auth``, ``not_taken``, ``prices``, ``usd_per_credit``; see
    `flux_adapters.providers.Adapter`), it builds and reads each exchange. Pure: no I/O.
    """

    @property
    def name(self) -> str:
        """Provider id."""

    @property
    def default_base_url(self) -> str:
        """The provider's real base URL."""

    @property
    def env_prefix(self) -> str:
        """Prefix of its environment variables: ``<PREFIX>_API_KEY``."""

    @property
    def limits(self) -> Mapping[str, ModelLimits]:
        """Canonical model id -> limits."""

    def build_submit(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """The request that submits the job (role ``submit``)."""

    def parse_submit(self, response: HttpResponse) -> Submitted:
        """Read the acceptance of a submit (a 2xx).

        Raises:
            ResponseFormatError: It is not the documented shape.
        """

    def build_poll(self, job: Job) -> HttpRequest:
        """The request that reads the job's status (role ``poll``)."""

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        """Read a status (a 2xx).

        Raises:
            Moderated, JobFailed, JobNotFound: The job ended without an image.
            ResponseFormatError: It is not the documented shape.
        """

    def build_fetch(self, job: Job) -> HttpRequest | None:
        """The request that fetches a finished job's result (role ``fetch``), if separate."""

    def parse_fetch(self, response: HttpResponse, job: Job) -> Answer:
        """Read a fetched result (a 2xx)."""

    def build_cancel(self, job: Job) -> HttpRequest | None:
        """The request that cancels the job (role ``cancel``), if the provider can."""

    def job_failure(self, response: HttpResponse, job: Job) -> JobError | None:
        """The job's own failure, when an error answer (status >= 300) to its fetch is one.

        Some providers keep a failed job's error at its result URL (fal answers its app's 422
        or 500 there): that is the job's outcome, not a failed exchange to try again. ``None``
        leaves the answer to the library: tried again in place when it may pass (429, 5xx, and
        404 and 410, which a proxy or another host may send for a job that goes on), the
        provider's error otherwise. Error answers to a poll are about the poll, with one
        exception: a 404 or 410 this method reads as `errors.JobNotFound` (the provider's own
        documented "unknown job", in its body) ends the job; any other 404 is polled again.
        """

    def parse_error(self, response: HttpResponse) -> ProviderError:
        """The typed error for an error answer to any exchange (status >= 300)."""


class JobAdapterBase:
    """Defaults for a `JobAdapter`: poll and fetch the returned URLs, no cancel.

    A subclass sets ``name``, ``default_base_url``, ``env_prefix``, ``limits`` (and ``auth``,
    ...), and writes ``build_submit``, ``parse_submit`` and ``parse_poll`` (and ``parse_fetch``
    when results are fetched apart).
    """

    name: ClassVar[str]
    auth: ClassVar[KeyAuth | None] = None

    def build_poll(self, job: Job) -> HttpRequest:
        """``GET`` the poll URL the provider returned, as returned."""
        from flux_adapters.wire import HttpRequest

        return HttpRequest(method="GET", url=job.poll_url, role="poll")

    def build_fetch(self, job: Job) -> HttpRequest | None:
        """``GET`` the result URL the provider returned, when it returned one."""
        from flux_adapters.wire import HttpRequest

        if job.result_url is None:
            return None
        return HttpRequest(method="GET", url=job.result_url, role="fetch")

    def parse_fetch(self, response: HttpResponse, job: Job) -> Answer:
        """Read a fetched result: an adapter whose provider answers apart overrides this."""
        from flux_adapters.errors import ResponseFormatError

        raise ResponseFormatError(
            f"the {self.name} adapter reads no separate result",
            provider=self.name,
            status_code=response.status_code,
        )

    def build_cancel(self, job: Job) -> HttpRequest | None:
        """No cancel by default."""
        return None

    def job_failure(self, response: HttpResponse, job: Job) -> JobError | None:
        """No error answer is the job's own outcome by default."""
        return None

    def parse_error(self, response: HttpResponse) -> ProviderError:
        """An error answer in any common shape (JSON, text, an HTML gateway page)."""
        from flux_adapters.providers._images_api import parse_error

        return parse_error(self.name, response)
