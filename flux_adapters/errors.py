"""Every exception flux-adapters raises on purpose.

The tree::

    FluxError                         base: ``except FluxError`` catches all of them
    ├── ConfigurationError            bad client setup (unknown provider, no API key); nothing sent
    │   └── ClientClosedError         the client was closed (also a RuntimeError, as httpx's is)
    ├── RequestError (also ValueError) the request breaks a rule or a limit; nothing was sent
    ├── ProviderError                 the provider answered, and the answer is an error
    │   ├── AuthenticationFailed      401, or 403 about the key
    │   ├── InsufficientBalance       402, or a 4xx "quota exhausted" answer; the job was not taken
    │   ├── RateLimited               429; ``retry_after`` seconds when the provider said
    │   ├── ContentModerated          the prompt, an input or the output was blocked
    │   ├── ModelUnavailable          the provider has no channel for this model right now
    │   ├── ProviderRejected          any other 4xx: the provider refused the request as invalid
    │   ├── ProviderUnavailable       5xx (a 503 was not taken; any other may have been billed)
    │   └── ResponseFormatError       a success status with a body we cannot read
    ├── TransportError                no usable answer; ``sent``: may the provider have it?
    │   └── Timeout
    ├── JobError                      a job the provider accepted ended without an image
    │   ├── Moderated                 its filter blocked the request or the output (BFL: not charged)
    │   ├── JobFailed                 the provider says processing failed
    │   ├── JobNotFound               the provider no longer knows the job (unknown or expired)
    │   └── JobTimeout                the job passed its deadline (cancelled if the provider can)
    ├── ResultExpired                 the short-lived result URL is gone (403/404/410 on download)
    ├── AddressRefused                a URL the provider gave leads to a non-public address; not sent
    ├── OutputError                   an image could not be written where asked; nothing was lost upstream
    │   └── ExtensionMismatch         the file name says another image format than the bytes have
    ├── MissingExtraError             an optional extra is not installed (also ModuleNotFoundError)
    ├── BudgetExceeded                a cumulative budget (``budget_usd=``) has no room for the call; nothing sent
    ├── StateUnavailable              the shared state (Redis) did not answer in time; nothing sent
    └── AllProvidersFailed            every candidate provider failed; ``attempts`` lists them

An error that came after an asynchronous provider accepted the job carries it in ``job``:
``client.resume(error.job)`` polls it again instead of paying for a new one.

An error that came with an HTTP answer carries that answer's headers in ``response_headers``
(read-only, cookies and credentials masked, keys removed) and the provider's id for the exchange
in ``request_id`` (from ``x-request-id`` and the like; for an accepted job without one, the job's
id); ``str(error)`` shows the request id, which is what a provider's support asks for.

Rules every class follows: status codes are the ones the provider sent (never made up here), the
cause is chained with ``raise ... from``, details are short and redacted, no API key appears in a
message or repr, and every instance pickles (``__reduce__`` rebuilds from state, so keyword-only
constructors need no extra code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attrs import frozen

    from flux_adapters.jobs import Job
    from flux_adapters.result import Attempt
else:  # Violation is made an attrs class on first use: importing errors does not import attrs
    from flux_adapters._lazy_attrs import frozen

__all__ = [
    "AddressRefused",
    "AllProvidersFailed",
    "AuthenticationFailed",
    "BudgetExceeded",
    "ClientClosedError",
    "ConfigurationError",
    "ContentModerated",
    "ExtensionMismatch",
    "FluxError",
    "InsufficientBalance",
    "JobError",
    "JobFailed",
    "JobNotFound",
    "JobTimeout",
    "MissingExtraError",
    "ModelUnavailable",
    "Moderated",
    "OutputError",
    "ProviderError",
    "ProviderRejected",
    "ProviderUnavailable",
    "RateLimited",
    "RequestError",
    "ResponseFormatError",
    "ResultExpired",
    "StateUnavailable",
    "Timeout",
    "TransportError",
    "Violation",
]


class FluxError(Exception):
    """Base class of everything this library raises on purpose."""

    attempts: tuple[Attempt, ...] = ()
    """Every provider tried or skipped before this error ended the call (set by the router)."""

    job: Job | None = None
    """The job an asynchronous provider accepted before this error, if one did: it may still
    finish (and be billed), so it is never submitted again; ``client.resume(job)`` polls it."""

    _request_id: str | None = None
    _response_headers: Mapping[str, str] = MappingProxyType({})

    @property
    def request_id(self) -> str | None:
        """The provider's id for the exchange that failed, to quote to its support; else ``None``.

        Read from the answer's headers (``x-request-id``, ``request-id``, ``x-fal-request-id``,
        ``x-oneapi-request-id`` of the one-api/new-api gateways many resellers run, ...). For an
        asynchronous provider's job with no such header, the job's id (BFL's task id; fal's
        ``request_id``). Shown in ``str(error)``. A header that is not UTF-8 reads as httpx
        reads it, on every client and driver: each byte one character (Latin-1).
        """
        if self._request_id is not None:
            return self._request_id
        return self.job.id if self.job is not None else None

    @property
    def response_headers(self) -> Mapping[str, str]:
        """The headers of the answer this error came with (names in lower case); read-only.

        Empty when no answer came (a refused connection, a request refused before sending);
        an answer cut short after its head keeps the head's.
        Cookies and credentials (``set-cookie``, ``authorization``, ...) are masked, the client's
        keys and anything shaped like a key are removed from the rest, and the query string of
        a URL (``location``) is left out: it may be signed.
        """
        return MappingProxyType(dict(self._response_headers))

    def _request_note(self) -> str:
        """``", request id X"`` when there is one, for ``__str__``."""
        from flux_adapters._display import escape_controls

        found = self.request_id
        # For a job with no request id header, its id: the provider's text, which an adapter
        # of another package may take as it came.
        return f", request id {escape_controls(found)}" if isinstance(found, str) and found else ""

    def __reduce__(self) -> tuple[object, ...]:
        # The state goes third, so pickle records the error before it: a router's error holds
        # its own attempt (``attempts[-1].error is self``), a cycle pickle can only close that way.
        return (_rebuild, (type(self), self.args), self.__dict__)


def attach_response(error: FluxError, headers: Mapping[str, str], request_id: str | None) -> None:
    """Give *error* the answer's (already redacted) *headers* and its *request_id*.

    Internal: called where the client meets an answer. An id the error already has (from an
    earlier exchange of the same call) is kept.
    """
    if not error._response_headers:
        error._response_headers = dict(headers)
    if error._request_id is None and request_id:
        error._request_id = request_id


def _rebuild(
    cls: type[FluxError], args: tuple[object, ...], state: dict[str, object] | None = None
) -> FluxError:
    error = cls.__new__(cls)
    error.args = args
    if state:  # pickles made before the state went apart
        error.__dict__.update(state)
    return error


class ConfigurationError(FluxError, ValueError):
    """The client is set up wrongly (unknown provider, missing API key). Nothing was sent."""


class ClientClosedError(ConfigurationError, RuntimeError):
    """The client was closed (``close()``, ``aclose()`` or the end of its ``with`` block).

    Nothing was sent. Also a `ConfigurationError` (what a closed client raised before) and a
    ``RuntimeError`` (what httpx raises for a closed client), so existing handlers still catch
    it. Create a new client, or use one `with_options` copy per call and close only the client.
    """


@frozen
class Violation:
    """One way a request breaks a rule or a provider's limit.

    Attributes:
        field: The request field at fault, e.g. ``"images"`` or ``"images[2]"``.
        message: What is wrong, as a sentence fragment.
        limit: The rule, e.g. ``"at most 3"`` or ``"a multiple of 32 from 512 to 2048"``.
        value: What the request had, rendered short (never image data).
        source: Where the limit comes from (a provider document), when it is a provider's limit.
    """

    field: str
    message: str
    limit: str
    value: str
    source: str | None = None

    def __str__(self) -> str:
        return f"{self.field}: {self.message} (limit: {self.limit}; got: {self.value})"


class RequestError(FluxError, ValueError):
    """The request breaks one or more rules; nothing was sent and nothing was paid for.

    Attributes:
        violations: Every violation found, not only the first.
        provider: The provider whose limits were checked, or ``None`` for rules that hold for all.
        model: The canonical model id the request asked for, when known.
    """

    def __init__(
        self,
        violations: Sequence[Violation],
        *,
        provider: str | None = None,
        model: str | None = None,
    ) -> None:
        self.violations = tuple(violations)
        self.provider = provider
        self.model = model
        where = f" for {model} at {provider}" if provider and model else ""
        lines = "".join(f"\n  - {violation}" for violation in self.violations)
        count = len(self.violations)
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} with the request{where}:{lines}"
        )


class ProviderError(FluxError):
    """The provider answered, and the answer is an error.

    Attributes:
        provider: The provider id, e.g. ``"apiyi"``.
        status_code: The HTTP status the provider sent.
        detail: The provider's own error text, at most 500 characters, secrets removed.
        code: The provider's machine-readable error code, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int,
        detail: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status_code = status_code
        self.detail = detail
        self.code = code

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.provider}: {self.args[0]} (HTTP {self.status_code}{self._request_note()}){detail}"


class AuthenticationFailed(ProviderError):
    """The provider refused the API key (401, or a 403 about the key)."""


class InsufficientBalance(ProviderError):
    """The account has no balance or quota left for this call; the job was not taken."""


class RateLimited(ProviderError):
    """The provider asked us to slow down (429).

    Attributes:
        retry_after: Seconds the provider asked us to wait, when it said.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int,
        detail: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message, provider=provider, status_code=status_code, detail=detail, code=code
        )
        self.retry_after = retry_after


class ContentModerated(ProviderError):
    """The provider's filter blocked the prompt, an input image or the output."""


class ModelUnavailable(ProviderError):
    """The provider has no working channel for this model at the moment."""


class ProviderRejected(ProviderError):
    """The provider refused the request as invalid (a 4xx not covered by a subclass)."""


class ProviderUnavailable(ProviderError):
    """The provider failed (5xx). The job may or may not have been taken for a 500."""


class ResponseFormatError(ProviderError):
    """The provider answered with a success status but a body we cannot read.

    Attributes:
        excerpt: The start of the body, at most 200 characters, secrets removed.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int,
        excerpt: str = "",
    ) -> None:
        super().__init__(
            message, provider=provider, status_code=status_code, detail=excerpt or None
        )
        self.excerpt = excerpt


class TransportError(FluxError):
    """No usable answer arrived (connection refused, reset, timed out).

    Attributes:
        provider: The provider id.
        sent: ``False`` when the failure proves the provider never received the request
            (connection refused, connect timeout), so repeating it cannot bill twice. ``True``
            when the request may have arrived and may be billed.
    """

    def __init__(self, message: str, *, provider: str, sent: bool) -> None:
        super().__init__(message)
        self.provider = provider
        self.sent = sent

    def __str__(self) -> str:
        state = "the request may have reached it" if self.sent else "the request was not sent"
        return f"{self.provider}: {self.args[0]} ({state}{self._request_note()})"


class Timeout(TransportError):
    """A connect, write or read timeout expired."""


class JobError(FluxError):
    """A job the provider accepted ended without an image, or was given up on.

    No HTTP status is claimed: the outcome came as a job status (in a 200), or from the clock.

    Attributes:
        provider: The provider id.
        job_id: The provider's id of the job.
        detail: The provider's own words, at most 500 characters, secrets removed.
    """

    def __init__(
        self, message: str, *, provider: str, job_id: str, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.job_id = job_id
        self.detail = detail

    def __str__(self) -> str:
        from flux_adapters._display import escape_controls

        detail = f": {self.detail}" if self.detail else ""
        found = self.request_id
        note = self._request_note() if found and found != self.job_id else ""
        # The id is the provider's text: an adapter of another package may take it as it came.
        shown = escape_controls(self.job_id) if type(self.job_id) is str else self.job_id
        return f"{self.provider}: {self.args[0]} (job {shown}{note}){detail}"


class Moderated(JobError):
    """The provider's filter blocked the job: its input (``"request"``) or its output (``"content"``).

    Black Forest Labs documents both as not charged; fal may charge them ("invalid inputs (HTTP
    422) may still be charged"), and a budget counts them. Never failed over: another provider's
    filter would most likely block it too.

    Attributes:
        stage: ``"request"`` (blocked before processing) or ``"content"`` (the output was).
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        job_id: str,
        stage: str,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, provider=provider, job_id=job_id, detail=detail)
        self.stage = stage


class JobFailed(JobError):
    """The provider reports that processing the job failed.

    Attributes:
        billed: What the provider's document says of a failure like this one: ``False`` not
            charged (the router may then fail over), ``True`` charged, ``None`` not said.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        job_id: str,
        detail: str | None = None,
        billed: bool | None = None,
    ) -> None:
        super().__init__(message, provider=provider, job_id=job_id, detail=detail)
        self.billed = billed


class JobNotFound(JobError):
    """The provider does not know the job (its id is unknown, or it expired).

    Raised only on the provider's own documented word (BFL's ``Task not found`` status): a bare
    HTTP 404 or 410 to a poll or fetch may come from a proxy or another host, and the job is
    polled again until its deadline (then `JobTimeout`, with the job to resume).
    """


class JobTimeout(JobError):
    """The job did not finish within its deadline.

    It may still finish, and be billed: ``client.resume(error.job)`` picks it up again.

    Attributes:
        waited: Seconds waited.
        cancelled: Whether the provider accepted a cancel; ``None`` when it offers none.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        job_id: str,
        waited: float,
        cancelled: bool | None,
    ) -> None:
        super().__init__(message, provider=provider, job_id=job_id)
        self.waited = waited
        self.cancelled = cancelled


class ResultExpired(FluxError):
    """A result URL answered 403, 404 or 410: result URLs live for about 10 minutes.

    Attributes:
        status_code: The status the download answered with.
        location: Host and path of the URL; the signed query string is left out.
    """

    def __init__(self, message: str, *, status_code: int, location: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.location = location

    def __str__(self) -> str:
        return (
            f"{self.args[0]} (HTTP {self.status_code} from {self.location}{self._request_note()})"
        )


class AddressRefused(FluxError):
    """A URL the provider gave (a result, a polling URL, a redirect) leads to a non-public address.

    Loopback, a private network, link-local (cloud metadata at 169.254.169.254), shared (CGNAT),
    unspecified, multicast or reserved addresses, IPv4 inside IPv6 included: nothing was sent
    there (the check is made where the connection would be opened, after the name is resolved).
    What it means for the job: a refused result URL after a synchronous answer is a job done,
    and billed, whose image was not fetched; a refused polling URL is an accepted job whose
    outcome is unknown (``error.job``; ``client.resume`` polls it). See docs/routing.md.

    Attributes:
        provider: The provider id.
        host: The URL's host (with its port), scrubbed of the client's keys.
        reason: The kind of address it leads to ("loopback", "link-local", ...).
    """

    def __init__(self, message: str, *, provider: str, host: str, reason: str) -> None:
        super().__init__(message)
        self.provider = provider
        self.host = host
        self.reason = reason

    def __str__(self) -> str:
        note = self._request_note()
        return f"{self.provider}: {self.args[0]}" + (f" ({note[2:]})" if note else "")


class MissingExtraError(FluxError, ModuleNotFoundError):
    """A feature needs a package of an optional extra that is not installed.

    The message names the package and the command that installs it, e.g. ``pip install
    'flux-adapters[emulator]'``. Also a ``ModuleNotFoundError`` (and so an ``ImportError``):
    code that catches those keeps working.

    Attributes:
        name: The module that could not be imported, e.g. ``"PIL"`` (as on any ``ImportError``).
        distribution: The package that provides it, e.g. ``"pillow"``.
        extra: The extra that installs it, e.g. ``"emulator"``.
    """

    def __init__(self, message: str, *, name: str, distribution: str, extra: str) -> None:
        ModuleNotFoundError.__init__(self, message, name=name)
        self.distribution = distribution
        self.extra = extra

    def __reduce__(self) -> tuple[object, ...]:
        # ImportError keeps ``name`` outside __dict__; BaseException.__setstate__ sets it back.
        return (_rebuild, (type(self), self.args), {**self.__dict__, "name": self.name})


class OutputError(FluxError):
    """An image could not be written to the path asked for.

    The path is not a regular file (a directory, a FIFO, a device), its folder is missing or not
    writable, or the disk is full. Raised before the paid call wherever the path is known then
    (the command line checks it first); the result itself is not lost: save it elsewhere.

    Attributes:
        path: The path that could not be written.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.args[0]}"


class ExtensionMismatch(OutputError):
    """The file name's extension says another image format than the image's bytes have.

    Raised by ``ResultImage.save`` (saving a JPEG as ``scene.png``) before anything is written
    under that name; the image is not converted. Save it under `suggested`, or pass
    ``add_suffix=True`` with a name without extension.

    Attributes:
        image_format: The format the bytes have, e.g. ``"jpeg"``.
        extension_format: The format the extension names, e.g. ``"png"``.
        suggested: *path* with the extension of the image's real format.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        image_format: str,
        extension_format: str,
        suggested: str,
    ) -> None:
        super().__init__(message, path=path)
        self.image_format = image_format
        self.extension_format = extension_format
        self.suggested = suggested


class AllProvidersFailed(FluxError):
    """Every candidate provider was tried or skipped, and none produced an image.

    Attributes:
        attempts: Every provider tried or skipped, in order, with its outcome.
    """

    def __init__(self, message: str, *, attempts: Sequence[Attempt]) -> None:
        super().__init__(message)
        self.attempts = tuple(attempts)


class BudgetExceeded(FluxError):
    """A cumulative budget has no room for the call's estimated price; nothing was sent.

    Raised before sending when every provider that could take the call was refused by the
    budget (``budget_usd=`` with ``budget_period=``, shared by every client and worker that use
    the same state, `flux_adapters.state`).

    Attributes:
        scope: The budget's scope (``"client:default"``, ``"key:<id>"``).
        limit_usd: The budget.
        spent_usd: What the scope had spent (and reserved) when the call was refused.
        period: ``"day"`` (UTC, by the state's clock) or ``"total"``.
    """

    def __init__(
        self, message: str, *, scope: str, limit_usd: float, spent_usd: float, period: str
    ) -> None:
        super().__init__(message)
        self.scope = scope
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.period = period


class StateUnavailable(FluxError):
    """The shared state (`flux_adapters.state`, Redis) could not be reached in time.

    Raised within the state's bounded timeouts, never a hang. Raised before a call is sent, it
    means nothing was sent; a call already answered is not affected (its outcome is returned;
    only the shared bookkeeping after it was lost). Raised before a failover, its ``attempts``
    list the tries made before it, and its message says when one of them may have been billed
    (``failover_on_ambiguous``). ``state_fallback = "local"`` in the configuration uses
    in-process state instead, with one warning.
    """
