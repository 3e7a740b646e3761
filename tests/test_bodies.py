"""JSON bodies with local images, as they are streamed: every byte of every image arrives, in
base64, with the announced length, whatever the image's size against the encoder's slices; and
a file that changed since the request was built never goes out whole."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from flux_adapters import EditRequest
from flux_adapters._bodies import (
    _ONE_SLICE,
    _READ_SIZE,
    StreamedJson,
    json_segments,
    segments_length,
)
from flux_adapters.errors import RequestError
from flux_adapters.request import FileImage
from flux_adapters.wire import JsonBody, json_image
from tests.conftest import image_bytes

PNG = image_bytes(16, 16)

# Image sizes on each side of the encoder's slice edges (a slice, the largest image in one).
SIZES = sorted(
    {
        len(PNG),
        _READ_SIZE - 1,
        _READ_SIZE,
        _READ_SIZE + 1,
        _ONE_SLICE,
        _ONE_SLICE + 1,
        2 * _READ_SIZE,
        2 * _READ_SIZE + 1,
        2 * _READ_SIZE + _ONE_SLICE + 2,
        1024 * 1024,
    }
)


def picture(size: int) -> bytes:
    """A valid PNG of exactly *size* bytes (its header, then padding)."""
    return PNG + bytes(range(256)) * ((size - len(PNG)) // 256) + bytes((size - len(PNG)) % 256)


def sent(body: JsonBody) -> tuple[bytes, list[bytes]]:
    """The body as streamed, checked against its announced length, and its chunks."""
    segments = json_segments(body)
    chunks = list(StreamedJson(segments))
    streamed = b"".join(chunks)
    assert len(streamed) == segments_length(segments)
    return streamed, chunks


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("given", ["path", "bytes", "data URL"])
def test_every_byte_arrives_whatever_the_size(size: int, given: str, tmp_path: Path) -> None:
    data = picture(size)
    assert len(data) == size
    source: bytes | str | Path = data
    if given == "path":
        source = tmp_path / "image.png"
        source.write_bytes(data)
    elif given == "data URL":
        source = "data:image/png;base64," + base64.b64encode(data).decode()
    [image] = EditRequest(prompt="p", model="flux-2-pro", images=[source]).images
    body = JsonBody(
        {
            "prompt": 'a "quoted" prompt, ünïcode',
            "input_image": json_image(image),
            "bare": json_image(image, bare=True),
            "list": [json_image(image), 1, None],
            "seed": 7,
        }
    )
    streamed, chunks = sent(body)
    received = json.loads(streamed)
    assert received == body.materialize()
    head, _, payload = received["input_image"].partition(",")
    assert head == "data:image/png;base64"
    assert base64.b64decode(payload, validate=True) == data
    assert base64.b64decode(received["bare"], validate=True) == data
    assert received["list"][0] == received["input_image"]
    assert received["prompt"] == 'a "quoted" prompt, ünïcode'
    # Memory stays bounded: no chunk holds more than one slice of an image, encoded.
    assert max(map(len, chunks)) <= 4 * -(-_ONE_SLICE // 3) + len(head) + 64


@pytest.mark.parametrize("size", [len(PNG), _READ_SIZE + 1, 3 * _READ_SIZE])
@pytest.mark.parametrize(
    ("change", "found"),
    [
        (lambda data: data + b"more", "more than"),
        (lambda data: data[:-1], "bytes instead of"),
        (lambda data: data[: len(data) // 2], "bytes instead of"),
    ],
    ids=["grew", "one byte shorter", "half"],
)
def test_a_file_that_changed_since_the_request_never_goes_out_whole(
    size: int, change: object, found: str, tmp_path: Path
) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(picture(size))
    [image] = EditRequest(prompt="p", model="flux-2-pro", images=[path]).images
    assert isinstance(image, FileImage)
    path.write_bytes(change(path.read_bytes()))  # type: ignore[operator]
    segments = json_segments(JsonBody({"input_image": json_image(image), "n": 1}))
    out = bytearray()

    def send() -> None:
        for chunk in StreamedJson(segments):
            out.extend(chunk)

    with pytest.raises(RequestError) as caught:
        send()
    [violation] = caught.value.violations
    assert violation.message.endswith("image.png changed while it was being sent")
    assert found in violation.value
    # Stopped before the last slice of the image: the announced length is never reached, so no
    # server can take what went out for a whole request.
    assert len(out) < segments_length(segments) - len(b'","n":1}')
