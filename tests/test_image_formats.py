"""One table of image formats (`flux_adapters._files.image_format`), and image errors that name
the image, its format and what the provider takes.

Formats people send by mistake (GIF, BMP, TIFF, HEIC, AVIF, ...) are named, not "unrecognised
data"; what only looks like a format is not; no other module keeps magic numbers of its own.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from flux_adapters import EditRequest, check, errors
from flux_adapters._files import IMAGE_FORMATS, MEDIA_TYPES, SNIFF_BYTES, format_name, image_format
from tests.conftest import image_bytes

ROOT = Path(__file__).resolve().parent.parent
PNG = image_bytes(40, 30)


def build(images: object) -> EditRequest:
    return EditRequest(prompt="x", model="flux-2-pro", images=images)  # type: ignore[arg-type]


def heif_box(major: bytes, *compatible: bytes) -> bytes:
    brands = b"".join(compatible)
    return (16 + len(brands)).to_bytes(4, "big") + b"ftyp" + major + bytes(4) + brands


def pillow(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format=fmt)
    return buffer.getvalue()


SAMPLES = {
    "png": PNG,
    "jpeg": image_bytes(8, 8, "JPEG"),
    "webp": image_bytes(8, 8, "WEBP"),
    "gif": pillow("GIF"),
    "bmp": pillow("BMP"),
    "tiff": pillow("TIFF"),
    "jpeg2000": pillow("JPEG2000"),
    "heic": heif_box(b"heic", b"mif1", b"heic"),
    "avif": heif_box(b"avif", b"mif1", b"miaf"),
    "heif": heif_box(b"mif1", b"mif1"),
    "jxl": b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(20),
    "psd": b"8BPS\x00\x01" + bytes(20),
    "pdf": b"%PDF-1.7\n" + bytes(20),
}


@pytest.mark.parametrize("expected", list(SAMPLES))
def test_image_format_names_each_format_from_its_first_bytes(expected: str) -> None:
    assert image_format(SAMPLES[expected][:SNIFF_BYTES]) == expected


def test_a_generic_heif_brand_is_named_by_the_specific_one_it_lists() -> None:
    assert image_format(heif_box(b"mif1", b"mif1", b"avif")) == "avif"
    assert image_format(heif_box(b"msf1", b"heic")) == "heic"


@pytest.mark.parametrize(
    "data",
    [b"", b"BM", b"BMW is a car, not a bitmap", b"RIFF\x00\x00\x00\x00WAVEfmt ", heif_box(b"isom")],
    ids=["empty", "BM alone", "text starting BM", "a WAV file", "an mp4 video"],
)
def test_what_only_looks_like_an_image_format_is_not_named(data: bytes) -> None:
    assert image_format(data) is None


@pytest.mark.parametrize("fmt", [name for name in SAMPLES if name not in IMAGE_FORMATS])
def test_a_format_providers_do_not_take_is_named_with_the_file_and_what_they_take(
    fmt: str, short_tmp_path: Path
) -> None:
    path = short_tmp_path / f"photo.{fmt}"
    path.write_bytes(SAMPLES[fmt])
    request = build([PNG, path])
    [violation] = check(request, "apiyi")
    assert violation.field == "images[1]"
    assert violation.message == (
        f"{path} is a {format_name(fmt)} image, which apiyi does not accept; "
        "it takes jpeg, png, webp"
    )
    assert violation.value == format_name(fmt)
    assert str(path) in str(errors.RequestError([violation]))


def test_every_per_image_limit_message_names_the_image(short_tmp_path: Path) -> None:
    huge = short_tmp_path / "huge.png"
    with huge.open("wb") as out:
        out.write(image_bytes(5000, 4100))
        out.truncate(21 * 2**20)
    broken = short_tmp_path / "broken.png"
    broken.write_bytes(PNG[:20])
    request = build([huge, broken, b"hello"])
    messages = [(v.field, v.message) for v in check(request, "apiyi")]
    assert messages == [
        ("images[0]", f"{huge} is too large"),
        ("images[0]", f"{huge} has too many pixels"),
        ("images[1]", f"{broken} has an unreadable PNG header"),
        (
            "images[2]",
            "5 bytes in memory is not in any image format known here, which apiyi does not "
            "accept; it takes jpeg, png, webp",
        ),
    ]


def test_no_module_keeps_a_magic_number_table_of_its_own() -> None:
    # One table (flux_adapters/_files.py): a second one drifts (the emulator's named GIF and
    # BMP, the client's did not; a cassette's media types knew no WebP header but its own).
    magic = re.compile(r"\\x89PNG|GIF8[79]a|\\xff\\xd8\\xff|b\"RIFF\"|b\"WEBP\"|ftyp")
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "flux_adapters").rglob("*.py")
        if path.name != "_files.py" and magic.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


@given(st.binary(max_size=64))
def test_image_format_of_any_bytes_is_a_known_name_or_none(data: bytes) -> None:
    found = image_format(data)
    assert found is None or found in MEDIA_TYPES
