"""The provider-neutral request: `EditRequest` and the image inputs it holds.

Only rules that hold at every provider are checked here (a prompt is present, a size is written
``"WxH"``, a local file exists and is a regular, readable file, every value has the right type and
lies within a generous universal bound). Each provider's limits for each model are data in
``flux_adapters.limits`` and are checked when the request meets a provider.

Any value for any field either builds a request or raises `RequestError`; user code reached on the
way (an iterator, ``__fspath__``, ``__repr__``) may fail and is reported as a violation too.

Local images (a path, raw bytes, a ``data:`` URL) are inspected once, when the request is built:
format and pixel size come from the image header (``imagesize``), without decoding pixels and
without reading a large file more than once. The body is streamed from the file at send time,
opened again with `FileImage.open`, which refuses anything but a regular file.

Images people have in hand are taken too, and turned into bytes when the request is built (never
later, so a request holds no open stream and can be sent twice): a binary file object (anything
whose ``read()`` returns bytes) is read once from where it stands to its end, at most
`MAX_READ_BYTES`; a Pillow image is encoded to PNG, losslessly, and Pillow is never imported to
find out (an object can be a Pillow image only once the caller imported it).
"""

from __future__ import annotations

import binascii
import functools
import io
import os
import re
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    BinaryIO,
    Final,
    Literal,
    NamedTuple,
    Protocol,
    TypeAlias,
    get_args,
)

from flux_adapters._display import (
    describe_exception,
    printable,
    render_value,
    short_path,
    shown_url,
    type_name,
)
from flux_adapters._files import MEDIA_TYPES, SNIFF_BYTES, image_format
from flux_adapters._ids import ModelId
from flux_adapters.errors import RequestError, Violation

if TYPE_CHECKING:
    from attrs import field, frozen
    from PIL.Image import Image as PILImage
else:  # attrs classes made on first use: importing this module does not import attrs
    from flux_adapters._lazy_attrs import field, frozen

__all__ = [
    "MAX_ENCODED_PIXELS",
    "MAX_GUIDANCE",
    "MAX_IMAGES",
    "MAX_READ_BYTES",
    "MAX_SAFETY_TOLERANCE",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_STEPS",
    "MAX_URL_LENGTH",
    "MODELS",
    "BinaryReadable",
    "BytesImage",
    "DataUrlImage",
    "EditRequest",
    "FileImage",
    "ImageInfo",
    "ImageInput",
    "ImageLike",
    "OutputFormat",
    "UrlImage",
]

MODELS: Final[tuple[ModelId, ...]] = get_args(ModelId)
"""Canonical model ids (Black Forest Labs' own), in the order tables list them (`ModelId`)."""

# Universal bounds: far beyond anything a provider takes (providers' own, tighter limits are data
# in flux_adapters.limits), but small enough that no arithmetic overflows, no int is too long to
# print (Python refuses str() of ints over 4300 digits) and nothing json.dumps refuses is built.
MAX_SIDE: Final = 100_000
"""Largest ``width``/``height``, ``size`` side or ``aspect_ratio`` term, in pixels."""
MAX_SEED: Final = 2**63 - 1
"""Largest ``seed``: a signed 64-bit integer (seeds start at 0)."""
MAX_STEPS: Final = 1_000
"""Largest ``steps`` (FLUX.2 [flex] documents at most 50)."""
MAX_SAFETY_TOLERANCE: Final = 100
"""Largest ``safety_tolerance`` (providers document 0..6 at most)."""
MAX_GUIDANCE: Final = 100.0
"""Largest ``guidance`` (providers document at most 20); the least is 0."""
MAX_IMAGES: Final = 100
"""Most reference images one request may hold (providers take at most 8)."""
MAX_URL_LENGTH: Final = 8_192
"""Longest image URL, in characters."""
MAX_READ_BYTES: Final = 64 * 1024 * 1024
"""Most bytes read from a binary file object, or made by encoding a Pillow image: three times any
provider's limit (20 MB), so that a provider's own limit is what refuses a large image, by name,
while an endless stream is never read past this (plus one byte, to know it is longer)."""
MAX_ENCODED_PIXELS: Final = 50_000_000
"""Largest Pillow image encoded (width times height): providers take at most 20 MP, and
encoding a larger one would take long only to be refused."""

OutputFormat: TypeAlias = Literal["jpeg", "png", "webp"]
_OUTPUT_FORMATS: Final = ("jpeg", "png", "webp")

# Enough decoded bytes to reach a JPEG's frame header even behind large EXIF/ICC blocks.
_HEADER_BYTES: Final = 2 * 1024 * 1024
_BASE64_CHUNK: Final = 4 * 256 * 1024
# Longest rendering of a value in a message: enough to recognise it, never a flood.

# O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
# O_NOCTTY: opening a terminal never makes it ours. Both exist only on POSIX; Windows has no FIFOs.
_OPEN_FLAGS: Final = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_REGULAR_FILE: Final = "a regular image file"
_PATH: Final = type(Path())  # PosixPath or WindowsPath

# ASCII digits only, and few of them: int() never sees a 5,000-digit or Arabic-Indic number.
_SIZE: Final = re.compile(r"([0-9]{1,6})x([0-9]{1,6})", re.ASCII)
_RATIO: Final = re.compile(r"([0-9]{1,6}):([0-9]{1,6})", re.ASCII)
# Patterns only non-ASCII text, an image URL or a data URL needs: re compiles each when first
# used, and keeps it (compiling all three here cost more than the rest of this module's body).
_LONE_SURROGATE: Final = "[\ud800-\udfff]"
# Whitespace (Unicode's too) and control characters, which a URL must carry percent-encoded.
_URL_FORBIDDEN: Final = r"[\x00-\x20\x7f-\x9f\s]"
_DATA_URL: Final = r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,"
# The limits a refusal names, written once: every request is checked, few are refused.
_MODELS_LIMIT: Final = ", ".join(MODELS)
_MODEL_SET: Final = frozenset(MODELS)
_FORMATS_LIMIT: Final = " / ".join(_OUTPUT_FORMATS)
_SIDES_LIMIT: Final = f"1..{MAX_SIDE}"
_PAIRS: Final = (("size", _SIZE, "WxH", '"1024x768"'), ("aspect_ratio", _RATIO, "W:H", '"16:9"'))


def _surrogate_at(text: str) -> int | None:
    """Index of the first lone surrogate in *text*, if any.

    A lone surrogate is what decoding bad UTF-8 with ``errors="surrogateescape"`` leaves behind;
    no encoder takes it, so it would fail later, when the body is encoded.
    """
    if text.isascii():
        return None
    found = re.search(_LONE_SURROGATE, text)
    return None if found is None else found.start()


def _surrogate_message(text: str, at: int) -> tuple[str, str]:
    context = render_value(text[max(0, at - 20) : at + 20])
    return f"contains a lone surrogate at index {at} (invalid UTF-8?)", context


def _as_text(value: object) -> str | None:
    """*value* as a plain ``str`` when it is one (a subclass is copied); else ``None``."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[return-value]
    if issubclass(kind, str):
        # str.__str__ copies the characters without calling anything the subclass overrides.
        return str.__str__(value)
    return None


def _is(value: object, kinds: type | tuple[type, ...]) -> bool:
    """``isinstance`` that asks only the real type: a ``__class__`` property cannot lie or raise.

    An abstract base class (``os.PathLike``) reads attributes of the type, which a hostile
    metaclass may refuse; such a type is taken to be none of *kinds*.
    """
    try:
        return issubclass(type(value), kinds)
    except Exception:
        return False


def _not_text(name: str, value: object, limit: str) -> Violation:
    if _is(value, (bytes, bytearray, memoryview)):
        return Violation(
            name, "must be text, not bytes; decode it first", limit, render_value(value)
        )
    return Violation(
        name, f"must be text (str), not {type_name(value)}", limit, render_value(value)
    )


# --- Image inputs ---------------------------------------------------------------------------


@frozen
class ImageInfo:
    """What the header of a local image says.

    Attributes:
        format: ``"png"``, ``"jpeg"`` or ``"webp"``; a format providers do not take, named so
            that an error can say which (``"gif"``, ``"bmp"``, ``"tiff"``, ``"heic"``,
            ``"avif"``, ... see ``flux_adapters._files.image_format``); ``None`` for data that
            is no image format known here.
        width: Pixel width, or ``None`` when the header could not be read.
        height: Pixel height, or ``None`` when the header could not be read.
        byte_size: Size of the image file in bytes (decoded, for a data URL).
    """

    format: str | None
    width: int | None
    height: int | None
    byte_size: int

    @property
    def media_type(self) -> str:
        """The media type to declare when sending the image."""
        return MEDIA_TYPES.get(self.format or "", "application/octet-stream")

    @property
    def pixels(self) -> int | None:
        """Width times height, when both are known."""
        if self.width is None or self.height is None:
            return None
        return self.width * self.height


@frozen
class UrlImage:
    """A public ``http(s)`` URL; the provider fetches it."""

    url: str = field(repr=lambda url: repr(shown_url(url)))
    """The URL (its user info and query are hidden in the repr and in messages)."""

    def describe(self) -> str:
        """A short, human-readable name for messages."""
        return printable(shown_url(self.url))


@frozen
class DataUrlImage:
    """A ``data:image/...;base64,`` URL, sent as it is to JSON providers."""

    data_url: str = field(repr=lambda value: f"<data URL, {len(value)} characters>")
    info: ImageInfo
    payload_offset: int
    """Index in ``data_url`` where the base64 payload starts."""

    def describe(self) -> str:
        """A short, human-readable name for messages."""
        return f"data URL ({self.info.byte_size} bytes)"

    def decode(self) -> bytes:
        """Return the decoded image bytes."""
        return binascii.a2b_base64(self.data_url[self.payload_offset :])


@frozen
class FileImage:
    """A local file; read from disk while the request body is sent."""

    path: Path
    info: ImageInfo

    def describe(self) -> str:
        """A short, human-readable name for messages."""
        return short_path(str(self.path))

    def open(self) -> BinaryIO:
        """Open the file for reading, as the request body is sent.

        Only a regular file is opened: a FIFO, a device (``/dev/zero``, ``/dev/stdin``), a
        directory or a socket is refused without waiting on it or reading it, even if the path
        was swapped for one after the request was built. The check and the open cannot race: the
        file is opened without blocking and the open descriptor itself is checked.

        Raises:
            RequestError: The path is no longer a readable regular file.
        """
        descriptor = self._descriptor()
        try:
            # O_NONBLOCK stays set: it has no effect on a regular file. The caller closes it.
            return open(descriptor, "rb")
        except BaseException:
            os.close(descriptor)
            raise

    def _descriptor(self) -> int:
        """`open`'s checks, without a file object: the open descriptor, for the caller to close.

        The body of a JSON request reads it with ``os.read`` (a Python file object costs three
        system calls and as many instructions as the checks themselves).

        Raises:
            RequestError: The path is no longer a readable regular file.
        """
        opened = _regular_descriptor(self.path)
        if isinstance(opened, _Refused):
            shown = self.describe()
            raise RequestError(
                [Violation("images", f"{shown} {opened.problem}", opened.limit, shown)]
            )
        return opened[0]


@frozen
class BytesImage:
    """Image bytes held in memory: given as bytes, read from a file object, or a Pillow image.

    Attributes:
        data: The image bytes.
        info: What its header says.
        source: Where the bytes came from, for messages: a file object's name
            (``'photos/cat.png'``; ``'<BytesIO object>'`` when it has none), or ``'a PIL image
            (640x480)'``; ``None`` for bytes given as they are.
    """

    data: bytes = field(repr=lambda value: f"<{len(value)} bytes>")
    info: ImageInfo
    source: str | None = None

    def describe(self) -> str:
        """A short, human-readable name for messages."""
        if self.source is not None:
            return f"{self.source} ({len(self.data)} bytes)"
        return f"{len(self.data)} bytes in memory"


ImageInput: TypeAlias = UrlImage | DataUrlImage | FileImage | BytesImage
"""One reference image, classified and (when local) inspected."""

LocalImage: TypeAlias = DataUrlImage | FileImage | BytesImage


class BinaryReadable(Protocol):
    """A binary file object: ``open(path, "rb")``, ``io.BytesIO``, a spooled temporary file..."""

    def read(self, size: int = ..., /) -> bytes:
        """Up to *size* bytes; ``b""`` at the end."""


if TYPE_CHECKING:  # Pillow is an optional dependency: type checkers see its Image class
    ImageLike: TypeAlias = (
        str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryReadable | PILImage
    ) | ImageInput
else:  # at run time, the same union without Pillow's class (which is never imported here)
    ImageLike = (
        str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryReadable | ImageInput
    )
"""One image as ``EditRequest(images=...)`` takes it: an ``http(s)`` URL or ``data:`` URL
string, a path, bytes, a binary file object, a Pillow image, or an `ImageInput`."""

_IMAGE_INPUTS: Final = (UrlImage, DataUrlImage, FileImage, BytesImage)
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)
_IMAGE_LIMIT: Final = (
    "an http(s) URL or data URL str, a pathlib.Path, bytes, a binary file object or a PIL image"
)
_READ_CHUNK: Final = 1024 * 1024
# Modes Pillow writes to PNG as they are (PngImagePlugin._OUTMODES, without the packed
# variants): any other would be converted, which is not what "lossless" promises.
_PNG_MODES: Final = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"})


@frozen
class _Unreadable:
    """Stand-in for an image that could not be classified; never outlives ``EditRequest``.

    With ``whole``, the problem is with ``images`` itself (not a list, too many, ...).
    """

    description: str
    problem: str
    limit: str
    whole: bool = False


def _whole(problem: str, limit: str, shown: str) -> _Unreadable:
    return _Unreadable(shown, problem, limit, whole=True)


def _dimensions(stream: BinaryIO) -> tuple[int | None, int | None]:
    import imagesize  # lazy: only requests with local images pay for it

    try:
        found = imagesize.get_info(
            stream, dpi=False, colors=False, channels=False, exif_rotation=False
        )
        width, height = int(found.width), int(found.height)
    except Exception:  # a parser of hostile bytes: any failure means "no readable header"
        return None, None
    if width <= 0 or height <= 0:
        return None, None
    return width, height


def _inspect(stream: BinaryIO, byte_size: int) -> ImageInfo:
    found = image_format(stream.read(SNIFF_BYTES))
    width, height = _dimensions(stream) if found else (None, None)
    return ImageInfo(format=found, width=width, height=height, byte_size=byte_size)


_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(mode: int) -> tuple[str, str] | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return f"is {kind}, not a regular file", _REGULAR_FILE


def _os_problem(error: OSError) -> tuple[str, str]:
    import errno

    if isinstance(error, FileNotFoundError):
        return "file not found", "an existing, readable file"
    if isinstance(error, NotADirectoryError):
        return "is not a file path: a part of it is not a directory", "an existing file"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not a regular file", _REGULAR_FILE
    if isinstance(error, PermissionError):
        return "cannot be read (permission denied)", "a readable file"
    reasons = {
        errno.ENAMETOOLONG: ("path is too long", "a path the system accepts"),
        errno.ELOOP: ("has a loop of symbolic links", "a path that leads to a file"),
        errno.ENXIO: ("is a device or socket that cannot be opened", _REGULAR_FILE),
    }
    fallback = (
        f"cannot be read ({printable(error.strerror or type(error).__name__)})",
        "a readable file",
    )
    return reasons.get(error.errno or 0, fallback)


class _Refused(NamedTuple):
    """Why a path is not opened as a regular file."""

    problem: str
    limit: str


def _regular_descriptor(path: Path) -> tuple[int, os.stat_result] | _Refused:
    """Open *path* for reading when it is a regular file: the descriptor and its ``fstat``.

    Else why not (`_Refused`). The path is looked at first (``stat``), so a device or FIFO is
    never opened at all; the open itself cannot block (``O_NONBLOCK``) and its descriptor is
    checked again (``fstat``), so a path swapped in between is refused too.
    """
    try:
        found = _not_regular(os.stat(path).st_mode)
        if found is not None:
            return _Refused(*found)
        descriptor = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        return _Refused(*_os_problem(error))
    except (ValueError, UnicodeError):  # a NUL character; a name the file system cannot encode
        return _Refused(
            "path cannot be passed to the operating system",
            "a path without NUL or lone surrogates",
        )
    try:
        status = os.fstat(descriptor)
        found = _not_regular(status.st_mode)
    except BaseException:
        os.close(descriptor)
        raise
    if found is not None:
        os.close(descriptor)
        return _Refused(*found)
    return descriptor, status


_INSPECTED: Final[dict[tuple[str | int, ...], ImageInfo]] = {}
"""What the header of a file said, by its path and the file's identity and state as ``fstat``
gives them (device, inode, size, and the times of its last change, in nanoseconds; the path too,
for file systems that number no inodes): a request that names the same unchanged file again (an
image sent with every call) is not read again. Bounded."""
_MOST_INSPECTED: Final = 4096
_SETTLED_NS: Final = 2_000_000_000
"""A file changed less than this long ago is read every time: a write within the same tick of
the file system's clock leaves its times as they were (git's "racily clean" files)."""


def _from_path(path: Path) -> FileImage | _Unreadable:
    text = str(path)  # shown (`short_path`) only in an error: every edit names its files
    if "\0" in text:
        return _Unreadable(short_path(text), "path contains a NUL character", "a path without NUL")
    at = _surrogate_at(text)
    if at is not None:
        return _Unreadable(
            short_path(text),
            f"path has a lone surrogate at index {at}: the name is not valid UTF-8; rename it",
            "a path in valid Unicode",
        )
    opened = _regular_descriptor(path)
    if isinstance(opened, _Refused):
        return _Unreadable(short_path(text), opened.problem, opened.limit)
    descriptor, status = opened
    if status.st_size == 0:  # not "in no known image format": nothing is in it at all
        os.close(descriptor)
        return _Unreadable(short_path(text), "is empty", "at least one byte of image data")
    key = (
        text,
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )
    info = _INSPECTED.get(key)
    if info is not None:
        os.close(descriptor)
        return FileImage(path=path, info=info)
    try:
        stream = open(descriptor, "rb")  # noqa: SIM115 - closed by the with below
    except BaseException:
        os.close(descriptor)
        raise
    with stream:
        info = _inspect(stream, status.st_size)
    if time.time_ns() - max(status.st_mtime_ns, status.st_ctime_ns) > _SETTLED_NS:
        if len(_INSPECTED) >= _MOST_INSPECTED:
            _INSPECTED.clear()
        _INSPECTED[key] = info
    return FileImage(path=path, info=info)


def _from_path_like(value: object) -> FileImage | _Unreadable:
    if type(value) is _PATH:
        return _from_path(value)  # the common case: nothing to distrust
    try:
        raw: object = os.fspath(value)  # type: ignore[call-overload]
    except Exception as error:  # __fspath__ is user code: it may raise or return a non-path
        return _Unreadable(
            f"<{type_name(value)} object>",
            f"is not a usable path (__fspath__ failed: {describe_exception(error)})",
            "a path whose __fspath__ returns str",
        )
    try:
        # os.fspath returned a str or bytes (or a subclass, whose methods are not trusted).
        text = (
            os.fsdecode(bytes(memoryview(raw)))  # type: ignore[arg-type]
            if _is(raw, bytes)
            else str.__str__(raw)
        )
    except Exception as error:
        return _Unreadable(
            f"<{type_name(value)} object>",
            f"is not a usable path ({describe_exception(error)})",
            "a path whose __fspath__ returns str",
        )
    return _from_path(Path(text))


def _from_data_url(text: str) -> DataUrlImage | _Unreadable:
    described = f"data URL ({len(text)} characters)"
    if not text.isascii():
        return _Unreadable(described, "contains non-ASCII characters", "an ASCII base64 data URL")
    match = re.match(_DATA_URL, text, re.ASCII)
    if match is None:
        return _Unreadable(described, "is not a base64 data URL", "data:image/<type>;base64,<data>")
    offset = match.end()
    if (len(text) - offset) % 4:
        return _Unreadable(described, "has a truncated base64 payload", "a whole base64 payload")
    head = bytearray()
    size = 0
    try:
        # Decode in slices so a 20 MB image never needs a second 20 MB copy just to be checked.
        for start in range(offset, len(text), _BASE64_CHUNK):
            chunk = binascii.a2b_base64(text[start : start + _BASE64_CHUNK], strict_mode=True)
            size += len(chunk)
            if len(head) < _HEADER_BYTES:
                head += chunk
    except (binascii.Error, ValueError):
        return _Unreadable(described, "has invalid base64 data", "standard base64 without spaces")
    if size == 0:
        return _Unreadable(described, "is empty", "at least one byte of image data")
    info = _inspect(io.BytesIO(bytes(head)), size)
    return DataUrlImage(data_url=text, info=info, payload_offset=offset)


def _url_problem(url: str) -> tuple[str, str] | None:
    """Why *url* is not a URL a provider can fetch, as (problem, limit); ``None`` when it is."""
    if len(url) > MAX_URL_LENGTH:
        return "is too long", f"at most {MAX_URL_LENGTH} characters"
    forbidden = re.search(_URL_FORBIDDEN, url)
    if forbidden is not None:
        return (
            f"contains whitespace or a control character at index {forbidden.start()}",
            "a URL with those percent-encoded",
        )
    from urllib.parse import urlsplit  # lazy: only requests with URL images pay for it

    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises ValueError for a bad port
    except ValueError as error:
        return f"is not a valid URL ({describe_exception(error)})", "a valid http(s) URL"
    if parts.scheme.lower() not in ("http", "https"):
        return "is not an http(s) URL", "http://... or https://..."
    if not host:
        return "has no host", "http(s)://host/..."
    return None


def _from_text(text: str) -> ImageInput | _Unreadable:
    at = _surrogate_at(text)
    if at is not None:
        message, _ = _surrogate_message(text, at)
        return _Unreadable(render_value(text), message, "text in valid Unicode")
    scheme = text[:8].lower()
    if scheme.startswith(("https://", "http://")):
        problem = _url_problem(text)
        if problem is not None:
            return _Unreadable(render_value(shown_url(text)), *problem)
        return UrlImage(text)
    if scheme.startswith("data:"):
        return _from_data_url(text)
    return _Unreadable(
        render_value(shown_url(text)),
        "is neither an http(s) URL nor a data URL (pass a local file as pathlib.Path)",
        "http(s)://..., data:image/...;base64,..., a Path or bytes",
    )


def _from_bytes(value: object, source: str | None = None) -> BytesImage | _Unreadable:
    try:
        data = value if type(value) is bytes else bytes(memoryview(value))  # type: ignore[arg-type]
    except Exception as error:  # a released memoryview; a buffer that refuses to be read
        return _Unreadable(
            f"<{type_name(value)} object>",
            f"cannot be read ({describe_exception(error)})",
            "bytes of an image",
        )
    if not data:
        return _Unreadable("empty bytes", "is empty", "at least one byte of image data")
    return BytesImage(data=data, info=_inspect(io.BytesIO(data), len(data)), source=source)


def _has_method(value: object, name: str) -> bool:
    """Whether *value*'s type has a method *name*; asks the type, never runs the instance's code."""
    try:
        return callable(getattr(type(value), name, None))
    except Exception:  # a metaclass that refuses attribute lookups
        return False


def _stream_name(value: object) -> str:
    """How to name a file object in messages: its file name when it has one (``open()``)."""
    try:
        name: object = getattr(value, "name", None)  # user code: a property may raise
    except Exception:
        name = None
    text = _as_text(name)
    if text:
        return short_path(text)
    return f"<{type_name(value)} object>"


_MB: Final = 1024 * 1024
_READ_LIMIT: Final = f"at most {MAX_READ_BYTES // _MB} MB read from a file object"
_BINARY_STREAM: Final = "a file object opened in binary mode ('rb'), or bytes"


def _from_stream(value: object) -> BytesImage | _Unreadable:
    """Read a binary file object from where it stands to its end: at most `MAX_READ_BYTES` + 1.

    Reads in slices, never asking for more than one byte past the limit in all, so an endless
    stream costs no more than that; the file object is left open (it is the caller's).
    """
    shown = _stream_name(value)
    if _is(value, io.TextIOBase):
        return _Unreadable(
            shown, "is a text file object; open the file with 'rb' (binary)", _BINARY_STREAM
        )
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_READ_BYTES:
        wanted = min(_READ_CHUNK, MAX_READ_BYTES + 1 - size)
        try:
            chunk: object = value.read(wanted)  # type: ignore[attr-defined]
        except Exception as error:  # closed, not readable, or the caller's own code failed
            problem = f"could not be read ({describe_exception(error)})"
            return _Unreadable(shown, problem, _BINARY_STREAM)
        if chunk is None:  # io's answer for "no data yet" on a non-blocking stream
            problem = "has no data ready (a non-blocking stream); read it first and pass bytes"
            return _Unreadable(shown, problem, _BINARY_STREAM)
        if _is(chunk, str):
            problem = "gives text, not bytes; open the file with 'rb' (binary)"
            return _Unreadable(shown, problem, _BINARY_STREAM)
        if not _is(chunk, _BYTES_LIKE):
            problem = f"read() returned {type_name(chunk)}, not bytes"
            return _Unreadable(shown, problem, _BINARY_STREAM)
        try:
            data = bytes(chunk) if type(chunk) is not bytes else chunk  # type: ignore[call-overload]
        except Exception as error:  # a memoryview released under us
            return _Unreadable(shown, f"could not be read ({describe_exception(error)})", "bytes")
        if not data:
            break
        chunks.append(data[: MAX_READ_BYTES + 1 - size])  # a read() that gives more than asked
        size += len(chunks[-1])
    if size > MAX_READ_BYTES:
        return _Unreadable(shown, f"is larger than {MAX_READ_BYTES // _MB} MB", _READ_LIMIT)
    if not size:
        problem = "is empty (at its end: a file object is read from where it stands; seek(0)?)"
        return _Unreadable(shown, problem, "at least one byte of image data")
    return _from_bytes(b"".join(chunks), shown)


def _pil_image_type() -> type | None:
    """Pillow's ``Image`` class, when the caller has imported Pillow; never imports it."""
    module = sys.modules.get("PIL.Image")
    found = getattr(module, "Image", None) if module is not None else None
    return found if isinstance(found, type) else None


class _TooLarge(Exception):
    """An encoded image passed `MAX_READ_BYTES` (internal to `_from_pil`)."""


class _CappedBuffer(io.BytesIO):
    """A ``BytesIO`` that refuses to grow past `MAX_READ_BYTES`."""

    def write(self, data: object, /) -> int:
        if self.tell() + memoryview(data).nbytes > MAX_READ_BYTES:  # type: ignore[arg-type]
            raise _TooLarge
        return super().write(data)  # type: ignore[arg-type]


def _from_pil(value: object) -> BytesImage | _Unreadable:
    """A Pillow image, encoded to PNG as it is: no mode conversion, its ICC profile kept."""
    image: PILImage = value  # type: ignore[assignment]
    try:
        width, height = (int(side) for side in image.size)
        mode = str(image.mode)
        filename = _as_text(getattr(image, "filename", None))
        profile = image.info.get("icc_profile")
    except Exception as error:
        return _Unreadable("a PIL image", f"cannot be read ({describe_exception(error)})", "PNG")
    shown = f"a PIL image ({width}x{height}"
    shown += f", from {short_path(filename)!r})" if filename else ")"
    if width * height > MAX_ENCODED_PIXELS:
        limit = f"at most {MAX_ENCODED_PIXELS / 1_000_000:g} MP"
        return _Unreadable(shown, f"has too many pixels to encode ({width}x{height})", limit)
    if mode not in _PNG_MODES:
        problem = (
            f"is in mode {render_value(mode)}, which PNG cannot hold without converting it; "
            "convert it first, e.g. image.convert('RGB')"
        )
        return _Unreadable(shown, problem, "modes " + ", ".join(sorted(_PNG_MODES)))
    buffer = _CappedBuffer()
    extra = {"icc_profile": profile} if type(profile) is bytes else {}
    try:
        image.save(buffer, format="PNG", **extra)
    except _TooLarge:
        limit = f"at most {MAX_READ_BYTES // _MB} MB as PNG"
        return _Unreadable(shown, f"is larger than {MAX_READ_BYTES // _MB} MB as PNG", limit)
    except Exception as error:  # closed, truncated file behind it, a decompression bomb ...
        problem = f"could not be encoded as PNG ({describe_exception(error)})"
        return _Unreadable(shown, problem, "a readable PIL image")
    return _from_bytes(buffer.getvalue(), shown)


def _recheck(image: ImageInput) -> ImageInput | _Unreadable:
    """Check an image input built elsewhere (by hand, or taken from another request) again.

    Its fields are re-derived from its source (URL, data URL, path or bytes), so a hand-built
    one cannot smuggle in a wrong header or a value of the wrong type.
    """
    shown = f"<{type_name(image)} object>"
    try:
        if _is(image, UrlImage):
            text = _as_text(image.url)  # type: ignore[union-attr]
            if text is None:
                return _Unreadable(shown, "has a url that is not text", "a str URL")
            if not text[:8].lower().startswith(("https://", "http://")):
                return _Unreadable(
                    render_value(text), "is not an http(s) URL", "http://... or https://..."
                )
            return _from_text(text)
        if _is(image, DataUrlImage):
            text = _as_text(image.data_url)  # type: ignore[union-attr]
            if text is None:
                return _Unreadable(shown, "has a data_url that is not text", "a str data URL")
            return _from_data_url(text)
        if _is(image, FileImage):
            path: object = image.path  # type: ignore[union-attr]
            if not _is(path, os.PathLike):
                return _Unreadable(shown, "has a path that is not a path", "a pathlib.Path")
            return _from_path_like(path)
        data: object = image.data  # type: ignore[union-attr]
    except Exception as error:  # a subclass's property may raise anything
        return _Unreadable(shown, f"cannot be read ({describe_exception(error)})", _IMAGE_LIMIT)
    if not _is(data, _BYTES_LIKE):
        return _Unreadable(shown, "has data that is not bytes", "bytes")
    try:
        source = _as_text(image.source)  # type: ignore[union-attr]
    except Exception:
        source = None
    return _from_bytes(data, source)


def _to_image(value: object) -> ImageInput | _Unreadable:
    if _is(value, _IMAGE_INPUTS):
        return _recheck(value)  # type: ignore[arg-type]
    if _is(value, _BYTES_LIKE):
        return _from_bytes(value)
    if _is(value, str):
        return _from_text(str.__str__(value))
    if _is(value, os.PathLike):
        return _from_path_like(value)
    pil = _pil_image_type()
    if pil is not None and _is(value, pil):
        return _from_pil(value)
    if _has_method(value, "read"):
        return _from_stream(value)
    return _Unreadable(
        render_value(value), f"is not an image input (a {type_name(value)})", _IMAGE_LIMIT
    )


def _is_single_image(value: object) -> bool:
    """Whether *value* is one image rather than a collection of them."""
    if _is(value, (str, *_BYTES_LIKE, *_IMAGE_INPUTS, os.PathLike)):
        return True
    pil = _pil_image_type()
    return (pil is not None and _is(value, pil)) or _has_method(value, "read")


_LIST_LIMIT: Final = "an image, or a list of images, e.g. images=[Path('a.png')]"


def _to_images(values: ImageLike | Iterable[object]) -> tuple[ImageInput | _Unreadable, ...]:
    # Typed for callers; at run time *values* may be anything, and every case is reported.
    return _classify(values)


def _classify(values: object) -> tuple[ImageInput | _Unreadable, ...]:
    kind = type(values)
    if kind is tuple or kind is list:
        count = len(values)  # type: ignore[arg-type]
        if not count:
            return ()  # text-to-image: the default (), or []
        if count > MAX_IMAGES:
            return (_whole("too many images", f"at most {MAX_IMAGES}", f"{count} images"),)
        return tuple(_to_image(value) for value in values)  # type: ignore[attr-defined]
    if _is_single_image(values):
        return (_to_image(values),)  # a str is one URL, a BytesIO one image: never iterated
    if values is None:
        return (
            _whole("must be a list of images, not None; pass [] for none", _LIST_LIMIT, "None"),
        )
    if _is(values, (Mapping, Set)):
        # A set has no order, and a dict's keys are no images: "image 1" must mean something.
        problem = f"must be a list of images in order, not a {type_name(values)}"
        return (_whole(problem, _LIST_LIMIT, render_value(values)),)
    return _collect(values)


def _collect(values: object) -> tuple[ImageInput | _Unreadable, ...]:
    """Read images from any iterable, reporting (not raising) what its own code raises."""
    try:
        iterator: Iterator[object] = iter(values)  # type: ignore[call-overload]
    except Exception:
        problem = f"must be a list of images, not a {type_name(values)}"
        return (_whole(problem, _LIST_LIMIT, render_value(values)),)
    images: list[ImageInput | _Unreadable] = []
    while True:
        try:
            value = next(iterator)
        except StopIteration:
            break
        except Exception as error:  # a generator's own code failed
            problem = f"could not be read: iterating it raised {describe_exception(error)}"
            images.append(_whole(problem, _LIST_LIMIT, f"<{type_name(values)} object>"))
            break
        if len(images) == MAX_IMAGES:
            problem = f"has more than {MAX_IMAGES} images"
            images.append(_whole(problem, f"at most {MAX_IMAGES}", f"<{type_name(values)}>"))
            break
        images.append(_to_image(value))
    return tuple(images)


# --- The request ----------------------------------------------------------------------------


@frozen(kw_only=True)
class EditRequest:
    """One image generation or edit, described without reference to any provider.

    With no images it is text-to-image; with images it is an edit, and their order is the
    "image 1", "image 2", ... the prompt refers to. Set at most one of ``width``/``height``
    (together), ``size`` (``"WxH"``) or ``aspect_ratio`` (``"W:H"``); with none, the provider
    decides (for an edit, usually the first image's size).

    Building a request checks the rules that hold everywhere and inspects local images; any
    problem raises `RequestError` listing every problem found, whatever the values given (wrong
    types, huge numbers, text that is not valid Unicode, objects whose methods raise). Each
    provider's own limits are checked when the request is sent (or by ``flux_adapters.check``).

    Rules that hold everywhere: text fields are ``str`` without lone surrogates (what decoding
    invalid UTF-8 with ``surrogateescape`` leaves); whole numbers are ``int`` (not ``bool`` or
    ``float``); every number lies within a universal bound far beyond any provider's own
    (`MAX_SIDE`, `MAX_SEED`, `MAX_STEPS`, `MAX_SAFETY_TOLERANCE`, `MAX_GUIDANCE`); ``images``
    is one image, or a list (or another ordered iterable) of at most `MAX_IMAGES`; a URL is
    ``http(s)`` with a host, no whitespace or control characters and at most `MAX_URL_LENGTH`
    characters; a path names a regular file (never a directory, FIFO, device or socket); a file
    object gives bytes and at most `MAX_READ_BYTES` of them.

    Attributes:
        prompt: What to generate or how to edit; non-empty text.
        model: A canonical model id, one of ``flux_adapters.MODELS`` (typed `ModelId`, so
            ``mypy --strict`` flags a misspelt one; at run time it is a `RequestError`).
        images: Reference images, in order, at most `MAX_IMAGES`; or one image on its own
            (``images=Path("scene.png")``). Each is an ``http(s)`` URL or ``data:`` URL string
            (a plain ``str`` is never taken as a file path: pass a ``pathlib.Path``), a
            ``pathlib.Path`` naming a regular file, bytes, a binary file object (``open(path,
            "rb")``, ``io.BytesIO``: read now, from where it stands to its end, at most
            `MAX_READ_BYTES`, and left open), or a Pillow image (encoded now to PNG,
            losslessly, at most `MAX_ENCODED_PIXELS`). Files named by a path are read when the
            request is sent; everything else is held in memory from now on.
        width: Output width in pixels (with ``height``), 1 to `MAX_SIDE`.
        height: Output height in pixels (with ``width``), 1 to `MAX_SIDE`.
        size: Output size as ``"WxH"``, for providers that take that form; each side 1 to
            `MAX_SIDE`, ASCII digits.
        aspect_ratio: Output aspect ratio as ``"W:H"``; the provider picks the pixel size. Each
            term 1 to `MAX_SIDE`.
        seed: Fixed seed for reproducible output, 0 to `MAX_SEED` (``2**63 - 1``).
        output_format: ``"jpeg"``, ``"png"`` or ``"webp"``.
        safety_tolerance: Moderation level (0 strictest), 0 to `MAX_SAFETY_TOLERANCE`; the
            range a provider takes is narrower.
        prompt_upsampling: Let the provider rewrite the prompt.
        steps: Inference steps (FLUX.2 [flex] only), 1 to `MAX_STEPS`.
        guidance: Guidance scale (FLUX.2 [flex]; aimlapi's FLUX.2 [pro] takes it too, as
            ``guidance_scale``), a finite number from 0 to `MAX_GUIDANCE`.
        allow_conversions: Let an adapter express a setting its provider cannot take exactly in
            the nearest form it can (e.g. a size as an aspect ratio), reporting each conversion
            as a warning on the result. Off by default: such a request is refused.
    """

    prompt: str
    model: ModelId
    images: tuple[ImageInput, ...] = field(default=(), converter=_to_images)
    width: int | None = None
    height: int | None = None
    size: str | None = None
    aspect_ratio: str | None = None
    seed: int | None = None
    output_format: OutputFormat | None = None
    safety_tolerance: int | None = None
    prompt_upsampling: bool | None = None
    steps: int | None = None
    guidance: float | None = None
    allow_conversions: bool = False

    def __attrs_post_init__(self) -> None:
        found = _universal_violations(self)
        if found:
            model = self.model if _is(self.model, str) and self.model in MODELS else None
            raise RequestError(found, model=model)

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """The requested ``(width, height)``, from ``width``/``height`` or ``size``."""
        if self.width is not None and self.height is not None:
            return self.width, self.height
        if self.size is not None:
            width, height = self.size.split("x")
            return int(width), int(height)
        return None

    @property
    def ratio(self) -> tuple[int, int] | None:
        """The requested aspect ratio as ``(w, h)``, when one was given."""
        if self.aspect_ratio is None:
            return None
        width, height = self.aspect_ratio.split(":")
        return int(width), int(height)


# Whole-number fields: (low, high) inclusive.
_WHOLE_NUMBERS: Final = (
    ("seed", 0, MAX_SEED),
    ("safety_tolerance", 0, MAX_SAFETY_TOLERANCE),
    ("steps", 1, MAX_STEPS),
)


def _plainly_valid(request: EditRequest) -> bool:
    """Whether *request* is plainly within every universal rule: the common case, told quickly.

    True only when `_universal_violations` would find nothing and replace nothing: every field
    of its exact built-in type (``str``, ``int``, ``bool``, ``float``; no subclass to copy),
    text in ASCII (no lone surrogate can hide in it), numbers in range, at most one way to set
    the output size, every image readable. Anything else is judged field by field there.
    """
    # Read as plain objects: callers may pass anything, whatever the annotations say.
    prompt: object = request.prompt
    model: object = request.model
    if not (
        type(prompt) is str
        and prompt.isascii()
        and prompt.strip()
        and type(model) is str
        and model in _MODEL_SET
    ):
        return False
    images: Sequence[object] = request.images
    for image in images:
        if type(image) is _Unreadable:
            return False
    width: object = request.width
    height: object = request.height
    size: object = request.size
    ratio: object = request.aspect_ratio
    if width is not None or height is not None:
        if not (
            size is None
            and ratio is None
            and type(width) is int
            and type(height) is int
            and 1 <= width <= MAX_SIDE
            and 1 <= height <= MAX_SIDE
        ):
            return False
    elif size is not None:
        if ratio is not None or type(size) is not str or _parsed_pair(_SIZE, size) is None:
            return False
    elif ratio is not None and (type(ratio) is not str or _parsed_pair(_RATIO, ratio) is None):
        return False
    seed: object = request.seed
    tolerance: object = request.safety_tolerance
    steps: object = request.steps
    if (
        (seed is not None and not (type(seed) is int and 0 <= seed <= MAX_SEED))
        or (
            tolerance is not None
            and not (type(tolerance) is int and 0 <= tolerance <= MAX_SAFETY_TOLERANCE)
        )
        or (steps is not None and not (type(steps) is int and 1 <= steps <= MAX_STEPS))
    ):
        return False
    output_format: object = request.output_format
    if output_format is not None and not (
        type(output_format) is str and output_format in _OUTPUT_FORMATS
    ):
        return False
    upsampling: object = request.prompt_upsampling
    conversions: object = request.allow_conversions
    if (upsampling is not None and type(upsampling) is not bool) or (
        conversions is not None and type(conversions) is not bool
    ):
        return False
    guidance: object = request.guidance
    return guidance is None or (
        (type(guidance) is int or type(guidance) is float) and 0 <= guidance <= MAX_GUIDANCE
    )


def _universal_violations(request: EditRequest) -> list[Violation]:
    """Every rule that holds at every provider, in field order.

    Fields are read as plain objects (callers may pass anything, whatever the annotations say)
    and compared only by their real type; a subclass of ``str``, ``int`` or ``float`` is
    replaced by a plain copy, so no overridden method runs after this point.
    """
    if _plainly_valid(request):
        return []
    found: list[Violation] = []
    prompt = _text_field(request, "prompt", "non-empty text", found)
    if prompt is not None and not prompt.strip():
        found.append(
            Violation("prompt", "must be non-empty text", "non-empty text", render_value(prompt))
        )
    model = _text_field(request, "model", _MODELS_LIMIT, found)
    if model is not None and model not in MODELS:
        from flux_adapters._options import did_you_mean  # lazy: only a wrong id needs difflib

        hint = did_you_mean(model, MODELS) if len(model) <= 64 else ""
        found.append(
            Violation(
                "model",
                f"is not a known FLUX model id{hint}",
                _MODELS_LIMIT,
                render_value(model),
            )
        )
    images: Sequence[object] = request.images
    if images:
        found += _image_violations(images)
    _geometry_violations(request, found)
    for name, low, high in _WHOLE_NUMBERS:
        _whole_field(request, name, low, high, found)
    output_format = _text_field(request, "output_format", _FORMATS_LIMIT, found)
    if output_format is not None and output_format not in _OUTPUT_FORMATS:
        found.append(
            Violation(
                "output_format",
                "is not an image format",
                _FORMATS_LIMIT,
                render_value(output_format),
            )
        )
    for name in ("prompt_upsampling", "allow_conversions"):
        value = getattr(request, name)
        if value is not None and type(value) is not bool:
            found.append(Violation(name, "must be True or False", "a bool", render_value(value)))
    _guidance_field(request, found)
    return found


def _replace(request: EditRequest, name: str, value: object) -> None:
    # The request is frozen; this runs while it is being built, before anyone else sees it.
    object.__setattr__(request, name, value)


def _text_field(request: EditRequest, name: str, limit: str, found: list[Violation]) -> str | None:
    """The field as a plain ``str`` without lone surrogates; ``None`` when unset or refused."""
    value: object = getattr(request, name)
    if value is None and name != "prompt" and name != "model":
        return None
    text = _as_text(value)
    if text is None:
        found.append(_not_text(name, value, limit))
        return None
    if text is not value:
        _replace(request, name, text)
    at = _surrogate_at(text)
    if at is not None:
        message, shown = _surrogate_message(text, at)
        found.append(Violation(name, message, "text in valid Unicode", shown))
        return None
    return text


def _whole_number(value: object) -> int | None:
    """*value* as a plain ``int`` when it is one (not a ``bool``); else ``None``."""
    kind = type(value)
    if kind is int:
        return value  # type: ignore[return-value]
    if kind is bool or not issubclass(kind, int):
        return None
    return int.__index__(value)  # type: ignore[arg-type]  # a plain copy of an int subclass


def _whole_field(
    request: EditRequest, name: str, low: int, high: int, found: list[Violation]
) -> None:
    value: object = getattr(request, name)
    if value is None:
        return
    number = _whole_number(value)
    if number is None:
        found.append(
            Violation(
                name,
                f"must be a whole number (int) from {low} to {high}, not {type_name(value)}",
                f"{low}..{high}",
                render_value(value),
            )
        )
    elif not low <= number <= high:
        found.append(Violation(name, "is out of range", f"{low}..{high}", render_value(number)))
    elif number is not value:
        _replace(request, name, number)


def _guidance_field(request: EditRequest, found: list[Violation]) -> None:
    value: object = request.guidance
    if value is None:
        return
    number: int | float | None = _whole_number(value)
    kind = type(value)
    if number is None and kind is not bool and issubclass(kind, float):
        number = float.__float__(value)  # type: ignore[arg-type]  # a plain copy of a subclass
    limit = f"0..{MAX_GUIDANCE:g}"
    if number is None:
        found.append(
            Violation(
                "guidance",
                f"must be a number (int or float), not {type_name(value)}",
                limit,
                render_value(value),
            )
        )
    # Exact comparisons: NaN and the infinities fail them, and a huge int is compared exactly.
    elif not 0 <= number <= MAX_GUIDANCE:
        found.append(
            Violation("guidance", "must be a finite number in range", limit, render_value(number))
        )
    elif number is not value:
        _replace(request, "guidance", number)


def _image_violations(images: Sequence[object]) -> list[Violation]:
    found = []
    for index, image in enumerate(images):
        if isinstance(image, _Unreadable):
            if image.whole:
                found.append(Violation("images", image.problem, image.limit, image.description))
            else:
                found.append(
                    Violation(
                        f"images[{index}]",
                        f"{image.description} {image.problem}",
                        image.limit,
                        image.description,
                    )
                )
    return found


def _parsed_pair(pattern: re.Pattern[str], value: str) -> tuple[int, int] | None:
    """``(a, b)`` from ``"AxB"`` / ``"A:B"`` when both are whole numbers from 1 to MAX_SIDE."""
    if len(value) <= _PAIR_CHARS:  # the longest that can be one: "100000x100000"
        return _known_pair(pattern, value)
    return None


_PAIR_CHARS: Final = 13


@functools.lru_cache(maxsize=256)
def _known_pair(pattern: re.Pattern[str], value: str) -> tuple[int, int] | None:
    """`_parsed_pair` of a short *value*, remembered: requests ask for a few sizes and ratios."""
    match = pattern.fullmatch(value)
    if match is None:
        return None
    first, second = int(match[1]), int(match[2])  # at most six ASCII digits each
    if not (1 <= first <= MAX_SIDE and 1 <= second <= MAX_SIDE):
        return None
    return first, second


def _geometry_violations(request: EditRequest, found: list[Violation]) -> None:
    width: object = request.width
    height: object = request.height
    size: object = request.size
    ratio: object = request.aspect_ratio
    sides_given = width is not None or height is not None
    if not sides_given and size is None and ratio is None:
        return
    if sides_given + (size is not None) + (ratio is not None) > 1:
        ways = [
            name
            for name, present in (
                ("width/height", sides_given),
                ("size", size is not None),
                ("aspect_ratio", ratio is not None),
            )
            if present
        ]
        found.append(
            Violation(
                "size",
                "give only one way to set the output size",
                "one of width/height, size, aspect_ratio",
                " and ".join(ways),
            )
        )
    sides = _SIDES_LIMIT
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        number = _whole_number(value)
        if number is None:
            found.append(
                Violation(
                    name,
                    f"must be a whole number (int) of pixels, not {type_name(value)}",
                    sides,
                    render_value(value),
                )
            )
        elif not 1 <= number <= MAX_SIDE:
            found.append(Violation(name, "is out of range", sides, render_value(number)))
        elif number is not value:
            _replace(request, name, number)
    if (width is None) != (height is None):
        missing = "height" if height is None else "width"
        found.append(
            Violation(
                missing, "width and height go together", "both or neither", f"{missing} missing"
            )
        )
    for name, pattern, form, example in _PAIRS:
        text = _text_field(request, name, example, found)
        if text is not None and _parsed_pair(pattern, text) is None:
            found.append(
                Violation(
                    name,
                    f'must be written "{form}" with whole numbers from 1 to {MAX_SIDE}',
                    example,
                    render_value(text),
                )
            )
