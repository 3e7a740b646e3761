"""Interaction patterns, each written once as a generator the sync and async clients both drive.

A flow yields what it wants done and receives the outcome, the way httpx's ``Auth.auth_flow``
does: an `HttpRequest` (answered with its `HttpResponse`, or the client's `FluxError` thrown into
the flow: a transport failure, an answer too large to read, a request httpx refused to build), a `Sleep` (answered with ``None``), or `Accepted` (a job was accepted: the client records
it; answered with ``None``). It returns its outcome through ``StopIteration``. It does no I/O,
so every provider limit is enforced before the first request is yielded.

- `edit_flow`: a synchronous provider, one call.
- `job_flow`: an asynchronous provider (`flux_adapters.jobs`): submit, then `follow_job`.
- `follow_job`: poll an accepted job until it is done, fetch its result, cancel it at the
  deadline or when the caller stops waiting; also how ``client.resume(job)`` picks a job up.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Generator
from typing import Any, Final, ParamSpec, TypeAlias, TypeVar

import attrs
from attrs import frozen

from flux_adapters._display import describe_exception, escape_controls, render_value, type_name
from flux_adapters._foreign import is_interruption
from flux_adapters._ids import ProviderId, ProviderName
from flux_adapters._options import is_number
from flux_adapters._redact import answer_headers, redact, redactor_for, request_id
from flux_adapters.errors import (
    FluxError,
    JobError,
    JobNotFound,
    JobTimeout,
    Moderated,
    ProviderError,
    RequestError,
    ResponseFormatError,
    TransportError,
    Violation,
    attach_response,
)
from flux_adapters.jobs import (
    _USAGE_FIELDS,
    Accepted,
    Done,
    Job,
    JobAdapter,
    Pending,
    Polling,
    StopJob,
    Submitted,
)
from flux_adapters.limits import Plan, plan
from flux_adapters.providers import Adapter, Answer, AnyAdapter, get_adapter
from flux_adapters.request import EditRequest
from flux_adapters.result import ResultImage, Usage
from flux_adapters.wire import HttpRequest, HttpResponse, Role, Sleep

__all__ = [
    "Flow",
    "Instruction",
    "Outcome",
    "adapter_built",
    "as_request",
    "check",
    "edit_flow",
    "first_request",
    "flow_for",
    "follow_job",
    "job_flow",
    "job_request_id",
    "resolve",
]

_T = TypeVar("_T")
_P = ParamSpec("_P")
_E = TypeVar("_E", bound=FluxError)


@frozen
class Outcome:
    """What a finished flow produced: the plan it sent, the answer, and its job if it had one.

    ``request_id`` is the provider's id for the call (`FluxError.request_id` explains where it
    comes from), when it gave one.
    """

    plan: Plan
    answer: Answer
    job: Job | None = None
    request_id: str | None = None


Instruction: TypeAlias = HttpRequest | Sleep | Accepted
Flow: TypeAlias = Generator[Instruction, HttpResponse | None, Outcome]
_Steps: TypeAlias = Generator[Instruction, HttpResponse | None, _T]

_UNREADABLE_POLLS: Final = 3
"""Polls in a row whose answer cannot be read before the job is given up as unreadable."""

CANCEL_DEADLINE: Final = 10.0
"""Seconds a cancel may take: it is sent while the caller is giving up, and must not hold them."""

_SHORTEST_EXCHANGE: Final = 0.1
"""The least time a poll or fetch is given, however close the job's deadline."""

_UNPROVEN: Final = (404, 410)
"""HTTP statuses of a poll or fetch that say a URL was not found, not that the job is unknown:
BFL answers an unknown job with a 200 whose status is ``Task not found``, fal documents no such
answer. A regional host's routing, a proxy or a CDN may send them for a job that goes on."""


def _not_a_request(value: object, provider: str) -> RequestError:
    violation = Violation(
        "request",
        f"must be an EditRequest, not {type_name(value)}",
        "an EditRequest",
        render_value(value),
    )
    return RequestError([violation], provider=provider)


def resolve(adapter: AnyAdapter, request: EditRequest) -> Plan:
    """Check *request* against *adapter*'s limits and resolve it.

    Raises:
        RequestError: *request* is not an `EditRequest`, the provider does not offer the model,
            or the request breaks its limits.
    """
    if not issubclass(type(request), EditRequest):  # the real type: callers may pass anything
        raise _not_a_request(request, adapter.name)
    limits = adapter.limits.get(request.model)
    if limits is None:
        offered = ", ".join(adapter.limits) or "none"
        violation = Violation(
            "model", f"{adapter.name} does not offer {request.model}", offered, request.model
        )
        raise RequestError([violation], provider=adapter.name, model=request.model)
    if limits.provider != adapter.name:
        # A reseller's adapter may reuse another provider's rows as they are ("compatible with
        # laozhang"): the plan is this provider's, so that its refusals name it and its price
        # (looked up by the row's provider) is its own.
        limits = attrs.evolve(limits, provider=adapter.name)
    return plan(request, limits)


def check(request: EditRequest, provider: ProviderId | ProviderName) -> tuple[Violation, ...]:
    """Return every way *request* breaks *provider*'s limits; empty when it would be sent.

    Pure: nothing is sent. The same check runs inside every ``edit`` call. The provider is
    looked up first (in any case), so a bad provider id is reported even when *request* is bad
    too. *provider* is a built-in id, or ``ProviderName("...")`` for a registered one.

    Raises:
        ConfigurationError: *provider* is not a known provider id (whatever its type).
        RequestError: *request* is not an `EditRequest`.
    """
    adapter = get_adapter(provider)
    if not issubclass(type(request), EditRequest):
        raise _not_a_request(request, adapter.name)
    try:
        resolve(adapter, request)
    except RequestError as error:
        return error.violations
    return ()


def is_job_adapter(adapter: object) -> bool:
    """Whether *adapter* is an asynchronous provider's (`flux_adapters.jobs.JobAdapter`)."""
    return callable(getattr(adapter, "build_submit", None)) and callable(
        getattr(adapter, "parse_submit", None)
    )


def first_request(
    adapter: AnyAdapter, request: EditRequest, plan: Plan, base_url: str
) -> HttpRequest:
    """The request *adapter* sends first, the one that may be paid: a job's submit, or the call."""
    if is_job_adapter(adapter):
        return adapter.build_submit(request, plan, base_url)  # type: ignore[union-attr]
    return adapter.build_request(request, plan, base_url)  # type: ignore[union-attr]


def flow_for(
    adapter: AnyAdapter,
    request: EditRequest,
    base_url: str,
    secrets: tuple[str, ...] = (),
    plan: Plan | None = None,
    *,
    polling: Polling | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Flow:
    """The flow that performs *request* at *adapter*: one call, or a job."""
    if is_job_adapter(adapter):
        return job_flow(
            adapter,  # type: ignore[arg-type]
            request,
            base_url,
            secrets,
            plan,
            polling=polling or Polling(),
            clock=clock,
        )
    return edit_flow(adapter, request, base_url, secrets, plan)  # type: ignore[arg-type]


def adapter_built(
    adapter: object,
    request: EditRequest | None,
    build: Callable[_P, _T],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T:
    """``build(*args)``, or a `RequestError` in place of an adapter's own exception (not sent).

    *request* is the edit for a submit, ``None`` for a later exchange of an accepted job. (The
    call and its arguments rather than a closure: one less function, and its cells, per call.)
    A `JobError` is no build's to raise: only an answer can tell how a job ended, and
    ``JobFailed(billed=False)`` from ``build_poll`` of an accepted job would make the router
    fail over while the job may still run and be billed. It is a `RequestError` too (raised
    after the submit, it carries the job: final, "may be billed").
    """
    try:
        return build(*args, **kwargs)
    except JobError as error:
        raise _not_built(adapter, request, error) from error
    except FluxError:
        raise
    except BaseException as exc:  # an adapter's own, even outside Exception; not an interruption
        if is_interruption(exc):
            raise
        raise _not_built(adapter, request, exc) from exc


def _not_built(adapter: object, request: EditRequest | None, exc: BaseException) -> RequestError:
    """The `RequestError` for an exchange *adapter* failed to build (*exc* says how): not sent."""
    name = str(getattr(adapter, "name", "the adapter"))
    why = describe_exception(exc)
    violation = Violation("request", f"{name} could not build it", "an adapter bug", why)
    model = request.model if request is not None else None
    return RequestError([violation], provider=name, model=model)


def _answer_id(response: HttpResponse, secrets: tuple[str, ...]) -> str | None:
    """The provider's id for the exchange *response* answers, if it sent one."""
    return request_id(response.headers, redactor_for(secrets))


def _with_answer(error: _E, response: HttpResponse, secrets: tuple[str, ...]) -> _E:
    """*error* carrying *response*'s headers (made safe) and the provider's request id."""
    scrub = redactor_for(secrets)
    attach_response(
        error, answer_headers(response.headers, scrub), request_id(response.headers, scrub)
    )
    return error


def _scrubbed(
    error: ProviderError, name: str, status: int, secrets: tuple[str, ...]
) -> ProviderError:
    # The status the provider sent decides what the error proves (routing.billing_rule): an
    # adapter may not report another, nor turn a billed 2xx or 5xx into a 402 or 429.
    error.status_code = status
    error.detail = _redacted(error.detail, secrets)
    error.code = _redacted(error.code, secrets)
    if isinstance(error, ResponseFormatError):
        error.excerpt = _redacted(error.excerpt, secrets) or ""
    return _owned(error, name, secrets)


def _owned(error: _E, name: str, secrets: tuple[str, ...]) -> _E:
    """*error*, made by *name*'s adapter, naming that adapter, its message redacted of *secrets*.

    An adapter writes the message itself, often with the answer's text in it
    (``ProviderRejected(f"refused: {response.text()}")``): a provider that echoes the key would
    have it shown by ``str(error)``, as the detail never is. And an adapter's error names the
    provider that answered, not the one it says (a copy of another package's code may say
    ``provider="laozhang"``).
    """
    error.provider = name  # type: ignore[attr-defined]  # ProviderError and JobError have one
    error.args = tuple(
        _redacted(arg, secrets) or "" if type(arg) is str else arg for arg in error.args
    )
    if isinstance(error, JobError) and type(error.job_id) is str:
        error.job_id = _redacted(error.job_id, secrets) or ""
    return error


def _redacted(text: object, secrets: tuple[str, ...]) -> str | None:
    """*text* (an adapter's, so perhaps not text at all) redacted of *secrets*; ``None`` if empty.

    Its control characters are escaped, as the built-in adapters escape the provider's text they
    quote: an adapter of another package that quotes ``response.text()`` as it is would carry a
    provider's escape sequences to the terminal ``str(error)`` is printed on.
    """
    if not text:
        return None
    return escape_controls(redact(text if type(text) is str else render_value(text), secrets))


def _answered(
    adapter: AnyAdapter,
    response: HttpResponse,
    secrets: tuple[str, ...],
    taken: bool,
    expected: tuple[type[_T], ...],
    read: Callable[_P, object],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T:
    """``read(*args)`` of a 2xx answer; the typed error of any other, or of an answer it fails on.

    What *read* returns must be one of *expected* (checked and made whole by `_as_returned`):
    anything else, or a part of it that is no value of its kind, is a `ResponseFormatError`.
    A `JobError` other than `Moderated` counts only once a job was *taken* (a poll, a fetch):
    before that (a synchronous call, a submit), ``JobFailed(billed=False)`` would make an answer
    that may have been billed "not billed", and the router would pay twice. It is then a
    `ResponseFormatError`, judged by the status the provider sent.

    An adapter's own exception, or a `FluxError` that is no answer's (a "not sent"
    `TransportError`, say), becomes a `ResponseFormatError`: the provider did answer, so it is
    judged by that answer's status, never as "nothing was sent" (which would retry, or send it
    again later). A `ProviderError` keeps its kind but carries the status really sent.
    """
    try:
        if not 200 <= response.status_code < 300:
            failure: object = adapter.parse_error(response)
            if not isinstance(failure, ProviderError | JobError):
                # Raising what it returned as it is: KeyboardInterrupt() would stop the program.
                raise ResponseFormatError(
                    f"the {adapter.name} adapter returned {type_name(failure)} for an error "
                    "answer, not a ProviderError",
                    provider=adapter.name,
                    status_code=response.status_code,
                )
            raise failure
        return _as_returned(adapter.name, read(*args, **kwargs), expected)
    except ProviderError as error:
        scrubbed = _scrubbed(error, adapter.name, response.status_code, secrets)
        raise _with_answer(scrubbed, response, secrets) from error.__cause__
    except JobError as error:
        if not taken and not isinstance(error, Moderated):
            unread = ResponseFormatError(
                f"the {adapter.name} adapter reported a job's end ({type_name(error)}) where no "
                "job was taken",
                provider=adapter.name,
                status_code=response.status_code,
            )
            raise _with_answer(unread, response, secrets) from error
        error.detail = _redacted(error.detail, secrets)
        _with_answer(_owned(error, adapter.name, secrets), response, secrets)
        raise
    except _Unusable as exc:
        unusable = ResponseFormatError(
            f"the {adapter.name} adapter returned {exc}",
            provider=adapter.name,
            status_code=response.status_code,
        )
        raise _with_answer(unusable, response, secrets) from None
    except BaseException as exc:  # an adapter's own, even outside Exception; not an interruption
        if is_interruption(exc):
            raise
        unread = ResponseFormatError(
            f"the {adapter.name} adapter could not read the answer ({type_name(exc)})",
            provider=adapter.name,
            status_code=response.status_code,
        )
        raise _with_answer(unread, response, secrets) from exc


class _Unusable(Exception):
    """What a parse method returned is not what it must return (internal to `_answered`)."""


def _as_returned(name: str, value: object, expected: tuple[type[_T], ...]) -> _T:
    """*value*, returned by *name*'s adapter, checked to be one of *expected* and made whole.

    An adapter from another package may return anything: another type, ``images`` as a list
    or a generator (kept, as a tuple: checking them must not use them up), entries that are no
    `ResultImage`, a job id that is no text. Each is an error of the answer (the caller raises
    `ResponseFormatError`), except a usage that cannot be read: the images are there, so only
    the figures are dropped, with a warning (`_usage`).

    Raises:
        _Unusable: *value* is not usable; its text says why.
    """
    if not isinstance(value, expected):
        wanted = " or ".join(kind.__name__ for kind in expected)
        raise _Unusable(f"{type_name(value)}, not {wanted}")
    if isinstance(value, Answer):
        return _whole_answer(name, value)  # type: ignore[return-value]
    if isinstance(value, Done) and value.answer is not None:
        if not isinstance(value.answer, Answer):
            raise _Unusable(f"Done with {type_name(value.answer)}, not an Answer")
        answer = _whole_answer(name, value.answer)
        return value if answer is value.answer else Done(answer=answer)  # type: ignore[return-value]
    if isinstance(value, Submitted):
        return _whole_submitted(name, value)  # type: ignore[return-value]
    return value


def _whole_answer(name: str, answer: Answer) -> Answer:
    images: object = answer.images
    if type(images) is not tuple:
        if isinstance(images, str | bytes) or not hasattr(images, "__iter__"):
            raise _Unusable(f"images as {type_name(images)}, not a sequence of ResultImage")
        images = tuple(images)
    assert isinstance(images, tuple)
    if not images:  # a success with nothing to show for it: as a built-in adapter says
        raise _Unusable("an Answer that holds no image")
    for image in images:
        if not isinstance(image, ResultImage):
            raise _Unusable(f"{type_name(image)} for an image, not a ResultImage")
    usage = _usage(name, answer.usage)
    if images is answer.images and usage is answer.usage:
        return answer  # as it came: nothing to make (the usual case, and the fast one)
    return Answer(images=images, usage=usage)


def _whole_submitted(name: str, submitted: Submitted) -> Submitted:
    # The URLs are taken as they are: the job was accepted, and is followed as long as the
    # adapter can build its polls (a poll it cannot build is a typed error with the job).
    # The id is text: a provider's numeric id, taken as it came ({"id": 12345}), is made its
    # text; anything else is no id (every error after the acceptance showed it, quoted it in
    # the journal and compared keys with it, and failed there with a bare TypeError).
    ident: object = submitted.id
    if type(ident) is int:
        submitted = attrs.evolve(submitted, id=str(ident))
    elif not isinstance(ident, str) or not ident:
        raise _Unusable(f"Submitted with an id of {type_name(ident)}, not a text")
    usage = _usage(name, submitted.usage)
    return submitted if usage is submitted.usage else attrs.evolve(submitted, usage=usage)


def _usage(name: str, usage: object) -> Usage | None:
    """*usage* as a `Usage` of finite figures >= 0 (``tokens_used`` whole); others dropped.

    A provider's figures are extras beside the images it made (and may have billed): one that
    cannot be read is dropped with a warning on the ``flux_adapters`` logger, never a failure.
    """
    if usage is None:
        return None
    kept: dict[str, object] = {}
    dropped: list[str] = []
    if isinstance(usage, Usage):
        for field in _USAGE_FIELDS:
            try:
                figure = getattr(usage, field)
            except BaseException as exc:  # a subclass's property, failing in its own way
                if is_interruption(exc):
                    raise
                dropped.append(field)
                continue
            whole = field != "tokens_used" or type(figure) is int
            if figure is None or (is_number(figure) and figure >= 0 and whole):
                kept[field] = figure
            else:
                dropped.append(field)
    if not dropped and type(usage) is Usage:
        return usage
    from flux_adapters._log import note

    what = ", ".join(dropped) if isinstance(usage, Usage) else f"a {type_name(usage)}"
    note(
        logging.WARNING,
        "usage-dropped",
        str,
        "%s: the adapter reported a usage it could not read (%s); dropped",
        name,
        what,
    )
    figures = {field: value for field, value in kept.items() if value is not None}
    return Usage(**figures) if figures else None  # type: ignore[arg-type]


def edit_flow(
    adapter: Adapter,
    request: EditRequest,
    base_url: str,
    secrets: tuple[str, ...] = (),
    plan: Plan | None = None,
) -> Flow:
    """One synchronous call: POST the request, read the images from the answer.

    *plan* is the request already resolved against *adapter*'s limits (the router has one);
    without it the flow resolves the request itself. An adapter (perhaps from another package)
    that fails with an exception of its own gets a typed error in its place: before anything is
    sent, a `RequestError`; once an answer came, a `ResponseFormatError` (see `_answered`).

    Raises:
        RequestError: Before anything is yielded, when the request breaks the provider's limits.
        ProviderError: The provider answered with an error (details redacted of *secrets*).
    """
    resolved = plan if plan is not None else resolve(adapter, request)
    outgoing = adapter_built(adapter, request, adapter.build_request, request, resolved, base_url)
    response = yield _as_submit(outgoing, adapter, request)
    assert response is not None
    answer = _answered(
        adapter, response, secrets, False, (Answer,), adapter.parse_response, response
    )
    # Made as Outcome(...) makes it, without the dict of keyword arguments a class call
    # builds (a third of the cost; tests/test_async_per_edit.py holds why it is the same).
    outcome = object.__new__(Outcome)
    Outcome.__init__(
        outcome, plan=resolved, answer=answer, request_id=_answer_id(response, secrets)
    )
    return outcome


def job_flow(
    adapter: JobAdapter,
    request: EditRequest,
    base_url: str,
    secrets: tuple[str, ...] = (),
    plan: Plan | None = None,
    *,
    polling: Polling,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> Flow:
    """An asynchronous provider's job: submit it, then follow it (`follow_job`).

    The submit is the only exchange that can be billed; once the provider accepted it, the flow
    yields `Accepted` with the `Job`, and every later error carries it (``error.job``).

    Raises:
        RequestError: Before anything is yielded, when the request breaks the provider's limits.
        ProviderError: The submit was refused (details redacted of *secrets*).
        JobError: The accepted job ended without an image, or passed the deadline.
    """
    resolved = plan if plan is not None else resolve(adapter, request)
    started = clock()
    submit = adapter_built(adapter, request, adapter.build_submit, request, resolved, base_url)
    response = yield _as_submit(submit, adapter, request)
    assert response is not None
    submitted = _answered(
        adapter, response, secrets, False, (Submitted,), adapter.parse_submit, response
    )
    submit_id = _answer_id(response, secrets)
    job = Job(
        provider=adapter.name,
        model=resolved.limits.model,
        id=submitted.id,
        poll_url=submitted.poll_url,
        result_url=submitted.result_url,
        cancel_url=submitted.cancel_url,
        submitted_at=time.time(),
        usage=submitted.usage,
    )
    job = _keyless(job, secrets)
    try:
        yield Accepted(job)
    except StopJob as stop:  # the caller stopped while the job was being kept: it is taken
        stop.job = job
        stop.cancelled = yield from _cancel(adapter, job)
        raise
    except FluxError as error:  # the job could not be recorded: it was accepted all the same
        _attach(error, job, secrets)
        raise
    answer = yield from follow_job(
        adapter, job, secrets, polling=polling, clock=clock, rng=rng, started=started
    )
    return Outcome(
        plan=resolved, answer=answer, job=job, request_id=submit_id or job_request_id(job, secrets)
    )


def job_request_id(job: Job, secrets: tuple[str, ...]) -> str:
    """*job*'s id as the request id of its result, where no header named one: without *secrets*.

    A provider's id may echo the key it was sent; the result's ``request_id`` is shown (a
    gateway answers it to its own clients as ``x-flux-provider-request-id``), as an error's
    is, while ``result.job`` keeps the id whole, to be polled again.
    """
    ident = job.id
    if any(secret and secret in ident for secret in secrets):
        return redact(ident, secrets)
    return ident


def _keyless(job: Job, secrets: tuple[str, ...]) -> Job:
    """*job* without the key in its URLs' queries, wherever the adapter sends the key.

    A provider may answer with URLs that repeat the key (``?key=...``, or ``?token=...`` at a
    provider that takes it in a header): kept in the `Job`, the key went into the result's repr,
    ``--json``, httpx's log line of every poll and the batch journal on disk. The client sends
    the key as the adapter declares it (a header, or its query parameter, added again to each
    URL that may receive it). Only a parameter holding one of *secrets* is taken out: the same
    name holding anything else (a CDN's own signed ``token=``) is the URL's.
    """
    if not secrets:
        return job
    changes: dict[str, Any] = {
        field: kept
        for field in ("poll_url", "result_url", "cancel_url")
        if isinstance(url := getattr(job, field), str)
        and (kept := _without_key(url, secrets)) != url
    }
    return attrs.evolve(job, **changes) if changes else job


def _without_key(url: str, secrets: tuple[str, ...]) -> str:
    """*url* without the query parameters that hold one of *secrets*, whatever their name.

    Every other byte of it stays as it was: the URL may be signed.
    """
    head, mark, rest = url.partition("?")
    if not mark:
        return url
    query, hash_, fragment = rest.partition("#")
    from urllib.parse import unquote_plus

    def keyed(pair: str) -> bool:
        return unquote_plus(pair.partition("=")[2]) in secrets

    kept = [pair for pair in query.split("&") if not keyed(pair)]
    return head + (mark + "&".join(kept) if kept else "") + hash_ + fragment


class _Deadline(Exception):
    """The job's deadline passed (internal to `follow_job`)."""


def follow_job(
    adapter: JobAdapter,
    job: Job,
    secrets: tuple[str, ...] = (),
    *,
    polling: Polling,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    started: float | None = None,
) -> _Steps[Answer]:
    """Poll *job* until it is done and return its answer (fetching it where it is apart).

    Waits grow from ``polling.first`` by ``polling.factor`` up to ``polling.longest``, each
    varied by ``polling.jitter``, or follow the provider's ``Retry-After``. A poll or fetch that
    fails in a way that may pass (a dropped connection, a timeout, a 429, a 5xx, a 404 or 410
    that is not the provider's documented "unknown job") is tried again in place: they are free. At ``polling.deadline`` after *started* (default: now) the job is
    cancelled where the provider can, and `JobTimeout` raised. `StopJob` thrown in (the caller
    stopped waiting) cancels it too, then propagates.

    Raises:
        Moderated, JobFailed, JobNotFound: The job ended without an image.
        JobTimeout: The deadline passed.
        ProviderError: A poll or fetch was refused for good (a revoked key, say).
    """
    chance = rng or random.Random()
    begun = clock() if started is None else started
    ends = begun + polling.deadline
    wait = polling.first
    unreadable = 0
    missing: list[str] = []  # the last poll's or fetch's "not found", for the deadline's error
    try:
        while True:
            yield from _pause(wait, polling, chance, ends - clock())
            if clock() >= ends:
                raise _Deadline
            built = adapter_built(adapter, None, adapter.build_poll, job)
            poll = _within(built, adapter, "poll", ends, clock)
            state = yield from _poll_once(adapter, job, poll, secrets)
            missing[:] = []
            if isinstance(state, _Missing):
                missing.append(state.why)
                state = state.pending
            if isinstance(state, ResponseFormatError):
                # Maybe a glitch, maybe an adapter that cannot read its provider's statuses:
                # a few in a row, and the job is given up as unreadable (it may still finish).
                unreadable += 1
                if unreadable >= _UNREADABLE_POLLS:
                    raise state
                state = Pending()
            else:
                unreadable = 0
            if isinstance(state, Done):
                if state.answer is not None:
                    return state.answer
                return (
                    yield from _fetch(adapter, job, secrets, polling, chance, ends, clock, missing)
                )
            wait = _next_wait(wait, polling, state)
    except _Deadline:
        try:
            cancelled = yield from _cancel(adapter, job)
        except StopJob as stop:  # the caller stopped too, the cancel under way: no answer
            stop.job, stop.cancelled = job, False
            raise
        timeout = JobTimeout(
            f"the job did not finish within {polling.deadline:g} s"
            + (
                f"; {missing[0]}, which does not prove the job gone (it was accepted)"
                if missing
                else ""
            )
            + (
                "; it was cancelled if it had not started (if it had, it may still finish"
                " and be billed)"
                if cancelled
                else "; it may still finish and be billed"
            ),
            provider=adapter.name,
            job_id=job.id,
            waited=clock() - begun,
            cancelled=cancelled,
        )
        _attach(timeout, job, secrets)
        raise timeout from None
    except StopJob as stop:
        stop.job = job
        stop.cancelled = yield from _cancel(adapter, job)
        raise
    except FluxError as error:
        _attach(error, job, secrets)
        raise


@frozen
class _Missing:
    """A poll or fetch answered 404 or 410, which does not prove the job gone (`_UNPROVEN`).

    The job is polled again, as after a 5xx, until its deadline.
    """

    why: str
    pending: Pending = attrs.field(factory=Pending)


def _unproven(response: HttpResponse, role: str) -> _Missing:
    return _Missing(
        f"its {role} URL was last answered HTTP {response.status_code}",
        Pending(retry_after=_asked_wait(response)),
    )


def _attach(error: FluxError, job: Job, secrets: tuple[str, ...]) -> None:
    """Give *error* its *job*; the ids its message shows without a key the provider echoed.

    Only an id that holds one is shown changed (the job's id stands for the request id when
    no header gave one); the job itself (``error.job``) keeps it whole, to be polled again.
    """
    error.job = job
    ident: object = job.id  # a job made by hand (resume) may hold anything
    if not isinstance(ident, str):
        return
    shown = job_request_id(job, secrets)
    if shown == ident:
        return
    if isinstance(error, JobError) and error.job_id == job.id:
        error.job_id = shown
    if error._request_id is None:
        error._request_id = shown


def _pause(wait: float, polling: Polling, chance: random.Random, left: float) -> _Steps[None]:
    spread = wait * polling.jitter
    pause = max(0.0, min(wait + chance.uniform(-spread, spread), left))
    if pause > 0:  # time.sleep(0) still costs a trip through the kernel's timer
        yield Sleep(pause)


def _next_wait(wait: float, polling: Polling, state: Pending | None) -> float:
    """The wait after *wait*: grown by the backoff, or longer when the provider asked for more.

    A ``Retry-After`` is the least wait, never a reason to hurry: a provider answering "0" to
    every poll would otherwise be polled in a busy loop until the deadline. A wait it asks that
    is no number (NaN, from an adapter) is ignored, and an endless one stops at the deadline.
    """
    grown = min(polling.longest, wait * polling.factor)
    asked = state.retry_after if state is not None else None
    if isinstance(asked, int | float) and not isinstance(asked, bool) and asked > grown:
        return min(float(asked), polling.deadline)
    return grown


def as_request(built: object, adapter: object, request: EditRequest | None) -> HttpRequest:
    """*built*, what *adapter* built for *request* (``None``: a taken job's), as a request.

    Raises:
        RequestError: The adapter built something other than an `HttpRequest`: the error an
            exception in building gives (not sent).
    """
    if not isinstance(built, HttpRequest):  # an outside adapter may return anything
        why = TypeError(f"{type(built).__name__}, not an HttpRequest")
        raise _not_built(adapter, request, why)
    return built


def _as_submit(request: object, adapter: object, edit: EditRequest) -> HttpRequest:
    """*request* marked as the paid exchange, whatever the adapter said (usually as it is).

    Raises:
        RequestError: The adapter built something other than an `HttpRequest` (not sent).
    """
    request = as_request(request, adapter, edit)
    return request if request.role == "submit" else attrs.evolve(request, role="submit")


def _within(
    request: object, adapter: object, role: Role, ends: float, clock: Callable[[], float]
) -> HttpRequest:
    """*request* marked as *role* (whatever the adapter said), to end by the job's deadline.

    Raises:
        RequestError: *adapter* built something other than an `HttpRequest`, or one whose URL
            is no http(s) URL with a host (not sent; the job's flow gives the error its job, as
            for an exception in building).
    """
    from flux_adapters.providers._images_api import url_problem

    built = as_request(request, adapter, None)
    url: object = built.url
    # A poll URL the provider returned relative ("/v1/jobs/1"), or with no scheme, taken as it
    # was: no such request can ever be sent, and each try failed as "not sent", to be tried
    # again in place until the job's deadline (ten minutes by default), then a JobTimeout that
    # offered a job `resume` refuses for the same reason.
    problem = url_problem(url, f"its {role} URL") if isinstance(url, str) else ""
    if problem:
        raise _not_built(adapter, None, ValueError(problem))
    deadline = max(_SHORTEST_EXCHANGE, ends - clock())
    return attrs.evolve(built, role=role, deadline=deadline)


def _poll_once(
    adapter: JobAdapter, job: Job, request: HttpRequest, secrets: tuple[str, ...]
) -> _Steps[Pending | Done | _Missing | ResponseFormatError]:
    """One poll's state: `Done`, `Pending` (also after a failure that may pass), or an error.

    The error is the `ResponseFormatError` of a success answer that could not be read. A 404
    or 410 is `_Missing`: polled again, since only the provider's own documented answer says
    that it does not know the job (BFL's ``Task not found`` in a 200, read by `parse_poll`; a
    404 the adapter's `JobAdapter.job_failure` reads as `JobNotFound`).
    """
    try:
        response = yield request
    except TransportError:
        return Pending()  # a poll is free: try again after the usual wait
    except ResponseFormatError as error:  # a 2xx the client could not read (too large ...)
        return error
    assert response is not None
    retry = _transient(response)
    if retry is not None:
        return retry
    if response.status_code in _UNPROVEN:
        # Proof only when the adapter reads it as its provider's documented "unknown job".
        failed = _job_failure(adapter, response, job, secrets)
        if isinstance(failed, JobNotFound):
            raise failed
        return _unproven(response, "poll")
    try:
        expected: tuple[type[Pending | Done], ...] = (Pending, Done)
        state = _answered(
            adapter, response, secrets, True, expected, adapter.parse_poll, response, job
        )
    except ResponseFormatError as error:
        if not 200 <= response.status_code < 300:
            raise
        return error
    if isinstance(state, Pending) and state.retry_after is None:
        # A pending answer's Retry-After is the least wait, as a 429's: the adapter reads the
        # body, the header is the exchange's.
        asked = _asked_wait(response)
        if asked is not None:
            return attrs.evolve(state, retry_after=asked)
    return state


def _job_failure(
    adapter: JobAdapter, response: HttpResponse, job: Job, secrets: tuple[str, ...]
) -> JobError | None:
    """The job's own failure in an error answer to its result fetch (`JobAdapter.job_failure`)."""
    if 200 <= response.status_code < 300:
        return None
    try:
        failed = adapter.job_failure(response, job)
    except BaseException as exc:  # an adapter that cannot tell: the answer is judged by its status
        if is_interruption(exc):
            raise
        return None
    if not isinstance(failed, JobError):
        return None
    failed.detail = _redacted(failed.detail, secrets)
    return _with_answer(_owned(failed, adapter.name, secrets), response, secrets)


def _transient(response: HttpResponse) -> Pending | None:
    """A `Pending` to wait on for an answer that may pass (408, 429, 5xx), else ``None``."""
    status = response.status_code
    if status not in (408, 429) and not 500 <= status < 600:
        return None
    return Pending(retry_after=_asked_wait(response))


def _asked_wait(response: HttpResponse) -> float | None:
    """Seconds *response*'s ``Retry-After`` asks to wait, if it has a usable one."""
    from flux_adapters.providers._images_api import retry_after

    return retry_after(response.header("retry-after"))


def _fetch(
    adapter: JobAdapter,
    job: Job,
    secrets: tuple[str, ...],
    polling: Polling,
    chance: random.Random,
    ends: float,
    clock: Callable[[], float],
    missing: list[str],
) -> _Steps[Answer]:
    """Fetch a finished job's result, trying again in place after failures that may pass.

    A success answer that cannot be read (a proxy's page, JSON cut short, one too large) is
    tried again as a poll's is: the fetch is as free, and `_UNREADABLE_POLLS` in a row end it.
    A 404 or 410 is tried again too (the job said it is done; `_UNPROVEN`), and noted in
    *missing* for the deadline's error.
    """
    wait = polling.first
    unreadable = 0
    while True:
        built = adapter_built(adapter, None, adapter.build_fetch, job)
        if built is None:
            raise ResponseFormatError(
                "the job is done, and its answer holds no result to fetch",
                provider=adapter.name,
                status_code=200,
            )
        try:
            response = yield _within(built, adapter, "fetch", ends, clock)
        except TransportError:
            response, unreadable = None, 0
        except ResponseFormatError:  # a 2xx the client could not read (too large ...)
            unreadable += 1
            if unreadable >= _UNREADABLE_POLLS:
                raise
            response = None
        retry: Pending | None = None
        if response is not None:
            failed = _job_failure(adapter, response, job, secrets)
            if failed is not None:
                raise failed
            missing[:] = []
            if response.status_code in _UNPROVEN:
                unproven = _unproven(response, "result")
                missing.append(unproven.why)
                retry = unproven.pending
            else:
                retry = _transient(response)
            if retry is not None:
                unreadable = 0  # "in a row", as polls count them
            else:
                try:
                    return _answered(
                        adapter, response, secrets, True, (Answer,), adapter.parse_fetch,
                        response, job,
                    )  # fmt: skip
                except ResponseFormatError:
                    unreadable += 1
                    if not 200 <= response.status_code < 300 or unreadable >= _UNREADABLE_POLLS:
                        raise
        wait = _next_wait(wait, polling, retry)  # backing off after a dropped fetch too
        yield from _pause(wait, polling, chance, ends - clock())
        if clock() >= ends:
            raise _Deadline


def cancel_steps(adapter: JobAdapter, job: Job, stop: StopJob) -> _Steps[None]:
    """Cancel *job*, as a flow does when `StopJob` is thrown in: *stop* says how it went.

    For a client whose flow ended before it could (Ctrl-C in the flow's own code).
    """
    stop.cancelled = yield from _cancel(adapter, job)


def _cancel(adapter: JobAdapter, job: Job) -> _Steps[bool | None]:
    """Ask the provider to cancel *job*: ``True`` accepted, ``False`` refused, ``None`` no cancel."""
    try:
        request: object = adapter.build_cancel(job)
    except BaseException as exc:  # an adapter bug must not hide why the job is being given up
        if is_interruption(exc):
            raise
        return False
    if request is None:
        return None
    if not isinstance(request, HttpRequest):  # an adapter bug, as an exception above
        return False
    try:
        response = yield attrs.evolve(request, role="cancel", deadline=CANCEL_DEADLINE)
    except FluxError:  # not sent, or no answer: it must not hide why the job is given up
        return False
    assert response is not None
    return 200 <= response.status_code < 300
