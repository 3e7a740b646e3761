"""The emulator: each document's own examples are accepted, what the provider would reject is
rejected with a readable 4xx, result URLs expire, and every fault behaves as injected."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from flux_adapters import EditRequest, FluxClient, ProviderId, errors
from flux_adapters.emulator import Emulator, Fault, run_emulator
from tests.conftest import image_bytes
from tests.test_seed_examples import EXAMPLES, MULTIPART_EXAMPLES, Example, local

HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
"""The module's own requests to the emulator: `httpx.get()` builds a client, certificates
and all, for every call (about 25 ms of CPU). Each request still has a connection of its own,
closed with its answer, as with `httpx.get()`: none is left open when the tests end."""

KEY = {"Authorization": "Bearer any-key"}


@pytest.fixture(scope="module")
def running() -> Iterator[Emulator]:
    with run_emulator(bad_keys={"revoked-key"}) as emulator:
        yield emulator


@pytest.fixture
def emulator(running: Emulator) -> Iterator[Emulator]:
    yield running
    running.clear_faults()
    running.ttl = 600.0


def post(emulator: Emulator, path: str, **kwargs: object) -> httpx.Response:
    headers = kwargs.pop("headers", KEY)
    return HTTP.post(f"{emulator.url}{path}", headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


PREFIX = {"laozhang": "/laozhang", "apiyi": "/apiyi", "aimlapi": "/aimlapi"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.provider}: {e.where}")
def test_every_json_example_of_the_documents_is_accepted(
    example: Example, emulator: Emulator, tmp_path: Path
) -> None:
    response = post(
        emulator, PREFIX[example.provider] + example.path, json=example.expected(tmp_path)
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["url"].startswith(emulator.url + "/files/")


@pytest.mark.parametrize(
    ("where", "model", "prompt", "size", "names"), MULTIPART_EXAMPLES, ids=lambda v: str(v)[:40]
)
def test_every_multipart_example_of_the_documents_is_accepted(
    where: str,
    model: str,
    prompt: str,
    size: str,
    names: list[str],
    emulator: Emulator,
    tmp_path: Path,
) -> None:
    # The OpenAI SDK sends a single file as "image", several as "image[]"; both are examples.
    field = "image" if len(names) == 1 and "SDK" in where else "image[]"
    files = [(field, (name, local(tmp_path, name).read_bytes(), "image/png")) for name in names]
    response = post(
        emulator,
        "/apiyi/v1/images/edits",
        data={"model": model, "prompt": prompt, "size": size},
        files=files,
    )
    assert response.status_code == 200, response.text


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def claiming(data: bytes, width: int, height: int) -> bytes:
    """A small real PNG or JPEG whose header claims *width* x *height* (a decompression bomb)."""
    if data.startswith(b"\x89PNG"):
        # IHDR is the first chunk: length, type, then width and height; its CRC follows the data.
        ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
        return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    # A baseline JPEG's SOF0 segment: marker, length, precision, then height and width.
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


GOOD = {"model": "flux-2-pro", "prompt": "a robot"}
REJECTED = [
    ("/laozhang", {"model": "flux-2-pro"}, "prompt is required"),
    ("/laozhang", GOOD | {"style": "vivid"}, "unknown parameter 'style'"),
    ("/laozhang", GOOD | {"seed": "42"}, "seed must be an integer"),
    ("/laozhang", GOOD | {"model": "flux-9"}, "model 'flux-9' is not available"),
    ("/laozhang", GOOD | {"width": 1000, "height": 1024}, "not allowed: multiples of 16"),
    ("/laozhang", GOOD | {"width": 4096, "height": 1024}, "not allowed"),
    ("/laozhang", GOOD | {"size": "1024x1024", "width": 1024, "height": 1024}, "not both"),
    ("/laozhang", GOOD | {f"input_image{'' if n == 1 else f'_{n}'}": "https://ex.com/a.png" for n in range(1, 9)} | {"input_image_9": "https://ex.com/x.png"}, "unknown parameter 'input_image_9'"),
    ("/laozhang", GOOD | {"input_image_2": "https://ex.com/a.png"}, "numbered without gaps"),
    ("/laozhang", GOOD | {"input_image": "data:image/png;base64,@@@@"}, "invalid base64"),
    ("/laozhang", GOOD | {"input_image": "ftp://ex.com/a.png"}, "public http(s) URL or a data:image"),
    ("/laozhang", GOOD | {"input_image": data_url(image_bytes(16, 16, "GIF"))}, "accepted: jpeg, png, webp"),
    ("/laozhang", GOOD | {"input_image": data_url(image_bytes(8, 8) + bytes(21 * 1024 * 1024))}, "at most 20 MB"),
    # Decompression bombs: tiny files whose headers claim more pixels than the 20 MP rule allows
    # (10000x10000 sits in the band where Pillow would only warn): refused before decoding.
    ("/laozhang", GOOD | {"input_image": data_url(claiming(image_bytes(8, 8), 30000, 30000))}, "30000x30000 pixels; at most 20 MP"),
    ("/laozhang", GOOD | {"input_image": data_url(claiming(image_bytes(8, 8), 10000, 10000))}, "10000x10000 pixels; at most 20 MP"),
    ("/apiyi", GOOD | {"input_image": data_url(claiming(image_bytes(8, 8, "JPEG"), 60000, 60000))}, "60000x60000 pixels; at most 20 MP"),
    # Truncated or corrupt images are refused while validating, not found broken while rendering.
    ("/laozhang", GOOD | {"input_image": data_url(image_bytes(300, 300)[:300])}, "truncated or corrupt png image"),
    ("/apiyi", GOOD | {"input_image": data_url(image_bytes(300, 300, "JPEG")[:200])}, "not a readable jpeg image"),
    ("/aimlapi", {"model": "blackforestlabs/flux-2-pro-edit", "prompt": "p", "image_urls": [data_url(image_bytes(300, 300, "WEBP")[:100])]}, "webp image"),
    ("/laozhang", GOOD | {"input_image": data_url(b"\x89PNG\r\n\x1a\n" + bytes(64))}, "not a readable png image"),
    ("/apiyi", GOOD | {"width": 1024, "height": 1024}, "unknown parameter 'width'"),
    ("/apiyi", GOOD | {"steps": 20}, "only supported by flux-2-flex"),
    ("/apiyi", {"model": "flux-2-flex", "prompt": "p", "guidance": 11}, "guidance must be a number from 1.5 to 10"),
    ("/apiyi", {"model": "flux-kontext-pro", "prompt": "p", "input_image": "https://a.ex/1.png", "input_image_2": "https://a.ex/2.png"}, "takes 0..1 reference images"),
    ("/aimlapi", {"model": "blackforestlabs/flux-2-pro-edit", "prompt": "p", "image_urls": ["https://a.ex/1.png"] * 4}, "takes 0..3 reference images"),
    ("/aimlapi", {"model": "blackforestlabs/flux-2-pro", "prompt": "p", "image_size": {"width": 1040, "height": 768}}, "multiples of 32"),
    ("/aimlapi", {"model": "blackforestlabs/flux-2-pro", "prompt": "p", "safety_tolerance": 2}, "(a string)"),
    ("/aimlapi", {"model": "blackforestlabs/flux-2-pro", "prompt": "p" * 4001}, "at most 4000"),
    ("/aimlapi", {"model": "blackforestlabs/flux-2-pro", "prompt": "p", "seed": 0}, "seed must be at least 1"),
]  # fmt: skip


@pytest.mark.parametrize(("prefix", "body", "message"), REJECTED, ids=[m for _, _, m in REJECTED])
def test_what_the_provider_would_reject_gets_a_readable_4xx(
    prefix: str, body: dict[str, object], message: str, emulator: Emulator
) -> None:
    response = post(emulator, f"{prefix}/v1/images/generations", json=body)
    assert response.status_code == 400
    assert message in response.text


def test_wrong_content_types_and_missing_or_revoked_keys(emulator: Emulator) -> None:
    assert (
        post(
            emulator,
            "/laozhang/v1/images/generations",
            content=b"prompt=x",
            headers=KEY | {"Content-Type": "text/plain"},
        ).status_code
        == 415
    )
    assert post(emulator, "/apiyi/v1/images/edits", json=GOOD).status_code == 415
    missing = post(emulator, "/apiyi/v1/images/generations", json=GOOD, headers={})
    assert missing.status_code == 401
    assert "No API key provided" in missing.text
    assert (
        post(
            emulator,
            "/aimlapi/v1/images/generations",
            json=GOOD,
            headers={"Authorization": "Bearer revoked-key"},
        ).status_code
        == 401
    )


def test_multipart_rejections(emulator: Emulator) -> None:
    png = image_bytes(32, 32)
    fields = {"model": "flux-2-klein-4b", "prompt": "p"}
    five = [("image[]", (f"{n}.png", png, "image/png")) for n in range(5)]
    assert (
        "takes 1..4 reference images"
        in post(emulator, "/apiyi/v1/images/edits", data=fields, files=five).text
    )
    off_grid = post(
        emulator,
        "/apiyi/v1/images/edits",
        data=fields | {"width": "1000", "height": "1000"},
        files=five[:1],
    )
    assert off_grid.status_code == 400
    assert "multiples of 16" in off_grid.text
    wrong_field = post(
        emulator,
        "/apiyi/v1/images/edits",
        data=fields,
        files=[("images", ("a.png", png, "image/png"))],
    )
    assert "send images as image[]" in wrong_field.text


def test_output_has_the_requested_size_and_format(emulator: Emulator) -> None:
    body = GOOD | {"size": "1792x1024", "output_format": "png"}
    url = post(emulator, "/laozhang/v1/images/generations", json=body).json()["data"][0]["url"]
    picture = HTTP.get(url)
    assert picture.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(picture.content)) as image:
        assert (image.format, image.size) == ("PNG", (1792, 1024))


def test_edits_without_a_size_take_the_first_image_size(emulator: Emulator) -> None:
    body = {
        "model": "flux-2-pro",
        "prompt": "p",
        "input_image": data_url(image_bytes(320, 240)),
        "input_image_2": data_url(image_bytes(64, 64)),
    }
    url = post(emulator, "/apiyi/v1/images/generations", json=body).json()["data"][0]["url"]
    with Image.open(io.BytesIO(HTTP.get(url).content)) as image:
        assert image.size == (320, 240)


def test_output_is_deterministic_for_a_seed(emulator: Emulator) -> None:
    body = GOOD | {"seed": 5, "output_format": "png"}
    first, second = (
        HTTP.get(
            post(emulator, "/laozhang/v1/images/generations", json=body).json()["data"][0]["url"]
        ).content
        for _ in range(2)
    )
    other = HTTP.get(
        post(emulator, "/laozhang/v1/images/generations", json=body | {"seed": 6}).json()["data"][
            0
        ]["url"]
    ).content
    assert first == second
    assert first != other


def test_result_urls_expire_and_are_signed(emulator: Emulator) -> None:
    url = post(emulator, "/laozhang/v1/images/generations", json=GOOD).json()["data"][0]["url"]
    assert HTTP.get(url).status_code == 200
    assert HTTP.get(url.replace("signature=", "signature=0")).status_code == 403
    with run_emulator() as expiring:  # its own: the module's emulator keeps its clock
        expiring.ttl = 0.2
        short = post(expiring, "/laozhang/v1/images/generations", json=GOOD).json()
        expiring.advance_clock(1.3)  # expiry is checked in whole seconds
        expired = HTTP.get(short["data"][0]["url"])
    assert expired.status_code == 403
    assert "Request has expired" in expired.text


def client(emulator: Emulator, provider: ProviderId = "laozhang") -> FluxClient:
    return FluxClient(
        provider, api_key="test-key", base_url=emulator.base_url(provider), timeout=10
    )


@pytest.mark.parametrize(
    ("fault", "expected", "status"),
    [
        (Fault(status=429, retry_after=3), errors.RateLimited, 429),
        (Fault(status=402), errors.InsufficientBalance, 402),
        (Fault(status=500), errors.ProviderUnavailable, 500),
        (Fault(status=502), errors.ProviderUnavailable, 502),
        (Fault(status=503), errors.ProviderUnavailable, 503),
        (Fault(moderation=True), errors.ContentModerated, 400),
        (Fault(body="malformed"), errors.ResponseFormatError, 200),
        (Fault(body="empty"), errors.ResponseFormatError, 200),
    ],
    ids=lambda value: str(value)[:30],
)
def test_each_fault_reaches_the_client_as_its_typed_error(
    fault: Fault, expected: type[errors.ProviderError], status: int, emulator: Emulator
) -> None:
    emulator.inject("laozhang", fault)
    with pytest.raises(expected) as caught, client(emulator) as flux:
        flux.edit(EditRequest(prompt="p", model="flux-2-pro"))
    assert caught.value.status_code == status
    if isinstance(caught.value, errors.RateLimited):
        assert caught.value.retry_after == 3.0


def test_a_dropped_connection_may_have_been_received(emulator: Emulator) -> None:
    emulator.inject("apiyi", Fault(drop=True))
    before = len(emulator.calls("apiyi"))
    with pytest.raises(errors.TransportError) as caught, client(emulator, "apiyi") as flux:
        flux.edit(EditRequest(prompt="p", model="flux-2-pro"))
    assert caught.value.sent is True
    assert len(emulator.calls("apiyi")) == before + 1


def test_delay_and_first_n_calls(emulator: Emulator) -> None:
    emulator.inject("aimlapi", Fault(status=503, first=2))
    emulator.inject("aimlapi", Fault(delay=0.3))
    with client(emulator, "aimlapi") as flux:
        for _ in range(2):
            with pytest.raises(errors.ProviderUnavailable):
                flux.edit(EditRequest(prompt="p", model="flux-2-pro"))
        started = time.perf_counter()
        assert flux.edit(EditRequest(prompt="p", model="flux-2-pro")).provider == "aimlapi"
        assert time.perf_counter() - started >= 0.3


def test_a_read_timeout_during_a_delay_is_reported_as_maybe_sent(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(delay=2))
    flux = FluxClient(
        "laozhang", api_key="test-key", base_url=emulator.base_url("laozhang"), timeout=0.5
    )
    with pytest.raises(errors.Timeout) as caught, flux:
        flux.edit(EditRequest(prompt="p", model="flux-2-pro"))
    assert caught.value.sent is True


def test_faults_parse_from_the_command_line_form() -> None:
    assert Fault.parse("429,retry-after=2,first=1") == Fault(status=429, retry_after=2.0, first=1)
    assert Fault.parse("drop") == Fault(drop=True)
    assert Fault.parse("malformed,delay=0.5") == Fault(body="malformed", delay=0.5)
    with pytest.raises(ValueError, match="unknown fault part"):
        Fault.parse("teapot")
