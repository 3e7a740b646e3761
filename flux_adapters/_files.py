"""Image bytes and local files: what format bytes are, where an image may go, writing it whole.

`image_format` is the one place that tells image formats apart by their first bytes: inputs
(`flux_adapters.request`), downloads, inline results, saved files and the emulator all ask it,
so a format is recognised (or named in an error) the same way everywhere. Its table knows the
formats providers take (`IMAGE_FORMATS`) and the ones people send by mistake (GIF, BMP, TIFF,
HEIC/AVIF, ...), so that an error can say which one it got.

Every failure to write is an `OutputError` naming the path: the image itself is not lost (it is
still at its URL, or in memory), it just cannot go where it was asked to.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import stat
from pathlib import Path, PurePath
from typing import Final

from flux_adapters._display import describe_exception, render_value, type_name
from flux_adapters.errors import ExtensionMismatch, OutputError

__all__ = [
    "IMAGE_FORMATS",
    "MEDIA_TYPES",
    "SNIFF_BYTES",
    "SUFFIXED_NAME_MAX",
    "TAIL_BYTES",
    "ImageFile",
    "atomic_image",
    "check_extension",
    "check_target",
    "extension_format",
    "format_name",
    "image_format",
    "image_is_whole",
    "plain_path",
    "read_text_file",
    "remove_partial_files",
]

_PARTIAL: Final = re.compile(r"\..+\.[0-9a-f]{8}\.part")
"""The name `atomic_image` gives its temporary file: ``.<name>.<8 hex digits>.part``."""
_numbers: Final = itertools.count(int.from_bytes(os.urandom(4), "big"))
"""The temporary files' numbers: from a random start, one more each (not a `getrandom` call per
image; ``O_EXCL`` is what makes a name this file's alone, and a name taken is passed over)."""
_NAME_MAX: Final = 255
"""The longest file name (in bytes) common file systems take (ext4, APFS, NTFS in UTF-16)."""
SNIFF_BYTES: Final = 32
"""Bytes needed to tell the formats apart (an ISO-BMFF ``ftyp`` box lists its brands there)."""

IMAGE_FORMATS: Final = ("jpeg", "png", "webp")
"""The formats every built-in provider takes as input and returns: anything else is refused
(as a reference image, by a provider's limits; as a result, when it is read)."""

# (first bytes, format). WebP, BMP and the ISO-BMFF family (HEIC, AVIF) need more than a prefix
# and are told apart in `image_format`. Sources: the PNG spec (section 5.2), JPEG's SOI marker,
# GIF89a (section 17), TIFF 6.0 (section 2), JPEG 2000 (ISO 15444-1 annex I), JPEG XL (ISO
# 18181-2), Photoshop's file format, PDF 1.7 (section 7.5.2).
_SIGNATURES: Final = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"),  # a bare codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),
    (b"\xff\x0a", "jxl"),  # a bare codestream
    (b"8BPS", "psd"),
    (b"%PDF-", "pdf"),
)
# ISO-BMFF brands (the ``ftyp`` box): HEIF's (ISO 23008-12 annex B) and AVIF's (AV1 Image File
# Format, section 9). A generic HEIF brand (mif1) is named by the first specific one it lists.
_BRANDS: Final = {
    b"avif": "avif",
    b"avis": "avif",
    **dict.fromkeys(
        (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"), "heic"
    ),
}
_GENERIC_BRANDS: Final = (b"mif1", b"msf1")
# The header sizes of the BMP versions (BITMAPCOREHEADER .. BITMAPV5HEADER): "BM" alone would
# take any text that starts with those two letters for an image.
_BMP_HEADERS: Final = (12, 16, 40, 52, 56, 64, 108, 124)

MEDIA_TYPES: Final = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "heic": "image/heic",
    "heif": "image/heif",
    "avif": "image/avif",
    "jpeg2000": "image/jp2",
    "jxl": "image/jxl",
    "psd": "image/vnd.adobe.photoshop",
    "pdf": "application/pdf",
}
"""The media type of each format `image_format` names (IANA's registry)."""
_NAMES: Final = {
    "png": "PNG",
    "jpeg": "JPEG",
    "webp": "WebP",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
    "heic": "HEIC",
    "heif": "HEIF",
    "avif": "AVIF",
    "jpeg2000": "JPEG 2000",
    "jxl": "JPEG XL",
    "psd": "Photoshop (PSD)",
    "pdf": "PDF",
}
# File name extensions (lower case) and the format each names.
_EXTENSIONS: Final = {
    "png": "png",
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "jpe": "jpeg",
    "jfif": "jpeg",
    "webp": "webp",
    "gif": "gif",
    "bmp": "bmp",
    "dib": "bmp",
    "tif": "tiff",
    "tiff": "tiff",
    "heic": "heic",
    "heif": "heif",
    "hif": "heif",
    "avif": "avif",
    "jp2": "jpeg2000",
    "j2k": "jpeg2000",
    "jxl": "jxl",
    "psd": "psd",
    "pdf": "pdf",
}


def image_format(head: bytes) -> str | None:
    """The format of image bytes starting with *head* (`SNIFF_BYTES` of them suffice).

    ``"png"``, ``"jpeg"`` or ``"webp"`` (`IMAGE_FORMATS`, what providers take), or a format
    people send by mistake, named so that an error can say so: ``"gif"``, ``"bmp"``,
    ``"tiff"``, ``"heic"``, ``"heif"``, ``"avif"``, ``"jpeg2000"``, ``"jxl"``, ``"psd"``,
    ``"pdf"``. ``None`` for anything else. Decodes nothing: a match says what the bytes claim
    to be, not that they are a whole, readable image.
    """
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADERS:
        return "bmp"
    if head[4:8] == b"ftyp":
        return _iso_brand(head)
    return None


def _iso_brand(head: bytes) -> str | None:
    """HEIC, HEIF or AVIF from an ``ftyp`` box: its major brand, then its compatible ones."""
    major = head[8:12]
    if major in _BRANDS:
        return _BRANDS[major]
    if major not in _GENERIC_BRANDS:
        return None  # a video (mp4, mov) or another ISO-BMFF file: not an image we can name
    end = min(len(head), int.from_bytes(head[:4], "big"))
    for start in range(16, end - 3, 4):
        brand = head[start : start + 4]
        if brand in _BRANDS:
            return _BRANDS[brand]
    return "heif"


def format_name(found: str | None) -> str:
    """How a format from `image_format` is written in messages: ``"GIF"``, ``"JPEG"``, ..."""
    if found is None:
        return "no image format we know"
    return _NAMES.get(found, found.upper())


def extension_format(path: Path) -> str | None:
    """The image format the extension of *path* names (any case); ``None`` for none or another.

    ``scene.JPG`` -> ``"jpeg"``; ``scene``, ``scene.bin``, ``scene.tmp`` -> ``None``. A name that
    is nothing but an extension (``.png``, which `pathlib` sees as a hidden file with none) names
    that format too: its bytes must not be another's.
    """
    name = path.name
    suffix = path.suffix or (name if name.startswith(".") and name.count(".") == 1 else "")
    return _EXTENSIONS.get(suffix[1:].lower()) if suffix else None


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


def plain_path(value: object) -> Path:
    """*value* (a ``str``, a `pathlib` path, an ``os.PathLike``) as the `Path` it names.

    A ``str`` subclass names the file its characters name, as ``open()`` takes it (``Path()``
    of Python 3.11 asks its ``__str__``, which may name another file). An ``os.PathLike``'s
    ``__fspath__`` is the caller's code: whatever it raises is the `TypeError` here.

    Raises:
        TypeError: *value* is not a path (bytes included), or its ``__fspath__`` failed; the
            message says which, briefly.
    """
    kind = type(value)  # asked of the real type: a __class__ property cannot lie
    if issubclass(kind, PurePath):  # pathlib's own: Path() reads its parts, no user code
        return Path(value)  # type: ignore[arg-type]
    if not issubclass(kind, str):
        try:
            fspath = getattr(kind, "__fspath__", None)
        except Exception:  # a metaclass that refuses attribute lookups
            fspath = None
        if fspath is None:
            raise TypeError(type_name(value))
        try:
            value = os.fspath(value)  # type: ignore[call-overload]
        except Exception as exc:
            raise TypeError(f"its __fspath__ raised {describe_exception(exc)}") from None
        if not issubclass(type(value), str):
            raise TypeError(f"its __fspath__ returned {type_name(value)}, not str")
    return Path(str.__str__(value))


def check_target(path: str | os.PathLike[str], *, add_suffix: bool = False) -> Path:
    """Return *path* as a `Path` if an image can be written there; never writes anything.

    A new file in an existing, writable folder, or an existing regular file (replaced). A
    symbolic link is written through: the path returned is the file it names, and the link
    stays. With *add_suffix*, the name must leave room for the extension the bytes will add.

    Raises:
        OutputError: A directory, FIFO, device or socket; a missing or read-only folder; a
            parent that is not a folder; a name too long; not a path at all.
    """
    try:
        target = plain_path(path)
    except TypeError as exc:
        raise OutputError(f"not a path ({exc})", path=render_value(path)) from None
    shown = str(target)
    if target.name in ("", ".", ".."):
        raise OutputError("is not a file name", path=shown)
    # Else the whole image is downloaded, and only renaming it to its full name fails.
    if add_suffix and _name_bytes(target.name) > SUFFIXED_NAME_MAX:
        raise OutputError(
            f"is too long a name to add an extension to (at most {SUFFIXED_NAME_MAX} bytes)",
            path=shown,
        )
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
    if not add_suffix and os.path.islink(target):  # (with add_suffix, a new name is written)
        # Written through, as cp and curl -o do: renamed over, the link itself was replaced and
        # the file it names kept its old bytes (as root, `-o /dev/stdout` replaced /dev/stdout).
        target = Path(os.path.realpath(target))
    folder = target.parent
    try:
        if not folder.is_dir():
            raise OutputError(f"the folder {folder} does not exist", path=shown)
    except (OSError, ValueError):
        raise OutputError(f"the folder {folder} cannot be read", path=shown) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"the folder {folder} is not writable", path=shown)
    return target


SUFFIXED_NAME_MAX: Final = _NAME_MAX - len(".jpeg")
"""The longest name (in bytes) that `atomic_image` can add an extension to."""


def _name_bytes(name: str) -> int:
    try:
        return len(os.fsencode(name))
    except UnicodeError:  # a lone surrogate the file system encoding cannot write: stat says so
        return 0


def check_extension(target: Path, found: str | None) -> None:
    """Refuse to write an image of format *found* under a name that says it is another.

    Saving a JPEG as ``scene.png`` would label it wrongly for every program that trusts the
    name; converting it would need an image library and change the bytes that were paid for.
    A name without an image extension (``scene``, ``scene.bin``) is taken as it is.

    Raises:
        ExtensionMismatch: *target*'s extension names an image format other than *found*.
    """
    named = extension_format(target)
    if named is None or found is None or named == found:
        return
    # A name that is only an extension (".png") has no suffix to pathlib: it is replaced whole.
    suggested = target.with_suffix(f".{found}") if target.suffix else target.with_name(f".{found}")
    raise ExtensionMismatch(
        f"the image is {format_name(found)}, but the name says {format_name(named)}; "
        f"save it as {suggested.name} (nothing was written)",
        path=str(target),
        image_format=found,
        extension_format=named,
        suggested=str(suggested),
    )


class ImageFile:
    """The open temporary file of `atomic_image`; raises `OutputError`, never `OSError`.

    Once the ``with`` block of `atomic_image` has ended, it says what was put in place:
    `target`, `head` and `size`, so nobody needs to open the file again to know what it holds.
    """

    def __init__(self, fd: int, target: Path, *, named: bool = False) -> None:
        self._fd = fd
        self._target = target
        self._named = named  # the name must fit the bytes: refuse them once the head says not
        self.target = target
        """Where the image ends up."""
        self.head = b""
        """The first bytes written, enough to tell the image format."""
        self.size = 0
        """How many bytes were written."""

    def _failed(self, exc: OSError) -> OutputError:
        return OutputError(exc.strerror or str(exc), path=str(self._target))

    def write(self, data: bytes | memoryview) -> None:
        """Append *data*.

        Raises:
            ExtensionMismatch: The first bytes name another format than the target's name
                (unless the name is to get the bytes' extension): a download stops there,
                rather than fetching the whole image only to refuse it at the end.
        """
        if len(self.head) < SNIFF_BYTES:
            self.head += bytes(data[: SNIFF_BYTES - len(self.head)])
            if self._named and len(self.head) == SNIFF_BYTES:
                check_extension(self._target, image_format(self.head))
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                self.size += written
                view = view[written:]
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
        self.size = 0


def atomic_image(target: Path, *, add_suffix: bool = False) -> _AtomicImage:
    """Write *target* through a temporary file beside it, renamed over it only once complete.

    The temporary file is created with the usual permissions (0666 less the umask), given those
    of the file it replaces if there is one (as ``cp`` keeps them), and removed on any failure,
    so a failed or interrupted write never leaves a partial image behind under the target's
    name. With *add_suffix*, the file is named *target* plus the extension of the
    format its bytes turned out to have (``robot`` -> ``robot.png``); the final path is
    `ImageFile.target` once the block has ended. Without it, an extension that names another
    image format than the bytes have is refused (`check_extension`), and nothing is written.
    The format is told from the first bytes as they were written: the bytes are written once,
    renamed once, and never read back.

    The image is not ``fsync``-ed: a kill cannot leave part of it under its name, a power loss
    can (the rename may reach the disk before the data). A batch's journal does not take such
    a file for a saved image unless it starts and ends like a whole one
    (`flux_adapters._journal.is_image_file`).

    Raises:
        ExtensionMismatch: *target*'s extension names another image format than the bytes'.
        OutputError: The file cannot be created, written or renamed into place.
    """
    return _AtomicImage(target, add_suffix)


_STEM_BYTES: Final = _NAME_MAX - len(".00000000.part") - 1
"""The most bytes of a name that its temporary file's name (`atomic_image`) keeps."""


def partial_stem(name: str) -> str:
    """*name* cut so that its temporary file's name is no longer than the longest a system takes.

    Cut as bytes (the file system's encoding): a name of ASCII short enough is kept as it is
    without encoding it (every file system encoding writes ASCII a byte a character), as a
    batch's names are.
    """
    if len(name) <= _STEM_BYTES and name.isascii():
        return name
    return os.fsdecode(os.fsencode(name)[:_STEM_BYTES])


class _AtomicImage:
    """`atomic_image`'s ``with`` block: what ``contextlib.contextmanager`` made of it, written out.

    A batch saves every image through it; the generator and its wrapper cost about as much
    again as the file's own steps in Python.
    """

    __slots__ = ("_add_suffix", "_fd", "_out", "_partial", "_target", "_where")

    def __init__(self, target: Path, add_suffix: bool) -> None:
        self._target = target
        self._add_suffix = add_suffix

    def __enter__(self) -> ImageFile:
        target = self._target
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        # Plain strings, not Paths, for the temporary name: a batch does this for every image.
        where = os.fspath(target)
        folder, name = os.path.split(where)
        stem = partial_stem(name)
        while True:
            partial = os.path.join(
                folder, f".{stem}.{next(_numbers) & 0xFFFFFFFF:08x}.part"
            )  # _PARTIAL
            try:
                fd = os.open(partial, flags, 0o666)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(exc.strerror or str(exc), path=str(target)) from exc
        self._where, self._partial, self._fd = where, partial, fd
        self._out = ImageFile(fd, target, named=not self._add_suffix)
        return self._out

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        renamed = False
        try:
            os.close(self._fd)
            if kind is not None:
                return  # the block's own exception goes on, the temporary file removed
            out, where = self._out, self._where
            found = image_format(out.head)
            final = where
            if self._add_suffix:
                final = f"{where}.{found or 'bin'}"
                out.target = Path(final)
            else:
                check_extension(self._target, found)
            _keep_mode(self._partial, final)
            try:
                os.replace(self._partial, final)
            except OSError as exc:
                raise OutputError(exc.strerror or str(exc), path=final) from exc
            renamed = True
        finally:
            if not renamed:
                with contextlib.suppress(OSError):
                    os.unlink(self._partial)


def _keep_mode(partial: str, final: str) -> None:
    """Give *partial* the permissions of the regular file at *final* it replaces, if any.

    As ``cp`` over an existing file: one kept private (0600) stays so, rather than becoming
    the new file's 0666 less the umask. A file that cannot be looked at is replaced as it is.
    """
    try:
        found = os.stat(final)
        if stat.S_ISREG(found.st_mode):
            os.chmod(partial, stat.S_IMODE(found.st_mode))
    except OSError:
        pass


def remove_partial_files(folder: Path) -> int:
    """Remove the temporary files `atomic_image` left in *folder* when a process was killed.

    Only for a folder this process alone writes to (a batch holds its journal's lock).
    Returns how many were removed.
    """
    removed = 0
    # One entry at a time (Path.glob lists a folder whole): a rerun's folder may hold 100,000
    # images, whose list would be the largest thing the batch ever held (17 MB).
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") and _PARTIAL.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
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
