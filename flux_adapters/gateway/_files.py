"""Result images kept by the gateway and served again from ``/v1/files/<name>``.

Each image is downloaded as it arrives (at most 32 MB, checked to be a whole png, jpeg or webp
image), stored under an unguessable name (24 random bytes), and kept ``retention`` seconds. A
name is a capability, like the providers' signed URLs: whoever holds the URL may fetch the
image until it expires; no key is needed, so an ``<img src>`` works.

An image of up to `_IN_MEMORY` bytes (most results) is gathered in memory and written once,
under its final name: that name is made here and given to nobody until the file is written
and closed, so no client can fetch it part-written, and no temporary name and rename are
needed (on ext4 the two cost as much as the write). A larger one is streamed to disk under a
temporary name and renamed once complete (`flux_adapters._files.atomic_image`). A gateway
killed while writing can leave a part-written file under a name nobody was given; the sweep
removes it after the retention like any other.

Such a file is most often created before the call that fills it, while the gateway is idle,
in a worker thread (`FileStore.replenish_async`): creating it costs far more than writing it on
ext4 where many files come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Final

from flux_adapters._files import SNIFF_BYTES, ImageFile, atomic_image, image_format
from flux_adapters.errors import ConfigurationError, OutputError
from flux_adapters.result import ResultImage, _checking

__all__ = ["FileStore"]

_IN_MEMORY: Final = 256 * 1024
"""An image up to this size is gathered in memory and written once, under its final name."""
_MOST_FRESH: Final = 16
"""Images written last whose bytes are held for their first fetch (`FileStore.fresh`)."""
_NEW_FILE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

_NAME: Final = re.compile(r"[A-Za-z0-9_-]{32}\.(?:png|jpeg|webp)")
MEDIA: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

_Spare = tuple[str, int, tuple[int, int]]
"""A spare file made: its name, its open descriptor, its device and inode."""


class FileStore:
    """A folder of result images, each kept for *retention* seconds after it was written."""

    def __init__(self, folder: str | os.PathLike[str], retention: float) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file there, a part of the path a file, no permission
            reason = "a file is in the way" if isinstance(exc, FileExistsError) else exc.strerror
            raise ConfigurationError(
                f"files_dir {str(self.folder)!r} cannot be used as a folder: {reason or exc}"
            ) from None
        self.retention = retention
        self._prefix = os.path.join(os.fspath(self.folder), "")
        """The folder's path and a separator: a kept file's path is this and its name (every
        call passes there; pathlib's parsing of a path costs as much as the rest of it)."""
        self._last_format = "png"
        """The extension of the image kept last: a spare file is created under it."""
        self._closed = False
        self._spare: tuple[str, int] | None = None
        """A new empty file (its name, open descriptor) for the next image kept (`replenish`)."""
        self._spare_id = (0, 0)
        """The spare's device and inode: it is used only while its name still leads to it."""
        self._making = False
        """A spare is being made in a worker thread (`replenish_async`)."""
        self._fresh: dict[str, tuple[bytes, int, int, int]] = {}
        """The images written last into a spare, by name: their bytes, device, inode and
        modification time (ns) once written, for their first fetch (`fresh`), which most often
        follows at once."""

    def replenish(self) -> None:
        """Create a spare file for the next image kept, unless one is waiting already.

        Creating a file is the costly part of keeping an image (on ext4 in a folder where many
        files come and go, such as ``/tmp``, 0.1 to 0.8 ms of the kernel's time, against 10 us
        to write and close it): the gateway makes it once it has served a kept image (or
        answered with one inline), when it most likely waits for the next request, instead of
        creating the file in a call while its caller waits; and in a worker thread
        (`replenish_async`), so that the next request, which most often is already there, is
        not held up meanwhile. The spare is an empty file under a new random name that nobody
        is given until an image is written into it; one not used is removed by `close`, or by
        the sweep if the gateway was stopped without it.

        A spare is used only if its name still leads to it (not removed, renamed away with its
        folder, or replaced) and it waited at most half the retention: the sweep, reading its
        age in another thread, could otherwise remove it just after an image went in.
        """
        if self._wants_spare():
            self._keep_spare(self._new_spare(self._last_format))

    async def replenish_async(self) -> None:
        """`replenish`, the file created in a worker thread while the event loop goes on.

        The spare is taken in (or, if the store was closed meanwhile, removed) on the event
        loop, which alone reads and sets it. Cancelled while the thread works, the file it
        makes is removed once made.
        """
        if not self._wants_spare():
            return
        self._making = True
        try:
            making = asyncio.get_running_loop().run_in_executor(
                None, self._new_spare, self._last_format
            )
            try:
                made = await asyncio.shield(making)
            except asyncio.CancelledError:
                making.add_done_callback(lambda done: self._discard(done.result()))
                raise
        finally:
            self._making = False
        self._keep_spare(made)

    def _wants_spare(self) -> bool:
        return self._spare is None and not self._closed and not self._making

    def _new_spare(self, extension: str) -> _Spare | None:
        """A new empty file under a new name with *extension*; ``None`` if it cannot be made.

        Kept images then create their own, and say why. Run in a worker thread: it reads and
        sets none of the store's state.
        """
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        path = self._prefix + name
        try:
            fd = os.open(path, _NEW_FILE, 0o666)
        except OSError:
            return None
        try:
            status = os.fstat(fd)
        except OSError:
            self._discard((name, fd, (0, 0)))
            return None
        return name, fd, (status.st_dev, status.st_ino)

    def _keep_spare(self, made: _Spare | None) -> None:
        if made is None:
            return
        if self._spare is not None or self._closed:  # one made meanwhile, or closed since
            self._discard(made)
            return
        self._spare, self._spare_id = made[:2], made[2]

    def _discard(self, made: _Spare | None) -> None:
        """Close and remove a spare made but not kept."""
        if made is None:
            return
        with contextlib.suppress(OSError):
            os.close(made[1])
        with contextlib.suppress(OSError):
            os.unlink(self._prefix + made[0])

    def _take_spare(self, extension: str) -> tuple[str, int] | None:
        spare = self._spare
        if spare is None or spare[0].rpartition(".")[2] != extension:
            return None
        self._spare = None
        path = self._prefix + spare[0]
        ours = False
        with contextlib.suppress(OSError):  # removed meanwhile
            found = os.stat(path, follow_symlinks=False)
            ours = (found.st_dev, found.st_ino) == self._spare_id
            if ours and time.time() - found.st_mtime <= self.retention / 2:
                return spare
        # Gone, not at its name any more, or waited long enough for the sweep (in a worker
        # thread) to judge it expired and remove it right after it is written. Not used.
        with contextlib.suppress(OSError):
            os.close(spare[1])
        if ours:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return None

    def close(self) -> None:
        """Remove the spare file, if any, and make no other."""
        self._closed = True
        self._fresh.clear()
        spare, self._spare = self._spare, None
        if spare is not None:
            self._discard((*spare, self._spare_id))

    async def keep(self, image: ResultImage) -> tuple[str, bytes | None]:
        """Store *image* (downloading it now if it is a URL): its file name (in `folder`), bytes.

        The bytes are given when they were held in memory anyway (an image up to
        `_IN_MEMORY`), else ``None``.

        Raises:
            FluxError: The download failed (`OutputError`: the file could not be written).
        """
        # The folder is ours (made in __init__) and the name new: `save_async`'s checks of the
        # target (three system calls) would tell nothing; a folder removed since fails as
        # OutputError when the file is created.
        fetcher = _checking(image._fetcher()) if image.b64_json is None else None
        if fetcher is None:
            token = secrets.token_urlsafe(24)
            saved = await image._save_async(self.folder / token, add_suffix=True)
            return saved.name, None
        with contextlib.ExitStack() as spill:
            out = _Gathered(self.folder, spill)
            await fetcher._fetch_async(image._url(), out.write, out.restart)
            if out.file is None:
                data = b"".join(out.chunks)
                name = self._write_new(data)
                self._last_format = name.rpartition(".")[2]
                image._seen(data[:SNIFF_BYTES], len(data))
                return name, data
        # Spilled to a temporary file, now renamed into place (by atomic_image's exit).
        saved = image._written(out.file)
        return saved.name, None

    def _write_new(self, data: bytes) -> str:
        """Write *data* to a new file: its name, a new token and its format's extension.

        The file is the spare one if that was created under the same extension and can still be
        used (`_take_spare`). It is removed if writing it fails.

        Raises:
            OutputError: The file cannot be created or written.
        """
        extension = image_format(data[:SNIFF_BYTES]) or "bin"
        spare = self._take_spare(extension)
        if spare is not None:
            written = _write_closed(spare[1], data, self._prefix + spare[0], measured=True)
            fresh = self._fresh
            if len(fresh) >= _MOST_FRESH:  # links never fetched: the oldest goes
                del fresh[next(iter(fresh))]
            fresh[spare[0]] = (data, *self._spare_id, written)
            return spare[0]
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        path = self._prefix + name
        try:
            fd = os.open(path, _NEW_FILE, 0o666)
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=path) from exc
        _write_closed(fd, data, path)
        return name

    def fresh(self, name: str, path: str) -> tuple[bytes, float] | None:
        """The bytes of *name* (at *path*) and its ``st_mtime``, if it was written last, once.

        An image is most often fetched right after the answer linking it: its first fetch is
        served from the bytes written, after one ``stat`` of *path* (instead of an ``open``,
        ``fstat``, ``read`` and ``close``) shows the same file still there, of the same size
        and modification time (not removed, replaced, cut short or written to since; its age
        is the caller's to judge, as for any other file). ``None``: read the file itself (it was fetched already, or is not the
        file written, or is not there: the file's own reading says which).
        """
        kept = self._fresh.pop(name, None)
        if kept is None:
            return None
        data, device, inode, written = kept
        try:
            found = os.stat(path)
        except OSError:
            return None
        if (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns) != (
            device,
            inode,
            len(data),
            written,
        ):
            return None
        return data, found.st_mtime

    def path(self, name: str) -> str | None:
        """Where the file for *name* would be; ``None`` for a name this store never makes.

        Whether it is there and still kept is for the caller to see (`expired`): the gateway
        opens it and reads its age from the open file, one system call less than a ``stat``
        first.
        """
        return self._prefix + name if _NAME.fullmatch(name) else None

    def expired(self, written: float) -> bool:
        """Whether a file last written at *written* (``st_mtime``) is past the retention."""
        return time.time() - written > self.retention

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


class _Gathered:
    """Where a download goes: memory up to `_IN_MEMORY` bytes, then an `atomic_image` file."""

    def __init__(self, folder: Path, spill: contextlib.ExitStack) -> None:
        self._folder = folder
        self._spill = spill
        self.chunks: list[bytes] = []
        self.size = 0
        self.file: ImageFile | None = None

    def write(self, data: bytes) -> None:
        if self.file is not None:
            self.file.write(data)
            return
        self.chunks.append(bytes(data))
        self.size += len(data)
        if self.size > _IN_MEMORY:
            self.file = self._spill.enter_context(
                atomic_image(self._folder / secrets.token_urlsafe(24), add_suffix=True)
            )
            for chunk in self.chunks:
                self.file.write(chunk)
            self.chunks = []

    def restart(self) -> None:
        if self.file is not None:
            self.file.restart()
        self.chunks = []
        self.size = 0


def _write_closed(fd: int, data: bytes, path: str, *, measured: bool = False) -> int:
    """Write *data* to *fd*, the new file *path*, and close it; it is removed if that fails.

    *measured*: its modification time (``st_mtime_ns``) once written is returned (else 0).

    Raises:
        OutputError: *data* could not be written.
    """
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            written = os.fstat(fd).st_mtime_ns if measured else 0
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise OutputError(exc.strerror or str(exc), path=path) from exc
    return written
