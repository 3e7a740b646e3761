"""Images people have in hand: binary file objects, Pillow images, one image on its own.

Each input either builds a request or raises `RequestError` naming what is wrong and the limit,
whatever a careless caller passes (a text file, a file at its end, an endless stream, a read()
that returns the wrong type) and before anything is sent.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageCms

from flux_adapters import EditRequest, check, errors
from flux_adapters.request import MAX_ENCODED_PIXELS, MAX_READ_BYTES, BytesImage
from tests.conftest import image_bytes

ROOT = Path(__file__).resolve().parent.parent
PNG = image_bytes(40, 30)


def build(images: object) -> EditRequest:
    return EditRequest(prompt="x", model="flux-2-pro", images=images)  # type: ignore[arg-type]


def refused(images: object) -> errors.Violation:
    with pytest.raises(errors.RequestError) as caught:
        build(images)
    [violation] = caught.value.violations
    return violation


# --- binary file objects ---------------------------------------------------------------------


def test_a_file_opened_rb_is_read_once_when_the_request_is_built(short_tmp_path: Path) -> None:
    path = short_tmp_path / "robot.png"
    path.write_bytes(PNG)
    with path.open("rb") as stream:
        request = build([stream])
        assert not stream.closed  # the caller's: left open
        assert stream.read() == b""  # read to its end
    path.write_bytes(image_bytes(8, 8))  # changed afterwards: the request keeps what it read
    [image] = request.images
    assert isinstance(image, BytesImage)
    assert image.data == PNG
    assert (image.info.format, image.info.width, image.info.height) == ("png", 40, 30)
    assert image.describe() == f"{path} ({len(PNG)} bytes)"
    assert check(request, "apiyi") == ()


def test_a_file_object_is_read_from_where_it_stands() -> None:
    stream = io.BytesIO(b"HEADER" + PNG)
    stream.seek(6)
    [image] = build(stream).images
    assert isinstance(image, BytesImage)
    assert image.data == PNG
    assert image.describe().startswith("<BytesIO object> (")


def test_a_spooled_temporary_file_and_a_buffered_reader_are_file_objects() -> None:
    with tempfile.SpooledTemporaryFile() as spooled:
        spooled.write(PNG)
        spooled.seek(0)
        assert build([spooled]).images[0].info.format == "png"  # type: ignore[union-attr]
    reader = io.BufferedReader(io.BytesIO(image_bytes(8, 8, "JPEG")))
    assert build([reader]).images[0].info.format == "jpeg"  # type: ignore[union-attr]


def test_a_text_file_object_is_refused_without_being_read(short_tmp_path: Path) -> None:
    path = short_tmp_path / "notes.png"
    path.write_bytes(PNG)
    with path.open("r", encoding="latin-1") as text:
        violation = refused([text])
        assert text.tell() == 0  # not a byte of it was read
    assert violation.field == "images[0]"
    assert violation.message == f"{path} is a text file object; open the file with 'rb' (binary)"
    assert "binary mode ('rb')" in violation.limit
    assert "text file object" in refused(io.StringIO("abc")).message


class Reader:
    """A file-like object whose read() returns whatever it was given."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.asked: list[int] = []

    def read(self, size: int = -1) -> object:
        self.asked.append(size)
        answer = self.answers.pop(0) if self.answers else b""
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("text", "gives text, not bytes; open the file with 'rb' (binary)"),
        (42, "read() returned int, not bytes"),
        ([PNG], "read() returned list, not bytes"),
        (None, "has no data ready (a non-blocking stream); read it first and pass bytes"),
        (OSError(5, "Input/output error"), "could not be read (OSError: [Errno 5] Input/output"),
        (KeyError("boom"), "could not be read (KeyError: 'boom')"),
    ],
    ids=["str", "int", "list", "None", "OSError", "KeyError"],
)
def test_a_read_that_returns_no_bytes_or_fails_is_a_violation(answer: object, problem: str) -> None:
    violation = refused(Reader(answer))
    assert violation.field == "images[0]"
    assert violation.message.startswith(f"<Reader object> {problem}")


def test_a_closed_file_is_a_violation(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    stream = path.open("rb")
    stream.close()
    violation = refused(stream)
    assert "could not be read (ValueError: " in violation.message
    assert str(path) in violation.message


def test_bytearray_and_memoryview_reads_are_taken_and_short_reads_put_together() -> None:
    half = len(PNG) // 2
    [image] = build(Reader(bytearray(PNG[:half]), memoryview(PNG[half:]))).images
    assert isinstance(image, BytesImage)
    assert image.data == PNG


def test_a_released_memoryview_from_read_is_a_violation() -> None:
    view = memoryview(bytearray(PNG))
    view.release()
    assert "could not be read (ValueError" in refused(Reader(view)).message


@pytest.mark.parametrize("where", ["empty", "at its end"])
def test_an_empty_file_object_or_one_at_its_end_says_so(where: str) -> None:
    stream = io.BytesIO(b"" if where == "empty" else PNG)
    stream.seek(0, io.SEEK_END)
    violation = refused([stream])
    assert violation.message == (
        "<BytesIO object> is empty (at its end: a file object is read from where it stands; seek(0)?)"
    )
    assert violation.limit == "at least one byte of image data"


def test_an_empty_file_is_said_to_be_empty_not_of_an_unknown_format(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.touch()
    violation = refused([empty])
    assert violation.message.endswith("empty.png is empty")  # a long path is shortened
    assert violation.limit == "at least one byte of image data"


class Endless:
    """A stream that never ends; it counts every byte asked for and given."""

    def __init__(self, generous: bool = False) -> None:
        self.asked = 0
        self.given = 0
        self.generous = generous  # give twice what is asked

    def read(self, size: int = -1) -> bytes:
        assert size > 0, "an endless stream must never be read whole"
        self.asked += size
        chunk = bytes(size * 2 if self.generous else size)
        self.given += len(chunk)
        return chunk


@pytest.mark.parametrize("generous", [False, True], ids=["honest", "gives more than asked"])
def test_an_endless_stream_is_never_read_past_the_limit_plus_one(generous: bool) -> None:
    stream = Endless(generous)
    violation = refused(stream)
    assert stream.asked <= MAX_READ_BYTES + 1
    assert violation.message == f"<Endless object> is larger than {MAX_READ_BYTES // 2**20} MB"
    assert violation.limit == f"at most {MAX_READ_BYTES // 2**20} MB read from a file object"


def test_a_stream_over_a_providers_limit_is_named_by_that_limit() -> None:
    big = io.BytesIO(image_bytes(64, 64) + bytes(21 * 2**20))
    request = build(big)
    [violation] = check(request, "apiyi")
    assert violation.field == "images[0]"
    assert (
        violation.message
        == f"<BytesIO object> ({21 * 2**20 + len(image_bytes(64, 64))} bytes) is too large"
    )
    assert violation.limit == "at most 20 MB"


class NameRaises(io.BytesIO):
    @property
    def name(self) -> str:
        raise RuntimeError("no name")


def test_a_name_property_that_raises_only_loses_the_name() -> None:
    [image] = build(NameRaises(PNG)).images
    assert image.describe().startswith("<NameRaises object> (")


def test_read_as_an_instance_attribute_only_is_not_taken_for_a_file_object() -> None:
    class Bag:
        pass

    bag = Bag()
    bag.read = lambda size=-1: PNG  # type: ignore[attr-defined]
    violation = refused([bag])
    assert violation.message.endswith("is not an image input (a Bag)")


def test_a_request_built_from_a_file_object_can_be_sent_twice() -> None:
    request = build(io.BytesIO(PNG))
    assert check(request, "apiyi") == ()
    assert check(request, "laozhang") == ()
    assert request.images[0] == build(io.BytesIO(PNG)).images[0]


# --- Pillow images ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "1", "P", "I;16"])
def test_a_pil_image_is_encoded_to_png_losslessly(mode: str) -> None:
    source = Image.new("RGB", (17, 9), "teal").convert(mode) if mode != "I;16" else None
    if source is None:
        source = Image.new("I;16", (17, 9))
        source.putpixel((3, 4), 54321)
    [image] = build(source).images
    assert isinstance(image, BytesImage)
    assert image.info.format == "png"
    assert (image.info.width, image.info.height) == (17, 9)
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.mode == source.mode
        assert decoded.tobytes() == source.tobytes()
    assert image.describe().startswith("a PIL image (17x9) (")


def test_a_pil_image_keeps_its_icc_profile_and_names_its_file(short_tmp_path: Path) -> None:
    path = short_tmp_path / "photo.jpg"
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (12, 8), "orange").save(path, icc_profile=profile)
    with Image.open(path) as opened:
        [image] = build(opened).images
    assert isinstance(image, BytesImage)
    assert image.describe().startswith(f"a PIL image (12x8, from {str(path)!r}) (")
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.info.get("icc_profile") == profile


@pytest.mark.parametrize("mode", ["CMYK", "F", "I", "YCbCr", "HSV"])
def test_a_pil_mode_png_cannot_hold_is_refused_with_a_way_out(mode: str) -> None:
    violation = refused([Image.new(mode, (4, 4))])
    assert violation.message == (
        f"a PIL image (4x4) is in mode '{mode}', which PNG cannot hold without converting it; "
        "convert it first, e.g. image.convert('RGB')"
    )


def test_a_pil_image_too_large_to_encode_is_refused_before_encoding() -> None:
    wide = Image.new("1", (10_000, MAX_ENCODED_PIXELS // 10_000 + 1))
    violation = refused(wide)
    assert "has too many pixels to encode" in violation.message
    assert violation.limit == f"at most {MAX_ENCODED_PIXELS / 1e6:g} MP"


def test_a_closed_or_truncated_pil_image_is_a_violation(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes(image_bytes(200, 200, color="blue")[:-200])
    with Image.open(path) as cut:  # lazy: the pixels are read only when encoding
        violation = refused(cut)
    assert "could not be encoded as PNG (OSError" in violation.message
    closed = Image.open(io.BytesIO(PNG))
    closed.close()
    assert "could not be encoded as PNG" in refused(closed).message


def test_pillow_is_never_imported_to_take_images() -> None:
    code = (
        "import io, sys; from flux_adapters import EditRequest; "
        f"png = {PNG!r}; "
        "EditRequest(prompt='x', model='flux-2-pro', images=[png, io.BytesIO(png)]); "
        "print('PIL' in sys.modules, 'PIL.Image' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


# --- one image on its own --------------------------------------------------------------------


def test_one_image_on_its_own_of_every_kind_is_the_first_image(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    path.write_bytes(PNG)
    for single in (
        path,
        PNG,
        memoryview(PNG),
        io.BytesIO(PNG),
        Image.new("RGB", (4, 4)),
        f"https://example.com/{path.name}",
    ):
        request = build(single)
        assert len(request.images) == 1, single
    url = build("https://example.com/a.png")
    assert [image.describe() for image in url.images] == ["https://example.com/a.png"]


def test_a_lone_string_that_is_not_a_url_is_still_refused_with_the_path_hint() -> None:
    violation = refused("robot.png")
    assert violation.field == "images[0]"
    assert "pass a local file as pathlib.Path" in violation.message


# --- property: whatever a stream answers, a request or RequestError ------------------------


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([PNG[:10], PNG[10:], b""]),
            st.text(max_size=5),
            st.none(),
            st.integers(),
            st.builds(bytearray, st.binary(max_size=8)),
        ),
        max_size=6,
    )
)
def test_a_stream_that_answers_anything_builds_or_raises_request_error(
    answers: list[object],
) -> None:
    try:
        request = build(Reader(*answers))
    except errors.RequestError as error:
        assert all(v.field in ("images", "images[0]") for v in error.violations)  # noqa: PT017
    else:
        [image] = request.images
        assert isinstance(image, BytesImage)
        assert image.data
