"""Limits and prices checked against the figures the providers' own documents state.

Each test quotes the document it holds the code to; the audit that found the difference is in
the commit that added the test.
"""

import base64
from pathlib import Path

import pytest

from flux_adapters import EditRequest, ModelId, check
from flux_adapters.errors import ConfigurationError
from flux_adapters.limits import plan
from flux_adapters.prices import PerMegapixel, estimate
from flux_adapters.providers import bfl, fal, laozhang
from tests.conftest import image_bytes


def _fal_estimate(model: ModelId, width: int, height: int, *images: bytes) -> float | None:
    request = EditRequest(prompt="x", model=model, width=width, height=height, images=list(images))
    return estimate(request, plan(request, fal.LIMITS[model]), shipped=fal.PRICES)


@pytest.mark.parametrize(
    ("model", "width", "height", "usd"),
    [
        # flex/edit: "a 1024x1024 image will cost $0.05, and a 1920x1080 image will cost $0.10
        # ($0.05 x 2 megapixels)". 1920x1088, the 16-grid size nearest 1920x1080, is as many
        # megapixels of either kind.
        ("flux-2-flex", 1024, 1024, 0.05),
        ("flux-2-flex", 1920, 1088, 0.10),
        # pro/edit: "$0.03 first output MP + $0.015 per extra MP ...; 1920x1080 = $0.045".
        ("flux-2-pro", 1920, 1088, 0.045),
        ("flux-2-pro", 1024, 1024, 0.03),
        # max/edit: "$0.07 first MP + $0.03 per additional".
        ("flux-2-max", 2048, 2048, 0.07 + 3 * 0.03),
    ],
)
def test_fal_counts_a_megapixel_as_1024_by_1024(
    model: ModelId, width: int, height: int, usd: float
) -> None:
    # Was: a million pixels, so 1024x1024 was two megapixels and 1920x1080 three: fal's own
    # examples were estimated at up to half again their price (budgets and "cheapest" routing).
    assert _fal_estimate(model, width, height) == pytest.approx(usd)


def test_fal_counts_input_megapixels_by_the_same_unit() -> None:
    # "Input images counted as processed megapixel": a 1024x1024 reference is one more.
    reference = image_bytes(1024, 1024)
    assert _fal_estimate("flux-2-pro", 1024, 1024, reference) == pytest.approx(0.045)


def test_bfl_keeps_a_million_pixels_to_the_megapixel() -> None:
    # BFL does not say which megapixel it bills (and reports its own cost once a job is taken);
    # its estimate stays at a million pixels, the larger of the two.
    price = bfl.PRICES["flux-2-pro"]
    assert isinstance(price, PerMegapixel)
    assert price.pixels_per_mp == 1_000_000


@pytest.mark.parametrize("unit", [0, -1, 1.5, True, 10**10])
def test_a_megapixel_of_no_pixels_is_refused(unit: object) -> None:
    from flux_adapters._declared import check_price

    price = PerMegapixel(usd_first=0.03, usd_extra=0.015, pixels_per_mp=unit)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="megapixel as a whole number of pixels"):
        check_price(price, "prices")


@pytest.mark.parametrize("model", list(laozhang.LIMITS))
def test_laozhang_rows_cite_the_overview_they_come_from(model: str) -> None:
    # Seed 001 (sizes 64-2048, Kontext 3:7..7:3, safety_tolerance 0-6) is laozhang's "Flux Image
    # Generation API" page, .../api-capabilities/flux-image-generation; the rows cited
    # .../api-capabilities/flux-image, which is not it.
    source = laozhang.LIMITS[model].source
    assert "https://docs.laozhang.ai/en/api-capabilities/flux-image-generation " in source
    assert "api-capabilities/flux-image " not in source


def _pictures(count: int, width: int, height: int) -> list[bytes]:
    return [image_bytes(width, height, color=color) for color in ("red", "blue", "green")[:count]]


def test_bfl_pro_takes_at_most_nine_megapixels_of_references_together() -> None:
    # "[pro] API: Up to 8 images (9MP total limit)" (help.bfl.ai, "How do I reference specific
    # images when editing"). Was: eight 4 MP references went out, 32 MP in all.
    three = _pictures(3, 2048, 1536)  # 3 MP each (1024 x 1024 to the MP): 9 MP, the limit
    fits = EditRequest(prompt="x", model="flux-2-pro", images=three)
    assert check(fits, "bfl") == ()
    over = EditRequest(prompt="x", model="flux-2-pro", images=[*three, image_bytes(64, 64)])
    [violation] = check(over, "bfl")
    assert violation.field == "images"
    assert violation.limit == "at most 9 MP in all"
    assert violation.value == "9.00 MP"  # 9 MP and 4096 pixels, shown to two places
    assert "help.bfl.ai/articles/3531680306" in (violation.source or "")


def test_the_nine_megapixels_are_pro_s_and_count_only_what_can_be_measured() -> None:
    many = _pictures(3, 2048, 2048)  # 12 MP
    assert check(EditRequest(prompt="x", model="flux-2-max", images=many), "bfl") == ()
    assert check(EditRequest(prompt="x", model="flux-2-pro", images=many), "laozhang") == ()
    urls = ["https://example.com/big.png"] * 8  # sizes unknown before sending: not refused
    assert check(EditRequest(prompt="x", model="flux-2-pro", images=urls), "bfl") == ()


def test_the_emulator_refuses_what_bfl_pro_refuses() -> None:
    from flux_adapters.emulator._job_dialects import Problem
    from flux_adapters.emulator._job_dialects import bfl as bfl_dialect

    pictures = _pictures(3, 2048, 2048)
    body = {"prompt": "x"} | {
        ("input_image" if n == 0 else f"input_image_{n + 1}"): base64.b64encode(p).decode()
        for n, p in enumerate(pictures)
    }
    answer = bfl_dialect("flux-2-pro", body)
    assert isinstance(answer, list)
    assert [problem.loc for problem in answer] == [("body", "input_image")]
    assert isinstance(answer[0], Problem)
    assert "at most 9 MP in all" in answer[0].msg
    assert not isinstance(bfl_dialect("flux-2-max", body), list)


def test_a_price_in_other_megapixels_says_so() -> None:
    # `flux-adapters models` shows describe(): the figures alone read as a million pixels.
    assert fal.PRICES["flux-2-pro"].describe() == (
        "$0.03 first MP + $0.015 per further MP + $0.015 per input MP, 1 MP = 1024x1024 px "
        "(as of 2026-11-22)"
    )
    assert "1 MP =" not in bfl.PRICES["flux-2-pro"].describe()


def test_a_configured_price_may_say_its_megapixel(tmp_path: Path) -> None:
    # Overriding fal's figures in the file must not silently go back to a million pixels.
    from flux_adapters.config import load_config

    file = tmp_path / "flux-adapters.toml"
    file.write_text(
        '[provider.fal.prices]\n"flux-2-pro" = '
        "{ usd_first = 0.03, usd_extra = 0.015, usd_input = 0.015, pixels_per_mp = 1048576 }\n"
    )
    [settings] = load_config(file, environ={}).providers
    price = settings.prices["flux-2-pro"]
    assert isinstance(price, PerMegapixel)
    assert price.pixels_per_mp == 1024 * 1024
    file.write_text('[provider.fal.prices]\n"flux-2-pro" = { usd = 0.04, pixels_per_mp = 1 }\n')
    with pytest.raises(ConfigurationError, match="do not go together"):
        load_config(file, environ={})
    file.write_text(
        '[provider.fal.prices]\n"flux-2-pro" = { usd_first = 0.03, usd_extra = 0.01, '
        "pixels_per_mp = 0 }\n"
    )
    with pytest.raises(ConfigurationError, match="pixels_per_mp must be a whole number"):
        load_config(file, environ={})
