"""Result images kept by the gateway and served again from ``/v1/files/<name>``.

Each image is streamed to disk as it arrives (`ResultImage.save_async`: at most 32 MB, checked
to be a whole png, jpeg or webp image, written under a temporary name and renamed once
complete), under an unguessable name (24 random bytes), and kept ``retention`` seconds. A name
is a capability, like the providers' signed URLs: whoever holds the URL may fetch the image
until it expires; no key is needed, so an ``<img src>`` works.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Final

from flux_adapters.result import ResultImage

__all__ = ["FileStore"]

_NAME: Final = re.compile(r"[A-Za-z0-9_-]{32}\.(?:png|jpeg|webp)")
MEDIA: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class FileStore:
    """A folder of result images, each kept for *retention* seconds after it was written."""

    def __init__(self, folder: str | os.PathLike[str], retention: float) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.retention = retention

    async def keep(self, image: ResultImage) -> tuple[str, Path]:
        """Store *image* (downloading it now if it is a URL); its file name and path."""
        stem = self.folder / secrets.token_urlsafe(24)
        saved = await image.save_async(stem, add_suffix=True)
        return saved.name, saved

    def find(self, name: str) -> Path | None:
        """The file for *name* while it is kept; ``None`` for an unknown or expired name."""
        if not _NAME.fullmatch(name):
            return None
        path = self.folder / name
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return None
        if age > self.retention:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return path

    def sweep(self) -> int:
        """Remove every file older than the retention; how many were removed."""
        removed = 0
        limit = time.time() - self.retention
        with os.scandir(self.folder) as entries:
            for entry in entries:
                try:
                    if entry.is_file() and entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    continue
        return removed
