"""What an edit returns: `EditResult`, its `ResultImage` items, usage, warnings and attempts."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import urlsplit

from attrs import field, frozen

from flux_adapters.errors import FluxError

if TYPE_CHECKING:
    from flux_adapters.request import EditRequest

__all__ = [
    "Attempt",
    "BatchItem",
    "ConversionWarning",
    "Downloader",
    "EditResult",
    "ResultImage",
    "Usage",
]


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
    """Usage the provider reported (``meta.usage``), in its own units."""

    credits_used: float | None = None
    tokens_used: int | None = None


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
    """

    provider: str
    model: str
    outcome: Literal["ok", "failed", "skipped"]
    elapsed_s: float
    error: FluxError | None = None
    reason: str = ""
    billing: str = ""


class Downloader(Protocol):
    """Fetches result URLs; the clients provide one. Never sends the API key."""

    def read(self, url: str) -> bytes:
        """Return the body at *url*."""

    def save(self, url: str, path: Path) -> None:
        """Stream the body at *url* into *path*."""

    async def read_async(self, url: str) -> bytes:
        """Return the body at *url*."""

    async def save_async(self, url: str, path: Path) -> None:
        """Stream the body at *url* into *path*."""


def _short_url(url: str | None) -> str:
    # Signed result URLs grant access to the image; keep the signature out of reprs and logs.
    if url is None:
        return "None"
    parts = urlsplit(url)
    return repr(f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else ""))


def _default_downloader() -> Downloader:
    from flux_adapters.client import HttpDownloader  # lazy: results can be built without a client

    return HttpDownloader()


@frozen(kw_only=True)
class ResultImage:
    """One generated image: a short-lived URL, or base64 data the provider returned inline.

    Result URLs expire about 10 minutes after the image is made; `save` or `read` it at once.

    Attributes:
        url: Where to download the image, when the provider returned a URL.
        b64_json: The image as base64, when the provider returned it inline.
    """

    url: str | None = field(default=None, repr=_short_url)
    b64_json: str | None = field(
        default=None,
        repr=lambda value: "None" if value is None else f"<{len(value)} base64 characters>",
    )

    _downloader: Downloader | None = field(default=None, eq=False, repr=False, alias="downloader")

    def _fetcher(self) -> Downloader:
        return self._downloader if self._downloader is not None else _default_downloader()

    def _url(self) -> str:
        if self.url is None:  # pragma: no cover - parse_* never builds an image with neither
            raise ValueError("this image has neither a URL nor inline data")
        return self.url

    def read(self) -> bytes:
        """Return the image bytes, downloading them now if the provider returned a URL.

        Raises:
            ResultExpired: The URL has expired.
            TransportError: The download failed.
        """
        if self.b64_json is not None:
            return base64.b64decode(self.b64_json)
        return self._fetcher().read(self._url())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the image to *path* (streamed to disk for a URL) and return the path.

        The file appears only once it is complete: a failed download leaves nothing behind.

        Raises:
            ResultExpired: The URL has expired.
            TransportError: The download failed.
        """
        target = Path(path)
        if self.b64_json is not None:
            _write_atomically(target, base64.b64decode(self.b64_json))
        else:
            self._fetcher().save(self._url(), target)
        return target

    async def read_async(self) -> bytes:
        """Async twin of `read`."""
        if self.b64_json is not None:
            return base64.b64decode(self.b64_json)
        return await self._fetcher().read_async(self._url())

    async def save_async(self, path: str | os.PathLike[str]) -> Path:
        """Async twin of `save`."""
        target = Path(path)
        if self.b64_json is not None:
            _write_atomically(target, base64.b64decode(self.b64_json))
        else:
            await self._fetcher().save_async(self._url(), target)
        return target


def _write_atomically(target: Path, data: bytes) -> None:
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    partial.replace(target)


@frozen(kw_only=True)
class EditResult:
    """The outcome of one successful edit or generation.

    Attributes:
        provider: The provider that served it, e.g. ``"apiyi"``.
        model: The canonical model id.
        images: The images it returned.
        usage: Usage the provider reported, if any.
        cost_usd: Estimated from the provider's documented price (``flux_adapters.prices``);
            ``None`` when no price is known.
        warnings: Conversions made because the request allowed them.
        attempts: Every provider tried, in order.
        elapsed_s: Seconds from sending to the parsed answer.
    """

    provider: str
    model: str
    images: tuple[ResultImage, ...]
    usage: Usage | None = None
    cost_usd: float | None = None
    warnings: tuple[ConversionWarning, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    elapsed_s: float = 0.0


@frozen(kw_only=True)
class BatchItem:
    """One finished request of ``AsyncFluxClient.edit_many``: its result or its error.

    Attributes:
        index: Position of the request in the batch.
        name: The file name stem its images were saved under.
        request: The request.
        result: The result, when it succeeded.
        error: What went wrong, when it failed (``error.attempts`` lists the providers tried).
        saved: Where its images were saved, when an output folder was given.
    """

    index: int
    name: str
    request: EditRequest
    result: EditResult | None = None
    error: FluxError | None = None
    saved: tuple[Path, ...] = ()
