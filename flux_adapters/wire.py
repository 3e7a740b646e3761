"""Plain-data HTTP requests and responses, the currency between adapters and the client.

Adapters build `HttpRequest` values and read `HttpResponse` values; they never see httpx, a
socket, a file handle or the API key. The client adds credentials, turns the body description
into a streamed httpx body and sends it.

A body is a description, not bytes: `JsonBody` may hold `ImageValue` leaves (a local image to be
written as base64, as a data URL or bare, while sending) and `MultipartBody` names the local
images to upload, so a 20 MB image is streamed from disk rather than copied into memory.

A request carries its role in a job (``submit``, ``poll``, ``fetch``, ``cancel``): only a submit
can be billed, which is how the client judges billing per job rather than per exchange. A flow
may also ask the client to wait (`Sleep`) between exchanges.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Final, Literal, TypeAlias

from attrs import frozen

from flux_adapters.request import ImageInput, LocalImage, UrlImage
from flux_adapters.result import MAX_IMAGE_BYTES

__all__ = [
    "ERROR_BODY_BYTES",
    "MAX_ANSWER_BYTES",
    "FilePart",
    "HttpRequest",
    "HttpResponse",
    "ImageValue",
    "JsonBody",
    "JsonValue",
    "MultipartBody",
    "Role",
    "Sleep",
    "json_image",
]


ERROR_BODY_BYTES: Final = 64 * 1024
"""An error answer's body is read no further than this: its status says what happened, its text
only adds detail, and no pattern runs over more than this many bytes."""

_DECODER: Final = json.JSONDecoder()
"""What ``json.loads`` decodes text with, when given no options."""

MAX_ANSWER_BYTES: Final = 4 * -(-MAX_IMAGE_BYTES // 3) + 1024 * 1024
"""The largest success answer read: one inline image of `MAX_IMAGE_BYTES` as base64, plus room
for the JSON around it. A larger answer is a ``ResponseFormatError``."""


@frozen
class ImageValue:
    """A local image that goes into a JSON body as base64 text.

    Attributes:
        image: The image.
        bare: Plain base64 (``iVBOR...``) rather than a ``data:image/...;base64,`` URL, for
            providers that document "a base64 encoded image" (Black Forest Labs).
    """

    image: LocalImage
    bare: bool = False


JsonValue: TypeAlias = (
    bool | int | float | str | ImageValue | list["JsonValue"] | dict[str, "JsonValue"] | None
)


def json_image(image: ImageInput, *, bare: bool = False) -> JsonValue:
    """The JSON value for a reference image: a URL as it is, a local image as base64.

    With *bare*, a local image is plain base64 (no ``data:`` prefix).
    """
    return image.url if isinstance(image, UrlImage) else ImageValue(image, bare)


@frozen
class JsonBody:
    """A JSON object body; `ImageValue` leaves are encoded while streaming."""

    value: dict[str, JsonValue]

    def materialize(self) -> dict[str, object]:
        """Return the body as plain JSON data, with images written out as base64 text.

        This builds every image's text in memory: meant for tests and small bodies.
        """
        from flux_adapters._bodies import image_text  # the encoder lives with the streaming code

        return self.map_values(image_text)

    def map_images(self, replace: Callable[[LocalImage], object]) -> dict[str, object]:
        """Return the body as plain data, with each image leaf replaced by ``replace(image)``."""
        return self.map_values(lambda value: replace(value.image))

    def map_values(self, replace: Callable[[ImageValue], object]) -> dict[str, object]:
        """Return the body as plain data, with each `ImageValue` replaced by ``replace(value)``."""
        return {key: _map_images(item, replace) for key, item in self.value.items()}


@frozen
class FilePart:
    """One uploaded file of a multipart body."""

    name: str
    filename: str
    image: LocalImage


@frozen
class MultipartBody:
    """A ``multipart/form-data`` body: text fields, then files in order."""

    fields: tuple[tuple[str, str], ...]
    files: tuple[FilePart, ...]


Role: TypeAlias = Literal["submit", "poll", "fetch", "cancel"]
"""What an exchange is to a job: ``submit`` (the one that can be billed), ``poll`` (its status),
``fetch`` (its result), ``cancel``. The last three are free and may be repeated."""


@frozen(kw_only=True)
class HttpRequest:
    """One HTTP request an adapter wants sent. Holds no credentials.

    Attributes:
        method: ``"POST"``, ``"GET"``, ``"PUT"``...
        url: The full URL.
        body: What to send, or ``None``.
        headers: Extra headers (the client adds authentication and the content type).
        role: What the exchange is to its job (`Role`); a synchronous provider's one request is
            its ``submit``.
        deadline: Seconds the exchange may take in all, when that is shorter than the client's
            own deadline (a poll near its job's deadline); set by the library's job flows.
    """

    method: str
    url: str
    body: JsonBody | MultipartBody | None = None
    headers: tuple[tuple[str, str], ...] = ()
    role: Role = "submit"
    deadline: float | None = None


@frozen
class Sleep:
    """A flow asks the client to wait *seconds* before its next exchange (answered with None)."""

    seconds: float


@frozen(kw_only=True)
class HttpResponse:
    """One HTTP response, fully read. Header names are lower case."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def header(self, name: str) -> str | None:
        """Return the header *name* (any case), or ``None``."""
        return self.headers.get(name.lower())

    def text(self) -> str:
        """The body decoded as UTF-8, with undecodable bytes replaced."""
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> object:
        """The body parsed as JSON.

        Raises:
            ValueError: The body is not JSON.
        """
        content = self.content
        if content[:1] in (b"{", b"[") and content[1:2] != b"\x00":
            # UTF-8, as json.loads would find (no byte-order mark, no UTF-16/32 zero byte):
            # decoded at once, without its search for the encoding. No whitespace leads; a
            # value that ends the text is the whole answer, else ``decode`` judges what follows
            # (whitespace, or the same "Extra data" error).
            text = content.decode("utf-8", "surrogatepass")
            value, end = _DECODER.raw_decode(text)
            return value if end == len(text) else _DECODER.decode(text)
        return json.loads(content)


def _map_images(value: JsonValue, replace: Callable[[ImageValue], object]) -> object:
    if isinstance(value, ImageValue):
        return replace(value)
    if isinstance(value, dict):
        return {key: _map_images(item, replace) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_images(item, replace) for item in value]
    return value
