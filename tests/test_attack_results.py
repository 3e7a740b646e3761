"""Attacks on results and their files: saving an image where it cannot or should not go, a
download from a hostile server, resuming a job that holds odd values, and the command line's
`edit` around them. Each ends in a typed `FluxError`, a clean exit, or the image saved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from flux_adapters import errors
from flux_adapters._download import HttpDownloader
from flux_adapters.result import ResultImage
from tests.conftest import image_bytes

KEY = "sk-live-7Qw2Zr9XbT4mKp1VfH8sLd3NcY6gJa0E"
PNG = image_bytes(16, 12)
JPEG = image_bytes(16, 12, "JPEG")
CDN = "https://cdn.example/results/a?signature=s3cr3t"
both = pytest.mark.parametrize("kind", ["sync", "async"])


def save(kind: str, image: ResultImage, target: Path) -> Path:
    """`ResultImage.save`, or `save_async` run to its end."""
    if kind == "sync":
        return image.save(target)
    return asyncio.run(image.save_async(target))


# --- a name that names another format: refused when the first bytes say so, not at the end ----


class Counted(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A JPEG's first bytes, then *padding* chunks of 1 KB, then its end; counts chunks sent."""

    def __init__(self, padding: int = 200) -> None:
        self.sent = 0
        self._chunks = [JPEG[:64], *([b"\0" * 1024] * padding), JPEG[64:]]

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.sent += 1
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            self.sent += 1
            yield chunk


@both
def test_a_download_under_a_name_of_another_format_stops_at_its_first_bytes(
    kind: str, tmp_path: Path
) -> None:
    # Before: the whole image (up to 32 MB, for up to the 120 s deadline) was downloaded into
    # the temporary file and only then refused by its name, though `save` says the download is
    # dropped once the first bytes arrive.
    body = Counted()
    handler = httpx.MockTransport(lambda request: httpx.Response(200, stream=body))
    downloader = HttpDownloader(
        sync_client=httpx.Client(transport=handler),
        async_client=httpx.AsyncClient(transport=handler),
    )
    image = ResultImage(url=CDN, downloader=downloader)
    target = tmp_path / "scene.png"
    with pytest.raises(errors.ExtensionMismatch) as caught:
        save(kind, image, target)
    assert caught.value.suggested == str(tmp_path / "scene.jpeg")
    assert body.sent < 10  # dropped at once, not read to its end
    assert list(tmp_path.iterdir()) == []  # nothing under the name, no partial file
    # The same download under a fitting name is whole.
    fitting = Counted()
    handler = httpx.MockTransport(lambda request: httpx.Response(200, stream=fitting))
    with httpx.Client(transport=handler) as http:
        saved = ResultImage(url=CDN, downloader=HttpDownloader(sync_client=http)).save(
            tmp_path / "scene.jpg"
        )
    assert saved.stat().st_size == len(JPEG) + 200 * 1024
