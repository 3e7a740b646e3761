"""Each provider's limits, enforced before anything is sent, all violations at once."""

import base64
from pathlib import Path

import pytest

from flux_adapters import EditRequest, ModelId, ProviderId, check, get_adapter
from flux_adapters._flows import resolve
from flux_adapters.errors import RequestError
from tests.conftest import image_bytes

URL = "https://example.com/ref.png"


def fields(request: EditRequest, provider: ProviderId) -> list[str]:
    return [violation.field for violation in check(request, provider)]


@pytest.mark.parametrize(
    ("provider", "model", "most"),
    [
        ("laozhang", "flux-2-pro", 8),
        ("laozhang", "flux-2-max", 8),
        ("laozhang", "flux-2-flex", 8),
        ("laozhang", "flux-kontext-pro", 1),
        ("apiyi", "flux-2-pro", 8),
        ("apiyi", "flux-2-klein-4b", 4),
        ("apiyi", "flux-2-klein-9b", 4),
        ("apiyi", "flux-kontext-max", 1),
        ("apiyi-multipart", "flux-2-flex", 8),
        ("apiyi-multipart", "flux-2-klein-9b", 4),
        ("apiyi-multipart", "flux-kontext-pro", 1),
        ("aimlapi", "flux-2-pro", 3),
    ],
)
def test_reference_image_count(provider: ProviderId, model: ModelId, most: int) -> None:
    image: object = image_bytes(8, 8) if provider == "apiyi-multipart" else URL
    at_limit = EditRequest(prompt="x", model=model, images=[image] * most)
    over = EditRequest(prompt="x", model=model, images=[image] * (most + 1))
    assert check(at_limit, provider) == ()
    [violation] = check(over, provider)
    assert violation.field == "images"
    assert violation.value == str(most + 1)
    assert str(most) in violation.limit
    assert violation.source  # every limit cites its document


def test_unoffered_models_are_refused_by_name() -> None:
    request = EditRequest(prompt="x", model="flux-2-klein-4b")
    [violation] = check(request, "laozhang")
    assert violation.field == "model"
    assert "laozhang does not offer flux-2-klein-4b" in violation.message
    assert "flux-2-pro" in violation.limit
    assert fields(EditRequest(prompt="x", model="flux-2-max"), "aimlapi") == ["model"]


@pytest.mark.parametrize(
    ("provider", "width", "height", "expected"),
    [
        ("laozhang", 1792, 1024, []),
        ("laozhang", 1000, 1024, ["width/height"]),  # not a multiple of 16
        ("laozhang", 2064, 1024, ["width/height"]),  # wider than 2048
        ("laozhang", 48, 64, ["width/height"]),  # narrower than 64
        ("aimlapi", 1024, 768, []),
        ("aimlapi", 1040, 768, ["width/height"]),  # a multiple of 16 but not of 32
        ("aimlapi", 480, 512, ["width/height"]),  # below 512
        ("apiyi-multipart", 2048, 2048, []),  # exactly 4 MP
        ("apiyi-multipart", 2064, 2048, ["width/height"]),  # over 4 MP
    ],
)
def test_size_grids_and_ranges(
    provider: ProviderId, width: int, height: int, expected: list[str]
) -> None:
    images = [image_bytes(8, 8)] if provider == "apiyi-multipart" else []
    request = EditRequest(prompt="x", model="flux-2-pro", images=images, width=width, height=height)
    assert fields(request, provider) == expected


def test_size_violation_names_grid_value_and_source() -> None:
    request = EditRequest(prompt="x", model="flux-2-pro", width=1040, height=480)
    found = check(request, "aimlapi")
    assert [v.message for v in found] == [
        "width is not a multiple of 32",
        "height is out of range; nearest valid: 1024x512 or 1056x512",
    ]
    assert all(v.limit == "multiples of 32 from 512 to 2048 px" for v in found)
    assert all("aimlapi" in (v.source or "") for v in found)


def test_all_aimlapi_limits_are_reported_together() -> None:
    request = EditRequest(
        prompt="p" * 4001,
        model="flux-2-pro",
        images=[URL] * 4,
        width=1000,
        height=768,
        seed=0,
        safety_tolerance=6,
        prompt_upsampling=True,
        steps=20,
    )
    with pytest.raises(RequestError) as caught:
        resolve(get_adapter("aimlapi"), request)
    assert [v.field for v in caught.value.violations] == [
        "images",
        "prompt",
        "seed",
        "safety_tolerance",
        "steps",
        "prompt_upsampling",
        "width/height",
    ]
    assert caught.value.provider == "aimlapi"


def test_local_image_limits(tmp_path: Path) -> None:
    too_big = tmp_path / "big.png"
    with too_big.open("wb") as out:
        out.write(image_bytes(64, 64))
        out.truncate(21 * 1024 * 1024)
    too_many_pixels = tmp_path / "wide.png"
    too_many_pixels.write_bytes(image_bytes(5000, 4001))
    gif = tmp_path / "anim.gif"
    gif.write_bytes(image_bytes(8, 8, "GIF"))
    request = EditRequest(prompt="x", model="flux-2-pro", images=[too_big, too_many_pixels, gif])
    found = check(request, "apiyi")
    assert [(v.field, v.message) for v in found] == [
        ("images[0]", f"{too_big} is too large"),
        ("images[1]", f"{too_many_pixels} has too many pixels"),
        (
            "images[2]",
            f"{gif} is a GIF image, which apiyi does not accept; it takes jpeg, png, webp",
        ),
    ]
    assert found[0].limit == "at most 20 MB"
    assert found[1].value == "5000x4001"
    assert found[2].value == "GIF"


def test_settings_only_where_the_model_has_them() -> None:
    flex = EditRequest(prompt="x", model="flux-2-flex", steps=50, guidance=1.5)
    pro = EditRequest(prompt="x", model="flux-2-pro", steps=50, guidance=1.5)
    assert check(flex, "apiyi") == ()
    assert fields(pro, "apiyi") == ["steps", "guidance"]
    assert fields(flex, "laozhang") == ["steps", "guidance"]  # laozhang documents neither
    out_of_range = EditRequest(prompt="x", model="flux-2-flex", steps=51, guidance=10.5)
    assert [v.limit for v in check(out_of_range, "apiyi")] == ["1..50", "1.5..10"]
    klein = EditRequest(prompt="x", model="flux-2-klein-4b", prompt_upsampling=True)
    assert fields(klein, "apiyi") == ["prompt_upsampling"]


def test_output_formats_and_safety_tolerance_per_provider() -> None:
    webp = EditRequest(prompt="x", model="flux-2-pro", output_format="webp")
    assert check(webp, "aimlapi") == ()
    assert fields(webp, "laozhang") == ["output_format"]
    six = EditRequest(prompt="x", model="flux-2-pro", safety_tolerance=6)
    assert check(six, "apiyi") == ()
    assert fields(six, "aimlapi") == ["safety_tolerance"]
    zero = EditRequest(prompt="x", model="flux-2-pro", safety_tolerance=0)
    assert fields(zero, "aimlapi") == ["safety_tolerance"]


def test_multipart_needs_uploads() -> None:
    url_image = EditRequest(prompt="x", model="flux-2-pro", images=[URL])
    [violation] = check(url_image, "apiyi-multipart")
    assert violation.field == "images[0]"
    assert "cannot take an image given as url" in violation.message
    text_only = EditRequest(prompt="x", model="flux-2-pro")
    assert fields(text_only, "apiyi-multipart") == ["images"]


def test_data_urls_are_checked_like_files() -> None:
    big = base64.b64encode(image_bytes(6000, 4000)).decode()
    request = EditRequest(prompt="x", model="flux-2-pro", images=[f"data:image/png;base64,{big}"])
    assert fields(request, "laozhang") == ["images[0]"]


@pytest.mark.parametrize(
    ("provider", "width", "height", "nearest"),
    [
        ("laozhang", 1000, 1000, "992x992 or 1008x1008"),  # the grid of 16
        ("aimlapi", 1000, 1000, "992x992 or 1024x1024"),  # the grid of 32
        ("aimlapi", 480, 512, "512x512"),  # below the smallest side: only the one above
        ("laozhang", 3000, 3000, "2048x2048"),  # past the largest side: clamped
        ("bfl", 3000, 3000, "2032x2032 or 2048x2048"),  # past 4 MP: scaled down to it
    ],
)
def test_a_size_it_cannot_take_names_the_nearest_valid_sizes(
    provider: ProviderId, width: int, height: int, nearest: str
) -> None:
    request = EditRequest(prompt="x", model="flux-2-pro", width=width, height=height)
    found = check(request, provider)
    assert found[-1].message.endswith(f"; nearest valid: {nearest}")
    for size in nearest.split(" or "):
        across, down = map(int, size.split("x"))
        exact = EditRequest(prompt="x", model="flux-2-pro", width=across, height=down)
        assert check(exact, provider) == ()  # each suggestion is taken as it is


def test_an_aspect_ratio_that_is_no_preset_names_the_presets_it_takes() -> None:
    [violation] = check(EditRequest(prompt="x", model="flux-2-pro", aspect_ratio="21:9"), "aimlapi")
    assert violation.message == (
        "is not one of aimlapi's aspect-ratio presets for flux-2-pro (1:1, 4:3, 3:4, 16:9, 9:16); "
        "pass one of them, width/height (e.g. 1568x672 for 21:9) or allow_conversions=True"
    )
    assert "takes explicit sizes" not in violation.message
    [sizes_only] = check(
        EditRequest(prompt="x", model="flux-2-pro", aspect_ratio="21:9"), "laozhang"
    )
    assert sizes_only.message.startswith(
        "laozhang takes explicit sizes for flux-2-pro, no aspect ratio"
    )


class TestConversions:
    def test_an_off_grid_size_becomes_the_nearest_valid_one_with_a_warning(self) -> None:
        request = EditRequest(
            prompt="x", model="flux-2-pro", width=1000, height=1010, allow_conversions=True
        )
        plan = resolve(get_adapter("laozhang"), request)
        assert plan.dimensions == (992, 1008)  # the nearer of 992x1008 and 1008x1024
        [warning] = plan.warnings
        assert (warning.field, warning.requested, warning.sent) == (
            "width/height",
            "1000x1010",
            "992x1008",
        )
        assert "multiples of 16" in warning.message

    def test_a_size_out_of_range_is_refused_even_with_conversions(self) -> None:
        request = EditRequest(
            prompt="x", model="flux-2-pro", width=3000, height=3000, allow_conversions=True
        )
        assert fields(request, "laozhang") == ["width/height"] * 5

    def test_refused_by_default_with_the_alternative_named(self) -> None:
        request = EditRequest(prompt="x", model="flux-2-pro", width=1792, height=1024)
        [violation] = check(request, "apiyi")
        assert 'pass aspect_ratio="7:4" or allow_conversions=True' in violation.message

    def test_size_becomes_a_ratio_with_a_warning(self) -> None:
        request = EditRequest(
            prompt="x", model="flux-2-pro", width=1792, height=1024, allow_conversions=True
        )
        plan = resolve(get_adapter("apiyi"), request)
        assert plan.ratio == (7, 4)
        assert plan.dimensions is None
        [warning] = plan.warnings
        assert (warning.field, warning.requested, warning.sent) == (
            "width/height",
            "1792x1024",
            "aspect_ratio 7:4",
        )

    def test_ratio_becomes_a_grid_size_near_one_megapixel(self) -> None:
        request = EditRequest(
            prompt="x", model="flux-2-pro", aspect_ratio="21:9", allow_conversions=True
        )
        plan = resolve(get_adapter("aimlapi"), request)
        assert plan.dimensions is not None
        width, height = plan.dimensions
        assert width % 32 == 0
        assert height % 32 == 0
        assert abs(width / height - 21 / 9) < 0.05
        assert 0.8e6 < width * height < 1.3e6
        assert plan.warnings[0].sent == f"{width}x{height}"

    def test_documented_presets_are_exact_and_need_no_permission(self) -> None:
        plan = resolve(
            get_adapter("aimlapi"), EditRequest(prompt="x", model="flux-2-pro", aspect_ratio="16:9")
        )
        assert (plan.preset, plan.warnings) == ("landscape_16_9", ())

    def test_ratio_out_of_range_is_refused_even_with_conversions(self) -> None:
        request = EditRequest(
            prompt="x", model="flux-kontext-pro", aspect_ratio="4:1", allow_conversions=True
        )
        [violation] = check(request, "laozhang")
        assert violation.limit == "from 3:7 to 7:3"

    def test_kontext_at_laozhang_takes_a_ratio(self) -> None:
        plan = resolve(
            get_adapter("laozhang"),
            EditRequest(prompt="x", model="flux-kontext-max", aspect_ratio="7:3"),
        )
        assert plan.ratio_text == "7:3"
