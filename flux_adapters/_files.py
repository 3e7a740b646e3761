"""Local files for results: their format, where they may go, and writing them whole.

What format image bytes are, where an image may be written, and writing it so that it appears
only once complete.

Every failure here is an `OutputError` naming the path: the image itself is not lost (it is
still at its URL, or in memory), it just cannot go where it was asked to.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from flux_adapters.errors import OutputError

__all__ = [
    "TAIL_BYTES",
    "ImageFile",
    "atomic_image",
    "check_target",
    "image_format",
    "image_is_whole",
    "read_text_file",
    "remove_partial_files",
]

_PARTIAL: Final = re.compile(r"\..+\.[0-9a-f]{8}\.part")
"""The name `atomic_image` gives its temporary file: ``.<name>.<8 hex digits>.part``."""
_SIGNATURES: Final = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"))
_NAME_MAX: Final = 255
"""The longest file name (in bytes) common file systems take (ext4, APFS, NTFS in UTF-16)."""
SNIFF_BYTES: Final = 12
"""Bytes needed to tell the formats apart (WebP: ``RIFF`` + size + ``WEBP``)."""


def image_format(head: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"webp"`` for image bytes starting with *head*, else ``None``."""
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if len(head) >= SNIFF_BYTES and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


TAIL_BYTES: Final = 1024
"""The last bytes of an image kept to tell whether it is whole (`image_is_whole`)."""
_PNG_END: Final = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last chunk of a PNG
_JPEG_END: Final = b"\xff\xd9"  # EOI; within the entropy-coded data 0xFF is always escaped


def image_is_whole(head: bytes, tail: bytes, size: int) -> bool:
    """Whether an image of *size* bytes, starting with *head*, ending with *tail*, is complete.

    A cheap check without decoding, against an image cut short (a CDN serving part of a
    file, a ``Content-Length`` shorter than the image): a PNG ends with its IEND chunk, a JPEG
    with its EOI marker (a few bytes of padding after either are allowed), a WebP's RIFF
    header gives its exact size.
    """
    found = image_format(head)
    if found == "png":
        return _PNG_END in tail[-64:]
    if found == "jpeg":
        return _JPEG_END in tail[-64:]
    if found == "webp":
        return int.from_bytes(head[4:8], "little") + 8 == size
    return False


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"


def check_target(path: str | os.PathLike[str]) -> Path:
    """Return *path* as a `Path` if an image can be written there; never writes anything.

    A new file in an existing, writable folder, or an existing regular file (replaced).

    Raises:
        OutputError: A directory, FIFO, device or socket; a missing or read-only folder; a
            parent that is not a folder; not a path at all.
    """
    try:
        target = Path(path)
        shown = str(target)
    except (TypeError, ValueError) as exc:
        raise OutputError(f"not a path ({type(exc).__name__})", path=repr(path)[:80]) from None
    if target.name in ("", ".", ".."):
        raise OutputError("is not a file name", path=shown)
    try:
        found = os.stat(target)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # ENOTDIR, ELOOP, ENAMETOOLONG, an embedded NUL ...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(reason, path=shown) from None
    else:
        if not stat.S_ISREG(found.st_mode):
            raise OutputError(_kind(found.st_mode), path=shown)
    folder = target.parent
    try:
        if not folder.is_dir():
            raise OutputError(f"the folder {folder} does not exist", path=shown)
    except (OSError, ValueError):
        raise OutputError(f"the folder {folder} cannot be read", path=shown) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"the folder {folder} is not writable", path=shown)
    return target


class ImageFile:
    """The open temporary file of `atomic_image`; raises `OutputError`, never `OSError`."""

    def __init__(self, fd: int, target: Path) -> None:
        self._fd = fd
        self._target = target
        self.target = target
        """Where the image ends up."""
        self.head = b""
        """The first bytes written, enough to tell the image format."""

    def _failed(self, exc: OSError) -> OutputError:
        return OutputError(exc.strerror or str(exc), path=str(self._target))

    def write(self, data: bytes | memoryview) -> None:
        """Append *data*."""
        if len(self.head) < SNIFF_BYTES:
            self.head += bytes(data[: SNIFF_BYTES - len(self.head)])
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise self._failed(exc) from exc

    def restart(self) -> None:
        """Drop everything written so far (a download starting again)."""
        try:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
        except OSError as exc:
            raise self._failed(exc) from exc
        self.head = b""


@contextlib.contextmanager
def atomic_image(target: Path, *, add_suffix: bool = False) -> Iterator[ImageFile]:
    """Write *target* through a temporary file beside it, renamed over it only once complete.

    The temporary file is created with the usual permissions (0666 less the umask) and removed
    on any failure, so a failed or interrupted write never leaves a partial image behind under
    the target's name. With *add_suffix*, the file is named *target* plus the extension of the
    format its bytes turned out to have (``robot`` -> ``robot.png``); the final path is
    `ImageFile.target` once the block has ended.

    Raises:
        OutputError: The file cannot be created, written or renamed into place.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    # The name cut so that the temporary one is no longer than the longest the system takes.
    stem = os.fsdecode(os.fsencode(target.name)[: _NAME_MAX - len(".00000000.part") - 1])
    while True:
        partial = target.with_name(f".{stem}.{os.urandom(4).hex()}.part")  # _PARTIAL
        try:
            fd = os.open(partial, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(target)) from exc
    out = ImageFile(fd, target)
    try:
        try:
            yield out
        finally:
            os.close(fd)
        if add_suffix:
            out.target = target.with_name(f"{target.name}.{image_format(out.head) or 'bin'}")
        try:
            os.replace(partial, out.target)
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(out.target)) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)


def remove_partial_files(folder: Path) -> int:
    """Remove the temporary files `atomic_image` left in *folder* when a process was killed.

    Only for a folder this process alone writes to (a batch holds its journal's lock).
    Returns how many were removed.
    """
    removed = 0
    for path in folder.glob(".*.part"):
        if _PARTIAL.fullmatch(path.name):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def read_bytes_file(path: Path, limit: int = 16 * 1024 * 1024) -> bytes:
    """The bytes of the regular file *path*, at most *limit*: `read_text_file` without decoding.

    Raises:
        OSError: As `read_text_file`.
    """
    import errno

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def read_text_file(path: Path, limit: int = 16 * 1024 * 1024) -> str:
    """The UTF-8 text of the regular file *path*, at most *limit* bytes.

    Opened without blocking, so a FIFO or a device in its place is refused instead of waited on.

    Raises:
        OSError: It cannot be read, is not a regular file (``EINVAL``) or is too large
            (``EFBIG``); ``strerror`` says which.
        UnicodeDecodeError: It is not UTF-8 text.
    """
    return read_bytes_file(path, limit).decode("utf-8")
