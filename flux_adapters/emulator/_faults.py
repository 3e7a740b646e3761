"""Faults the emulator can inject, and its records of calls received and jobs billed.

No server imports here: the conformance scenarios and the command line build faults without the
``emulator`` extra installed.

Two kinds of provider are emulated. The synchronous ones (laozhang, apiyi, aimlapi) answer one
POST with the image. The job providers (bfl, fal) take a submit, answer polls until the job is
done, and (fal) a fetch of the result and a cancel: a fault says which of those exchanges it
applies to (``on``), and for a submit how the job goes on (``pending``, ``queued``, ``outcome``,
``other_host``).

A fault also travels over HTTP, in the fault-control protocol a recording run speaks to any
sandbox (``POST {base_url}/__flux/faults``, docs/validating-a-provider.md): its body is the
fault's fields that differ from their defaults, `build_fault_body`, read back strictly by
`parse_fault_body`.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, Final

from attrs import define, frozen

if TYPE_CHECKING:
    import cattrs

__all__ = [
    "EXCHANGES",
    "FAULTS_PATH",
    "JOB_PROVIDERS",
    "OUTCOMES",
    "Billed",
    "Call",
    "Fault",
    "build_fault_body",
    "parse_fault_body",
]

FAULTS_PATH: Final = "/__flux/faults"
"""Where a sandbox takes faults, under the base URL a recording run is given (the protocol)."""

GARBAGE_BODIES: Final = frozenset({"malformed", "empty", "bad-b64", "nested", "html"})
"""``Fault.body`` values that replace the answer with a 200 a client must not accept."""
BODIES: Final = GARBAGE_BODIES | {"b64"}
"""Every ``Fault.body`` value; ``"b64"`` is a success, with the image inline."""
DOWNLOADS: Final = frozenset({"html", "empty", "redirect", "redirect-loop", "not-image", "drip"})
"""Every ``Fault.download`` value."""
EXCHANGES: Final = ("submit", "poll", "fetch", "cancel")
"""The kinds of exchange (`Call.kind`, ``Fault.on``): a synchronous provider only has submits;
bfl has submits and polls; fal has all four."""
OUTCOMES: Final = frozenset(
    {"request-moderated", "content-moderated", "failed", "not-found", "invalid"}
)
"""Every ``Fault.outcome`` value: how a job that is not a success ends."""
JOB_PROVIDERS: Final = frozenset({"bfl", "fal"})
"""The providers that answer a submit with a job to poll rather than with the image."""
_SUBMIT_ONLY: Final = ("pending", "queued", "outcome", "other_host", "download")


@frozen(kw_only=True)
class Fault:
    """A misbehaviour to inject into one provider's answers.

    A fault either replaces the answer (``status``, ``drop``, a garbage ``body``,
    ``moderation``: at most one of them) or changes how a success is delivered (``delay``,
    ``drip``, ``body="b64"``, ``download``). By default a replacing fault answers before any work,
    so nothing is billed; with ``after_work`` the job is validated, rendered and billed first.

    At a job provider (bfl, fal) a fault applies to one kind of exchange (``on``): the submit, a
    poll of the job's status, a fetch of its result or a cancel. A fault on the submit also
    decides how that job goes on: how many polls stay pending, how it ends, where its polling
    URLs point.

    Attributes:
        status: Answer with this HTTP status instead (429, 402, 500, 502, 503, 504, ...), with a
            body in the provider's style (502 and 504 as a gateway's HTML page).
        retry_after: Seconds for a ``Retry-After`` header (with 429 by default 1); needs ``status``.
        delay: Seconds to wait before answering (or before the other misbehaviour).
        drop: Send the status line and headers, then cut the connection.
        body: A 200 that is not the documented shape: ``"malformed"`` (cut-off JSON), ``"empty"``,
            ``"bad-b64"`` (``data[0].b64_json`` that is not base64), ``"nested"`` (JSON nested
            100,000 levels deep), ``"html"`` (a ``text/html`` page); or ``"b64"``: a success
            with the image inline (``b64_json``) instead of a URL (synchronous providers only).
        moderation: Answer as the provider's content filter does (synchronous providers; a job
            provider moderates through ``outcome``).
        after_work: Do the exchange's work first, then send the fault's answer instead of its
            own: a submit is accepted (and billed as the provider bills it), a poll counts
            towards the job's completion, a cancel takes effect. The client gets an error or
            garbage for work that was done.
        download: Make the result URL of this job misbehave (the POST succeeds and is billed):
            ``"html"`` (a 200 HTML page), ``"empty"`` (a 200 without a body), ``"redirect"`` (302 to
            an HTML page), ``"redirect-loop"`` (302 to itself), ``"not-image"`` (a 200 with the
            image's content type and bytes that are no image), ``"drip"`` (the image one byte
            every ``drip`` seconds).
        drip: Send the answer's body one byte every this many seconds, after the headers; with
            ``download="drip"`` the download drips instead and the POST answer does not.
        chance: Apply to each call with this probability (drawn from the emulator's ``seed``).
        first: Apply only the first N times, then answer normally; ``None`` for every call. Only
            exchanges of the fault's own kind (``on``) count.
        on: The exchange this fault applies to at a job provider: ``"submit"`` (the default, and
            the only exchange of a synchronous provider), ``"poll"`` (BFL's ``get_result``,
            fal's ``/status``), ``"fetch"`` (fal's result) or ``"cancel"`` (fal's cancel).
        pending: Polls this job answers as not done yet before it ends; ``None`` for the
            emulator's ``pending_polls``. A huge number (``10**9``) is a job that never ends.
        queued: Of the ``pending`` polls, how many fal answers ``IN_QUEUE`` (the rest are
            ``IN_PROGRESS``); by default the first half, rounded up. A request cancelled while in
            the queue is not charged.
        outcome: How the job ends instead of with an image: ``"request-moderated"``,
            ``"content-moderated"`` (BFL's statuses; fal answers a 422 content-policy error),
            ``"failed"`` (BFL's ``Error``; fal a 500 from the result), ``"not-found"`` (the job
            is gone: BFL's ``Task not found``, fal's 404) or ``"invalid"`` (fal only: a 422 from
            the result for input the model refused).
        other_host: Give this job's polling URLs (fal: status, result and cancel URLs) another
            host name of the same server (``localhost`` for ``127.0.0.1`` and back), as BFL's
            polling URLs may point at another host than the submit.
    """

    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    drop: bool = False
    body: str | None = None
    moderation: bool = False
    after_work: bool = False
    download: str | None = None
    drip: float = 0.0
    chance: float = 1.0
    first: int | None = None
    on: str = "submit"
    pending: int | None = None
    queued: int | None = None
    outcome: str | None = None
    other_host: bool = False

    def __attrs_post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError(f"invalid fault: {'; '.join(problems)}")

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.status is not None and not 100 <= self.status <= 599:
            problems.append(f"status {self.status} is not an HTTP status")
        if self.body is not None and self.body not in BODIES:
            problems.append(f"body {self.body!r} is not one of {', '.join(sorted(BODIES))}")
        if self.download is not None and self.download not in DOWNLOADS:
            problems.append(
                f"download {self.download!r} is not one of {', '.join(sorted(DOWNLOADS))}"
            )
        # `not 0 <= x <= ...` also refuses NaN; a day is far past any test's patience.
        for name in ("delay", "drip", "retry_after"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 86_400:
                problems.append(f"{name} must be from 0 to 86400 seconds; got {value}")
        if not 0 <= self.chance <= 1:
            problems.append(f"chance must be from 0 to 1; got {self.chance}")
        if self.first is not None and self.first < 0:
            problems.append(f"first must be at least 0; got {self.first}")
        answers = self._replacements()
        if len(answers) > 1:
            problems.append(f"{' and '.join(answers)} each replace the answer; pick one")
        if self.retry_after is not None and self.status is None:
            problems.append("retry_after needs a status")
        if self.after_work and not answers:
            problems.append("after_work needs an answer to send after the work (status, ...)")
        if self.download is not None and (answers or self.body == "b64"):
            problems.append("download needs the POST to answer with a result URL")
        if self.download == "drip" and not self.drip:
            problems.append('download="drip" needs drip (seconds per byte)')
        if self.drop and self.drip:
            problems.append("drop sends no body to drip")
        return problems + self._job_problems(answers)

    def _job_problems(self, answers: list[str]) -> list[str]:
        problems: list[str] = []
        if self.on not in EXCHANGES:
            problems.append(f"on {self.on!r} is not one of {', '.join(EXCHANGES)}")
        if self.outcome is not None and self.outcome not in OUTCOMES:
            problems.append(f"outcome {self.outcome!r} is not one of {', '.join(sorted(OUTCOMES))}")
        for name in ("pending", "queued"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must be at least 0; got {value}")
        if self.pending is not None and self.queued is not None and self.queued > self.pending:
            problems.append(f"queued ({self.queued}) cannot be more than pending ({self.pending})")
        shaping = [name for name in _SUBMIT_ONLY if getattr(self, name) not in (None, False)]
        if shaping and self.on != "submit":
            problems.append(f"{', '.join(shaping)}: decided at the job's submit; use on='submit'")
            return problems
        # download has its own message above
        shaping = [name for name in shaping if name != "download"]
        if shaping and answers and not self.after_work:
            problems.append(
                f"{', '.join(shaping)}: needs the submit accepted, but {answers[0]} answers "
                "before the work (add after_work)"
            )
        return problems

    def check_for(self, provider: str) -> None:
        """Raise `ValueError` if the fault cannot take effect at *provider*.

        A synchronous provider has only submits and no jobs to shape; a job provider moderates
        through ``outcome``, not ``moderation``, and has no inline (``b64``) answer; only fal
        answers a result fetch or a cancel, or an ``invalid`` outcome.
        """
        problems: list[str] = []
        if provider not in JOB_PROVIDERS:
            job_only = [name for name in ("pending", "queued", "outcome") if getattr(self, name)]
            job_only += ["other_host"] if self.other_host else []
            job_only += [f"on={self.on!r}"] if self.on != "submit" else []
            if job_only:
                problems.append(f"{', '.join(job_only)}: {provider} answers with the image, no job")
        else:
            if self.moderation:
                problems.append(f"{provider} moderates jobs: use outcome='request-moderated'")
            if self.body == "b64":
                problems.append(f"{provider} has no inline (b64) answer")
            if provider == "bfl" and self.on in ("fetch", "cancel"):
                problems.append(f"bfl has no {self.on}: its poll answers the result, no cancel")
            if provider == "bfl" and self.outcome == "invalid":
                problems.append("bfl refuses invalid input at the submit; 'invalid' is fal's")
        if problems:
            raise ValueError(f"invalid fault for {provider}: {'; '.join(problems)}")

    def _replacements(self) -> list[str]:
        candidates = (
            ("status", self.status is not None),
            ("drop", self.drop),
            ("body", self.body in GARBAGE_BODIES),
            ("moderation", self.moderation),
        )
        return [name for name, present in candidates if present]

    @property
    def fails(self) -> bool:
        """Whether the fault replaces the success answer (rather than delaying or reshaping it)."""
        return bool(self._replacements())

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Read a command-line fault such as ``429,retry-after=2,first=1`` or ``502,after-work``.

        Job faults: ``on=poll``, ``pending=N``, ``queued=N``, an outcome word
        (``request-moderated``, ``content-moderated``, ``failed``, ``not-found``, ``invalid``, or
        ``outcome=WORD``) and ``other-host``, e.g. ``503,on=poll,first=1`` or
        ``content-moderated,pending=3``.

        Raises:
            ValueError: An unknown part, or a combination `Fault` refuses.
        """
        values: dict[str, object] = {}
        for item in (part.strip() for part in spec.split(",") if part.strip()):
            key, _, value = item.partition("=")
            if key.isdigit() and not value:
                values["status"] = int(key)
            elif key in ("drop", "moderation", "after-work", "other-host") and not value:
                values[key.replace("-", "_")] = True
            elif key in BODIES and not value:
                values["body"] = key
            elif key in OUTCOMES and not value:
                values["outcome"] = key
            elif key in ("download", "on", "outcome") and value:
                values[key] = value
            elif key in ("retry-after", "delay", "drip", "chance") and value:
                try:
                    values[key.replace("-", "_")] = float(value)
                except ValueError:
                    raise ValueError(f"{key} must be a number; got {value!r}") from None
            elif key in ("first", "pending", "queued") and value.isdigit():
                values[key] = int(value)
            else:
                raise ValueError(f"unknown fault part {item!r}")
        return cls(**values)  # type: ignore[arg-type]


def _exactly(kind: type[Any]) -> Any:
    """A structure hook taking only values of *kind* (JSON's ``true`` is no number, ``"7"`` none)."""

    def structure(value: object, _: object) -> object:
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise TypeError(f"must be {kind.__name__}, not {type(value).__name__}")
        return value

    return structure


def _number(value: object, _: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be a number, not {type(value).__name__}")
    return float(value)


@cache
def _wire() -> cattrs.Converter:
    import cattrs  # lazy: only the fault-control protocol needs it

    converter = cattrs.Converter(omit_if_default=True, forbid_extra_keys=True)
    for kind in (int, bool, str):
        converter.register_structure_hook(kind, _exactly(kind))
    converter.register_structure_hook(float, _number)
    return converter


def build_fault_body(fault: Fault) -> dict[str, Any]:
    """*fault* as the fault-control protocol sends it: the fields that differ from their defaults.

    ``Fault(status=429, retry_after=7)`` is ``{"status": 429, "retry_after": 7}``;
    ``Fault(body="malformed")`` is ``{"body": "malformed"}``.
    """
    body: dict[str, Any] = _wire().unstructure(fault)
    # A whole number is sent whole (7, not 7.0), however it was given: simpler for a sandbox.
    return {
        name: int(value) if isinstance(value, float) and value.is_integer() else value
        for name, value in body.items()
    }


def parse_fault_body(body: object) -> Fault:
    """The `Fault` a fault-control body describes, read strictly: a body from the network.

    Raises:
        ValueError: Not a JSON object, a field `Fault` does not have, a value of the wrong type
            (``"429"``, ``true`` for a number), or a combination `Fault` refuses; the message
            names each problem.
    """
    import cattrs

    if not isinstance(body, dict):
        raise ValueError(f"a fault is a JSON object, not {type(body).__name__}")
    try:
        return _wire().structure(body, Fault)
    except cattrs.BaseValidationError as exc:
        problems = cattrs.transform_error(exc, format_exception=lambda error, _: str(error))
        raise ValueError("; ".join(problems)) from None
    except (TypeError, ValueError) as exc:  # the class itself refused the combination
        raise ValueError(str(exc)) from None


@frozen
class Call:
    """One request the emulator received.

    Attributes:
        provider: The provider id it was for (``apiyi-multipart`` apart from ``apiyi``).
        method: The HTTP method.
        path: The URL path, without the query.
        at: Wall-clock time (``time.time()``) when it arrived.
        kind: Which exchange: ``"submit"`` (every synchronous call, a job's POST), ``"poll"``
            (BFL's ``get_result``, fal's ``/status``), ``"fetch"`` (fal's result) or ``"cancel"``.
        host: The ``Host`` it was sent to, e.g. ``127.0.0.1:8000`` or ``localhost:8000``.
        keyed: Whether it carried an API key (in the header the provider reads), whatever the
            key; the key itself is not kept.
    """

    provider: str
    method: str
    path: str
    at: float
    kind: str = "submit"
    host: str = ""
    keyed: bool = False


@frozen(kw_only=True)
class Billed:
    """One job the provider charges for, whether or not its answer got through.

    At a synchronous provider: a request validated and rendered. At a job provider: a submit
    accepted, unless the provider does not charge how the job ended (see `Emulator.billed`).

    Attributes:
        provider: The provider id that did it (``apiyi-multipart`` apart from ``apiyi``).
        model: The model, as the limits tables name it.
        prompt: The prompt; tests use it to tell jobs apart.
        seed: The seed sent, if any.
        at: Wall-clock time (``time.time()``) when the job was done (a job provider's: when it
            was accepted).
        job_id: A job provider's id for the job (BFL's ``id``, fal's ``request_id``).
    """

    provider: str
    model: str
    prompt: str
    seed: int | None
    at: float
    job_id: str | None = None


@define
class _Armed:
    fault: Fault
    used: int = 0
