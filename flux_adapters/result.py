"""What an edit returns: `EditResult`, its `ResultImage` items, usage, warnings and attempts."""

from __future__ import annotations

import binascii
import contextlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self
from urllib.parse import urlsplit

from attrs import field, frozen

from flux_adapters._display import type_name
from flux_adapters._files import (
    IMAGE_FORMATS,
    MEDIA_TYPES,
    SNIFF_BYTES,
    TAIL_BYTES,
    ImageFile,
    atomic_image,
    check_extension,
    check_target,
    image_format,
    image_is_whole,
    plain_path,
)
from flux_adapters.errors import ExtensionMismatch, FluxError

if TYPE_CHECKING:
    from flux_adapters._download import HttpDownloader
    from flux_adapters.jobs import Job
    from flux_adapters.request import EditRequest

__all__ = [
    "MAX_IMAGE_BYTES",
    "Attempt",
    "BatchItem",
    "BatchStatus",
    "ConversionWarning",
    "Downloader",
    "EditResult",
    "ResultImage",
    "Usage",
    "inline_image_problem",
]

MAX_IMAGE_BYTES: Final = 32 * 1024 * 1024
"""The largest result image accepted, whether downloaded from its URL or sent inline as
``b64_json``. FLUX outputs are at most 4 MP (a PNG of about 12 MB); a larger answer is a
`errors.ResponseFormatError` and is never held in memory or written in full."""

_BASE64: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_MAX_BASE64_CHARS: Final = 4 * -(-MAX_IMAGE_BYTES // 3)
_BASE64_SLICE: Final = 4 * 256 * 1024  # whole quanta: each slice decodes on its own


def inline_image_problem(text: str) -> str:
    """Why *text* is not acceptable inline image data (``b64_json``); empty when it is.

    Checks the size against `MAX_IMAGE_BYTES`, the whole text against the base64 alphabet (one
    linear scan, nothing decoded), and the decoded first bytes for a png, jpeg or webp header.
    """
    if len(text) > _MAX_BASE64_CHARS:
        return f"an inline image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB"
    if len(text) % 4 or not _BASE64.fullmatch(text):
        return "an inline image is not valid base64"
    head = binascii.a2b_base64(text[:64])
    if image_format(head) not in IMAGE_FORMATS:
        return "an inline image is not a png, jpeg or webp image"
    # The last whole base64 quanta hold the image's end, checked as a download's is.
    tail = binascii.a2b_base64(text[-4 * (TAIL_BYTES // 3) :])
    size = len(text) // 4 * 3 - text[-2:].count("=")
    if not image_is_whole(head, tail, size):
        return "an inline image is cut short"
    return ""


def _image_problem(url: object, b64_json: object) -> str:
    if b64_json is not None:
        if not isinstance(b64_json, str):
            return f"b64_json must be base64 text, not {type(b64_json).__name__}"
        return inline_image_problem(b64_json)
    if url is None:
        return "an image needs a url or b64_json; it has neither"
    if not isinstance(url, str) or not url:
        return "url must be a non-empty string"
    return ""


def _inline_chunks(text: str) -> Iterator[bytes]:
    for start in range(0, len(text), _BASE64_SLICE):
        yield binascii.a2b_base64(text[start : start + _BASE64_SLICE])


@frozen(kw_only=True)
class ConversionWarning:
    """A setting the provider could not take exactly, sent in the nearest form it takes.

    Only produced when the request has ``allow_conversions=True``.

    Attributes:
        field: The request field, e.g. ``"aspect_ratio"``.
        requested: What the request asked for, e.g. ``"16:9"``.
        sent: What was sent instead, e.g. ``"1360x768"``.
        message: Why, and what it means for the output.
    """

    field: str
    requested: str
    sent: str
    message: str

    def __str__(self) -> str:
        return f"{self.field} {self.requested} sent as {self.sent}: {self.message}"


@frozen(kw_only=True)
class Usage:
    """What the provider reported a call cost or measured, in its own units.

    Attributes:
        credits_used: Credits charged (aimlapi's ``meta.usage``; BFL's ``cost``).
        tokens_used: Tokens counted (aimlapi's example).
        input_mp: Megapixels of input the provider counted (BFL).
        output_mp: Megapixels of output the provider counted (BFL).
    """

    credits_used: float | None = None
    tokens_used: int | None = None
    input_mp: float | None = None
    output_mp: float | None = None


@frozen(kw_only=True)
class Attempt:
    """One provider tried (or skipped) for a request.

    Attributes:
        provider: The provider id.
        model: The canonical model id.
        outcome: ``"ok"``, ``"failed"`` or ``"skipped"`` (refused before sending).
        elapsed_s: Seconds spent on this provider.
        error: What went wrong, when it did.
        reason: Why it was skipped, in words.
        billing: For a failure, the row of the billing table it fell under
            (``flux_adapters.routing.BILLING_RULES``), e.g. ``"server-error"``: whether the
            provider may have billed the job.
        available_in_s: For a provider skipped for a while (cooling down after failures, its
            key paused by a ``Retry-After`` or held by its rate limit), the seconds until it
            may be tried again, as known when it was skipped; ``0.0`` while another call probes
            it; ``None`` otherwise.
    """

    provider: str
    model: str
    outcome: Literal["ok", "failed", "skipped"]
    elapsed_s: float
    error: FluxError | None = None
    reason: str = ""
    billing: str = ""
    available_in_s: float | None = None


class Downloader(Protocol):
    """Fetches result URLs; the clients provide one. Never sends the API key.

    Implementations verify what they fetch: a 2xx whose bytes are a png, jpeg or webp image of
    at most `MAX_IMAGE_BYTES`, within a deadline, following a few redirects at most.
    """

    def read(self, url: str) -> bytes:
        """Return the image at *url*."""

    def save(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        """Stream the image at *url* into *path* (plus its real extension with *add_suffix*)."""

    async def read_async(self, url: str) -> bytes:
        """Return the image at *url*."""

    async def save_async(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        """Stream the image at *url* into *path* (plus its real extension with *add_suffix*)."""


def _odd_answer(method: str, answer: object, wanted: str) -> FluxError:
    """A `Downloader` of the caller's own make answered *method* with the wrong type."""
    from flux_adapters.errors import ConfigurationError

    return ConfigurationError(
        f"ResultImage: its downloader's {method}() answered {type_name(answer)}, not {wanted}"
    )


def _short_url(url: str | None) -> str:
    # Signed result URLs grant access to the image; keep the signature (and any user name or
    # password) out of reprs and logs.
    if url is None:
        return "None"
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1": made by hand, or beside inline data (which is used)
        return "<an unusable URL>"
    host = parts.netloc.rpartition("@")[2]
    return repr(f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else ""))


def _default_downloader() -> Downloader:
    from flux_adapters._download import HttpDownloader  # lazy: results exist without a client

    return HttpDownloader()


_UNPICKLED: Final[Any] = object()
"""What `ResultImage._fetcher` finds of an unpickled image's downloader (it is not pickled)."""


def _unpickled_downloader() -> Downloader:
    """A short-lived downloader for an unpickled image: its URL checked the strictest way.

    The image came from a provider's answer, and which provider (whose settings may trust it)
    is not known once unpickled: its URL may lead only to public addresses.
    """
    from flux_adapters._addresses import strict
    from flux_adapters._download import HttpDownloader

    guard = strict(
        "unknown",
        "An unpickled result no longer knows which provider gave it, and is checked the "
        "strictest way; ResultImage(url=image.url) downloads a URL you trust as it is",
    )
    return HttpDownloader(guard=guard)


def _checking(fetcher: Downloader) -> HttpDownloader | None:
    """*fetcher* if it is this library's, which says what it wrote: nothing is read back."""
    from flux_adapters._download import HttpDownloader  # lazy, as in `_default_downloader`

    return fetcher if isinstance(fetcher, HttpDownloader) else None


def _declared(value: object) -> str | None:
    """A declared format as `image_format` names it: ``"jpeg"`` from ``"image/jpeg"``, ``"JPG"``."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if "/" in text:
        text = text.split(";", 1)[0].strip()
        text = next((name for name, media in MEDIA_TYPES.items() if media == text), "")
    text = {"jpg": "jpeg"}.get(text, text)
    return text if text in IMAGE_FORMATS else None


def _finite(value: float | None) -> float | None:
    """*value*, or ``None`` for NaN and the infinities (which JSON cannot hold)."""
    return value if value is None or math.isfinite(value) else None


def checked_image(
    url: str | None,
    b64_json: str | None,
    declared_format: str | None = None,
    downloader: Downloader | None = None,
) -> ResultImage:
    """A `ResultImage` of values already checked as its constructor checks them; not again.

    For the library's own code only: *url* a non-empty ``str`` (or ``None`` with *b64_json*),
    *b64_json* ``None`` or text `inline_image_problem` accepted, *declared_format* a format
    name as `_declared` gives it, or ``None``. Inline data is scanned whole: once is enough.
    """
    image = object.__new__(ResultImage)
    set_slot = object.__setattr__  # frozen: as attrs' own __init__ sets them
    set_slot(image, "url", url)
    set_slot(image, "b64_json", b64_json)
    set_slot(image, "declared_format", declared_format)
    set_slot(image, "_held_downloader", downloader)
    set_slot(image, "_held_seen", None)
    return image


class _Held:
    """What a `ResultImage` holds besides its value, kept out of its attrs fields.

    ``attrs.asdict``, ``==``, ``repr`` and pickling see the fields only: a downloader (with its
    httpx client) is no data, and what the bytes showed is only a cache.
    """

    __slots__ = ("_held_downloader", "_held_seen")


@frozen(kw_only=True, init=False)
class ResultImage(_Held):
    """One generated image: a short-lived URL, or base64 data the provider returned inline.

    Result URLs expire about 10 minutes after the image is made; `save` or `read` it at once.
    Inline data was checked when the answer was read (base64 of a png, jpeg or webp image).

    Attributes:
        url: Where to download the image, when the provider returned a URL.
        b64_json: The image as base64, when the provider returned it inline.
        declared_format: The format the provider declared for the image (fal's
            ``content_type``), else the ``output_format`` the request asked for (every adapter
            sends it); ``"png"``, ``"jpeg"`` or ``"webp"``, or ``None``. A claim, not a fact:
            `format` prefers the bytes.
    """

    url: str | None = field(default=None, repr=_short_url)
    b64_json: str | None = field(
        default=None,
        repr=lambda value: "None" if value is None else f"<{len(value)} base64 characters>",
    )
    declared_format: str | None = None

    def __init__(
        self,
        *,
        url: str | None = None,
        b64_json: str | None = None,
        declared_format: str | None = None,
        downloader: Downloader | None = None,
    ) -> None:
        """Make one; *declared_format* may be a media type (``"image/jpeg"``) or a format name.

        *downloader* fetches the URL (the clients give theirs); by default a short-lived one.

        Raises:
            ConfigurationError: Neither *url* nor *b64_json* is given, one is not text, or
                *b64_json* is not base64 of a whole png, jpeg or webp image (the check an
                answer's inline data gets; an adapter that builds such an image answers a
                `ResponseFormatError`).
        """
        problem = _image_problem(url, b64_json)
        if problem:
            from flux_adapters.errors import ConfigurationError

            raise ConfigurationError(f"ResultImage: {problem}")
        self.__attrs_init__(url=url, b64_json=b64_json, declared_format=_declared(declared_format))
        object.__setattr__(self, "_held_downloader", downloader)
        object.__setattr__(self, "_held_seen", None)

    def fetched_with(self, downloader: Downloader, *, declared_format: str | None = None) -> Self:
        """This image, downloading with *downloader*; *declared_format* fills in a missing one."""
        if type(self) is not ResultImage:  # a subclass may do more when it is made
            return type(self)(
                url=self.url,
                b64_json=self.b64_json,
                declared_format=self.declared_format or declared_format,
                downloader=downloader,
            )
        # The same url and data were checked when this one was made (inline data is scanned
        # whole): not again for every result.
        return checked_image(  # type: ignore[return-value]  # ResultImage is the type of self
            self.url,
            self.b64_json,
            self.declared_format
            or (None if declared_format is None else _declared(declared_format)),
            downloader,
        )

    def _fetcher(self) -> Downloader:
        held: Downloader | None = getattr(self, "_held_downloader", _UNPICKLED)
        if held is None:  # made by the caller: the URL is theirs
            return _default_downloader()
        if held is _UNPICKLED:  # a provider's URL, whose provider is no longer known
            return _unpickled_downloader()
        return held

    def _seen(self, head: bytes, size: int) -> None:
        """Remember what the bytes turned out to be, once they were read or saved."""
        object.__setattr__(self, "_held_seen", (image_format(head), size))

    def _inline_head(self) -> bytes:
        assert self.b64_json is not None
        return binascii.a2b_base64(self.b64_json[:64])

    def _url(self) -> str:
        assert self.url is not None  # the constructor refuses an image with neither
        return self.url

    @property
    def format(self) -> str | None:
        """``"png"``, ``"jpeg"`` or ``"webp"``: from the bytes once they are known, else declared.

        Inline data is known at once. A URL's bytes are known once `read` or `save` fetched them
        through this object; until then this is `declared_format` (``None`` when nothing was
        declared). The download itself always checks the bytes, whatever was declared.
        """
        if self.b64_json is not None:
            return image_format(self._inline_head())
        seen: tuple[str | None, int] | None = getattr(self, "_held_seen", None)
        if seen is not None and seen[0] is not None:
            return seen[0]
        return self.declared_format

    @property
    def media_type(self) -> str | None:
        """The media type of `format`, e.g. ``"image/png"``; ``None`` when it is not known."""
        return MEDIA_TYPES.get(self.format or "")

    @property
    def byte_size(self) -> int | None:
        """The image's size in bytes: known for inline data, and once a URL was read or saved."""
        if self.b64_json is not None:
            text = self.b64_json
            return len(text) // 4 * 3 - text[-2:].count("=")
        seen: tuple[str | None, int] | None = getattr(self, "_held_seen", None)
        return seen[1] if seen is not None else None

    def read(self) -> bytes:
        """Return the image bytes, downloading them now if the provider returned a URL.

        Raises:
            ResultExpired: The URL has expired.
            ResponseFormatError: What the URL served is not an image, or is too large.
            TransportError: The download failed or passed its deadline.
            ConfigurationError: A downloader of your own make answered something but bytes.
        """
        if self.b64_json is not None:
            return b"".join(_inline_chunks(self.b64_json))
        return self._read(self._fetcher().read(self._url()))

    def _read(self, data: object) -> bytes:
        """Note what a downloader read; one of the caller's own make may answer anything.

        Raises:
            ConfigurationError: It answered something other than bytes.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise _odd_answer("read", data, "the image's bytes")
        data = bytes(data)
        self._seen(data[:SNIFF_BYTES], len(data))
        return data

    def save(self, path: str | os.PathLike[str], *, add_suffix: bool = False) -> Path:
        """Write the image to *path* (streamed to disk for a URL) and return where it went.

        *path* must be a new file in an existing folder, or a regular file (replaced); it is
        checked before anything is downloaded. A symbolic link is written through (the file it
        names is replaced, the link stays), and the path returned is that file's. The file
        appears only once complete and verified as an image: a failed download leaves nothing
        behind. With *add_suffix*, the image's real extension is added to the name
        (``out/robot`` -> ``out/robot.png``).

        The image is written as it came, never converted. An extension that names another image
        format than the bytes have (a JPEG saved as ``scene.png``) is refused with
        `ExtensionMismatch`, whose ``suggested`` path has the right extension: converting would
        need an image library, change the bytes that were paid for, and for a JPEG source gain
        nothing; writing it as it is would mislabel it for every program that trusts the name.
        For inline data this is known before anything is written; for a URL, once the first
        bytes arrive (the download is then dropped, and the URL still serves it for a while).
        A name without an image extension (``out/robot``, ``robot.bin``) is written as it is.

        Raises:
            ExtensionMismatch: *path*'s extension names another image format (nothing written).
            OutputError: *path* is a directory, FIFO or device, its folder is missing or not
                writable, or the disk is full.
            ResultExpired: The URL has expired.
            ResponseFormatError: What the URL served is not an image, or is too large.
            TransportError: The download failed or passed its deadline.
            ConfigurationError: A downloader of your own make answered no path.
        """
        target = check_target(path, add_suffix=add_suffix)
        if self.b64_json is None:
            fetcher = self._fetcher()
            ours = _checking(fetcher)
            if ours is not None:
                return self._written(ours.write(self._url(), target, add_suffix=add_suffix))
            return self._saved(fetcher.save(self._url(), target, add_suffix=add_suffix))
        return self._save_inline(target, add_suffix)

    def _save_inline(self, target: Path, add_suffix: bool) -> Path:
        assert self.b64_json is not None
        if not add_suffix:
            check_extension(target, self.format)
        with atomic_image(target, add_suffix=add_suffix) as out:
            for chunk in _inline_chunks(self.b64_json):
                out.write(chunk)
        return out.target

    def _written(self, written: ImageFile) -> Path:
        """Note what `HttpDownloader` wrote: it checked the bytes and the name as they came."""
        self._seen(written.head, written.size)
        return written.target

    def _saved(self, answer: object) -> Path:
        """Note what the downloaded file holds; refuse (and remove) a mislabelled one.

        For a `Downloader` of another make, which says only where it saved the image: the file
        is read back to hold it to the rule that `HttpDownloader` keeps as it writes. Where it
        says so as a ``str`` is taken too.

        Raises:
            ConfigurationError: It answered no path.
            ExtensionMismatch: The file's name says another image format than its bytes.
        """
        try:
            saved = plain_path(answer)
        except TypeError:
            raise _odd_answer("save", answer, "the path it wrote") from None
        try:
            with saved.open("rb") as stream:
                head = stream.read(SNIFF_BYTES)
            size = saved.stat().st_size
        except OSError:
            return saved
        self._seen(head, size)
        try:
            check_extension(saved, image_format(head))
        except ExtensionMismatch:
            with contextlib.suppress(OSError):
                saved.unlink()
            raise
        return saved

    async def read_async(self) -> bytes:
        """Async twin of `read`."""
        if self.b64_json is not None:
            return self.read()
        return self._read(await self._fetcher().read_async(self._url()))

    async def save_async(self, path: str | os.PathLike[str], *, add_suffix: bool = False) -> Path:
        """Async twin of `save`."""
        return await self._save_async(
            check_target(path, add_suffix=add_suffix), add_suffix=add_suffix
        )

    async def _save_async(self, target: Path, *, add_suffix: bool) -> Path:
        """`save_async` to *target*, checked by `check_target` or in a batch's own folder.

        A batch checked its folder when it began (it keeps its journal there), and saves every
        image under a new name in it: the three system calls of `check_target` per image would
        tell it nothing. A folder gone or made read-only since still fails, as `OutputError`,
        when the image is written (`atomic_image`).
        """
        if self.b64_json is not None:
            return self._save_inline(target, add_suffix)
        fetcher = self._fetcher()
        ours = _checking(fetcher)
        if ours is not None:
            return self._written(await ours.write_async(self._url(), target, add_suffix=add_suffix))
        return self._saved(await fetcher.save_async(self._url(), target, add_suffix=add_suffix))

    def to_dict(self, *, include_data: bool = False) -> dict[str, object]:
        """The image as JSON data: ``url``, ``inline``, ``format``, ``media_type``, ``byte_size``.

        ``url`` is the full (signed) result URL: anyone holding it can fetch the image until it
        expires. Inline data is left out (``b64_json``, megabytes of it) unless *include_data*.
        """
        data: dict[str, object] = {
            "url": self.url,
            "inline": self.b64_json is not None,
            "format": self.format,
            "media_type": self.media_type,
            "byte_size": self.byte_size,
        }
        if include_data:
            data["b64_json"] = self.b64_json
        return data


def _error_dict(error: FluxError) -> dict[str, object]:
    """A failed attempt's error as JSON data (its message is redacted already)."""
    status: object = getattr(error, "status_code", None)
    return {
        "type": type(error).__name__,
        "message": str(error),
        "status_code": status if type(status) is int else None,
        "request_id": error.request_id,
    }


@frozen(kw_only=True)
class EditResult:
    """The outcome of one successful edit or generation.

    Attributes:
        provider: The provider that served it, e.g. ``"apiyi"``.
        model: The canonical model id.
        images: The images it returned.
        usage: Usage the provider reported, if any.
        cost_usd: What the call cost in US dollars at the provider that served it: the
            provider's own figure where it reports one with a documented rate (BFL's credits,
            $0.01 each), else an estimate from the price table (``flux_adapters.prices``);
            ``None`` when neither is known. An earlier attempt that may have been billed too
            (failed after sending, its ``billing`` row ambiguous: only with
            ``failover_on_ambiguous``) is not in it; a client's ``budget_usd`` counts it.
        cost_source: Where ``cost_usd`` came from: ``"provider"`` or ``"price table"``.
        warnings: Conversions made because the request allowed them.
        attempts: Every provider tried, in order.
        elapsed_s: Seconds from sending to the parsed answer.
        job: The job, for an asynchronous provider.
        request_id: The provider's id for the call, to quote to its support: from its answer's
            headers (``x-request-id`` and the like), or the job's id for an asynchronous
            provider that sent none; ``None`` when it gave none.
    """

    provider: str
    model: str
    images: tuple[ResultImage, ...]
    usage: Usage | None = None
    cost_usd: float | None = None
    cost_source: Literal["provider", "price table"] | None = None
    warnings: tuple[ConversionWarning, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    elapsed_s: float = 0.0
    job: Job | None = None
    request_id: str | None = None

    def to_dict(self, *, include_data: bool = False) -> dict[str, object]:
        """The result as JSON data: ``json.dumps(result.to_dict())`` always works.

        Keys: ``provider``, ``model``, ``request_id``, ``images`` (`ResultImage.to_dict`; inline
        data only with *include_data*), ``usage``, ``cost_usd``, ``cost_source``, ``warnings``,
        ``attempts`` (each with its error's ``type``, ``message``, ``status_code`` and
        ``request_id``), ``elapsed_s`` and ``job`` (``Job.to_dict``: ``Job.from_dict`` reads it
        back to resume). A number JSON cannot hold (NaN, infinity) is ``null``.
        """
        usage = None
        if self.usage is not None:
            usage = {
                "credits_used": _finite(self.usage.credits_used),
                "tokens_used": self.usage.tokens_used,
                "input_mp": _finite(self.usage.input_mp),
                "output_mp": _finite(self.usage.output_mp),
            }
        return {
            "provider": self.provider,
            "model": self.model,
            "request_id": self.request_id,
            "images": [image.to_dict(include_data=include_data) for image in self.images],
            "usage": usage,
            "cost_usd": _finite(self.cost_usd),
            "cost_source": self.cost_source,
            "warnings": [
                {
                    "field": warning.field,
                    "requested": warning.requested,
                    "sent": warning.sent,
                    "message": warning.message,
                }
                for warning in self.warnings
            ],
            "attempts": [
                {
                    "provider": attempt.provider,
                    "model": attempt.model,
                    "outcome": attempt.outcome,
                    "elapsed_s": _finite(attempt.elapsed_s),
                    "error": None if attempt.error is None else _error_dict(attempt.error),
                    "reason": attempt.reason,
                    "billing": attempt.billing,
                }
                for attempt in self.attempts
            ],
            "elapsed_s": _finite(self.elapsed_s),
            "job": None if self.job is None else self.job.to_dict(),
        }


BatchStatus = Literal["ok", "skipped", "changed", "failed", "unconfirmed"]


@frozen(kw_only=True)
class BatchItem:
    """One job of ``AsyncFluxClient.edit_many``: what became of it.

    Attributes:
        index: Position of the request in the batch.
        name: The file name stem its images are saved under (its id).
        request: The request (``None`` when what was given was not an `EditRequest`).
        status: ``"ok"`` (done now; saved when there is an output folder), ``"skipped"``
            (saved by an earlier run), ``"changed"`` (its request differs from the one an
            earlier run sent; not sent), ``"failed"`` (not billed: refused, or provably not
            taken; a rerun tries again), or ``"unconfirmed"`` (a provider may have billed it and
            no image was saved; a rerun sends it again only when told to).
        result: The result, when it was made in this run.
        error: What went wrong (``error.attempts`` lists the providers tried).
        saved: Where its images are, when an output folder was given.
        reason: Why it was skipped, what is known of an unconfirmed job, or how an earlier
            run's job was recovered ("downloaded again", "polled again"), in words.
    """

    index: int
    name: str
    request: EditRequest | None
    status: BatchStatus
    result: EditResult | None = None
    error: FluxError | None = None
    saved: tuple[Path, ...] = ()
    reason: str = ""
