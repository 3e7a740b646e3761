"""Run, record and report conformance scenarios for one adapter.

`run_scenario` gives a `Verdict` for one scenario:

- **pass**: it behaved as the scenario expects, replayed from its cassette with the network
  blocked and every recorded interaction played (or, for a refusal, before any I/O);
- **fail**: it did not (the detail names the scenario and the first mismatch);
- **unsupported**: the adapter's limits refuse the request, and verifiably so before any I/O;
- **deviation**: it fails in a way the provider's author declared (and fails again, loudly,
  once it stops deviating);
- **unrecorded**: a failure only a misbehaving server can produce (402, 429, 5xx, ...) has no
  cassette, because it was recorded against a live provider or a server that does not speak
  the fault-control protocol (or cannot produce that fault). Not a pass;
- **not applicable**: the scenario is about the other kind of provider (a job's polls at a
  provider that answers in one call, a refused call at one that runs jobs). Not a pass.

A job is polled by `JOB_POLLING` with its deadline kept on a clock that only the job's own waits
move; a replay does not wait at all, and a recording against the emulator does not either, so a
replay makes exactly the recorded polls. Every request the replay sends must be in the cassette
(a poll the cassette lacks is a failure, even though the library retries a poll in place), and
every recorded interaction must be played.

`record` re-records cassettes against the emulator, a live provider, or any base URL, asking
the server for each fault scenario's fault over the fault-control protocol where it speaks it
(`flux_adapters.conformance._fault_control`). Each scenario records on its own: what goes wrong
in one is that scenario's failure, and the run goes on. It writes into a temporary folder next
to the cassettes, scans every new cassette for secrets, and moves them into place only when
every recorded scenario passed (or failed as a declared deviation) and the scan is clean;
otherwise it raises `RecordingFailed` and the old cassettes are untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import httpx
from attrs import define, frozen

from flux_adapters import errors
from flux_adapters._display import escape_controls
from flux_adapters._files import read_bytes_file, read_text_file
from flux_adapters._flows import first_request, is_job_adapter, resolve
from flux_adapters._redact import Redactor
from flux_adapters._transport import bounded_http_client
from flux_adapters._version import __version__
from flux_adapters.client import FluxClient
from flux_adapters.config import ProviderSettings
from flux_adapters.conformance._fault_control import FaultControl
from flux_adapters.conformance.cassettes import (
    RECORDING,
    Scrubber,
    SecretScan,
    _Serializer,
    make_vcr,
)
from flux_adapters.conformance.scenarios import (
    JOB_POLLING,
    SCENARIOS,
    Completes,
    Expectation,
    JobEnds,
    ProviderFails,
    RaisesBeforeIO,
    Scenario,
    TimesOut,
)
from flux_adapters.jobs import Job, JobAdapter, Polling
from flux_adapters.providers import AnyAdapter
from flux_adapters.request import EditRequest
from flux_adapters.result import ResultImage, Usage
from flux_adapters.wire import HttpRequest

__all__ = [
    "DEVIATIONS_FILE",
    "RecordingFailed",
    "Verdict",
    "bundled_cassettes",
    "credential_names",
    "fault_control_problem",
    "paid_calls",
    "read_deviations",
    "record",
    "run_scenario",
    "scan_for_secrets",
    "write_report",
]

Outcome = Literal["pass", "fail", "unsupported", "deviation", "unrecorded", "not-applicable"]
REPLAY_KEY: Final = "replay-key"
# Where each in-repo provider's result images live, for the URLs of emulator recordings. A
# job's own URLs (BFL's polling_url, fal's status, result and cancel URLs) are on the provider's
# base URL: the emulator serves them under the provider's prefix, rewritten like the submit.
RESULT_HOSTS: Final = {
    "laozhang": "https://delivery-eu.bfl.ai/results",
    "apiyi": "https://delivery-eu.bfl.ai/results",
    "apiyi-multipart": "https://delivery-eu.bfl.ai/results",
    "aimlapi": "https://cdn.aimlapi.com/generations",
    # BFL: "result.sample" is a signed URL on its delivery hosts (delivery-eu1.bfl.ai, ...).
    "bfl": "https://delivery-eu.bfl.ai/results",
    # fal: outputs live on its media CDN (https://v3.fal.media/files/...).
    "fal": "https://v3.fal.media/files",
}
POLL_HOSTS: Final = {
    # BFL answers with a polling_url on a regional host (api.eu2.bfl.ai, api.us1.bfl.ai, ...),
    # "to be polled as returned": emulator recordings put it there, so that an adapter that
    # rebuilds it on its base URL does not match.
    "bfl": ("/v1/get_result", "https://api.eu2.bfl.ai"),
}
"""Provider -> (path of its job URLs, the host they are on), for emulator recordings."""
RECORDED_PENDING_POLLS: Final = 2
"""Polls an emulated job answers as pending before it ends, when recording against the emulator
(``job-pending-then-ready`` needs at least two)."""


def bundled_cassettes() -> Path:
    """The built-in providers' cassettes that came with this installation.

    A wheel carries them as ``flux_adapters/conformance/recorded``; a checkout (an editable
    install) has them at the repository's top level, ``cassettes/``.
    """
    here = Path(__file__).resolve().parent
    packaged = here / "recorded"
    return packaged if packaged.is_dir() else here.parents[1] / "cassettes"


@frozen(kw_only=True)
class Verdict:
    """What one scenario showed for one provider."""

    provider: str
    scenario: str
    outcome: Outcome
    detail: str = ""
    recorded: Mapping[str, str] | None = None


class RecordingFailed(errors.FluxError):
    """A recording run replaced no cassette: a scenario failed, it broke off, or it found a secret.

    The cassettes that were there before are untouched, and the new ones are deleted.

    Attributes:
        provider: The adapter's name.
        folder: The cassette folder that was left as it was.
        failures: The scenarios that did not pass, with what went wrong.
        findings: ``<file>:<line>: <kind of secret>`` for each secret found (never the secret).
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        folder: Path,
        failures: Sequence[Verdict] = (),
        findings: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.folder = folder
        self.failures = tuple(failures)
        self.findings = tuple(findings)


def _inapplicable(adapter: AnyAdapter, scenario: Scenario) -> str:
    """Why *scenario* does not apply to *adapter*'s kind of provider (empty when it does)."""
    jobs = is_job_adapter(adapter)
    if scenario.applies_to == "job" and not jobs:
        return f"{adapter.name} answers each edit in one call: it has no jobs to poll"
    if scenario.applies_to == "call" and jobs:
        return (
            f"{adapter.name} runs jobs: it moderates a job it accepted "
            "(job-request-moderated, job-content-moderated), not the call"
        )
    if scenario.needs is not None and getattr(adapter, scenario.needs, True) is False:
        return f"{adapter.name} declares {scenario.needs} = False"
    return ""


def _supports(adapter: AnyAdapter, scenario: Scenario, request: EditRequest) -> str:
    """Why *adapter* cannot run *scenario* (empty when it can)."""
    forms = getattr(adapter, "result_forms", frozenset({"url"}))
    if scenario.result_form not in forms:
        return f"{adapter.name} documents no {scenario.result_form} answers"
    try:
        resolve(adapter, request)
    except errors.RequestError as error:
        return "; ".join(str(violation) for violation in error.violations)
    return ""


@contextlib.contextmanager
def _network_blocked() -> Iterator[None]:
    """Refuse every outgoing connection: a replay must come entirely from the cassette."""
    real = socket.socket.connect

    def refuse(self: socket.socket, address: Any) -> None:
        raise ConnectionRefusedError(f"the conformance replay blocks the network (tried {address})")

    socket.socket.connect = refuse  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.connect = real  # type: ignore[method-assign]


@define
class _Pace:
    """The clock of a job's deadline, moved by the job's own waits only.

    *real* also spends each wait, and a download's pauses between tries (recording against a
    live provider, which must not be polled in a tight loop); otherwise a wait costs nothing.
    """

    real: bool = False
    now: float = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.spend(seconds)

    def spend(self, seconds: float) -> None:
        """A wait that is not the job's (a download's pause between tries): the clock stays."""
        if self.real:
            time.sleep(seconds)


@define
class _Exchanges:
    """What the client sent and which of those were answered (httpx event hooks)."""

    sent: list[httpx.Request] = attrs.Factory(list)
    answered: list[tuple[httpx.Request, int]] = attrs.Factory(list)

    def on_request(self, request: httpx.Request) -> None:
        self.sent.append(request)

    def on_response(self, response: httpx.Response) -> None:
        self.answered.append((response.request, response.status_code))

    def unanswered(self) -> list[httpx.Request]:
        """Requests that got no answer: in a replay, requests the cassette does not hold."""
        answered = {id(request) for request, _ in self.answered}
        return [request for request in self.sent if id(request) not in answered]

    def matching(self, wanted: HttpRequest, key_param: str | None) -> list[httpx.Request]:
        """The requests sent that are *wanted* (method and URL; a key in the query ignored)."""
        try:
            url = httpx.URL(wanted.url)
        except (httpx.InvalidURL, TypeError, ValueError):
            return []
        found = []
        for request in self.sent:
            sent = request.url.copy_remove_param(key_param) if key_param else request.url
            if request.method == wanted.method.upper() and sent == url:
                found.append(request)
        return found

    def status(self, request: httpx.Request) -> int | None:
        return next((status for sent, status in self.answered if sent is request), None)


def _polling(expect: Expectation) -> Polling:
    if isinstance(expect, TimesOut):
        return attrs.evolve(JOB_POLLING, deadline=expect.deadline)
    return JOB_POLLING


@contextlib.contextmanager
def _client(
    adapter: AnyAdapter,
    api_key: str,
    base_url: str,
    polling: Polling,
    pace: _Pace,
    *,
    replay: bool = False,
) -> Iterator[tuple[FluxClient, _Exchanges]]:
    exchanges = _Exchanges()
    # A replay's answers come from its cassette, the network blocked: the URLs a sandbox on
    # loopback gave when it was recorded lead nowhere, and are not refused as private ones.
    settings = (
        {adapter.name: ProviderSettings(name=adapter.name, allow_private_urls=True)}
        if replay
        else None
    )
    with _recording_http(exchanges) as http:
        client = FluxClient(
            adapter,
            api_key=api_key,
            base_url=base_url,
            http_client=http,
            polling=polling,
            settings=settings,
        )
        client._job_clock = pace.clock
        client._job_sleep = pace.sleep
        client._download_sleep = pace.spend  # a replayed answer is the same however late
        yield client, exchanges


def _recording_http(exchanges: _Exchanges) -> httpx.Client:
    """The httpx client a scenario is recorded (and replayed) through.

    vcrpy reads each answer whole inside the transport, before the library's own reader (its
    size cap and deadline) sees a byte of it: a sandbox answering without end, or a byte at a
    time, held a recording for ever and filled the memory. So the client is the library's own
    (`bounded_http_client`: each socket read ends by the exchange's deadline), and no answer is
    read past `CASSETTE_BYTES`, more than a replay reads from a cassette anyway.
    """
    from flux_adapters._bounded import connection_pools  # as bounded_http_client does

    http = bounded_http_client()
    # gzip only: vcrpy cannot decode every encoding httpx may advertise (zstd), and a body it
    # cannot decode cannot be scrubbed.
    http.headers["Accept-Encoding"] = "gzip"
    http.event_hooks = {"request": [exchanges.on_request], "response": [exchanges.on_response]}
    for pool in connection_pools(http):
        if pool is not None:
            pool.handle_request = _capped(pool.handle_request)
    return http


def _capped(send: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """*send* (a connection pool's), its answers' bodies cut off past `CASSETTE_BYTES`."""
    import httpcore

    def capped(request: Any) -> Any:
        response = send(request)
        return httpcore.Response(
            response.status,
            headers=response.headers,
            content=_CappedBody(response.stream),
            extensions=response.extensions,
        )

    return capped


class _CappedBody:
    """An answer's body as the connection gives it, failing once it passes `CASSETTE_BYTES`."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        import httpcore

        size = 0
        for chunk in self._stream:
            size += len(chunk)
            if size > CASSETTE_BYTES:
                raise httpcore.ReadError(
                    f"the answer is larger than a cassette may hold ({CASSETTE_BYTES} bytes)"
                )
            yield chunk

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


def _is_unrecorded(cause: BaseException | None) -> bool:
    """Whether *cause* is vcrpy's "no recorded interaction matches" (the client types it)."""
    return type(cause).__name__ == "CannotOverwriteExistingCassetteException"


@frozen
class _Sent:
    """What a scenario's call is judged with besides its outcome."""

    adapter: AnyAdapter
    request: EditRequest
    base_url: str
    exchanges: _Exchanges
    reported: Mapping[str, float] = attrs.field(factory=dict)

    @property
    def key_param(self) -> str | None:
        auth = getattr(self.adapter, "auth", None)
        query = getattr(auth, "query", None)
        return query if isinstance(query, str) else None

    def count(self, build: Callable[[], object]) -> tuple[int, str]:
        """How many requests like the one *build* makes were sent (or why that is unknown)."""
        try:
            wanted = build()
        except Exception as exc:  # the adapter under test: anything may go wrong
            return 0, f"the adapter could not build it ({type(exc).__name__})"
        if wanted is None:
            return 0, ""
        if not isinstance(wanted, HttpRequest):
            return 0, "the adapter built no HttpRequest"
        return len(self.exchanges.matching(wanted, self.key_param)), ""

    def submits(self) -> int:
        plan = resolve(self.adapter, self.request)
        count, _ = self.count(
            lambda: first_request(self.adapter, self.request, plan, self.base_url)
        )
        return count


def _exercise(client: FluxClient, expect: Expectation, sent: _Sent) -> str:
    """Send the scenario's request; return what went against *expect* (empty when nothing did)."""
    try:
        result = client.edit(sent.request)
    except errors.FluxError as error:
        cause = error.__cause__
        if cause is not None and _is_unrecorded(cause):
            raise cause from None  # a request the cassette does not hold: a mismatch
        if isinstance(expect, ProviderFails) and isinstance(error, expect.error):
            status = getattr(error, "status_code", None)
            if status != expect.status and status not in expect.also:
                wanted = " or ".join(str(code) for code in (expect.status, *expect.also))
                return f"raised {type(error).__name__} with status {status}, expected {wanted}"
            if expect.retry_after and getattr(error, "retry_after", None) is None:
                return "the 429 carried no Retry-After value"
            return ""
        if isinstance(expect, JobEnds | TimesOut) and isinstance(error, errors.JobError):
            return _job_ending(error, expect, sent)
        return f"raised {type(error).__name__}: {error}"
    if isinstance(expect, ProviderFails):
        return f"completed, but {expect.error.__name__} ({expect.status}) was expected"
    if isinstance(expect, JobEnds | TimesOut):
        ending = expect.error if isinstance(expect, JobEnds) else errors.JobTimeout
        return f"completed, but {ending.__name__} was expected"
    assert isinstance(expect, Completes)
    if not result.images:
        return "the result holds no image"
    if expect.pending:
        problem = _pending_polls(result.job, expect.pending, sent)
        if problem:
            return problem
    if expect.base64 and result.images[0].b64_json is None:
        return "the image came as a URL, expected inline base64"
    for number, image in enumerate(result.images, 1):
        problem = _image_problem(image, number, sent.request)
        if problem:
            return problem
    return _usage_problem(result.usage, sent.reported)


RATIO_TOLERANCE: Final = 0.05
"""How far an image's width/height may be from the aspect ratio asked, relatively: a provider
picks the pixel size for a ratio and rounds it to its grid (21:9 at one megapixel on a grid of
32 is 1536x640, 2.9 % off)."""


def _image_problem(image: ResultImage, number: int, request: EditRequest) -> str:
    """Why result image *number* is not the image *request* asked for (empty: it is).

    Completing means an image: each one is downloaded from the cassette (or decoded from its
    base64) and must be a png, jpeg or webp; of the format asked, if one was; whose header says
    the width and height asked (``width``/``height`` or ``size``), or an aspect ratio within
    `RATIO_TOLERANCE` of the one asked.
    """
    import io

    from flux_adapters._files import IMAGE_FORMATS, SNIFF_BYTES, image_format
    from flux_adapters.request import _dimensions

    try:
        data = image.read()
    except errors.FluxError as error:
        cause = error.__cause__
        if cause is not None and _is_unrecorded(cause):
            raise cause from None  # its download is not in the cassette: a mismatch
        return f"image {number} is not an image: {type(error).__name__}: {error}"
    found = image_format(data[:SNIFF_BYTES])
    if found not in IMAGE_FORMATS:
        return f"image {number} is not a png, jpeg or webp image"
    if request.output_format is not None and found != request.output_format:
        return f"image {number} is a {found} image; the request asked for {request.output_format}"
    width, height = _dimensions(io.BytesIO(data))
    if width is None or height is None:
        return f"image {number} has no readable size"
    wanted = request.dimensions
    if wanted is not None and (width, height) != wanted:
        return f"image {number} is {width}x{height}; the request asked for {wanted[0]}x{wanted[1]}"
    ratio = request.ratio
    if ratio is not None and abs(width * ratio[1] / (height * ratio[0]) - 1) > RATIO_TOLERANCE:
        return (
            f"image {number} is {width}x{height}; the request asked for the aspect ratio "
            f"{ratio[0]}:{ratio[1]}"
        )
    return ""


USAGE_FIELDS: Final = {
    "cost": "credits_used",  # BFL: credits
    "credits_used": "credits_used",  # aimlapi's meta.usage
    "tokens_used": "tokens_used",
    "input_mp": "input_mp",
    "output_mp": "output_mp",
}
"""Fields of a provider's answers that report usage -> the `Usage` attribute they parse into."""
USAGE_OBJECT_FIELDS: Final = {"credits": "credits_used"}
"""Fields that report usage only inside a ``usage`` object (Nimbus's ``usage.credits``): alone,
``credits`` may as well be a balance."""


def reported_usage(answers: Iterable[object]) -> dict[str, float]:
    """The usage the provider reported in *answers* (JSON bodies), by `Usage` attribute.

    Each of `USAGE_FIELDS` found at any depth with a number (not a bool), and each of
    `USAGE_OBJECT_FIELDS` in an object under ``usage``; the first answer that reports a field
    gives its value.
    """
    found: dict[str, float] = {}
    stack: list[tuple[object, bool]] = [(answer, False) for answer in list(answers)[::-1]]
    while stack:
        value, in_usage = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                field = USAGE_FIELDS.get(key) or (
                    USAGE_OBJECT_FIELDS.get(key) if in_usage else None
                )
                if field and isinstance(item, int | float) and not isinstance(item, bool):
                    found.setdefault(field, float(item))
            stack.extend((item, key == "usage") for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((item, False) for item in reversed(value))
    return found


def _usage_problem(usage: Usage | None, reported: Mapping[str, float]) -> str:
    """What of the *reported* usage the result's *usage* misses or misreads (empty: nothing)."""
    for field, number in reported.items():
        parsed = getattr(usage, field, None) if usage is not None else None
        if parsed is None:
            return f"the provider reported {field} {number:g}; the result's usage has none"
        if abs(float(parsed) - number) > 1e-9 * max(1.0, abs(number)):
            return f"the provider reported {field} {number:g}; the result's usage says {parsed:g}"
    return ""


def _cassette_answers(data: Mapping[str, Any]) -> list[object]:
    """The JSON bodies of the answers recorded in a cassette (others skipped)."""
    answers: list[object] = []
    for interaction in data.get("interactions") or []:
        body = (interaction.get("response") or {}).get("body") or {}
        text = body.get("string") if isinstance(body, dict) else None
        if isinstance(text, str | bytes):
            try:
                answers.append(json.loads(text))
            except (ValueError, RecursionError):  # an image, a page, anything but JSON
                continue
    return answers


def _submitted_once(sent: _Sent) -> str:
    submits = sent.submits()
    if submits != 1:
        return f"the job was submitted {submits} times; an accepted job is never submitted again"
    return ""


def _pending_polls(job: Job | None, pending: int, sent: _Sent) -> str:
    """Check that the job was polled past *pending* answers of "not done", and submitted once."""
    if job is None:
        return "the result carries no job"
    adapter: JobAdapter = sent.adapter  # type: ignore[assignment]
    polls, problem = sent.count(lambda: adapter.build_poll(job))
    if problem:
        return f"its poll: {problem}"
    if polls < pending + 1:
        return (
            f"the job was polled {polls} time(s); the scenario needs {pending} pending "
            "answer(s) before the result (record it again)"
        )
    return _submitted_once(sent)


def _job_ending(error: errors.JobError, expect: JobEnds | TimesOut, sent: _Sent) -> str:
    """What in *error*, a job's ending, goes against *expect* (empty when nothing does)."""
    name = type(error).__name__
    wanted = expect.error if isinstance(expect, JobEnds) else errors.JobTimeout
    if not isinstance(error, wanted):
        return f"raised {name}, expected {wanted.__name__}: {error}"
    job = error.job
    if job is None:
        return f"raised {name} without its job (error.job), so it could not be resumed"
    if error.job_id != job.id or error.provider != sent.adapter.name:
        return f"{name} names job {error.job_id!r} at {error.provider!r}, not {job.id!r}"
    if isinstance(expect, JobEnds):
        if expect.stage is not None and getattr(error, "stage", None) != expect.stage:
            return f"raised {name} with stage {getattr(error, 'stage', None)!r}, expected {expect.stage!r}"
        if isinstance(error, errors.JobFailed):
            billed = error.billed
            if billed not in (True, False, None):
                return f"raised JobFailed with billed={billed!r}; it must be True, False or None"
            if sent.adapter.name in expect.billed and billed != expect.billed[sent.adapter.name]:
                return (
                    f"raised JobFailed with billed={billed!r}; the provider's document says "
                    f"{expect.billed[sent.adapter.name]!r}"
                )
        return _submitted_once(sent)
    assert isinstance(error, errors.JobTimeout)
    return _timed_out(error, job, expect.deadline, sent) or _submitted_once(sent)


def _timed_out(error: errors.JobTimeout, job: Job, deadline: float, sent: _Sent) -> str:
    if not error.waited >= deadline - 1e-9:
        return f"JobTimeout after {error.waited:g} s of waits; the deadline is {deadline:g} s"
    adapter: JobAdapter = sent.adapter  # type: ignore[assignment]
    polls, problem = sent.count(lambda: adapter.build_poll(job))
    if problem or polls < 1:
        return problem or "the job was never polled before its deadline"
    try:
        cancel: object = adapter.build_cancel(job)
    except Exception as exc:  # the adapter under test
        return f"the adapter could not build the job's cancel ({type(exc).__name__})"
    if cancel is None:
        if error.cancelled is not None:
            return f"JobTimeout says cancelled={error.cancelled!r}, but the job has no cancel"
        return ""
    cancels = (
        sent.exchanges.matching(cancel, sent.key_param) if isinstance(cancel, HttpRequest) else []
    )
    if len(cancels) != 1:
        return f"the job was cancelled {len(cancels)} times at its deadline; expected once"
    status = sent.exchanges.status(cancels[0])
    accepted = status is not None and 200 <= status < 300
    if error.cancelled is not accepted:
        return (
            f"JobTimeout says cancelled={error.cancelled!r}, but the cancel was answered {status}"
        )
    return ""


def _refusal(adapter: AnyAdapter, request: EditRequest) -> str:
    """Check that *request* is refused with a RequestError before any byte is sent."""
    sent: list[httpx.Request] = []

    def record(outgoing: httpx.Request) -> httpx.Response:
        sent.append(outgoing)
        return httpx.Response(500)

    http = httpx.Client(transport=httpx.MockTransport(record))
    with FluxClient(
        adapter, api_key=REPLAY_KEY, base_url=adapter.default_base_url, http_client=http
    ) as client:
        try:
            client.edit(request)
        except errors.RequestError:
            return (
                ""
                if not sent
                else f"raised RequestError, but only after sending {len(sent)} request(s)"
            )
        except errors.FluxError as error:
            return f"raised {type(error).__name__} instead of RequestError (sent {len(sent)} request(s))"
        finally:
            http.close()
    return f"was not refused: {len(sent)} request(s) sent"


def _metadata(data: Mapping[str, Any]) -> Mapping[str, str] | None:
    """The ``recorded`` block of a cassette: where and when it was made."""
    recorded = data.get("recorded")
    return {str(k): str(v) for k, v in recorded.items()} if isinstance(recorded, dict) else None


def _judge(adapter: AnyAdapter, scenario: Scenario, cassettes: Path) -> Verdict:
    def verdict(
        outcome: Outcome, detail: str = "", recorded: Mapping[str, str] | None = None
    ) -> Verdict:
        return Verdict(
            provider=adapter.name,
            scenario=scenario.id,
            outcome=outcome,
            detail=detail,
            recorded=recorded,
        )

    inapplicable = _inapplicable(adapter, scenario)
    if inapplicable:
        return verdict("not-applicable", inapplicable)
    try:
        request = scenario.build(adapter)
    except errors.RequestError as error:
        return verdict("fail", f"{scenario.id}: the scenario's request could not be built: {error}")
    unsupported = _supports(adapter, scenario, request)
    if isinstance(scenario.expect, RaisesBeforeIO) or (
        unsupported and scenario.result_form == "url"
    ):
        problem = _refusal(adapter, request)
        if problem:
            return verdict("fail", f"{scenario.id}: {problem}")
        return verdict(
            "pass" if isinstance(scenario.expect, RaisesBeforeIO) else "unsupported", unsupported
        )
    if unsupported:
        return verdict("unsupported", unsupported)
    path = cassettes / f"{scenario.id}.yaml"
    if not path.exists():
        if scenario.fault is not None:
            return verdict(
                "unrecorded",
                f"{scenario.id}: no cassette; only a server that misbehaves on purpose produces "
                "it (the emulator, or a sandbox that speaks the fault-control protocol)",
            )
        return verdict(
            "fail",
            f"{scenario.id}: no cassette at {path}; record it: {_record_command(adapter, cassettes)}",
        )
    if not path.is_file():  # a FIFO or device would hang the replay: stat it, never open it
        return verdict("fail", f"{scenario.id}: {path} is not a regular file")
    data, unreadable = _read_cassette(path)
    if unreadable:
        return verdict("fail", f"{scenario.id}: {path} cannot be read as a cassette ({unreadable})")
    recorded = _metadata(data)
    expect = scenario.expect
    assert not isinstance(expect, RaisesBeforeIO)
    base_url = adapter.default_base_url
    try:
        replay = make_vcr("none", secrets=[REPLAY_KEY], credentials=credential_names(adapter))
        with _network_blocked(), replay.use_cassette(str(path)) as cassette:
            with _client(adapter, REPLAY_KEY, base_url, _polling(expect), _Pace(), replay=True) as (
                client,
                exchanges,
            ):
                sent = _Sent(
                    adapter, request, base_url, exchanges, reported_usage(_cassette_answers(data))
                )
                problem = _exercise(client, expect, sent)
            unplayed = len(cassette.data) - len(cassette.play_counts)
    except Exception as exc:  # vcrpy's CannotOverwriteExistingCassetteException names the mismatch
        return verdict("fail", f"{scenario.id}: {_mismatch(exc)}", recorded)
    missing = exchanges.unanswered()
    if missing:
        # A poll or fetch the library retried in place after the cassette had no answer for it
        # (a transport failure to the flow): the recording and the replay went apart there.
        first = missing[0]
        return verdict(
            "fail",
            f"{scenario.id}: the request was not recorded: {first.method} {first.url}"
            + (f" ({len(missing)} such requests)" if len(missing) > 1 else "")
            + (f"; then {problem}" if problem else ""),
            recorded,
        )
    if problem:
        return verdict("fail", f"{scenario.id}: {problem}", recorded)
    if unplayed:
        return verdict(
            "fail", f"{scenario.id}: {unplayed} recorded request(s) were never made", recorded
        )
    return verdict("pass", "", recorded)


CASSETTE_BYTES: Final = 16 * 1024 * 1024
"""The largest cassette a replay reads (the suite's own are a few kB; images are digests)."""


def _read_cassette(path: Path) -> tuple[dict[str, Any], str]:
    """The cassette at *path*, or why it cannot be one: that scenario's failure, not the report's.

    Why: a file that is too large, not UTF-8, not YAML, YAML no recording writes, or not the
    shape vcrpy writes (a mapping with a list of interactions, each a request and a response).
    """
    try:
        data: object = _Serializer.deserialize(read_text_file(path, limit=CASSETTE_BYTES))
    except OSError as exc:
        return {}, exc.strerror or type(exc).__name__
    except UnicodeDecodeError:
        return {}, "it is not UTF-8 text"
    except RecursionError:
        return {}, "it is nested too deeply"
    except ValueError as exc:  # _Serializer: YAML no recording writes
        return {}, str(exc).removeprefix("not a cassette: ")
    except errors.MissingExtraError:
        raise  # no cassette can be read: the whole run stops, naming what to install
    except Exception as exc:  # yaml.YAMLError and what vcrpy raises on a file it did not write
        return {}, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    interactions = data.get("interactions") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(interactions, list):
        return {}, "it holds no list of interactions"
    if not all(
        isinstance(item, dict)
        and isinstance(item.get("request"), dict)
        and isinstance(item.get("response"), dict)
        for item in interactions
    ):
        return {}, "an interaction is not a request and a response"
    return data, ""


def _record_command(adapter: AnyAdapter, cassettes: Path) -> str:
    """The command that records *adapter*'s cassettes into *cassettes*, as the CLI takes it."""
    from flux_adapters.providers import PROVIDERS, get_adapter

    name = adapter.name
    try:
        known = name in PROVIDERS and type(get_adapter(name)) is type(adapter)
    except errors.FluxError:  # a registered package that fails to load: name the class instead
        known = False
    which = (
        f"--provider {name}"
        if known
        else f"--adapter {type(adapter).__module__}:{type(adapter).__qualname__}"
    )
    folder = "" if cassettes.parent == Path("cassettes") else f" --cassettes {cassettes.parent}"
    return f"flux-adapters conformance {which} --record{folder}"


def _mismatch(exc: BaseException) -> str:
    """The matcher's own words from vcrpy's "no match" error (both its 8.x and 9.x wording)."""
    text = str(exc)
    for line in text.splitlines():
        if " differs: " in line:  # vcrpy 9: "body_matcher differs: JSON body differs: ..."
            return (
                "the request does not match the recording: "
                + line.split(" differs: ", 1)[1].strip()
            )
    marker = "Matchers failed :"  # vcrpy 8
    if marker in text:
        return "the request does not match the recording: " + " ".join(
            text.split(marker, 1)[1].split()
        )
    if "no recorded interaction" in text or "No match for the request" in text:
        return "the request was not recorded: " + " ".join(text.split())[:300]
    return f"{type(exc).__name__}: {text[:300]}"


DEVIATIONS_FILE: Final = "deviations.toml"
"""A provider's declared deviations, beside its cassettes: read by `ConformanceSuite` and the CLI."""


def read_deviations(cassettes: Path) -> dict[str, str]:
    """The deviations declared in *cassettes*/``deviations.toml`` (none when it is absent).

    The file is one table, scenario id -> why the provider deviates::

        [deviations]
        error-429 = "answers 503 instead of 429 when rate limited"

    Raises:
        ConfigurationError: The file cannot be read, is not that shape, or names a scenario
            the suite does not have.
    """
    import tomllib

    path = cassettes / DEVIATIONS_FILE
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(read_text_file(path, limit=1024 * 1024))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise errors.ConfigurationError(f"{path}: cannot be read as TOML ({exc})") from None
    table = data.get("deviations")
    if set(data) != {"deviations"} or not isinstance(table, dict):
        raise errors.ConfigurationError(f"{path}: must hold one [deviations] table, and only it")
    known = {scenario.id for scenario in SCENARIOS}
    problems = [
        f"{scenario_id!r} is not a scenario" if scenario_id not in known else
        f"{scenario_id}: the reason must be text, not {type(reason).__name__}"
        for scenario_id, reason in table.items()
        if scenario_id not in known or not isinstance(reason, str) or not reason.strip()
    ]  # fmt: skip
    if problems:
        raise errors.ConfigurationError(f"{path}: " + "; ".join(problems))
    return {str(scenario_id): str(reason) for scenario_id, reason in table.items()}


def run_scenario(
    adapter: AnyAdapter,
    scenario: Scenario,
    cassettes: Path,
    deviations: Mapping[str, str] | None = None,
) -> Verdict:
    """Judge *adapter* on *scenario* from the cassettes in *cassettes* (see the module docstring).

    Raises:
        ConfigurationError: *adapter*'s declared data cannot be used (checked as a client checks
            it): a `ConformanceSuite` subclass hands its adapter over as it is, and its limits
            are read before any client is made.
    """
    from flux_adapters._options import check_adapter

    check_adapter(adapter)
    return _declared(_judge(adapter, scenario, cassettes), (deviations or {}).get(scenario.id))


def _declared(verdict: Verdict, reason: str | None, keep: Sequence[Outcome] = ()) -> Verdict:
    """*verdict* with the provider's declared deviation (*reason*) applied.

    A declared scenario that fails is a deviation; one that does anything else fails, asking for
    the declaration to be removed, unless its outcome is one of *keep* (a recording leaves a
    scenario it could not record as it is).
    """
    if reason is None or verdict.outcome in keep:
        return verdict
    if verdict.outcome == "fail":
        return attrs.evolve(verdict, outcome="deviation", detail=f"{reason} ({verdict.detail})")
    now = (
        "it now conforms"
        if verdict.outcome == "pass"
        else f"it does not fail ({_SYMBOLS[verdict.outcome]}: {verdict.detail})"
    )
    return attrs.evolve(
        verdict,
        outcome="fail",
        detail=f"{verdict.scenario}: declared as a deviation ({reason}) but {now}; "
        "remove the declaration",
    )


def _recordable(adapter: AnyAdapter, scenario: Scenario, faults: bool) -> bool:
    """Whether a run records *scenario*; *faults*: whether its server takes faults on request."""
    if (
        isinstance(scenario.expect, RaisesBeforeIO)
        or _inapplicable(adapter, scenario)
        or _supports(adapter, scenario, scenario.build(adapter))
    ):
        return False
    return faults or scenario.fault is None


def paid_calls(
    adapter: AnyAdapter, emulator: bool, *, faults: bool | None = None
) -> tuple[int, int]:
    """How many scenarios a recording run records, and how many send a request that may be billed.

    One each: polls, fetches and downloads are free. `record` says afterwards how many exchanges
    were made in all. *faults* says whether the server takes faults on request, so that the
    fault scenarios are recorded too (by default: with *emulator*; a sandbox that speaks the
    fault-control protocol does as well, see `fault_control_problem`).
    """
    chosen = [
        s for s in SCENARIOS if _recordable(adapter, s, emulator if faults is None else faults)
    ]
    # A job that ends without an image was accepted all the same, and an unreadable 2xx may
    # have been done: both may be billed.
    billed = [
        s
        for s in chosen
        if isinstance(s.expect, Completes | JobEnds | TimesOut)
        or (isinstance(s.expect, ProviderFails) and 200 <= s.expect.status < 300)
    ]
    return len(chosen), len(billed)


_LIVE_FAULTS: Final = (
    "a live provider is not asked to misbehave; record it against a sandbox that speaks the "
    "fault-control protocol (--base-url)"
)


def fault_control_problem(adapter: AnyAdapter, base_url: str | None) -> str:
    """Why a recording of *adapter* at *base_url* cannot record the fault scenarios (empty: it can).

    None is the live provider, which is never asked. Otherwise one ``DELETE
    {base_url}/__flux/faults`` (free, and without the key) asks whether the server speaks the
    fault-control protocol (see `flux_adapters.conformance._fault_control`); it clears any fault
    armed there before.
    """
    if base_url is None:
        return _LIVE_FAULTS
    with bounded_http_client() as http:
        return FaultControl(_target(adapter, base_url), http).probe()


def _target(adapter: AnyAdapter, base_url: str | None) -> str:
    """The URL a recording sends to in place of *adapter*'s own base URL (no trailing ``/v1``)."""
    return (base_url or adapter.default_base_url).rstrip("/").removesuffix("/v1")


def _rewriter(
    target: str,
    real: str,
    results_from: str | None,
    results_to: str,
    polls: tuple[str, str] | None = None,
) -> Callable[[str], str]:
    def rewrite(url: str) -> str:
        if polls is not None and url.startswith(target + polls[0]):
            return polls[1] + url[len(target) :]
        if url.startswith(target + "/") or url == target:
            return real + url[len(target) :]
        if results_from is not None and url.startswith(results_from):
            return results_to + url[len(results_from) :]
        return url

    return rewrite


def _recording_keys(api_key: str, scenarios: Sequence[Scenario]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([api_key, *(s.api_key for s in scenarios if s.api_key)]))


def record(
    adapter: AnyAdapter,
    cassettes: Path,
    *,
    api_key: str,
    base_url: str | None = None,
    emulator: bool = False,
    scenarios: Sequence[Scenario] = SCENARIOS,
    log: Callable[[str], None] = print,
) -> list[Verdict]:
    """Record every scenario *adapter* supports and replace their cassettes in *cassettes*.

    The new cassettes are written to a temporary folder next to *cassettes* (so that moving them
    in is a rename), scrubbed of *api_key* and every scenario's key in every form, then scanned
    for any secret left (`scan_for_secrets` with those keys). They replace the old ones only
    when every recorded scenario passed and the scan found nothing; cassettes of scenarios not
    recorded in this run stay as they are. A deviation declared in *cassettes*/``deviations.toml``
    counts as in a replay: a declared scenario that fails is recorded as a "deviation", one that
    passes fails (remove the declaration).

    Each scenario is recorded on its own: anything that goes wrong in one (a connection refused,
    a download that fails, a sandbox that refuses its fault, an exception of the adapter) is that
    scenario's failure, and the run goes on to the next, so that it reports every scenario.

    The fault scenarios (`Scenario.fault`: 402, 429, 5xx, ...) are recorded where the server
    misbehaves on request: the emulator, or a sandbox at *base_url* that speaks the
    fault-control protocol (``POST``/``DELETE {base_url}/__flux/faults``, see
    `flux_adapters.conformance._fault_control`). Elsewhere (a live provider, a server that does
    not speak it, a fault the sandbox answers 422 to) they are not recorded, and the run says
    which and why; their old cassettes, if any, stay.

    Args:
        adapter: The adapter to record through.
        cassettes: The folder for ``<scenario>.yaml``.
        api_key: The key to record with (never written: it is scrubbed, then searched for).
            With *emulator* it is not used: a random throwaway key is, because the emulator
            takes any key, and a fixed one (``emulator-key``) shares 8-character pieces with
            text every cassette holds (``emulator``).
        base_url: Record against this base URL instead of the provider's real one.
        emulator: Record against the bundled emulator, telling it each scenario's fault over
            the same protocol.
        scenarios: The scenarios to record (default: all).
        log: Where progress lines go.

    Returns:
        One verdict per scenario this run could record: ``"pass"``, ``"deviation"`` (declared),
        or ``"unrecorded"`` (with why) for a fault scenario the server could not be asked for.

    Raises:
        RecordingFailed: A scenario failed, recording broke off before its scenarios, or a new
            cassette held a secret; nothing was replaced.
        ConfigurationError: *cassettes*/``deviations.toml`` cannot be read (`read_deviations`),
            or *emulator* is asked for a provider it does not serve (a provider package's).
    """
    deviations = read_deviations(cassettes)
    if emulator:
        _check_emulated(adapter)
        api_key = "emu-" + secrets.token_urlsafe(24)
    keys = _recording_keys(api_key, scenarios)
    redact = Redactor(keys)
    cassettes.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cassettes.name}.recording-", dir=cassettes.parent))
    at: list[str] = []
    try:
        try:
            verdicts = _record_into(
                staging,
                adapter,
                api_key=api_key,
                keys=keys,
                base_url=base_url,
                emulator=emulator,
                scenarios=scenarios,
                deviations=deviations,
                log=lambda line: log(redact(line)),
                at=at,
            )
        except ImportError:
            raise  # a missing extra: the CLI names what to install
        except Exception as exc:
            where = f"at {at[-1]}" if at else "before the first scenario"
            raise RecordingFailed(
                f"recording {adapter.name} broke off {where} ({type(exc).__name__}: "
                f"{redact(str(exc))[:300]}); {cassettes} is unchanged",
                provider=adapter.name,
                folder=cassettes,
            ) from exc
        verdicts = [attrs.evolve(v, detail=redact(v.detail)) for v in verdicts]
        failures = [verdict for verdict in verdicts if verdict.outcome == "fail"]
        findings = [
            f"{cassettes / path.relative_to(staging)}:{line}: {kind}"
            for path, line, kind in _scan(staging, keys, credential_names(adapter))
        ]
        exchanges, paid = _exchanges(staging)
        tried = sum(verdict.outcome != "unrecorded" for verdict in verdicts)
        log(
            f"{adapter.name}: {tried} scenario(s) recorded in {exchanges} exchange(s), "
            f"{paid} of them a paid request the provider accepted"
            + (f"; {len(failures)} failed" if failures else "")
        )
        unrecorded = [verdict.scenario for verdict in verdicts if verdict.outcome == "unrecorded"]
        if unrecorded:
            log(f"{adapter.name}: not recorded (see above why): {', '.join(unrecorded)}")
        if failures or findings:
            lines = [f"- {v.scenario}: {v.detail}" for v in failures]
            lines += [f"- {finding} (not written)" for finding in findings]
            raise RecordingFailed(
                f"recording {adapter.name} failed, {cassettes} is unchanged:\n" + "\n".join(lines),
                provider=adapter.name,
                folder=cassettes,
                failures=failures,
                findings=findings,
            )
        cassettes.mkdir(exist_ok=True)
        for path in sorted(staging.glob("*.yaml")):
            os.replace(path, cassettes / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return verdicts


def _check_emulated(adapter: AnyAdapter) -> None:
    """Refuse to record *adapter* against the emulator when it does not speak its dialect.

    Raises:
        ConfigurationError: *adapter* is none of the built-in providers the emulator serves (a
            provider package's: it has its own sandbox); said before anything is sent, rather
            than ``KeyError: 'nimbus'`` once the emulator was started.
    """
    from flux_adapters.emulator import PROVIDER_PREFIXES

    if adapter.name not in PROVIDER_PREFIXES:
        raise errors.ConfigurationError(
            f"the bundled emulator speaks the built-in providers only "
            f"({', '.join(PROVIDER_PREFIXES)}), not {adapter.name!r}: record it against its "
            "own sandbox (--base-url) or the live provider"
        )


def _exchanges(folder: Path) -> tuple[int, int]:
    """Exchanges in the cassettes of *folder*, and how many paid requests were answered with a 2xx.

    Each scenario's first exchange is its paid request (the call, or a job's submit); the polls,
    fetches, cancels and downloads after it are free. So the second figure is what the run may
    have been billed for.
    """
    exchanges = paid = 0
    for path in folder.glob("*.yaml"):
        interactions = _read_cassette(path)[0].get("interactions") or []
        exchanges += len(interactions)
        if interactions:
            code = interactions[0].get("response", {}).get("status", {}).get("code", 0)
            paid += isinstance(code, int) and 200 <= code < 300
    return exchanges, paid


@frozen
class _Recording:
    """What every scenario of one run is recorded with."""

    folder: Path
    adapter: AnyAdapter
    api_key: str
    target: str
    where: str
    recorder: Any  # vcr.VCR: vcrpy is an optional extra, imported by make_vcr
    control: FaultControl | None
    unable: str
    """Why the fault scenarios cannot be recorded here (empty: they can)."""
    real_pace: bool


def _record_into(
    folder: Path,
    adapter: AnyAdapter,
    *,
    api_key: str,
    keys: Sequence[str],
    base_url: str | None,
    emulator: bool,
    scenarios: Sequence[Scenario],
    deviations: Mapping[str, str],
    log: Callable[[str], None],
    at: list[str],
) -> list[Verdict]:
    """Record into *folder*; *at* gets each scenario's id as it starts."""
    verdicts: list[Verdict] = []
    with contextlib.ExitStack() as stack:
        results_from: str | None = None
        if emulator:
            from flux_adapters.emulator import run_emulator

            bad_keys = {s.api_key for s in scenarios if s.api_key}
            running = stack.enter_context(
                run_emulator(
                    bad_keys={key for key in bad_keys if key},
                    pending_polls=RECORDED_PENDING_POLLS,
                )
            )
            target, where = running.base_url(adapter.name), "emulator"
            results_from = f"{running.url}/files"
        else:
            running = None
            target = _target(adapter, base_url)
            # The base URL may carry credentials of its own (https://user:pass@host).
            where = "live" if base_url is None else f"base URL {Scrubber(keys).url(target)}"
        control, unable = None, _LIVE_FAULTS
        if running is not None or base_url is not None:
            # The emulator is told its faults as any sandbox is: over HTTP, never with the key.
            # Asked once whether it speaks the protocol, and only when there is a fault to ask.
            control = FaultControl(target, stack.enter_context(bounded_http_client()))
            unable = control.probe() if any(s.fault is not None for s in scenarios) else ""
        rewrite = _rewriter(
            target,
            adapter.default_base_url,
            results_from,
            RESULT_HOSTS.get(adapter.name, adapter.default_base_url + "/results"),
            POLL_HOSTS.get(adapter.name) if running is not None else None,
        )
        recording = _Recording(
            folder=folder,
            adapter=adapter,
            api_key=api_key,
            target=target,
            where=where,
            recorder=make_vcr("all", rewrite, secrets=keys, credentials=credential_names(adapter)),
            control=control,
            unable=unable,
            # A live provider or a sandbox is polled at the suite's real pace; the emulator
            # counts polls, not seconds, so its waits are not spent.
            real_pace=running is None,
        )
        for scenario in scenarios:
            at.append(scenario.id)
            try:
                verdict = _record_scenario(recording, scenario)
            except Exception as exc:  # anything in one scenario is that scenario's failure
                verdict = Verdict(
                    provider=adapter.name,
                    scenario=scenario.id,
                    outcome="fail",
                    detail=f"{type(exc).__name__}: {str(exc)[:300]}",
                )
            if verdict is None:
                continue
            verdict = _declared(verdict, deviations.get(scenario.id), keep=("unrecorded",))
            verdicts.append(verdict)
            if verdict.outcome == "unrecorded":
                log(f"  not recorded {scenario.id}: {verdict.detail}")
            else:
                detail = f" - {verdict.detail}" if verdict.detail else ""
                log(f"  recorded {scenario.id}: {verdict.outcome}{detail}")
    return verdicts


def _record_scenario(recording: _Recording, scenario: Scenario) -> Verdict | None:
    """Record *scenario* (None: it is not for this adapter, or it is refused before any I/O)."""
    adapter = recording.adapter
    if not _recordable(adapter, scenario, faults=True):
        return None

    def verdict(outcome: Outcome, detail: str = "") -> Verdict:
        return Verdict(provider=adapter.name, scenario=scenario.id, outcome=outcome, detail=detail)

    fault, control = scenario.fault, recording.control
    if fault is None:
        return verdict(*_judged(_record_exchanges(recording, scenario)))
    if recording.unable or control is None:
        return verdict("unrecorded", recording.unable)
    try:
        taken, words = control.arm(fault)
        if taken == "cannot":
            return verdict("unrecorded", f"the sandbox cannot produce this fault ({words})")
        if taken == "refused":
            return verdict("fail", f"the sandbox refused the scenario's fault ({words})")
        problem = _record_exchanges(recording, scenario)
    finally:
        # Cleared whatever happened: a fault left armed would answer the next scenarios.
        cleared = control.clear()
    return verdict(*_judged(problem or cleared))


def _judged(problem: str) -> tuple[Outcome, str]:
    return ("fail", problem) if problem else ("pass", "")


def _record_exchanges(recording: _Recording, scenario: Scenario) -> str:
    """Send *scenario*'s request into its cassette; what went against its expectation, if any."""
    adapter = recording.adapter
    stamp = datetime.now(UTC).replace(microsecond=0).isoformat()
    token = RECORDING.set(
        {
            "where": recording.where,
            "at": stamp,
            "provider": adapter.name,
            "scenario": scenario.id,
            "flux_adapters": __version__,
        }
    )
    expect = scenario.expect
    assert not isinstance(expect, RaisesBeforeIO)
    # Either way the deadline is kept on the waits (see `_Pace`).
    pace = _Pace(real=recording.real_pace)
    try:
        with (
            recording.recorder.use_cassette(str(recording.folder / f"{scenario.id}.yaml")),
            _client(
                adapter,
                scenario.api_key or recording.api_key,
                recording.target,
                _polling(expect),
                pace,
            ) as (client, exchanges),
        ):
            request = scenario.build(adapter)
            problem = _exercise(
                client, expect, _Sent(adapter, request, recording.target, exchanges)
            )
    finally:
        RECORDING.reset(token)
    if not problem and exchanges.unanswered():
        # A failure without an answer cannot be recorded (a dropped poll the library
        # tried again): the replay would poll on a different schedule.
        problem = "an exchange got no answer while recording; record again"
    return problem


def credential_names(adapter: AnyAdapter) -> tuple[str, ...]:
    """The header and query parameter *adapter*'s key travels in (its ``auth``), if any.

    The scrubber and the scan know the usual names (``Authorization``, ``x-key``, ...); an
    adapter of another package may send its key under a name of its own.
    """
    auth = getattr(adapter, "auth", None)
    names = (getattr(auth, "header", None), getattr(auth, "query", None))
    return tuple(name for name in names if isinstance(name, str) and name)


def _scan(
    folder: Path, keys: Iterable[str], credentials: Iterable[str] = ()
) -> list[tuple[Path, int, str]]:
    scan = SecretScan(keys, credentials=credentials)
    found: list[tuple[Path, int, str]] = []
    for path in sorted(folder.rglob("*.yaml")):
        if not path.is_file():  # stat only: a FIFO named like a cassette is never opened
            continue
        try:
            data = read_bytes_file(path, CASSETTE_BYTES)
        except OSError as exc:  # too large, or gone: not scanned, so not passed either
            found.append((path, 1, f"a file that cannot be scanned ({exc.strerror})"))
            continue
        text = data.decode("utf-8", errors="replace")
        found += [(path, line, kind) for line, kind in scan.findings(text)]
    return found


def scan_for_secrets(
    folder: Path, keys: Iterable[str] = (), *, credentials: Iterable[str] = ()
) -> list[str]:
    """Every secret in the cassettes (``*.yaml``) under *folder*, as ``<file>:<line>: <kind>``.

    Looks for every form of each of *keys* (as is, URL-encoded, JSON-escaped, base64) and every
    8-character fragment of those forms, and for credentials whatever their value: bearer
    tokens, Basic credentials, ``sk-`` keys, URL passwords, and credential headers, query values,
    JSON and multipart fields that are not redacted, by the usual names and by *credentials*
    (an adapter's own header or query parameter: `credential_names`). The kind is named; the
    secret never is.
    """
    return [f"{path}:{line}: {kind}" for path, line, kind in _scan(folder, keys, credentials)]


_SYMBOLS: Final = {
    "pass": "pass",
    "fail": "FAIL",
    "unsupported": "unsupported",
    "deviation": "deviation",
    "unrecorded": "not recorded",
    "not-applicable": "not applicable",
}


def _one_markdown_line(text: str) -> str:
    """*text* as one line of Markdown: line breaks as spaces, ``|`` escaped, controls shown.

    A detail holds a deviations.toml reason as written, and an answer's text: a line break in
    it ended the list item and let the next lines be a table or a heading of their own.
    """
    return escape_controls(" ".join(text.split())).replace("|", "\\|")


def write_report(verdicts: Sequence[Verdict], folder: Path) -> tuple[Path, Path]:
    """Write the provider x scenario table as ``conformance.md`` and ``conformance.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    providers = list(dict.fromkeys(v.provider for v in verdicts))
    cell = {(v.provider, v.scenario): v for v in verdicts}
    lines = [
        f"# Conformance report (flux-adapters {__version__})",
        "",
        "| scenario | " + " | ".join(f"`{p}`" for p in providers) + " |",
        "|---" * (len(providers) + 1) + "|",
    ]
    for scenario in SCENARIOS:
        row = [
            _SYMBOLS[cell[(p, scenario.id)].outcome] if (p, scenario.id) in cell else ""
            for p in providers
        ]
        lines.append(f"| `{scenario.id}` | " + " | ".join(row) + " |")
    notes = [v for v in verdicts if v.outcome in ("fail", "deviation")]
    if notes:
        lines += ["", "## Failures and deviations", ""] + [
            f"- `{v.provider}` {_one_markdown_line(v.detail)}" for v in notes
        ]
    markdown, data = folder / "conformance.md", folder / "conformance.json"
    markdown.write_text("\n".join(lines) + "\n")
    data.write_text(json.dumps(
        {"flux_adapters": __version__, "verdicts": [
            {"provider": v.provider, "scenario": v.scenario, "outcome": v.outcome, "detail": v.detail,
             "recorded": dict(v.recorded) if v.recorded else None}
            for v in verdicts
        ]}, indent=2) + "\n")  # fmt: skip
    return markdown, data
