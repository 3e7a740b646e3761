import base64
import io
from pathlib import Path

import pytest

from flux_adapters import EditRequest, ImageLike
from flux_adapters.errors import RequestError
from flux_adapters.request import BytesImage, DataUrlImage, FileImage, UrlImage, _inspect
from tests.conftest import image_bytes


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def test_images_are_classified_in_order(tmp_path: Path) -> None:
    path = tmp_path / "scene.jpg"
    path.write_bytes(image_bytes(80, 40, "JPEG"))
    request = EditRequest(
        prompt="blend",
        model="flux-2-pro",
        images=[
            "https://example.com/a.png",
            data_url(image_bytes(10, 20)),
            path,
            image_bytes(30, 30, "WEBP"),
        ],
    )
    kinds = [type(image) for image in request.images]
    assert kinds == [UrlImage, DataUrlImage, FileImage, BytesImage]
    file_image = request.images[2]
    assert isinstance(file_image, FileImage)
    assert (file_image.info.format, file_image.info.width, file_image.info.height) == (
        "jpeg",
        80,
        40,
    )
    assert file_image.info.byte_size == path.stat().st_size
    data_image = request.images[1]
    assert isinstance(data_image, DataUrlImage)
    assert (data_image.info.width, data_image.info.height) == (10, 20)
    assert request.images[3].info.format == "webp"  # type: ignore[union-attr]


def test_every_universal_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(RequestError) as caught:
        EditRequest(
            prompt=" ",
            model="flux-3-ultra",  # type: ignore[arg-type]
            images=["photo.png", tmp_path / "missing.png", "data:image/png;base64,!!!!"],
            width=1024,
            aspect_ratio="16-9",
            seed=-1,
            output_format="gif",  # type: ignore[arg-type]
            steps=0,
            guidance=float("nan"),
            safety_tolerance=True,
        )
    fields = [violation.field for violation in caught.value.violations]
    assert fields == [
        "prompt",
        "model",
        "images[0]",
        "images[1]",
        "images[2]",
        "size",
        "height",
        "aspect_ratio",
        "seed",
        "safety_tolerance",
        "steps",
        "output_format",
        "guidance",
    ]
    message = str(caught.value)
    assert "pass a local file as pathlib.Path" in message
    assert "file not found" in message
    assert "invalid base64" in message


def test_a_plain_string_that_is_not_a_url_is_refused_with_a_hint() -> None:
    with pytest.raises(RequestError, match=r"pathlib\.Path"):
        EditRequest(prompt="x", model="flux-2-pro", images=["robot.png"])


def test_a_single_image_instead_of_a_list_is_taken_as_one(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(image_bytes(8, 8))
    cases: list[tuple[ImageLike, type]] = [
        ("https://example.com/a.png", UrlImage),
        (path, FileImage),
        (image_bytes(8, 8), BytesImage),
        (bytearray(image_bytes(8, 8)), BytesImage),
        (io.BytesIO(image_bytes(8, 8)), BytesImage),
    ]
    for single, kind in cases:
        request = EditRequest(prompt="x", model="flux-2-pro", images=single)
        assert [type(image) for image in request.images] == [kind], single


def test_a_single_missing_path_is_reported_as_the_first_image() -> None:
    with pytest.raises(RequestError) as caught:
        EditRequest(prompt="x", model="flux-2-pro", images=Path("/nonexistent/a.png"))
    [violation] = caught.value.violations
    assert violation.field == "images[0]"
    assert "file not found" in violation.message


def test_size_forms_are_parsed_and_exclusive() -> None:
    assert EditRequest(prompt="x", model="flux-2-pro", size="1792x1024").dimensions == (1792, 1024)
    assert EditRequest(prompt="x", model="flux-2-pro", width=64, height=80).dimensions == (64, 80)
    assert EditRequest(prompt="x", model="flux-2-pro", aspect_ratio="16:9").ratio == (16, 9)
    with pytest.raises(RequestError, match="only one way"):
        EditRequest(prompt="x", model="flux-2-pro", size="64x64", aspect_ratio="1:1")
    with pytest.raises(RequestError, match='"WxH"'):
        EditRequest(prompt="x", model="flux-2-pro", size="64*64")
    with pytest.raises(RequestError, match='"W:H"'):
        EditRequest(prompt="x", model="flux-2-pro", aspect_ratio="0:1")


def test_unrecognised_bytes_are_kept_for_the_provider_check() -> None:
    request = EditRequest(prompt="x", model="flux-2-pro", images=[b"not an image at all"])
    assert request.images[0].info.format is None  # type: ignore[union-attr]


def test_formats_no_provider_takes_are_named_for_the_provider_check() -> None:
    request = EditRequest(prompt="x", model="flux-2-pro", images=[b"GIF89a......"])
    assert request.images[0].info.format == "gif"  # type: ignore[union-attr]


def test_repr_never_shows_image_data() -> None:
    payload = image_bytes(16, 16)
    request = EditRequest(prompt="x", model="flux-2-pro", images=[payload, data_url(payload)])
    text = repr(request)
    assert base64.b64encode(payload).decode()[:40] not in text
    assert f"<{len(payload)} bytes>" in text


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


def test_inspection_reads_only_the_header_of_a_large_image() -> None:
    # A 4000x3000 PNG header followed by 30 MB: only the first bytes may be read.
    big = image_bytes(4000, 3000) + bytes(30 * 1024 * 1024)
    reader = CountingReader(big)
    info = _inspect(reader, len(big))
    assert (info.format, info.width, info.height) == ("png", 4000, 3000)
    assert reader.bytes_read < 64 * 1024


def test_a_huge_local_file_is_inspected_without_being_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    with path.open("wb") as out:
        out.write(image_bytes(5000, 5000))
        out.truncate(25 * 1024 * 1024)  # sparse: no 25 MB is written or read
    image = EditRequest(prompt="x", model="flux-2-pro", images=[path]).images[0]
    assert isinstance(image, FileImage)
    assert image.info.byte_size == 25 * 1024 * 1024
    assert image.info.pixels == 25_000_000


@pytest.mark.parametrize(
    "url",
    [
        "https://alice:hunter2-pw@example.com/a.png?X-Amz-Signature=hunter2-sig",
        "https://alice:hunter2-pw@exa mple.com/a.png",  # refused: whitespace
        "http://alice:hunter2-pw@[::1/a.png",  # refused: not parseable
        "ftp://alice:hunter2-pw@example.com/a.png",  # refused: not http(s)
    ],
)
def test_a_password_or_signature_in_an_image_url_is_never_shown(url: str) -> None:
    # They were echoed whole: in the repr, in "got: ..." of every refusal, and in the CLI's
    # `check` lines (a provider that takes no URL images) - a password and a presigned
    # URL's signature are credentials.
    try:
        request = EditRequest(prompt="p", model="flux-2-pro", images=[url])
    except RequestError as error:
        shown = str(error)
        assert "[redacted]@" in shown  # the message still says which URL it is
    else:
        image = request.images[0]
        assert isinstance(image, UrlImage)
        assert image.url == url  # sent as given
        shown = repr(request) + image.describe()
        assert shown.count("example.com/a.png?[redacted]") == 2
    assert "hunter2" not in shown
