"""Every adapter against the emulator over real loopback sockets: text-to-image, a one-image
edit and a multi-image edit, each downloaded; sync and async alike."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, ProviderId, errors
from flux_adapters.emulator import Emulator, run_emulator
from tests.conftest import image_bytes


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


# Per provider: how to ask for a 1024x768 output in the form it takes.
SIZED = {
    "laozhang": {"width": 1024, "height": 768},
    "apiyi": {"aspect_ratio": "4:3"},
    "apiyi-multipart": {"size": "1024x768"},
    "aimlapi": {"width": 1024, "height": 768},
}
EXPECTED = {
    "laozhang": (1024, 768),
    "apiyi": (1184, 880),
    "apiyi-multipart": (1024, 768),
    "aimlapi": (1024, 768),
}


def requests(provider: str, tmp_path: Path) -> dict[str, EditRequest]:
    robot = tmp_path / "robot.png"
    robot.write_bytes(image_bytes(300, 400, color="red"))
    scene, prop = (
        image_bytes(600, 400, "JPEG", color="green"),
        image_bytes(100, 100, "WEBP", color="yellow"),
    )
    cases: dict[str, list[object]] = {
        "one-image edit": [robot],
        "multi-image edit": [robot, scene, prop],
    }
    if provider != "apiyi-multipart":  # the multipart endpoint is for edits only
        cases["text-to-image"] = []
    return {
        name: EditRequest(
            prompt="image 1 in image 2",
            model="flux-2-pro",
            images=images,
            seed=3,
            **SIZED[provider],
        )  # type: ignore[arg-type]
        for name, images in cases.items()
    }


def check_image(data: bytes, provider: str) -> None:
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.size == EXPECTED[provider]


@pytest.mark.parametrize("provider", ["laozhang", "apiyi", "apiyi-multipart", "aimlapi"])
def test_sync(provider: ProviderId, emulator: Emulator, tmp_path: Path) -> None:
    with FluxClient(provider, api_key="test-key", base_url=emulator.base_url(provider)) as client:
        for name, request in requests(provider, tmp_path).items():
            result = client.edit(request)
            assert (result.provider, result.model) == (provider, "flux-2-pro"), name
            saved = result.images[0].save(tmp_path / f"{name}.out")
            check_image(saved.read_bytes(), provider)


@pytest.mark.parametrize("provider", ["laozhang", "apiyi", "apiyi-multipart", "aimlapi"])
def test_async(provider: ProviderId, emulator: Emulator, tmp_path: Path) -> None:
    async def run() -> list[EditResult]:
        async with AsyncFluxClient(
            provider, api_key="test-key", base_url=emulator.base_url(provider)
        ) as client:
            results = await asyncio.gather(
                *(client.edit(r) for r in requests(provider, tmp_path).values())
            )
            for result in results:
                check_image(await result.images[0].read_async(), provider)
            return list(results)

    assert {result.provider for result in asyncio.run(run())} == {provider}


def test_an_expired_result_url_raises_result_expired(emulator: Emulator) -> None:
    with FluxClient("aimlapi", api_key="test-key", base_url=emulator.base_url("aimlapi")) as client:
        result = client.edit(EditRequest(prompt="p", model="flux-2-pro"))
        emulator.advance_clock(emulator.ttl + 1)
        try:
            with pytest.raises(errors.ResultExpired) as caught:
                result.images[0].read()
        finally:
            emulator.advance_clock(-(emulator.ttl + 1))
    assert caught.value.status_code == 403
