"""JSON bodies with local images, as they are streamed: every byte of every image arrives, in
base64, with the announced length, whatever the image's size against the encoder's slices; and
a file that changed since the request was built never goes out whole."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_adapters import EditRequest
from flux_adapters._bodies import (
    _MARK,
    _ONE_SLICE,
    _READ_SIZE,
    Segment,
    StreamedJson,
    _flattened,
    json_segments,
    segments_length,
)
from flux_adapters.errors import RequestError
from flux_adapters.request import FileImage, LocalImage, UrlImage
from flux_adapters.wire import ImageValue, JsonBody, json_image
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


def given_as(given: str, data: bytes, folder: Path) -> LocalImage:
    """*data* as a request's image, *given* as a ``"path"`` (a file in *folder*), ``"bytes"`` or
    a ``"data URL"``."""
    source: bytes | str | Path = data
    if given == "path":
        source = folder / "image.png"
        source.write_bytes(data)
    elif given == "data URL":
        source = "data:image/png;base64," + base64.b64encode(data).decode()
    [image] = EditRequest(prompt="p", model="flux-2-pro", images=[source]).images
    assert not isinstance(image, UrlImage)
    return image


def sent(body: JsonBody) -> tuple[bytes, list[bytes]]:
    """The body as streamed, checked against its announced length, and its chunks."""
    segments = json_segments(body)
    chunks = list(StreamedJson(segments))
    streamed = b"".join(chunks)
    assert len(streamed) == segments_length(segments)
    return streamed, chunks


def refused_while_sent(segments: list[Segment]) -> tuple[RequestError, int]:
    """The `RequestError` the body's stream raised part-way, and how many bytes went out."""
    went_out = 0

    def send() -> None:
        nonlocal went_out
        for chunk in StreamedJson(segments):
            went_out += len(chunk)

    with pytest.raises(RequestError) as caught:
        send()
    return caught.value, went_out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("given", ["path", "bytes", "data URL"])
def test_every_byte_arrives_whatever_the_size(size: int, given: str, tmp_path: Path) -> None:
    data = picture(size)
    assert len(data) == size
    image = given_as(given, data, tmp_path)
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
    error, went_out = refused_while_sent(segments)
    [violation] = error.violations
    assert violation.message.endswith("image.png changed while it was being sent")
    assert found in violation.value
    # Stopped before the last slice of the image: the announced length is never reached, so no
    # server can take what went out for a whole request.
    assert went_out < segments_length(segments) - len(b'","n":1}')


# Any JSON a body can hold, with or without images among its values. Keys are mostly text
# (JSON's own); an adapter may also use what json.dumps turns into text: numbers, booleans, None.
# No NaN or infinity: JSON has no form for them (see the test after the next two).
_finite = st.floats(allow_nan=False, allow_infinity=False)
_keys = st.text(max_size=6) | st.integers() | _finite | st.booleans() | st.none()
_scalars = st.none() | st.booleans() | st.integers() | _finite | st.text(max_size=12)
_values = st.recursive(
    _scalars | st.sampled_from(["image"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=24,
)


def _with_images(value: object, image: ImageValue) -> object:
    if value == "image":
        return image
    if isinstance(value, list):
        return [_with_images(item, image) for item in value]
    if isinstance(value, dict):
        return {key: _with_images(item, image) for key, item in value.items()}
    return value


@given(st.dictionaries(_keys, _values, max_size=5), st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_body_is_sent_as_json_dumps_writes_it(value: dict[str, object], bare: bool) -> None:
    """The text of a body with or without images is exactly what json.dumps would write."""
    image = json_image(
        EditRequest(prompt="p", model="flux-2-pro", images=[PNG]).images[0], bare=bare
    )
    body = JsonBody(_with_images(value, image))  # type: ignore[arg-type]
    streamed, _ = sent(body)
    expected = json.dumps(body.materialize(), ensure_ascii=False, separators=(",", ":"))
    assert streamed == expected.encode("utf-8")


def _images_of(segments: list[Segment]) -> list[Segment]:
    return [segment for segment in segments if not isinstance(segment, bytes)]


@given(st.dictionaries(_keys, _values, max_size=5), st.booleans(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_body_is_cut_into_the_same_segments_in_one_pass_or_value_by_value(
    value: dict[str, object], bare: bool, as_data_url: bool
) -> None:
    """json_segments' one encoding gives the segments the value-by-value flattening gives."""
    source = "data:image/png;base64," + base64.b64encode(PNG).decode() if as_data_url else PNG
    image = json_image(
        EditRequest(prompt="p", model="flux-2-pro", images=[source]).images[0], bare=bare
    )
    assert isinstance(image, ImageValue)
    body = JsonBody(_with_images(value, image))  # type: ignore[arg-type]
    segments = json_segments(body)
    assert segments == _flattened(body.value)
    assert all(segment is image.image for segment in _images_of(segments))


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["value", "key", "beside an image"])
def test_a_float_json_has_no_form_for_is_refused_not_written(number: float, where: str) -> None:
    # Python's encoder writes NaN and Infinity, which no provider's JSON parser reads: the paid
    # request went out all the same, to be refused (or misread) there.
    image = json_image(EditRequest(prompt="p", model="flux-2-pro", images=[PNG]).images[0])
    values: dict[str, dict[object, object]] = {
        "value": {"weight": number},
        "key": {number: 1},
        "beside an image": {"weight": number, "image": image},
    }
    value = values[where]
    with pytest.raises(ValueError, match="JSON"):
        json_segments(JsonBody(value))  # type: ignore[arg-type]


# Text that holds the mark json_segments writes for an image, whole or within a value or a key.
_MARKED = [_MARK, f"a{_MARK}", f'"{_MARK}', f"{_MARK}\\", f'x"{_MARK}"y', _MARK * 2]


@pytest.mark.parametrize(
    "text",
    _MARKED,
    ids=["whole", "after a letter", "after a quote", "before a backslash", "quoted", "twice"],
)
@pytest.mark.parametrize("given", ["path", "bytes", "data URL"])
@pytest.mark.parametrize("where", ["value", "key", "in a list"])
def test_a_body_whose_text_holds_the_image_mark_is_still_sent_as_json_dumps_writes_it(
    text: str, given: str, where: str, tmp_path: Path
) -> None:
    image = given_as(given, PNG, tmp_path)
    marks: dict[str, dict[str, object]] = {
        "value": {"prompt": text},
        "key": {text: 1},
        "in a list": {"list": [text, json_image(image)]},
    }
    marked = marks[where]
    body = JsonBody({"a": json_image(image), **marked, "b": json_image(image, bare=True)})  # type: ignore[dict-item]
    segments = json_segments(body)
    assert segments == _flattened(body.value)
    assert len(_images_of(segments)) == 2 + (where == "in a list")
    streamed, _ = sent(body)
    expected = json.dumps(body.materialize(), ensure_ascii=False, separators=(",", ":"))
    assert streamed == expected.encode("utf-8")


@pytest.mark.parametrize("size", [len(PNG), _READ_SIZE + 1, 3 * _READ_SIZE])
def test_a_file_read_in_short_reads_still_goes_out_whole(
    size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read may return less than asked (a signal, a network file system): the rest is read."""
    import os

    data = picture(size)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    [image] = EditRequest(prompt="p", model="flux-2-pro", images=[path]).images
    body = JsonBody({"input_image": json_image(image), "n": 1})
    whole, _ = sent(body)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 1000)))
    streamed, _ = sent(body)
    assert streamed == whole
    _, _, payload = json.loads(streamed)["input_image"].partition(",")
    assert base64.b64decode(payload, validate=True) == data


def test_a_file_the_disk_fails_to_read_while_it_is_sent_is_a_request_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error reading the image (a failing disk, a network file system gone) names the
    file, as a file that changed does: it was a raw OSError, which the clients reported as "the
    connection failed (the request may have reached it)", blaming the network and saying the
    job may be billed when the body could not even be made."""
    import errno
    import os

    path = tmp_path / "image.png"
    path.write_bytes(picture(3 * _READ_SIZE))
    [image] = EditRequest(prompt="p", model="flux-2-pro", images=[path]).images
    segments = json_segments(JsonBody({"input_image": json_image(image), "n": 1}))
    real_read, reads = os.read, [0]

    def failing(fd: int, n: int) -> bytes:
        reads[0] += 1
        if reads[0] == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", failing)
    error, went_out = refused_while_sent(segments)
    [violation] = error.violations
    assert violation.field == "images"
    assert "image.png cannot be read (Input/output error)" in violation.message
    assert went_out < segments_length(segments)
