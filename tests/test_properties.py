"""Hypothesis properties of the pure core: translation never fails in an unplanned way."""

from __future__ import annotations

import base64
import json

from hypothesis import assume, given
from hypothesis import strategies as st

from flux_adapters import (
    MODELS,
    PROVIDERS,
    EditRequest,
    ModelId,
    ProviderId,
    ProviderName,
    check,
    get_adapter,
)
from flux_adapters._bodies import StreamedJson, json_segments, segments_length
from flux_adapters._flows import first_request, resolve
from flux_adapters.errors import RequestError
from flux_adapters.providers import BUILT_IN
from flux_adapters.providers._bfl_json import image_field
from flux_adapters.request import DataUrlImage
from flux_adapters.wire import JsonBody, MultipartBody, json_image
from tests.conftest import image_bytes

SMALL_IMAGES = [image_bytes(8 + n, 8, fmt) for n, fmt in enumerate(["PNG", "JPEG", "WEBP"])]

images = st.one_of(
    st.sampled_from(SMALL_IMAGES),
    st.builds(lambda n: f"https://example.com/{n}.png", st.integers(0, 99)),
    st.sampled_from(SMALL_IMAGES).map(
        lambda b: "data:image/png;base64," + base64.b64encode(b).decode()
    ),
    st.sampled_from([b"not an image", "no-scheme.png", "data:text/plain,hello"]),
)
maybe_int = st.one_of(st.none(), st.integers(-2, 70))
geometry: st.SearchStrategy[dict[str, object]] = st.one_of(
    st.fixed_dictionaries({}),
    st.fixed_dictionaries({"width": st.integers(1, 4200), "height": st.integers(1, 4200)}),
    st.builds(lambda w, h: {"size": f"{w}x{h}"}, st.integers(1, 3000), st.integers(1, 3000)),
    st.builds(lambda w, h: {"aspect_ratio": f"{w}:{h}"}, st.integers(1, 25), st.integers(1, 25)),
    st.fixed_dictionaries({"width": st.integers(1, 100)}),
)


@st.composite
def request_arguments(draw: st.DrawFn) -> dict[str, object]:
    arguments: dict[str, object] = {
        "prompt": draw(st.text(min_size=0, max_size=60)),
        "model": draw(st.sampled_from([*MODELS, "flux-1-dev"])),
        "images": draw(st.lists(images, max_size=10)),
        "seed": draw(maybe_int),
        "output_format": draw(st.sampled_from([None, "jpeg", "png", "webp", "gif"])),
        "safety_tolerance": draw(maybe_int),
        "prompt_upsampling": draw(st.sampled_from([None, True, False])),
        "steps": draw(maybe_int),
        "guidance": draw(st.one_of(st.none(), st.floats(0, 25, allow_nan=False))),
        "allow_conversions": draw(st.booleans()),
    }
    arguments.update(draw(geometry))
    return arguments


@given(arguments=request_arguments(), provider=st.sampled_from(sorted(PROVIDERS)))
def test_any_request_translates_or_raises_request_error(
    arguments: dict[str, object], provider: ProviderName
) -> None:
    try:
        request = EditRequest(**arguments)  # type: ignore[arg-type]
    except RequestError as error:
        assert error.violations  # construction problems are reported, never a bare crash
        return
    adapter = get_adapter(provider)
    try:
        plan = resolve(adapter, request)
    except RequestError as error:
        assert error.violations
        assert check(request, provider) == error.violations
        return
    assert check(request, provider) == ()
    wire = first_request(adapter, request, plan, "https://api.example")
    assert wire.method == "POST"
    assert wire.role == "submit"
    if provider in BUILT_IN:  # an installed provider package (Nimbus) has paths of its own
        path = wire.url.removeprefix("https://api.example/")
        assert path.startswith("v1/images/") or path.endswith(plan.wire_model), wire.url


def sent_images(wire_body: JsonBody | MultipartBody | None, provider: str) -> list[object]:
    if isinstance(wire_body, MultipartBody):
        return [part.image for part in wire_body.files]
    assert isinstance(wire_body, JsonBody)
    body = wire_body.materialize()
    if provider in ("aimlapi", "fal"):
        urls = body.get("image_urls", [body["image_url"]] if "image_url" in body else [])
        assert isinstance(urls, list)
        return urls
    numbered = [key for key in body if key.startswith("input_image")]
    assert numbered == [image_field(index) for index in range(len(numbered))]
    return [body[key] for key in numbered]


# The built-in providers, whose bodies `sent_images` knows; an installed provider package
# checks its own (tests/test_outside_provider.py for Nimbus).
@given(
    count=st.integers(0, 8),
    provider=st.sampled_from(sorted(BUILT_IN)),
    model=st.sampled_from(MODELS),
)
def test_image_order_and_count_survive_translation(
    count: int, provider: ProviderId, model: ModelId
) -> None:
    sources = [image_bytes(8 + n, 8) for n in range(count)]
    request = EditRequest(prompt="p", model=model, images=sources)
    adapter = get_adapter(provider)
    assume(not check(request, provider))
    wire = first_request(adapter, request, resolve(adapter, request), "https://api.example")
    sent = sent_images(wire.body, provider)
    assert len(sent) == count
    for original, value in zip(sources, sent, strict=True):
        if hasattr(value, "data"):  # a multipart file
            data = value.data
        elif provider == "bfl":  # BFL takes plain base64
            assert not str(value).startswith("data:")
            data = base64.b64decode(str(value))
        else:
            data = base64.b64decode(str(value).split(",", 1)[1])
        assert data == original


@given(payload=st.binary(min_size=1, max_size=4000))
def test_data_urls_round_trip_their_bytes(payload: bytes) -> None:
    text = "data:image/png;base64," + base64.b64encode(payload).decode()
    [image] = EditRequest(prompt="p", model="flux-2-pro", images=[text]).images
    assert isinstance(image, DataUrlImage)
    assert image.decode() == payload
    assert image.info.byte_size == len(payload)


@given(
    payloads=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=3),
    prompt=st.text(max_size=40),
    seed=st.integers(0, 2**40),
)
def test_streamed_json_equals_the_materialized_body(
    payloads: list[bytes], prompt: str, seed: int
) -> None:
    request = EditRequest(prompt="p", model="flux-2-pro", images=payloads)
    body = JsonBody(
        {
            "prompt": prompt,
            "seed": seed,
            "images": [json_image(image) for image in request.images],
            "nested": {"w": 1, "ok": True, "none": None},
        }
    )
    segments = json_segments(body)
    streamed = b"".join(StreamedJson(segments))
    assert len(streamed) == segments_length(segments)
    materialized = body.materialize()
    assert json.loads(streamed) == materialized
    urls = materialized["images"]
    assert isinstance(urls, list)
    assert [base64.b64decode(url.split(",", 1)[1]) for url in urls] == payloads
