"""Turn body descriptions into bytes on the wire, streamed, with the length known up front.

A JSON body is encoded once into segments: runs of already-encoded JSON text and the local
images whose base64 goes between them (a data URL's ``data:image/...;base64,`` head goes with
the text before it, so each image is one run of base64 between two runs of text). While
sending, each image is read and base64-encoded slice by slice, so eight 20 MB images never sit
in memory as one 213 MB string, and httpx is never handed one large ``bytes`` object (which
httpx 0.28 sends slowly).

A file is read as it was measured: exactly ``byte_size`` bytes, each slice with one ``read``
of its exact size (a read of more than is left allocates the larger size first) on the
descriptor `FileImage` opened and checked (`MeasuredFile`, no buffered file object), and a file
that is shorter or longer by then stops the body before its last slice goes out.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, Final

import httpx

from flux_adapters._files import MEDIA_TYPES
from flux_adapters.errors import RequestError, Violation
from flux_adapters.request import DataUrlImage, FileImage, LocalImage, _os_problem
from flux_adapters.wire import ImageValue, JsonBody, JsonValue

_READ_SIZE: Final = 3 * 256 * 1024
"""Bytes of an image encoded at a time (768 KiB in, 1 MiB of base64 out): whole base64 quanta,
so the slices' base64 joins up without padding."""
_ONE_SLICE: Final = _READ_SIZE + _READ_SIZE // 2
"""The largest image encoded in one slice (1.1 MiB): a 1 MiB image goes out as one run of
base64 rather than as 768 KiB and then 256 KiB; larger ones go in `_READ_SIZE` slices."""

Segment = bytes | LocalImage
"""Encoded JSON text, or an image that stands for its base64 payload (no ``data:`` head)."""


@functools.cache
def _b64encode() -> Callable[[bytes | memoryview], bytes]:
    """Return the fastest base64 encoder installed (standard alphabet, no newline).

    pybase64's SIMD encoder (the ``fast`` extra) is about 8x faster than the standard library's;
    both give identical output.
    """
    try:
        import pybase64

        encode: Callable[[bytes | memoryview], bytes] = pybase64.b64encode
    except ImportError:
        import binascii

        encode = functools.partial(binascii.b2a_base64, newline=False)
    return encode


_PREFIXES: Final = {
    found: f"data:{media_type};base64,".encode("ascii") for found, media_type in MEDIA_TYPES.items()
}
"""The ``data:`` head of a local image of each format (`ImageInfo.media_type`'s)."""
_OCTET_PREFIX: Final = b"data:application/octet-stream;base64,"


def _prefix(image: LocalImage) -> bytes:
    return _PREFIXES.get(image.info.format or "", _OCTET_PREFIX)


def _head(value: ImageValue) -> bytes:
    """The text sent before *value*'s base64 payload: its data URL head, or nothing when bare."""
    if value.bare:
        return b""
    image = value.image
    if isinstance(image, DataUrlImage):
        return image.data_url[: image.payload_offset].encode("ascii")
    return _prefix(image)


def data_url(image: LocalImage) -> str:
    """Return *image* as a complete ``data:`` URL string (in memory)."""
    return image_text(ImageValue(image))


def image_text(value: ImageValue) -> str:
    """Return the text *value* is sent as: a data URL, or plain base64 (in memory)."""
    if isinstance(value.image, DataUrlImage) and not value.bare:
        return value.image.data_url
    return (_head(value) + b"".join(_payload_chunks(value.image))).decode("ascii")


def _payload_length(image: LocalImage) -> int:
    if isinstance(image, DataUrlImage):
        return len(image.data_url) - image.payload_offset
    return 4 * -(-image.info.byte_size // 3)


def _slices(size: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each slice of *size* bytes: one up to `_ONE_SLICE`, else `_READ_SIZE`."""
    if size <= _ONE_SLICE:
        yield 0, size
        return
    for start in range(0, size, _READ_SIZE):
        yield start, min(_READ_SIZE, size - start)


def _changed(image: FileImage, found: str) -> RequestError:
    # The announced Content-Length no longer matches: stop rather than send a lie.
    return RequestError(
        [
            Violation(
                "images",
                f"{image.describe()} changed while it was being sent",
                "a file that stays the same until sent",
                found,
            )
        ]
    )


def _file_chunks(image: FileImage) -> Iterator[bytes]:
    """*image*'s bytes as base64, slice by slice, read as measured when the request was built.

    Raises:
        RequestError: The file is no longer a readable regular file, no longer has the size it
            had, or cannot be read: raised before its last slice is produced, so a body with it
            never completes.
    """
    encode = _b64encode()
    # Refuses anything but a regular file, without blocking: the path may have become a FIFO or
    # a device since the request was built.
    with MeasuredFile(image) as file:
        for _, length in _slices(image.info.byte_size):
            data = file.read(length)
            encoded = encode(data)
            del data  # only the base64 stays in memory while it is sent
            yield encoded


class MeasuredFile(io.RawIOBase):
    """A local file read as measured when the request was built: a JSON body's, a multipart part's.

    It gives exactly ``byte_size`` bytes, from the descriptor `FileImage` opened and checked (no
    buffered file object), and raises a `RequestError` naming the file when it turned shorter,
    longer (before its last slice is given, so the announced length is never reached) or
    unreadable. A raw ``OSError`` would read as the connection failing, and say the provider
    may have a request whose body could not even be made. httpx's multipart encoder takes a
    part's length from ``seek``/``tell``: both stay within the measured size.
    """

    def __init__(self, image: FileImage) -> None:
        super().__init__()
        self._image = image
        self._size = image.info.byte_size
        self._at = 0
        self._descriptor = image._descriptor()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move within the measured size: the file's own end is not asked (it may have moved)."""
        at = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self._size}[whence] + offset
        if not 0 <= at <= self._size:
            raise OSError(f"seek outside the {self._size} bytes measured")
        os.lseek(self._descriptor, at, os.SEEK_SET)
        self._at = at
        return at

    def read(self, size: int | None = -1) -> bytes:
        left = self._size - self._at
        wanted = left if size is None or size < 0 else min(size, left)
        data = _read(self._image, self._descriptor, wanted)
        if len(data) != wanted:
            raise _changed(self._image, f"{self._at + len(data)} bytes instead of {self._size}")
        self._at += wanted
        if self._at == self._size and _read(self._image, self._descriptor, 1):
            raise _changed(self._image, f"more than {self._size} bytes")
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._descriptor)
        super().close()


def _read(image: FileImage, descriptor: int, length: int) -> bytes:
    """`_read_exactly`, a failed read (an I/O error) a `RequestError` naming *image*'s file.

    Not left an ``OSError``: the clients would take it for the connection failing, and say
    the provider may have the request when its body could not even be made.
    """
    try:
        return _read_exactly(descriptor, length)
    except OSError as exc:
        problem, limit = _os_problem(exc)
        shown = image.describe()
        raise RequestError([Violation("images", f"{shown} {problem}", limit, shown)]) from None


def _read_exactly(descriptor: int, length: int) -> bytes:
    """*length* bytes read from *descriptor*, or fewer at the file's end.

    One ``read`` of the exact size, as a regular file gives it; a read that returns less (the
    end, or a signal) is followed by more until the end.
    """
    data = os.read(descriptor, length)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.read(descriptor, length - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _payload_chunks(image: LocalImage) -> Iterator[bytes]:
    """*image*'s base64 payload, in slices (a file read and encoded as it goes)."""
    if isinstance(image, FileImage):
        yield from _file_chunks(image)
    elif isinstance(image, DataUrlImage):
        text = image.data_url
        for start, length in _slices(len(text) - image.payload_offset):
            offset = image.payload_offset + start
            yield text[offset : offset + length].encode("ascii")
    else:
        view, encode = memoryview(image.data), _b64encode()
        for start, length in _slices(len(view)):
            yield encode(view[start : start + length])


def compiled_encoder(encoder: json.JSONEncoder) -> Callable[[object], str]:
    """*encoder*'s ``encode``, with the C encoder it would make for every value made once.

    ``JSONEncoder.encode`` runs two Python functions and builds a new C encoder per value (half
    the cost of encoding a request's body, six values a job for a batch). The text is the same;
    only the check for circular references is left out: a value that holds itself raises
    ``RecursionError`` instead of ``ValueError``.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or getattr(encoder, "indent", None) is not None:  # pragma: no cover
        return encoder.encode  # no C accelerator, or an indented encoder: its own way
    chunks = make(
        None,
        encoder.default,
        json.encoder.encode_basestring_ascii
        if encoder.ensure_ascii
        else json.encoder.encode_basestring,
        None,
        encoder.key_separator,
        encoder.item_separator,
        encoder.sort_keys,
        encoder.skipkeys,
        encoder.allow_nan,
    )
    join = "".join

    def encode(value: object) -> str:
        return join(chunks(value, 0))

    return encode


class _ImageMet(Exception):
    """The body's encoder met an image (`json_segments` flattens the body instead)."""


def _no_image(value: object) -> object:
    """The encoder's hook for a value JSON has no form for: an image, or a `TypeError`."""
    if isinstance(value, ImageValue):
        raise _ImageMet
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_JSON: Final = compiled_encoder(
    json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_no_image, allow_nan=False)
)
"""Compact JSON, as ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` writes it,
that stops at the first image (`_ImageMet`)."""


def _encode_scalar(value: JsonValue) -> bytes:
    return _JSON(value).encode("utf-8")


def _members(run: dict[str, JsonValue], written: int) -> bytes:
    """``"key":value`` of each member of *run*, as in a dict; after a comma if *written*."""
    text = _JSON(run)[1:-1].encode("utf-8")  # within the braces
    return b"," + text if written else text


def _key(key: object) -> bytes:
    """``"key":`` as json.dumps writes a member's key.

    Text as it is; a number, boolean or null made text (``1`` as ``"1"``); any other key is
    json's `TypeError`.
    """
    return _JSON({key: None})[1:-5].encode("utf-8")  # {"key":null} without { and null}


def _flatten(value: JsonValue, out: list[Segment]) -> None:
    if isinstance(value, ImageValue):
        # The data URL's head joins the text before it: the image stands for its payload.
        out += [b'"' + _head(value), value.image, b'"']
    elif isinstance(value, dict):
        # Members whose value holds no image are written together, as the encoder writes a
        # dict of them (the same bytes, one call instead of two per member); a member with an
        # image (or a key that is not text) on its own.
        out.append(b"{")
        run: dict[str, JsonValue] = {}
        written = 0
        for key, item in value.items():
            if type(key) is str and not isinstance(item, (ImageValue, dict, list)):
                run[key] = item
                continue
            if run:
                out.append(_members(run, written))
                written += len(run)
                run = {}
            out.append((b"," if written else b"") + _key(key))
            written += 1
            _flatten(item, out)
        if run:
            out.append(_members(run, written))
        out.append(b"}")
    elif isinstance(value, list):
        out.append(b"[")
        for index, item in enumerate(value):
            if index:
                out.append(b",")
            _flatten(item, out)
        out.append(b"]")
    else:
        out.append(_encode_scalar(value))


_MARK: Final = f"\0{os.urandom(8).hex()}\0"
"""The text `json_segments`' encoder writes in an image's place: a random word between two NUL
characters, which JSON writes as ``\\u0000``. A body whose own text holds it is not mistaken
for images: the marks found then outnumber the images met, and the body is flattened instead."""


class _Met(threading.local):
    """The images `json_segments`' encoder met, in order, in this thread."""

    images: list[ImageValue]


_met: Final = _Met()


def _mark_image(value: object) -> object:
    """The marking encoder's hook: an image is noted and written as `_MARK`; else a `TypeError`."""
    if isinstance(value, ImageValue):
        _met.images.append(value)
        return _MARK
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_MARKING: Final = compiled_encoder(
    json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), default=_mark_image, allow_nan=False
    )
)
"""`_JSON`'s text, with each image written as `_MARK` (and noted in `_met`)."""
_MARK_JSON: Final = _MARKING(_MARK)
"""`_MARK` as the encoder writes it: ``"\\u0000...\\u0000"``, quotes included."""


def json_segments(body: JsonBody) -> list[Segment]:
    """Flatten *body* into encoded JSON text runs and the images between them.

    The body is encoded once, each image written as `_MARK`, and the text cut at the marks
    (the text before an image ends with its opening quote and its data URL's head). A body
    whose own text holds a mark is flattened value by value instead (`_flattened`): the same
    segments either way.

    Raises:
        TypeError: A value JSON has no form for (a set, say): the adapter's mistake.
        ValueError: The body holds itself, nests deeper than Python can encode, or holds a
            float JSON has no form for (NaN, infinity: Python would write ``NaN``, which no
            provider's parser reads, and the paid request would go out all the same).
    """
    images: list[ImageValue] = []
    _met.images = images
    try:
        text = _MARKING(body.value)
    except RecursionError:
        raise ValueError("the body holds itself, or nests too deeply for JSON") from None
    finally:
        _met.images = []
    if not images:
        # The common case (text-to-image, URL references): one run of text.
        return [text.encode("utf-8")]
    runs = text.split(_MARK_JSON)
    if len(runs) != len(images) + 1:
        return _flattened(body.value)  # the body's own text holds a mark
    segments: list[Segment] = []
    before = runs[0]
    for value, after in zip(images, runs[1:], strict=True):
        segments += [(before + '"').encode("utf-8") + _head(value), value.image]
        before = '"' + after
    segments.append(before.encode("utf-8"))
    return segments


def _flattened(value: JsonValue) -> list[Segment]:
    """`json_segments` value by value: for a body whose text holds `_MARK`.

    Raises:
        TypeError: As `json_segments`.
        ValueError: As `json_segments`.
    """
    raw: list[Segment] = []
    try:
        _flatten(value, raw)
    except RecursionError:
        raise ValueError("the body holds itself, or nests too deeply for JSON") from None
    merged: list[Segment] = []
    for segment in raw:
        if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += segment
        else:
            merged.append(segment)
    return merged


def segments_length(segments: list[Segment]) -> int:
    """The exact number of bytes *segments* encode to."""
    return sum(len(s) if isinstance(s, bytes) else _payload_length(s) for s in segments)


def segment_chunks(segments: list[Segment]) -> Generator[bytes, None, None]:
    """The bytes *segments* encode to, in slices (images read and encoded as they go)."""
    for segment in segments:
        if isinstance(segment, bytes):
            yield segment
        else:
            yield from _payload_chunks(segment)


class StreamedJson(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A JSON body with images, encoded while it is sent; usable by sync and async clients.

    Local files are read with ordinary blocking reads of at most 1.1 MiB, which take well under
    a millisecond from the page cache; the async client accepts that rather than pay a thread
    hop per slice.
    """

    def __init__(self, segments: list[Segment]) -> None:
        self._segments = segments
        self._started: list[Generator[bytes, None, None]] = []

    def __iter__(self) -> Iterator[bytes]:
        chunks = segment_chunks(self._segments)
        self._started.append(chunks)
        return chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.__iter__():
            yield chunk

    def close(self) -> None:
        """Close the file being read, if the body was left part-sent.

        A transport that fails mid-body leaves the body's generator suspended, its file open,
        for as long as its error is kept (the traceback holds it): the sender closes the body.
        """
        started, self._started = self._started, []
        for chunks in started:
            # Running in another thread (a caller's transport sending from one): that thread
            # closes the file when the generator ends.
            with contextlib.suppress(ValueError):
                chunks.close()
