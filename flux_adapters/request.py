"""The provider-neutral request: `EditRequest` and the image inputs it holds.

Only rules that hold at every provider are checked here (a prompt is present, a size is written
``"WxH"``, a local file exists and is readable). Each provider's limits for each model are data in
``flux_adapters.limits`` and are checked when the request meets a provider.

Local images (a path, raw bytes, a ``data:`` URL) are inspected once, when the request is built:
format and pixel size come from the image header (``imagesize``), without decoding pixels and
without reading a large file more than once. The body is streamed from the file at send time.
"""

from __future__ import annotations

import binascii
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Final, Literal, TypeAlias

import attrs
from attrs import field, frozen

from flux_adapters.errors import RequestError, Violation

__all__ = [
    "MODELS",
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

MODELS: Final = (
    "flux-2-pro",
    "flux-2-max",
    "flux-2-flex",
    "flux-2-klein-4b",
    "flux-2-klein-9b",
    "flux-kontext-pro",
    "flux-kontext-max",
)
"""Canonical model ids (Black Forest Labs' own), in the order tables list them."""

OutputFormat: TypeAlias = Literal["jpeg", "png", "webp"]
_OUTPUT_FORMATS: Final = ("jpeg", "png", "webp")

# The three formats any provider here accepts, told apart by their first bytes.
_SIGNATURES: Final = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"))
_MEDIA_TYPES: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Enough decoded bytes to reach a JPEG's frame header even behind large EXIF/ICC blocks.
_HEADER_BYTES: Final = 2 * 1024 * 1024
_BASE64_CHUNK: Final = 4 * 256 * 1024


@frozen
class ImageInfo:
    """What the header of a local image says.

    Attributes:
        format: ``"png"``, ``"jpeg"`` or ``"webp"``; ``None`` for anything else.
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
        return _MEDIA_TYPES.get(self.format or "", "application/octet-stream")

    @property
    def pixels(self) -> int | None:
        """Width times height, when both are known."""
        if self.width is None or self.height is None:
            return None
        return self.width * self.height


@frozen
class UrlImage:
    """A public ``http(s)`` URL; the provider fetches it."""

    url: str

    def describe(self) -> str:
        """A short, human-readable name for messages."""
        return self.url if len(self.url) <= 80 else self.url[:77] + "..."


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
        return str(self.path)

    def open(self) -> BinaryIO:
        """Open the file for reading, refusing anything but a regular file without blocking.

        Raises:
            RequestError: It is gone, unreadable, or no longer a regular file (a FIFO would
                otherwise block the send forever).
        """
        import stat

        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (OSError, ValueError) as exc:
            raise self._gone(str(getattr(exc, "strerror", None) or exc)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._gone("is no longer a regular file")
        return os.fdopen(fd, "rb")

    def _gone(self, why: str) -> RequestError:
        return RequestError(
            [Violation("images", f"{self.path} {why}", "a readable regular file", str(self.path))]
        )


@frozen
class BytesImage:
    """Raw image bytes held in memory."""

    data: bytes = field(repr=lambda value: f"<{len(value)} bytes>")
    info: ImageInfo

    def describe(self) -> str:
        """A short, human-readable name for messages."""
        return f"{len(self.data)} bytes in memory"


ImageInput: TypeAlias = UrlImage | DataUrlImage | FileImage | BytesImage
"""One reference image, classified and (when local) inspected."""

LocalImage: TypeAlias = DataUrlImage | FileImage | BytesImage

ImageLike: TypeAlias = str | os.PathLike[str] | bytes | ImageInput
"""What ``EditRequest(images=...)`` takes: a URL or data URL string, a path, bytes, an input."""


@frozen
class _Unreadable:
    """Stand-in for an image that could not be classified; never outlives ``EditRequest``."""

    description: str
    problem: str
    limit: str


def _sniff(head: bytes) -> str | None:
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _dimensions(stream: BinaryIO) -> tuple[int | None, int | None]:
    import imagesize  # lazy: only requests with local images pay for it

    try:
        found = imagesize.get_info(
            stream, dpi=False, colors=False, channels=False, exif_rotation=False
        )
    except (ValueError, OSError, IndexError, KeyError, TypeError, EOFError):
        return None, None
    width, height = int(found.width), int(found.height)
    if width <= 0 or height <= 0:
        return None, None
    return width, height


def _inspect(stream: BinaryIO, byte_size: int) -> ImageInfo:
    image_format = _sniff(stream.read(16))
    width, height = _dimensions(stream) if image_format else (None, None)
    return ImageInfo(format=image_format, width=width, height=height, byte_size=byte_size)


def _from_path(path: Path) -> FileImage | _Unreadable:
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            return FileImage(path=path, info=_inspect(stream, size))
    except FileNotFoundError:
        return _Unreadable(str(path), "file not found", "an existing, readable file")
    except IsADirectoryError:
        return _Unreadable(str(path), "is a directory", "an existing, readable file")
    except OSError as exc:
        return _Unreadable(str(path), f"cannot be read ({exc.strerror})", "a readable file")


_DATA_URL = re.compile(
    r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,"
)


def _from_data_url(text: str) -> DataUrlImage | _Unreadable:
    described = f"data URL ({len(text)} characters)"
    match = _DATA_URL.match(text)
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


def _to_image(value: object) -> ImageInput | _Unreadable:
    if isinstance(value, UrlImage | DataUrlImage | FileImage | BytesImage):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if not data:
            return _Unreadable("empty bytes", "is empty", "at least one byte of image data")
        return BytesImage(data=data, info=_inspect(io.BytesIO(data), len(data)))
    if isinstance(value, os.PathLike):
        return _from_path(Path(value))
    if isinstance(value, str):
        if value.startswith(("https://", "http://")):
            return UrlImage(value)
        if value.startswith("data:"):
            return _from_data_url(value)
        shown = value if len(value) <= 60 else value[:57] + "..."
        return _Unreadable(
            shown,
            "is neither an http(s) URL nor a data URL (pass a local file as pathlib.Path)",
            "http(s)://..., data:image/...;base64,..., a Path or bytes",
        )
    return _Unreadable(type(value).__name__, "is not an image input", "str, Path, bytes")


def _to_images(values: Iterable[object]) -> tuple[ImageInput | _Unreadable, ...]:
    if isinstance(values, str | bytes | os.PathLike):
        # A lone image where a list was expected: flagged in __attrs_post_init__.
        return (_Unreadable("a single image", "images must be a list", "a list of images"),)
    return tuple(_to_image(value) for value in values)


_SIZE = re.compile(r"(\d+)x(\d+)")
_RATIO = re.compile(r"(\d+):(\d+)")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@frozen(kw_only=True)
class EditRequest:
    """One image generation or edit, described without reference to any provider.

    With no images it is text-to-image; with images it is an edit, and their order is the
    "image 1", "image 2", ... the prompt refers to. Set at most one of ``width``/``height``
    (together), ``size`` (``"WxH"``) or ``aspect_ratio`` (``"W:H"``); with none, the provider
    decides (for an edit, usually the first image's size).

    Building a request checks the rules that hold everywhere and inspects local images; any
    problem raises `RequestError` listing every problem found. Each provider's own limits are
    checked when the request is sent (or by ``flux_adapters.check``).

    Attributes:
        prompt: What to generate or how to edit.
        model: A canonical model id, one of ``flux_adapters.MODELS``.
        images: Reference images: URL or data URL strings, paths, bytes, in order.
        width: Output width in pixels (with ``height``).
        height: Output height in pixels (with ``width``).
        size: Output size as ``"WxH"``, for providers that take that form.
        aspect_ratio: Output aspect ratio as ``"W:H"``; the provider picks the pixel size.
        seed: Fixed seed for reproducible output.
        output_format: ``"jpeg"``, ``"png"`` or ``"webp"``.
        safety_tolerance: Moderation level (0 strictest); the range depends on the provider.
        prompt_upsampling: Let the provider rewrite the prompt.
        steps: Inference steps (FLUX.2 [flex] only).
        guidance: Guidance scale (FLUX.2 [flex] only).
        allow_conversions: Let an adapter express a setting its provider cannot take exactly in
            the nearest form it can (e.g. a size as an aspect ratio), reporting each conversion
            as a warning on the result. Off by default: such a request is refused.
    """

    prompt: str
    model: str
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
        found = list(_universal_violations(self))
        if found:
            model: object = self.model
            raise RequestError(found, model=model if isinstance(model, str) else None)

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


def _universal_violations(request: EditRequest) -> Iterable[Violation]:
    # Read the fields as plain objects: callers may pass anything, whatever the annotations say.
    given: dict[str, object] = attrs.asdict(request, recurse=False)
    prompt = given["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        yield Violation("prompt", "must be a non-empty string", "non-empty text", repr(prompt))
    if given["model"] not in MODELS:
        yield Violation(
            "model", "is not a known FLUX model id", ", ".join(MODELS), repr(given["model"])
        )
    yield from _image_violations(request.images)
    yield from _geometry_violations(given)
    for name, low in (("seed", 0), ("safety_tolerance", 0), ("steps", 1)):
        value = given[name]
        if value is not None and not (_is_int(value) and value >= low):  # type: ignore[operator]
            yield Violation(
                name, f"must be a whole number of at least {low}", f">= {low}", repr(value)
            )
    output_format = given["output_format"]
    if output_format is not None and output_format not in _OUTPUT_FORMATS:
        yield Violation(
            "output_format",
            "is not an image format",
            " / ".join(_OUTPUT_FORMATS),
            repr(output_format),
        )
    for name in ("prompt_upsampling", "allow_conversions"):
        value = given[name]
        if value is not None and not isinstance(value, bool):
            yield Violation(name, "must be True or False", "a bool", repr(value))
    guidance = given["guidance"]
    if guidance is not None and not (
        isinstance(guidance, int | float)
        and not isinstance(guidance, bool)
        and math.isfinite(guidance)
    ):
        yield Violation("guidance", "must be a finite number", "a number", repr(guidance))


def _image_violations(images: Sequence[object]) -> Iterable[Violation]:
    for index, image in enumerate(images):
        if isinstance(image, _Unreadable):
            yield Violation(
                f"images[{index}]",
                f"{image.description} {image.problem}",
                image.limit,
                image.description,
            )


def _matches(pattern: re.Pattern[str], value: object) -> bool:
    match = pattern.fullmatch(value) if isinstance(value, str) else None
    return match is not None and all(int(part) > 0 for part in match.groups())


def _geometry_violations(given: dict[str, object]) -> Iterable[Violation]:
    width, height, size, ratio = (
        given["width"],
        given["height"],
        given["size"],
        given["aspect_ratio"],
    )
    ways = [
        name
        for name, present in (
            ("width/height", width is not None or height is not None),
            ("size", size is not None),
            ("aspect_ratio", ratio is not None),
        )
        if present
    ]
    if len(ways) > 1:
        yield Violation(
            "size",
            "give only one way to set the output size",
            "one of width/height, size, aspect_ratio",
            " and ".join(ways),
        )
    for name, value in (("width", width), ("height", height)):
        if value is not None and not (_is_int(value) and value > 0):  # type: ignore[operator]
            yield Violation(name, "must be a positive whole number of pixels", "> 0", repr(value))
    if (width is None) != (height is None):
        missing = "height" if height is None else "width"
        yield Violation(
            missing, "width and height go together", "both or neither", f"{missing} missing"
        )
    if size is not None and not _matches(_SIZE, size):
        yield Violation(
            "size", 'must be written "WxH" with positive whole numbers', '"1024x768"', repr(size)
        )
    if ratio is not None and not _matches(_RATIO, ratio):
        yield Violation(
            "aspect_ratio",
            'must be written "W:H" with positive whole numbers',
            '"16:9"',
            repr(ratio),
        )
